"""The upsampler registry and the input checks every upsampler shares.

Every upsampler maps low-resolution features (B, C, h, w) and the normalised guidance image
(B, 3, H, W) to features at ``output_size`` (default: the image size):
``forward(lr_feats, image, output_size=None) -> (B, C, H', W')``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from featup.errors import InputError
from featup.registry import Registry

UPSAMPLERS: Registry[nn.Module] = Registry("upsampler")


def build_upsampler(name: str, dim: int, *, num_stages: int = 4, device=None, dtype=None, **kwargs) -> nn.Module:
    """Build the upsampler registered as ``name`` for ``dim``-channel features."""
    return UPSAMPLERS.get(name)(dim, num_stages=num_stages, device=device, dtype=dtype, **kwargs)


def check_finite(name: str, x: torch.Tensor) -> None:
    """Raise InputError if ``x`` holds NaN or Inf (they would silently spread through every filter)."""
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise InputError(f"{name}: expected finite values, got {bad} NaN/Inf entries in a tensor of shape {tuple(x.shape)}")


def check_inputs(lr_feats: torch.Tensor, image: torch.Tensor, *, dim: int | None, guidance_dim: int = 3) -> None:
    """Validate the (features, guidance image) pair handed to an upsampler."""
    if lr_feats.dim() != 4:
        raise InputError(f"lr_feats: expected a 4-D (B, C, h, w) tensor, got shape {tuple(lr_feats.shape)}")
    if image.dim() != 4 or image.shape[1] != guidance_dim:
        raise InputError(f"image: expected a (B, {guidance_dim}, H, W) tensor, got shape {tuple(image.shape)}")
    if lr_feats.shape[0] != image.shape[0]:
        raise InputError(f"batch size: lr_feats has {lr_feats.shape[0]} items, image has {image.shape[0]}")
    if dim is not None and lr_feats.shape[1] != dim:
        raise InputError(f"lr_feats: expected {dim} channels (the upsampler's dim), got {lr_feats.shape[1]}")
    if min(lr_feats.shape[2:]) < 1 or min(image.shape[2:]) < 1:
        raise InputError(f"empty input: lr_feats {tuple(lr_feats.shape)}, image {tuple(image.shape)}")
    check_finite("lr_feats", lr_feats)
    check_finite("image", image)


def resolve_output_size(image: torch.Tensor, output_size: Sequence[int] | int | None) -> tuple[int, int]:
    """``output_size`` as an (H, W) pair of positive ints; the image size when None."""
    if output_size is None:
        return int(image.shape[2]), int(image.shape[3])
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    size = tuple(int(s) for s in output_size)
    if len(size) != 2 or min(size) < 1:
        raise InputError(f"output_size: expected two positive ints (H, W), got {output_size!r}")
    return size
