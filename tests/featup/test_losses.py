"""Tests for featup/losses.py against direct formulas and mathematical properties."""

import math

import pytest
import torch

from featup.downsamplers import gaussian_blur2d
from featup.errors import InputError
from featup.losses import (
    SampledCRFLoss,
    ScaleNet,
    TVLoss,
    blur_pin_loss,
    magnitude,
    magnitude_loss,
    magnitude_tv,
    project,
    random_projection,
    reconstruction_loss,
    total_variation,
)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


def test_reconstruction_without_scales_is_mse():
    t, p = _rand(2, 4, 5, 6, seed=0), _rand(2, 4, 5, 6, seed=1)
    torch.testing.assert_close(reconstruction_loss(t, p), ((p - t) ** 2).mean())


def test_reconstruction_at_unit_scale_is_half_mse():
    t, p = _rand(2, 4, 5, 6, seed=0), _rand(2, 4, 5, 6, seed=1)
    ones = torch.ones(2, 1, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(reconstruction_loss(t, p, ones), 0.5 * ((p - t) ** 2).mean())


def test_reconstruction_matches_formula_with_per_pixel_scales():
    t, p = _rand(2, 3, 4, 4, seed=0), _rand(2, 3, 4, 4, seed=1)
    s = _rand(2, 1, 4, 4, seed=2).exp()
    ref = sum(
        ((p[b, c, i, j] - t[b, c, i, j]) ** 2 / (2 * s[b, 0, i, j] ** 2) + math.log(s[b, 0, i, j]))
        for b in range(2) for c in range(3) for i in range(4) for j in range(4)
    ) / (2 * 3 * 4 * 4)
    torch.testing.assert_close(reconstruction_loss(t, p, s), torch.as_tensor(ref, dtype=torch.float64))


def test_reconstruction_minimum_over_scale_is_at_mse():
    t, p = _rand(1, 8, 3, 3, seed=3), _rand(1, 8, 3, 3, seed=4)
    mse = ((p - t) ** 2).mean()
    grid = torch.linspace(0.2, 3.0, 2801, dtype=torch.float64)
    losses = torch.stack([reconstruction_loss(t, p, torch.full((1, 1, 3, 3), float(s))) for s in grid])
    best = grid[losses.argmin()]
    assert abs(best**2 - mse) < 2e-3 * 2 * float(best) + 1e-6
    # and the analytic stationary point has zero gradient
    s = mse.sqrt().clone().requires_grad_()
    reconstruction_loss(t, p, s.expand(1, 1, 3, 3)).backward()
    assert abs(s.grad.item()) < 1e-10


def test_reconstruction_shape_errors():
    t = _rand(1, 2, 3, 3)
    with pytest.raises(InputError):
        reconstruction_loss(t, _rand(1, 2, 3, 4))
    with pytest.raises(InputError):
        reconstruction_loss(t, t, torch.ones(1, 2, 3, 3, dtype=torch.float64))


def test_scale_net_positive_shape_keys_and_published_form():
    net = ScaleNet(6, generator=_gen(0))
    x = _rand(2, 6, 4, 5, dtype=torch.float32)
    s = net(x)
    assert s.shape == (2, 1, 4, 5) and (s > 0).all()
    assert set(net.state_dict()) == {"net.weight", "net.bias"}
    assert net.net.weight.shape == (1, 6, 1, 1)
    torch.testing.assert_close(s, torch.exp(net.net(x) + 0.1).clamp_min(1e-4))
    assert net.net.weight.abs().max() <= 0.1 / math.sqrt(6) + 1e-7  # default init scaled by 0.1
    with torch.no_grad():
        net.net.bias.fill_(-100.0)
    assert torch.allclose(net(x), torch.full_like(s, 1e-4))


def test_scale_net_generator_init_reproducible_and_gradients_flow():
    a, b = ScaleNet(4, generator=_gen(1)), ScaleNet(4, generator=_gen(1))
    torch.testing.assert_close(a.net.weight, b.net.weight)
    t, p = _rand(1, 4, 3, 3, dtype=torch.float32), _rand(1, 4, 3, 3, seed=1, dtype=torch.float32)
    reconstruction_loss(t, p, a(t)).backward()
    assert a.net.weight.grad is not None and a.net.weight.grad.abs().sum() > 0


def test_random_projection_unit_columns_and_reproducible():
    p = random_projection(16, 5, generator=_gen(0), dtype=torch.float64)
    assert p.shape == (16, 5)
    torch.testing.assert_close(p.norm(dim=0), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(p, random_projection(16, 5, generator=_gen(0), dtype=torch.float64))
    assert not torch.allclose(p, random_projection(16, 5, generator=_gen(1), dtype=torch.float64))


def test_project_matches_matmul_and_per_sample_projection():
    f = _rand(2, 6, 3, 4)
    p = random_projection(6, 3, generator=_gen(0), dtype=torch.float64)
    ref = (f.permute(0, 2, 3, 1) @ p).permute(0, 3, 1, 2)
    torch.testing.assert_close(project(f, p), ref)
    torch.testing.assert_close(project(f, p.expand(2, 6, 3)), ref)
    assert project(f, None) is f


def test_tv_zero_on_constant_positive_on_noise_and_formula():
    assert total_variation(torch.full((2, 3, 5, 7), 1.7)) == 0
    x = _rand(2, 3, 5, 7)
    tv = TVLoss()(x)
    assert tv > 0
    ref = sum(
        (x[b, c, i + 1, j] - x[b, c, i, j]) ** 2 for b in range(2) for c in range(3) for i in range(4) for j in range(7)
    ) + sum(
        (x[b, c, i, j + 1] - x[b, c, i, j]) ** 2 for b in range(2) for c in range(3) for i in range(5) for j in range(6)
    )
    torch.testing.assert_close(tv, ref / (2 * 3 * 5 * 7))


def _crf_reference(crf, guidance, feats, rows, cols):
    h, w = guidance.shape[2:]
    total, n = 0.0, len(rows)
    for b in range(guidance.shape[0]):
        for i in range(n):
            for j in range(n):
                dp = ((rows[i] - rows[j]) / h) ** 2 + ((cols[i] - cols[j]) / w) ** 2
                di = (guidance[b, :, rows[i], cols[i]] - guidance[b, :, rows[j], cols[j]]).square().sum()
                df = (feats[b, :, rows[i], cols[i]] - feats[b, :, rows[j], cols[j]]).square().sum()
                k = crf.w1 * torch.exp(-dp / (2 * crf.alpha) - di / (2 * crf.beta))
                k = k + crf.w2 * math.exp(-dp / (2 * crf.gamma)) - crf.shift
                total = total + df * k
    return total / (guidance.shape[0] * n * n)


def test_crf_matches_pairwise_formula_with_published_defaults():
    crf = SampledCRFLoss(n_samples=12)
    assert (crf.alpha, crf.beta, crf.gamma, crf.w1, crf.w2, crf.shift) == (0.1, 0.15, 0.005, 10.0, 3.0, 0.0)
    assert SampledCRFLoss().n_samples == 1000
    guidance, feats = _rand(2, 3, 9, 11, seed=0), _rand(2, 5, 9, 11, seed=1)
    g = _gen(7)
    rows = torch.randint(0, 9, (12,), generator=g).tolist()
    cols = torch.randint(0, 11, (12,), generator=g).tolist()
    out = crf(guidance, feats, generator=_gen(7))
    torch.testing.assert_close(out, _crf_reference(crf, guidance, feats, rows, cols))


def test_crf_finite_deterministic_and_differentiable():
    crf = SampledCRFLoss(n_samples=200)
    guidance = _rand(2, 3, 16, 16, dtype=torch.float32)
    feats = _rand(2, 8, 16, 16, seed=1, dtype=torch.float32).requires_grad_()
    a = crf(guidance, feats, generator=_gen(3))
    b = crf(guidance, feats, generator=_gen(3))
    c = crf(guidance, feats, generator=_gen(4))
    assert torch.isfinite(a) and a.item() == b.item() and a.item() != c.item()
    a.backward()
    assert torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0
    assert crf(guidance, torch.ones(2, 8, 16, 16), generator=_gen(3)) == 0
    with pytest.raises(InputError):
        crf(guidance, feats[:, :, :8])


def test_magnitude_terms_match_published_forms():
    f = _rand(2, 4, 6, 6)
    mag = magnitude(f)
    torch.testing.assert_close(mag, f.norm(dim=1, keepdim=True))
    target = _rand(2, 4, 3, 3, seed=1)
    down_mag = _rand(2, 1, 3, 3, seed=2)
    ref = ((down_mag - target.norm(dim=1, keepdim=True)) ** 2).mean()
    torch.testing.assert_close(magnitude_loss(down_mag, target), ref)
    torch.testing.assert_close(magnitude_tv(f), total_variation(mag))
    assert magnitude_tv(torch.ones(1, 3, 5, 5)) == 0


def test_blur_pin_zero_on_constant_positive_on_noise():
    assert blur_pin_loss(torch.full((1, 3, 8, 8), 2.0)) < 1e-12
    f = _rand(1, 3, 8, 8)
    torch.testing.assert_close(blur_pin_loss(f), ((gaussian_blur2d(f) - f) ** 2).mean())
    assert blur_pin_loss(f) > 0
