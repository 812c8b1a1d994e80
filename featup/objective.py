"""The multi-view reconstruction objective that trains FeatUp upsamplers, as values (no logging, no I/O).

For each of ``n_jitters`` random views t (pad, zoom, crop, flip): the backbone's low-resolution
features of the jittered image, f(t(x)), must be reconstructed by a learned downsampler from the
jittered high-resolution features, down(t(F)), under a predicted per-pixel uncertainty s:
``||f(t(x)) - down(t(F))||^2 / (2 s^2) + log s``, in a random channel projection. A CRF and a
total-variation regulariser on the first view keep the features edge-aware and smooth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from featup.errors import ConfigError
from featup.jitter import apply_jitter, sample_jitter
from featup.losses import SampledCRFLoss, project, random_projection, reconstruction_loss, total_variation

Featurizer = Callable[[torch.Tensor], torch.Tensor]
Upsample = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MultiViewConfig:
    """Settings of the objective; defaults are the published JBU training's."""

    n_jitters: int = 5
    max_pad: int = 20
    max_zoom: float = 2.0
    use_flips: bool = True
    projection_dim: int | None = 30
    crf_weight: float = 0.001
    tv_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.n_jitters < 1:
            raise ConfigError(f"n_jitters: expected >= 1, got {self.n_jitters}")
        if self.max_pad < 0 or self.max_zoom < 1.0:
            raise ConfigError(f"max_pad / max_zoom: expected >= 0 and >= 1, got {self.max_pad} and {self.max_zoom}")
        if self.projection_dim is not None and self.projection_dim < 1:
            raise ConfigError(f"projection_dim: expected None or >= 1, got {self.projection_dim}")
        if self.crf_weight < 0 or self.tv_weight < 0:
            raise ConfigError(f"crf_weight / tv_weight: expected >= 0, got {self.crf_weight} and {self.tv_weight}")


class Terms:
    """Base of an objective's terms (dataclass fields of scalar tensors): ``total`` and its parts."""

    def as_floats(self) -> dict[str, float]:
        """Every term as a float, for logging by the caller."""
        return {name: float(value.detach()) for name, value in vars(self).items()}


@dataclass
class LossTerms(Terms):
    """The objective's terms: ``total`` is differentiable; the others are its parts, for logging by the caller."""

    total: torch.Tensor
    reconstruction: torch.Tensor
    crf: torch.Tensor
    tv: torch.Tensor


def multiview_loss(
    featurize: Featurizer,
    upsample: Upsample,
    downsampler: nn.Module,
    image: torch.Tensor,
    config: MultiViewConfig,
    *,
    generator: torch.Generator,
    scale_net: nn.Module | None = None,
    crf: SampledCRFLoss | None = None,
) -> LossTerms:
    """The objective on a batch of normalised images (B, 3, H, W); ``featurize`` is the frozen backbone."""
    with torch.no_grad():
        lr_feats = featurize(image)  # (B, C, h, w)
    hr_feats = upsample(lr_feats, image)  # (B, C, H', W')
    if hr_feats.shape[2:] != image.shape[2:]:
        hr_feats = F.interpolate(hr_feats, size=image.shape[2:], mode="bilinear", align_corners=False)
    zero = hr_feats.new_zeros(())
    reconstruction, crf_term, tv_term = zero, zero, zero
    for view in range(config.n_jitters):
        params = sample_jitter(*image.shape[2:], max_pad=config.max_pad, max_zoom=config.max_zoom,
                               use_flips=config.use_flips, generator=generator)
        with torch.no_grad():
            jit_image = apply_jitter(image, config.max_pad, params)
            target = featurize(jit_image)  # (B, C, h, w)
        proj = _projection(lr_feats, config.projection_dim, generator)
        jit_hr = apply_jitter(hr_feats, config.max_pad, params)  # (B, C, H, W)
        down = downsampler(jit_hr, jit_image)  # (B, C, h, w)
        scales = scale_net(target) if scale_net is not None else None
        reconstruction = reconstruction + reconstruction_loss(project(target, proj), project(down, proj), scales) / config.n_jitters
        if view == 0:
            proj_hr = project(jit_hr, proj)
            if config.crf_weight > 0:
                # The jittered image guides the jittered features (the published code passed the un-jittered one).
                crf_term = (crf or SampledCRFLoss())(jit_image, proj_hr, generator=generator)
            if config.tv_weight > 0:
                tv_term = total_variation(proj_hr.square().sum(1, keepdim=True))
    total = reconstruction + config.crf_weight * crf_term + config.tv_weight * tv_term
    return LossTerms(total=total, reconstruction=reconstruction, crf=crf_term, tv=tv_term)


def _projection(lr_feats: torch.Tensor, dim: int | None, generator: torch.Generator) -> torch.Tensor | None:
    """A fresh random projection to ``dim`` channels per view (None: compare all channels)."""
    if dim is None or dim >= lr_feats.shape[1]:
        return None
    return random_projection(lr_feats.shape[1], dim, generator=generator, device=lr_feats.device, dtype=lr_feats.dtype)
