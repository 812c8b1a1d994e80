"""Lossy steps applied to features before the lossless codec: per sample and channel affine 8-bit codes, and rounding
float16 mantissas to fewer bits. Both run in torch on the model's device (GPU or CPU); decoding has numpy twins.

Stored int8 layout (what ``quant_attrs`` writes into the codes array's attributes for plain zarr users)::

    features         (N, C, H, W) uint8    codes
    features_scale   (N, C)       float32  per sample and channel
    features_offset  (N, C)       float32
    features = codes * scale[..., None, None] + offset[..., None, None]
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from featup.errors import ConfigError, InputError

QUANT_LEVELS = 255  # codes 0..255
QUANTIZATION = "int8-affine-per-channel"  # the scheme's name in an array's attributes
QUANT_FORMULA = "features = codes * scale[..., None, None] + offset[..., None, None]"


def quant_attrs(name: str = "features") -> dict[str, Any]:
    """Attributes of an int8-coded array ``name``: the scheme, the formula and the names of its scale/offset arrays."""
    return {"quantization": QUANTIZATION, "formula": QUANT_FORMULA.replace("features", name, 1),
            "scale_array": f"{name}_scale", "offset_array": f"{name}_offset", "codes_dtype": "uint8",
            "decoded_dtype": "float32"}


QUANT_ATTRS = quant_attrs()


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample and channel affine 8-bit codes of ``x`` (B, C, H, W) float: (codes uint8, scale (B, C), offset (B, C)).

    ``x ~= codes * scale + offset`` with offset = min and scale = (max - min) / 255 of each channel, so the error of
    each value is at most scale / 2 (plus float32 rounding); a constant channel gets scale 0 and is exact.
    Non-finite values (NaN, inf) are refused: no code can stand for them, and they mean the model's output is broken.
    """
    if x.ndim != 4 or not x.is_floating_point():
        raise InputError(f"quantize_int8: expected a float tensor (B, C, H, W), got {x.dtype} of shape {tuple(x.shape)}")
    flat = x.flatten(2)  # (B, C, H*W), the input dtype
    low, high = torch.aminmax(flat, dim=2)  # (B, C) each; NaN propagates into both, inf into one
    low, high = low.float(), high.float()
    bad = ~(torch.isfinite(low) & torch.isfinite(high))  # (B, C)
    if bool(bad.any()):
        rows = torch.nonzero(bad.any(1)).flatten().tolist()
        count = int((~torch.isfinite(x[rows])).sum())
        raise InputError(f"quantize_int8: expected finite features, got {count} NaN/inf values in samples {rows}")
    span = high - low  # (B, C)
    scale, offset = span / QUANT_LEVELS, low
    inv = torch.where(span > 0, QUANT_LEVELS / span.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(span))
    # codes = round((x - offset) * inv) as one fused multiply-add: x * inv + (-offset * inv)
    codes = torch.addcmul((-offset * inv)[..., None, None], x.float(), inv[..., None, None])  # (B, C, H, W) float32
    codes.round_().clamp_(0, QUANT_LEVELS)
    return codes.to(torch.uint8), scale, offset


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """float32 features (B, C, H, W) from codes (B, C, H, W) and scale, offset (B, C) (or (C, H, W) with (C,))."""
    _check_shapes(tuple(codes.shape), tuple(scale.shape), tuple(offset.shape))
    return codes.float() * scale.float()[..., None, None] + offset.float()[..., None, None]


def dequantize_int8_numpy(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """numpy twin of ``dequantize_int8``: float32 features from stored codes, scale and offset."""
    _check_shapes(np.shape(codes), np.shape(scale), np.shape(offset))
    scale = np.asarray(scale, dtype=np.float32)[..., None, None]
    return np.asarray(codes).astype(np.float32) * scale + np.asarray(offset, dtype=np.float32)[..., None, None]


def _check_shapes(codes: tuple, scale: tuple, offset: tuple) -> None:
    """Codes (..., C, H, W) with scale and offset (..., C)."""
    if len(codes) < 3 or scale != codes[:-2] or offset != codes[:-2]:
        raise InputError(f"dequantize_int8: expected codes (..., C, H, W) with scale and offset (..., C), "
                         f"got codes {codes}, scale {scale}, offset {offset}")


def _check_keep_bits(keep_bits: int) -> int:
    if isinstance(keep_bits, bool) or not isinstance(keep_bits, (int, np.integer)) or not 1 <= keep_bits <= 10:
        raise ConfigError(f"keep_bits: expected an integer from 1 to 10, got {keep_bits!r}")
    return int(keep_bits)


def _round_bits(bits, drop: int, where):
    """Float16 bit patterns ``bits`` (int16, numpy or torch) with ``drop`` low mantissa bits rounded away, in place.

    Works on the magnitude (sign bit cleared), which stays below 0x8000 for finite values even after the rounding
    carry, so int16 arithmetic cannot overflow there; NaN/inf magnitudes (>= 0x7C00) are restored afterwards.
    """
    low = (1 << drop) - 1
    sign = bits & -0x8000  # the sign bit alone
    mag = bits & 0x7FFF
    rounded = (mag >> drop) & 1  # ties go to the even neighbour: add half - 1, plus 1 when the kept LSB is odd
    rounded += mag
    rounded += (1 << (drop - 1)) - 1
    rounded &= ~low
    special = mag >= 0x7C00  # NaN and inf: unchanged
    overflow = rounded >= 0x7C00  # a finite value rounded up to inf: truncate it instead (the largest finite below)
    overflow &= ~special
    rounded = where(overflow, mag & ~low, rounded)
    rounded = where(special, mag, rounded)
    rounded |= sign
    return rounded


def round_mantissa(x: np.ndarray, keep_bits: int) -> np.ndarray:
    """float16 ``x`` with mantissas rounded to ``keep_bits`` bits (nearest, ties to even, on the bit pattern).

    Same rounding as numcodecs' BitRound (which works on float16 but is not a Zarr v3 codec: zarr warns on every open
    and other implementations cannot read it), so it runs before encoding and the array stays plain float16.
    Finite values stay finite (one that would round past the largest float16 is truncated instead); NaN and inf are
    kept as they are.
    """
    if np.asarray(x).dtype != np.float16:
        raise InputError(f"round_mantissa: expected float16 values, got {np.asarray(x).dtype}")
    drop = 10 - _check_keep_bits(keep_bits)
    if drop == 0:
        return np.array(x, copy=True)
    bits = np.ascontiguousarray(x).view(np.int16)
    return _round_bits(bits, drop, np.where).view(np.float16)


def round_mantissa_torch(x: torch.Tensor, keep_bits: int) -> torch.Tensor:
    """torch twin of ``round_mantissa`` (bit-identical), so the rounding runs on the model's device."""
    if x.dtype != torch.float16:
        raise InputError(f"round_mantissa_torch: expected float16 values, got {x.dtype}")
    drop = 10 - _check_keep_bits(keep_bits)
    if drop == 0:
        return x.clone()
    return _round_bits(x.contiguous().view(torch.int16), drop, torch.where).view(torch.float16)
