"""Tests for featup/jitter.py: reproducible sampling, shared geometry for images and features, each step."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from featup.errors import ConfigError, InputError
from featup.jitter import JitterParams, apply_jitter, sample_jitter, zoomed_size


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _img(h=20, w=28, c=3, seed=0, dtype=torch.float32):
    return torch.rand(2, c, h, w, generator=_gen(seed), dtype=dtype)


def _params(h, w, pad, zoom=1.0, flip=False, start_h=0, start_w=0):
    return JitterParams(pad, zoom, flip, start_h, start_w, zoomed_size(h, pad, zoom), zoomed_size(w, pad, zoom))


def test_same_seed_same_params_different_seeds_differ():
    kw = dict(max_pad=6, max_zoom=1.8)
    a = [sample_jitter(20, 28, generator=_gen(s), **kw) for s in range(10)]
    b = [sample_jitter(20, 28, generator=_gen(s), **kw) for s in range(10)]
    assert a == b
    assert len(set(a)) > 5


def test_params_are_frozen():
    p = sample_jitter(20, 28, max_pad=4, max_zoom=2.0, generator=_gen(0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.zoom = 1.5


def test_sampled_params_are_in_range_and_cover_both_branches():
    g = _gen(1)
    params = [sample_jitter(20, 28, max_pad=5, max_zoom=1.8, generator=g) for _ in range(200)]
    assert {p.flip for p in params} == {True, False}
    zooms = [p.zoom for p in params]
    assert any(z == 1.0 for z in zooms) and any(z > 1.0 for z in zooms)
    for p in params:
        assert 1.0 <= p.zoom < 1.8 and p.pad == 5
        assert (p.new_h, p.new_w) == (zoomed_size(20, 5, p.zoom), zoomed_size(28, 5, p.zoom))
        assert 0 <= p.start_h <= p.new_h - 20 and 0 <= p.start_w <= p.new_w - 28
    no_flip = [sample_jitter(20, 28, max_pad=5, max_zoom=1.8, use_flips=False, generator=g) for _ in range(50)]
    assert not any(p.flip for p in no_flip)


def test_output_keeps_shape_for_many_samples():
    x = _img()
    g = _gen(2)
    for _ in range(50):
        p = sample_jitter(20, 28, max_pad=7, max_zoom=2.0, generator=g)
        assert apply_jitter(x, 7, p).shape == x.shape


def test_identity_params_return_input():
    x = _img()
    torch.testing.assert_close(apply_jitter(x, 3, _params(20, 28, 3, start_h=3, start_w=3)), x)


def test_crop_offsets_select_reflect_padded_window():
    x = _img()
    p = _params(20, 28, 4, start_h=1, start_w=6)
    ref = F.pad(x, [4, 4, 4, 4], mode="reflect")[:, :, 1:21, 6:34]
    torch.testing.assert_close(apply_jitter(x, 4, p), ref)
    # the reflected border mirrors the image without repeating its edge row
    top = apply_jitter(x, 4, _params(20, 28, 4, start_h=0, start_w=4))
    torch.testing.assert_close(top[:, :, 0], x[:, :, 4])


def test_flip_is_horizontal_mirror():
    x = _img()
    flipped = apply_jitter(x, 2, _params(20, 28, 2, flip=True, start_h=2, start_w=2))
    torch.testing.assert_close(flipped, x.flip(3))


def test_zoom_is_bilinear_upscale_of_padded_map_then_crop():
    x = _img()
    p = _params(20, 28, 3, zoom=1.5, start_h=5, start_w=2)
    padded = F.pad(x, [3] * 4, mode="reflect")
    zoomed = F.interpolate(padded, size=(p.new_h, p.new_w), mode="bilinear", align_corners=False)
    torch.testing.assert_close(apply_jitter(x, 3, p), zoomed[:, :, 5:25, 2:30])


def test_zoom_by_two_doubles_constant_stripes():
    x = torch.zeros(1, 1, 8, 8)
    x[..., 4:, :] = 1.0  # a step edge: after 2x zoom the crop still reads the edge at twice the distance
    p = _params(8, 8, 0, zoom=2.0, start_h=4, start_w=0)
    out = apply_jitter(x, 0, p)
    assert (out[0, 0, :3] == 0).all() and (out[0, 0, 5:] == 1).all()


def test_pointwise_function_commutes_without_zoom():
    x = _img(seed=3)
    f = lambda t: torch.sigmoid(3 * t) ** 2  # noqa: E731 - nonlinear pointwise
    g = _gen(4)
    for _ in range(20):
        p = sample_jitter(20, 28, max_pad=6, max_zoom=1.0, generator=g)
        assert p.zoom == 1.0
        torch.testing.assert_close(apply_jitter(f(x), 6, p), f(apply_jitter(x, 6, p)))


def test_per_pixel_affine_map_commutes_with_any_jitter():
    x = _img(seed=5, dtype=torch.float64)
    g = _gen(6)
    weight = torch.randn(8, 3, 1, 1, generator=g, dtype=torch.float64)
    bias = torch.randn(8, generator=g, dtype=torch.float64)
    feats = lambda t: F.conv2d(t, weight, bias)  # noqa: E731 - 1x1 conv: a per-pixel "backbone"
    for _ in range(30):
        p = sample_jitter(20, 28, max_pad=6, max_zoom=1.8, generator=g)
        torch.testing.assert_close(apply_jitter(feats(x), 6, p), feats(apply_jitter(x, 6, p)))


def test_gradients_flow_through_jitter():
    x = _img().requires_grad_()
    p = _params(20, 28, 3, zoom=1.3, flip=True, start_h=2, start_w=5)
    apply_jitter(x, 3, p).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_mismatched_size_or_pad_raises():
    p = sample_jitter(20, 28, max_pad=4, max_zoom=1.5, generator=_gen(0))
    with pytest.raises(InputError):
        apply_jitter(_img(h=24, w=28), 4, p)
    with pytest.raises(InputError):
        apply_jitter(_img(), 5, p)
    with pytest.raises(InputError):
        apply_jitter(torch.zeros(3, 20, 28), 4, p)
    with pytest.raises(ConfigError):
        sample_jitter(20, 28, max_pad=4, max_zoom=0.5, generator=_gen(0))
    with pytest.raises(ConfigError):
        sample_jitter(4, 28, max_pad=4, max_zoom=1.5, generator=_gen(0))
