"""Bilinear resize of the features, the baseline every learned upsampler is measured against."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from featup.upsamplers.base import IMAGENET_NORM, UPSAMPLERS, check_inputs, resolve_output_size


class BilinearUpsampler(nn.Module):
    """Ignores the guidance image and resizes the features bilinearly to the output size."""

    image_norm = IMAGENET_NORM  # unused: the image only gives the default output size

    def __init__(self, dim: int | None = None) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, lr_feats: torch.Tensor, image: torch.Tensor, output_size: Sequence[int] | None = None) -> torch.Tensor:
        check_inputs(lr_feats, image, dim=self.dim)
        size = resolve_output_size(image, output_size)
        return F.interpolate(lr_feats, size=size, mode="bilinear", align_corners=False)  # (B, C, H, W)


@UPSAMPLERS.register("bilinear")
def build_bilinear(dim: int, *, num_stages: int = 4, device=None, dtype=None) -> BilinearUpsampler:
    """Bilinear baseline; ``num_stages``, ``device`` and ``dtype`` are accepted for a uniform factory signature."""
    return BilinearUpsampler(dim)
