"""The implicit upsampler's per-image objective over precomputed jittered views, as values (no logging, no I/O).

As published (``train_implicit_upsampler.py``): the high-res features F get their per-pixel magnitude
prepended as an extra channel; each sampled view t jitters [|F|, F] and the learned downsampler maps it
to the backbone grid, where ``down(t(F))`` must match the view's precomputed low-res features f(t(x))
under a predicted uncertainty, and ``down(t(|F|))`` must match ``|f(t(x))|`` (magnitude term). The
total variation of |F| and a blur pin (F against its Gaussian blur) keep the features smooth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from featup.downsamplers import AttentionDownsampler
from featup.errors import ConfigError, InputError
from featup.jitter import JitterParams, apply_jitter
from featup.losses import blur_pin_loss, magnitude, magnitude_loss, magnitude_tv, reconstruction_loss
from featup.objective import Terms


@dataclass(frozen=True)
class ImplicitLossWeights:
    """Weights of the regularisers; defaults are the published ``configs/implicit_upsampler.yaml`` values."""

    magnitude: float = 0.001
    magnitude_tv: float = 0.05
    blur_pin: float = 0.1

    def __post_init__(self) -> None:
        for name in ("magnitude", "magnitude_tv", "blur_pin"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{name} weight: expected a number >= 0, got {value!r}")


@dataclass
class ImplicitLossTerms(Terms):
    """The objective's terms: ``total`` is differentiable; the others are its parts, for logging by the caller."""

    total: torch.Tensor
    reconstruction: torch.Tensor
    magnitude: torch.Tensor
    magnitude_tv: torch.Tensor
    blur_pin: torch.Tensor


def implicit_views_loss(
    hr_feats: torch.Tensor,
    targets: torch.Tensor,
    views: Sequence[JitterParams],
    downsampler: nn.Module,
    *,
    max_pad: int,
    weights: ImplicitLossWeights,
    scale_net: nn.Module | None = None,
    generator: torch.Generator | None = None,
) -> ImplicitLossTerms:
    """Loss of high-res features (1, K, H, W) against V views' low-res targets (V, K, h, w) jittered by ``views``."""
    if hr_feats.dim() != 4 or hr_feats.shape[0] != 1:
        raise InputError(f"hr_feats shape: expected (1, K, H, W), got {tuple(hr_feats.shape)}")
    if targets.dim() != 4 or targets.shape[0] != len(views) or targets.shape[1] != hr_feats.shape[1]:
        expected = f"({len(views)}, {hr_feats.shape[1]}, h, w)"
        raise InputError(f"targets shape: expected {expected}, got {tuple(targets.shape)}")
    hr_mag = magnitude(hr_feats)  # (1, 1, H, W)
    both = torch.cat([hr_mag, hr_feats], dim=1)  # (1, 1+K, H, W)
    jittered = torch.cat([apply_jitter(both, max_pad, view) for view in views])  # (V, 1+K, H, W)
    down = _downsample(downsampler, jittered, generator)  # (V, 1+K, h, w)
    down_mag, down_feats = down[:, :1], down[:, 1:]
    scales = scale_net(targets) if scale_net is not None else None  # (V, 1, h, w)
    zero = hr_feats.new_zeros(())
    reconstruction = reconstruction_loss(targets, down_feats, scales)
    mag = magnitude_loss(down_mag, targets) if weights.magnitude > 0 else zero
    mag_tv = magnitude_tv(hr_feats) if weights.magnitude_tv > 0 else zero
    pin = blur_pin_loss(hr_feats) if weights.blur_pin > 0 else zero
    total = reconstruction + weights.magnitude * mag + weights.magnitude_tv * mag_tv + weights.blur_pin * pin
    return ImplicitLossTerms(total=total, reconstruction=reconstruction, magnitude=mag, magnitude_tv=mag_tv, blur_pin=pin)


def _downsample(downsampler: nn.Module, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """The attention downsampler draws its saliency dropout from ``generator``; the blur one draws nothing."""
    if isinstance(downsampler, AttentionDownsampler):
        return downsampler(x, None, generator=generator)
    return downsampler(x, None)
