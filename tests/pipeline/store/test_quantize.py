"""Tests of pipeline.store.quantize: int8 affine codes per sample and channel, and float16 mantissa rounding."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from featup.errors import ConfigError, InputError
from pipeline.store.quantize import (QUANT_ATTRS, dequantize_int8, dequantize_int8_numpy, quant_attrs, quantize_int8,
                                     round_mantissa, round_mantissa_torch)

ALL_FLOAT16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)  # every bit pattern


def smooth_maps(b: int, c: int, size: int, seed: int = 0) -> torch.Tensor:
    """(b, c, size, size) float32 maps like upsampled ViT features: a 14x14 grid bicubically upsampled, per-channel
    offsets and scales, a little pixel noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(b, c, 14, 14, generator=g)
    x = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    x = x * torch.rand(b, c, 1, 1, generator=g).mul(3).add(0.2) + torch.randn(b, c, 1, 1, generator=g)
    return x + 0.01 * torch.randn(x.shape, generator=g)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Relative L2 error of each map (B,) of a against the reference b."""
    return (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)


def reference_round(x: np.ndarray, keep_bits: int) -> np.ndarray:
    """Nearest value (ties to even) with ``keep_bits`` mantissa bits, by arithmetic on float64 values, not bits;
    values past the largest such float16 truncate, as round_mantissa documents."""
    v = x.astype(np.float64)
    with np.errstate(divide="ignore"):
        e = np.maximum(np.floor(np.log2(np.abs(v))), -14)  # binade; subnormals share the smallest normal's spacing
    q = np.exp2(e - keep_bits)
    r = np.round(v / q) * q  # np.round rounds half to even
    largest = (2 - 2.0 ** -keep_bits) * 2.0 ** 15
    r = np.where(np.abs(r) > largest, np.trunc(v / q) * q, r)
    return np.where(v == 0, v, r).astype(np.float16)


@pytest.mark.parametrize("keep_bits", [1, 3, 7, 9])
def test_round_mantissa_matches_value_rounding_on_every_float16(keep_bits):
    finite = ALL_FLOAT16[np.isfinite(ALL_FLOAT16)]
    got = round_mantissa(finite, keep_bits)
    np.testing.assert_array_equal(got.view(np.uint16), reference_round(finite, keep_bits).view(np.uint16))
    assert np.isfinite(got).all()


@pytest.mark.parametrize("keep_bits", [1, 4, 7, 10])
def test_round_mantissa_torch_is_bit_identical_and_keeps_nan_inf(keep_bits):
    got = round_mantissa(ALL_FLOAT16, keep_bits)
    torch_got = round_mantissa_torch(torch.from_numpy(ALL_FLOAT16.copy()), keep_bits).numpy()
    np.testing.assert_array_equal(got.view(np.uint16), torch_got.view(np.uint16))
    special = ~np.isfinite(ALL_FLOAT16)
    np.testing.assert_array_equal(got[special].view(np.uint16), ALL_FLOAT16[special].view(np.uint16))


@pytest.mark.parametrize("keep_bits", [2, 7])
def test_round_mantissa_error_bound_and_idempotent(keep_bits):
    x = np.random.default_rng(0).standard_normal(10_000).astype(np.float16)
    normal = np.abs(x) >= 2.0 ** -14
    r = round_mantissa(x, keep_bits)
    rel = np.abs(r.astype(np.float64) - x) / np.abs(x.astype(np.float64))
    assert rel[normal].max() <= 2.0 ** -(keep_bits + 1)  # half a unit of the kept last place
    assert rel[normal].max() > 2.0 ** -(keep_bits + 2)  # it did round
    np.testing.assert_array_equal(round_mantissa(r, keep_bits).view(np.uint16), r.view(np.uint16))


def test_round_mantissa_bad_input():
    with pytest.raises(InputError, match="expected float16 values, got float32"):
        round_mantissa(np.zeros(3, np.float32), 7)
    with pytest.raises(InputError, match="expected float16 values, got torch.float32"):
        round_mantissa_torch(torch.zeros(3), 7)
    for bad in (0, 11, 2.5, True):
        with pytest.raises(ConfigError, match=f"keep_bits: expected an integer from 1 to 10, got {bad!r}"):
            round_mantissa(np.zeros(3, np.float16), bad)


def test_quantize_int8_smooth_maps_within_one_percent():
    x = smooth_maps(4, 32, 64)
    codes, scale, offset = quantize_int8(x)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert scale.shape == offset.shape == (4, 32) and scale.dtype == offset.dtype == torch.float32
    back = dequantize_int8(codes, scale, offset)
    assert back.dtype == torch.float32
    assert rel_l2(back, x).max() < 0.01
    err = (back - x).abs().amax(dim=(2, 3))  # (B, C)
    assert (err <= scale / 2 * (1 + 1e-3) + 1e-6).all()  # half a step, up to float32 rounding
    assert int(codes.min()) == 0 and int(codes.max()) == 255


def test_quantize_int8_constant_channels_exact_and_float16_input():
    x = smooth_maps(2, 4, 16).half()
    x[0, 1] = 3.25
    x[1, 3] = -7.0
    codes, scale, offset = quantize_int8(x)
    back = dequantize_int8(codes, scale, offset)
    assert scale[0, 1] == 0 and scale[1, 3] == 0
    assert torch.equal(back[0, 1], torch.full((16, 16), 3.25)) and torch.equal(back[1, 3], torch.full((16, 16), -7.0))
    assert rel_l2(back, x.float()).max() < 0.01


def test_dequantize_numpy_matches_torch_and_accepts_one_row():
    codes, scale, offset = quantize_int8(smooth_maps(3, 5, 12))
    both = dequantize_int8_numpy(codes.numpy(), scale.numpy(), offset.numpy())
    assert both.dtype == np.float32
    np.testing.assert_array_equal(both, dequantize_int8(codes, scale, offset).numpy())
    np.testing.assert_array_equal(dequantize_int8_numpy(codes[1].numpy(), scale[1].numpy(), offset[1].numpy()), both[1])
    with pytest.raises(InputError, match=r"expected codes \(..., C, H, W\) with scale and offset \(..., C\)"):
        dequantize_int8_numpy(codes.numpy(), scale.numpy()[:, :2], offset.numpy())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_quantize_int8_refuses_non_finite_and_names_the_sample(bad):
    x = smooth_maps(3, 2, 8)
    x[2, 1, 4, 4] = bad
    with pytest.raises(InputError, match=r"expected finite features, got 1 NaN/inf values in samples \[2\]"):
        quantize_int8(x)


def test_quantize_int8_bad_shape_or_dtype():
    with pytest.raises(InputError, match=r"expected a float tensor \(B, C, H, W\), got torch.float32 of shape \(3, 8, 8\)"):
        quantize_int8(torch.zeros(3, 8, 8))
    with pytest.raises(InputError, match="got torch.uint8"):
        quantize_int8(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_quant_attrs_name_the_arrays_and_formula():
    assert QUANT_ATTRS["scale_array"] == "features_scale" and QUANT_ATTRS["offset_array"] == "features_offset"
    assert QUANT_ATTRS["formula"] == "features = codes * scale[..., None, None] + offset[..., None, None]"
    assert quant_attrs("lowres")["scale_array"] == "lowres_scale"
    assert quant_attrs("lowres")["formula"].startswith("lowres = codes")
