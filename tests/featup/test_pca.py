"""Tests of featup.pca against a numpy SVD reference and basic PCA properties."""

import numpy as np
import pytest
import torch

from featup.errors import ConfigError, InputError
from featup.pca import PCA, fit_pca, flatten_pixels


def _data(n: int = 200, c: int = 12, seed: int = 0) -> torch.Tensor:
    """Rows with distinct per-direction variances so components are well separated."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(5.0, 0.1, c, dtype=torch.float64)
    return torch.randn(n, c, generator=g, dtype=torch.float64) * scales + 3.0


def _numpy_reference(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and top-k principal axes from numpy's SVD, with the largest-|entry|-positive sign rule."""
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    comps = vt[:k]
    pivots = np.abs(comps).argmax(axis=1)
    comps = comps * np.sign(comps[np.arange(k), pivots])[:, None]
    return mean, comps


def test_fit_matches_numpy_svd_reference():
    x = _data()
    pca = fit_pca(x, 4)
    mean, comps = _numpy_reference(x.numpy(), 4)
    np.testing.assert_allclose(pca.mean.numpy(), mean, atol=1e-10)
    np.testing.assert_allclose(pca.components.numpy(), comps, atol=1e-8)


def test_transform_equals_centred_projection_reference():
    x = _data()
    pca = fit_pca(x, 3)
    mean, comps = _numpy_reference(x.numpy(), 3)
    np.testing.assert_allclose(pca.transform(x).numpy(), (x.numpy() - mean) @ comps.T, atol=1e-8)


def test_components_orthonormal_and_variance_sorted():
    x = _data()
    pca = fit_pca(x, 5)
    gram = pca.components @ pca.components.T
    torch.testing.assert_close(gram, torch.eye(5, dtype=torch.float64))
    variances = pca.transform(x).var(dim=0)
    assert torch.all(variances[:-1] >= variances[1:])


def test_sign_convention_is_deterministic_under_data_negation_and_repeat():
    x = _data()
    a, b = fit_pca(x, 3), fit_pca(x, 3)
    torch.testing.assert_close(a.components, b.components, rtol=0, atol=0)
    flipped = fit_pca(-x, 3)  # same axes, SVD may return either sign
    torch.testing.assert_close(flipped.components, a.components)
    pivots = a.components.abs().argmax(dim=1)
    assert torch.all(a.components[torch.arange(3), pivots] > 0)


def test_bchw_path_equals_flattened_rows():
    g = torch.Generator().manual_seed(1)
    maps = torch.randn(2, 6, 5, 7, generator=g)  # (B, C, H, W)
    rows = maps.permute(0, 2, 3, 1).reshape(-1, 6)  # (B*H*W, C)
    torch.testing.assert_close(flatten_pixels(maps), rows)
    pca_maps, pca_rows = fit_pca(maps, 3), fit_pca(rows, 3)
    torch.testing.assert_close(pca_maps.components, pca_rows.components)
    out = pca_maps.transform(maps)  # (B, K, H, W)
    assert out.shape == (2, 3, 5, 7)
    expected = pca_rows.transform(rows).reshape(2, 5, 7, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(out, expected)


def test_float32_input_fits_in_float32_close_to_float64():
    x = _data()
    pca32, pca64 = fit_pca(x.float(), 3), fit_pca(x, 3)
    assert pca32.components.dtype == torch.float32
    torch.testing.assert_close(pca32.components.double(), pca64.components, atol=1e-4, rtol=0)


def test_project_only_is_linear_part_and_commutes_with_bilinear_upsampling():
    g = torch.Generator().manual_seed(2)
    maps = torch.randn(1, 8, 4, 4, generator=g, dtype=torch.float64)
    pca = fit_pca(maps, 3)
    torch.testing.assert_close(pca.project_only(maps) - pca.offset().view(1, -1, 1, 1), pca.transform(maps))
    up = torch.nn.functional.interpolate
    lhs = pca.project_only(up(maps, size=(12, 12), mode="bilinear"))
    rhs = up(pca.project_only(maps), size=(12, 12), mode="bilinear")
    torch.testing.assert_close(lhs, rhs)


def test_inverse_transform_reconstructs_data_in_span():
    g = torch.Generator().manual_seed(3)
    low_rank = torch.randn(100, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 9, generator=g, dtype=torch.float64)
    x = low_rank + 1.5
    pca = fit_pca(x, 2)
    torch.testing.assert_close(pca.inverse_transform(pca.transform(x)), x)
    maps = x.reshape(4, 5, 5, 9).permute(0, 3, 1, 2)
    torch.testing.assert_close(pca.inverse_transform(pca.transform(maps)), maps)


def test_subsampling_fits_rows_drawn_through_the_generator():
    x = _data(n=500)
    a = fit_pca(x, 2, max_samples=100)
    b = fit_pca(x, 2, max_samples=100, generator=torch.Generator().manual_seed(0))
    c = fit_pca(x, 2, max_samples=100, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a.mean, b.mean, rtol=0, atol=0)
    assert not torch.equal(a.mean, c.mean)
    rows = x[torch.randperm(500, generator=torch.Generator().manual_seed(7))[:100]]
    reference = fit_pca(rows, 2)
    torch.testing.assert_close(c.mean, reference.mean)
    torch.testing.assert_close(c.components, reference.components)


def test_bad_k_and_shapes_raise():
    x = _data(n=10, c=4)
    with pytest.raises(ConfigError, match="k"):
        fit_pca(x, 5)
    with pytest.raises(InputError, match=r"\(N, C\) or \(B, C, H, W\)"):
        fit_pca(torch.zeros(3, 4, 5), 2)
    pca = fit_pca(x, 2)
    assert isinstance(pca, PCA) and pca.k == 2 and pca.dim == 4
    with pytest.raises(InputError, match="expected shape"):
        pca.transform(torch.zeros(3, 5))
