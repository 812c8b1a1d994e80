"""Bicubic 2x + reflect pad + per-pixel filter, composed over the source, against the upsample-then-filter math."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from featup.errors import InputError
from featup.ops.adaptive_conv import adaptive_conv_unfold, bilateral_kernel
from featup.ops.resample import bicubic_matrix_2x
from featup.ops.upsample_filter import composed_conv, resample_taps, upsample_filter, window

BACKENDS = ["eager", "compiled"]


def _published(source: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """The published order: bicubic upsample, reflect pad, unfolded per-pixel filter."""
    radius = int(filters.shape[1] ** 0.5) // 2
    upsampled = F.interpolate(source, scale_factor=2, mode="bicubic", align_corners=False)
    return adaptive_conv_unfold(F.pad(upsampled, [radius] * 4, mode="reflect"), filters)


def _inputs(b, c, h, w, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    source = torch.randn(b, c, h, w, generator=g, dtype=dtype)
    filters = torch.randn(b, d * d, 2 * h, 2 * w, generator=g, dtype=dtype)
    return source, filters


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_bicubic_matrix_is_pytorch_bicubic(size):
    eye = torch.eye(size, dtype=torch.float64).view(size, 1, size, 1)
    columns = F.interpolate(eye, size=(2 * size, 1), mode="bicubic", align_corners=False)[:, 0, :, 0]  # (size, 2*size)
    torch.testing.assert_close(bicubic_matrix_2x(size), columns.T, atol=1e-15, rtol=0)


@pytest.mark.parametrize("radius", [1, 2, 3])
@pytest.mark.parametrize("size", [2, 3, 10])
def test_resample_taps_interpolate(radius, size):
    taps = resample_taps(size, radius)  # (2*size, D, K)
    assert taps.shape == (2 * size, 2 * radius + 1, window(radius)[1])
    torch.testing.assert_close(taps.sum(dim=2), torch.ones(2 * size, 2 * radius + 1, dtype=torch.float64))


def test_a_7x7_filter_composes_into_a_7x7_filter():
    assert window(3) == (-3, 7)


SHAPES = [(1, 3, 2, 2, 7), (2, 5, 3, 7, 7), (1, 4, 9, 6, 7), (1, 2, 4, 5, 3), (1, 17, 5, 4, 5)]


# Every shape on the eager path; the compiled kernels on one (their sizes are dynamic: one compile serves all).
@pytest.mark.parametrize("backend,b,c,h,w,d", [("eager", *s) for s in SHAPES] + [("compiled", *SHAPES[1])])
def test_matches_upsample_then_filter(backend, b, c, h, w, d):
    with torch.inference_mode():  # as a job runs it (an inference tensor is its own compiled variant)
        source, filters = _inputs(b, c, h, w, d)
        out = upsample_filter(source, filters, backend=backend)
    assert out.shape == (b, c, 2 * h, 2 * w)
    torch.testing.assert_close(out, _published(source, filters), atol=2e-5, rtol=1e-5)


def test_float64_is_exact_to_rounding():
    source, filters = _inputs(2, 3, 6, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(upsample_filter(source, filters, backend="eager"), _published(source, filters), atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@torch.inference_mode()
def test_bands_equal_rows_of_the_whole(backend):
    source, filters = _inputs(2, 6, 9, 5, 7)
    whole = upsample_filter(source, filters, backend=backend)
    for start, stop in [(0, 4), (4, 10), (10, 18), (2, 16)]:
        band = upsample_filter(source, filters[:, :, start:stop], slice(start, stop), backend=backend)
        torch.testing.assert_close(band, whole[:, :, start:stop], atol=1e-6, rtol=0)


def test_gradcheck_eager():
    source, filters = _inputs(1, 2, 3, 2, 3, dtype=torch.float64)
    source.requires_grad_(True)
    filters.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s, f: upsample_filter(s, f, backend="eager"), (source, filters))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_the_published_order(backend):
    source, filters = _inputs(2, 3, 4, 5, 7, seed=3)
    rows = slice(2, 6)
    filters = filters[:, :, rows].contiguous()
    grad_out = torch.randn(2, 3, 4, 10, generator=torch.Generator().manual_seed(4))
    out = upsample_filter(source.requires_grad_(), filters.requires_grad_(), rows, backend=backend)
    got = torch.autograd.grad((out * grad_out).sum(), (source, filters))
    full = torch.zeros(2, 49, 8, 10).index_copy(2, torch.arange(2, 6), filters)  # filters of the other rows unused
    want = torch.autograd.grad((_published(source, full)[:, :, rows] * grad_out).sum(), (source, filters))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_source_keeps_float32_weights(dtype):
    source, filters = _inputs(1, 8, 5, 6, 7)
    out = upsample_filter(source.to(dtype), filters, backend="eager")
    assert out.dtype == dtype
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    torch.testing.assert_close(out.float(), _published(source.to(dtype).float(), filters), atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@torch.inference_mode()
def test_bilateral_kernel_matches_unfolded_softmax(backend):
    g = torch.Generator().manual_seed(5)
    keys_padded = torch.randn(2, 4, 11, 14, generator=g)
    queries = keys_padded[:, :, 3:-3, 3:-3]  # (2, 4, 5, 8): a view of the padded keys, as a JBU stage passes them
    temperature, spatial = torch.tensor(1.7), torch.rand(1, 49, 1, 1, generator=g)
    patches = F.unfold(keys_padded, 7).view(2, 4, 49, 5, 8)
    want = torch.softmax(temperature * torch.einsum("bkphw,bkhw->bphw", patches, queries), dim=1) * spatial
    want = want / want.sum(1, keepdim=True).clamp(min=1e-7)
    got = bilateral_kernel(keys_padded, queries, temperature, spatial, backend=backend)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_bad_inputs_are_named():
    source, filters = _inputs(1, 2, 4, 4, 7)
    with pytest.raises(InputError, match="even output rows"):
        upsample_filter(source, filters[:, :, 1:5], slice(1, 5))
    with pytest.raises(InputError, match="do not match rows 0:8"):
        upsample_filter(source, filters[:, :, :, :6])
    with pytest.raises(InputError, match="odd square number of filter taps, got 48"):
        upsample_filter(source, filters[:, :48])
    with pytest.raises(InputError, match="too small for radius 3"):
        upsample_filter(source[:, :, :1, :1], filters[:, :, :2, :2])
    with pytest.raises(InputError, match="does not fit source"):
        composed_conv(torch.zeros(1, 2, 10, 10), torch.zeros(1, 49, 6, 8))
