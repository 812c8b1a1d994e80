"""A teacher backbone whose true high-resolution features are known, for measuring upsamplers against ground truth.

The true feature of a pixel is a fixed random smooth function of its colour alone (``sin`` of a
random affine map, then a random linear mix): regions of different colour get clearly different
features with sharp edges between them, and small textures inside a region move them a little.
The backbone's output is that field area-pooled over ``stride`` x ``stride`` cells, so the
coarse features are exactly the cell means of the truth and the question "which upsampler
recovers the truth best" has an answer. Load it as a user backbone: ``featup.backbones.teacher:teacher16``.

Weights: the callables build fixed weights from their own seeded ``torch.Generator`` (the global
generator is never touched), so every process gets the same teacher (``--weights auto``);
``--weights random`` re-initialises them with torch's default init and a file is loaded strictly,
as for any user module.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from featup.backbones.base import IMAGENET_MEAN, IMAGENET_STD
from featup.errors import ConfigError

TEACHER_SEED = 5_2024  # seed of the fixed teacher weights (any fixed value; changing it changes the benchmark)
TEACHER_DIM = 32
TEACHER_HIDDEN = 64
TEACHER_FREQUENCY = 4.0  # std of the colour -> hidden weights, in radians per unit of colour in [0, 1]


class GroundTruthTeacher(nn.Module):
    """Per-pixel field ``W2 sin(W1 rgb + b1)`` (the truth) and its ``stride`` x ``stride`` area means (the output)."""

    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(
        self,
        stride: int,
        dim: int = TEACHER_DIM,
        hidden: int = TEACHER_HIDDEN,
        *,
        frequency: float = TEACHER_FREQUENCY,
        seed: int = TEACHER_SEED,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value in (("stride", stride), ("dim", dim), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"teacher {name}: expected a positive int, got {value!r}")
        if not frequency > 0:
            raise ConfigError(f"teacher frequency: expected > 0, got {frequency!r}")
        self.stride, self.dim, self.hidden = stride, dim, hidden
        # skip_init: no draw from the global generator for torch's default init; seeded_init sets every value.
        factory = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        self.embed = nn.utils.skip_init(nn.Conv2d, 3, hidden, 1, **factory)
        self.mix = nn.utils.skip_init(nn.Conv2d, hidden, dim, 1, **factory)
        self.seeded_init(seed, frequency)

    @torch.no_grad()
    def seeded_init(self, seed: int, frequency: float = TEACHER_FREQUENCY) -> None:
        """The fixed weights: drawn on the CPU from a generator seeded with ``seed``, the same in every process."""
        gen = torch.Generator().manual_seed(seed)
        draws = (
            (self.embed.weight, torch.randn(self.embed.weight.shape, generator=gen) * frequency),
            (self.embed.bias, torch.rand(self.embed.bias.shape, generator=gen) * (2 * math.pi)),
            (self.mix.weight, torch.randn(self.mix.weight.shape, generator=gen) / math.sqrt(self.hidden)),
            (self.mix.bias, torch.zeros(self.mix.bias.shape)),
        )
        for param, value in draws:
            param.copy_(value.to(device=param.device, dtype=param.dtype))

    def colour(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised (B, 3, H, W) images back to colour in [0, 1]."""
        mean = torch.as_tensor(self.mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        std = torch.as_tensor(self.std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        return images * std + mean

    def true_features(self, images: torch.Tensor) -> torch.Tensor:
        """The ground truth: normalised (B, 3, H, W) images -> per-pixel features (B, dim, H, W)."""
        hidden = torch.sin(self.embed(self.colour(images)))  # (B, hidden, H, W)
        return self.mix(hidden)  # (B, dim, H, W)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """What a backbone sees: the truth area-pooled -> (B, dim, H / stride, W / stride)."""
        return F.avg_pool2d(self.true_features(images), self.stride)


def teacher16() -> GroundTruthTeacher:
    """The stride-16 teacher (as ViT-S/16 and CLIP), with the fixed seeded weights."""
    return GroundTruthTeacher(16)


def teacher14() -> GroundTruthTeacher:
    """The stride-14 teacher (as DINOv2), with the fixed seeded weights."""
    return GroundTruthTeacher(14)
