"""Tests for featup/upsamplers/implicit.py: shapes, output_size, published layout, gradients, dtypes."""

import math

import pytest
import torch
import torch.nn.functional as F

from featup.errors import InputError
from featup.layers import MinMaxScaler
from featup.upsamplers.implicit import FourierFeatures, ImplicitUpsampler


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _img(h=12, w=20, b=1, dtype=torch.float32, seed=0):
    return torch.rand(b, 3, h, w, generator=_gen(seed), dtype=dtype)


def _small(dim=6, **kw):
    return ImplicitUpsampler(dim, n_freqs=4, hidden_dim=16, generator=_gen(0), **kw).eval()


def test_published_defaults_and_layout():
    up = ImplicitUpsampler(32)
    fourier = up.net[1]
    assert fourier.n_freqs == 30 and fourier.out_dim == 5 * 30 * 2 + 3
    assert up.net[4].in_channels == 303 and up.net[4].out_channels == 128
    assert up.net[10].out_channels == 32
    assert [type(m).__name__ for m in up.net] == [
        "MinMaxScaler", "FourierFeatures", "ChannelNorm", "Dropout2d", "PointwiseConv", "ReLU",
        "Dropout2d", "ChannelNorm", "PointwiseConv", "ReLU", "PointwiseConv",
    ]
    assert all(isinstance(up.net[i], torch.nn.Conv2d) and up.net[i].kernel_size == (1, 1) for i in (4, 8, 10))
    assert up.net[3].p == 0.2 and up.net[6].p == 0.2
    assert fourier.biases.shape == (2, 5, 30)
    keys = set(up.state_dict())
    assert {"net.1.biases", "net.2.norm.weight", "net.4.weight", "net.7.norm.bias", "net.10.bias"} <= keys


def test_output_follows_image_size_on_non_square_image():
    up = _small()
    assert up(_img(12, 20)).shape == (1, 6, 12, 20)
    assert up(_img(12, 20), (12, 20)).shape == (1, 6, 12, 20)


def test_output_size_resizes_guidance_first():
    up = _small()
    img = _img(12, 20)
    for size, antialias in (((24, 40), False), ((6, 9), True), ((18, 10), True)):
        out = up(img, size)
        assert out.shape == (1, 6, *size)
        resized = F.interpolate(img, size=size, mode="bilinear", align_corners=False, antialias=antialias)
        torch.testing.assert_close(out, up(resized))


def test_fourier_features_match_direct_formula():
    fourier = FourierFeatures(3, color_feats=True, generator=_gen(1))
    img = _img(4, 5, b=2, dtype=torch.float64)
    fourier = fourier.double()
    out = fourier(img)
    assert out.shape == (2, 2 * 3 * 5 + 3, 4, 5)
    freqs = [math.exp(-2 + 6 * k) for k in range(3)]  # exp(linspace(-2, 10, 3))
    phase = fourier.biases.detach().reshape(2, 3, 5)  # published reading: (n_freqs, n_inputs)
    for b in range(2):
        for i in range(4):
            for j in range(5):
                inputs = [-1 + 2 * i / 3, -1 + 2 * j / 4, *img[b, :, i, j].tolist()]
                sin = [math.sin(inputs[c] * freqs[k] + phase[0, k, c]) for k in range(3) for c in range(5)]
                cos = [math.cos(inputs[c] * freqs[k] + phase[1, k, c]) for k in range(3) for c in range(5)]
                ref = torch.tensor(sin + cos + inputs[2:], dtype=torch.float64)
                torch.testing.assert_close(out[b, :, i, j], ref)


def test_fourier_features_without_colour():
    fourier = FourierFeatures(4, color_feats=False)
    assert fourier.biases.shape == (2, 2, 4) and fourier.out_dim == 16
    assert fourier(_img(3, 7)).shape == (1, 16, 3, 7)
    up = ImplicitUpsampler(5, n_freqs=4, hidden_dim=8, color_feats=False).eval()
    out = up(_img(6, 6))
    # without colour the features depend on position only: the image content does not matter
    torch.testing.assert_close(out, up(_img(6, 6, seed=9)))


def test_network_input_is_min_max_scaled_image():
    up = _small(dtype=torch.float64)  # float64: frequencies up to e^10 amplify float32 rounding of the scaling
    img = _img(8, 8, dtype=torch.float64)
    torch.testing.assert_close(up(img), up(img * 3.0 + 1.0))  # affine colour changes cancel in MinMaxScaler
    scaled = MinMaxScaler()(img)
    torch.testing.assert_close(up.net[1:](scaled), up(img))


def test_backward_reaches_all_parameters():
    up = _small().train()
    out = up(_img(10, 14), (16, 16))
    out.square().mean().backward()
    for name, p in up.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert up.net[1].biases.grad.abs().sum() > 0


def test_float64_and_generator_reproducible():
    a = _small(dtype=torch.float64)
    b = _small(dtype=torch.float64)
    img = _img(9, 13, dtype=torch.float64)
    out = a(img, (11, 7))
    assert out.dtype == torch.float64 and out.shape == (1, 6, 11, 7)
    torch.testing.assert_close(out, b(img, (11, 7)))
    c = ImplicitUpsampler(6, n_freqs=4, hidden_dim=16, generator=_gen(1), dtype=torch.float64).eval()
    assert not torch.allclose(out, c(img, (11, 7)))


def test_dropout_only_in_training():
    up = _small(dropout=0.5)
    img = _img(8, 8)
    torch.testing.assert_close(up(img), up(img))
    up.train()
    torch.manual_seed(0)
    a = up(img)
    torch.manual_seed(1)
    assert not torch.allclose(a, up(img))


def test_invalid_inputs_raise():
    up = _small()
    with pytest.raises(InputError):
        up(torch.rand(1, 4, 8, 8))
    with pytest.raises(InputError):
        up(_img(), (8,))
    with pytest.raises(InputError):
        up(_img(), (0, 8))


def test_pointwise_conv_computes_the_same_as_a_1x1_convolution():
    from featup.upsamplers.implicit import PointwiseConv

    conv = PointwiseConv(7, 5)
    x = torch.randn(2, 7, 6, 9, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias), rtol=1e-5, atol=1e-5)
