"""Small layers shared by the upsamplers: channel LayerNorm and per-channel min-max scaling."""

from __future__ import annotations

import torch
from torch import nn


class ChannelNorm(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) map, as the published FeatUp ``ChannelNorm``.

    The parameter names (``norm.weight``, ``norm.bias``) and eps (LayerNorm's default, 1e-5, which
    reproduces the published outputs) match the official checkpoints, whose ``model.1.norm.*``
    entries load into this module.
    """

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, H, W, C) -> norm -> (B, C, H, W)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class MinMaxScaler(nn.Module):
    """Scales each channel of a (B, C, H, W) batch to [-0.5, 0.5] using its min and max over the batch."""

    def __init__(self, eps: float = 1e-4) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        flat = x.transpose(0, 1).reshape(c, -1)  # (C, B*H*W)
        low = flat.min(dim=1).values.view(1, c, 1, 1)
        span = flat.max(dim=1).values.view(1, c, 1, 1) - low
        return (x - low) / span.clamp_min(self.eps) - 0.5
