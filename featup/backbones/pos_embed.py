"""Position embeddings resampled as the published FeatUp featurizers do (DINO, DINOv2 and MaskCLIP code).

Their ``interpolate_pos_encoding`` keeps the table when the grid has the trained size and is square, else
resizes it bicubically by the scale factor ``(g + 0.1) / M`` without antialiasing. timm instead resizes to the
exact size with antialiasing, which gives other features wherever the grid is not the trained one: for
DINOv2 (a 37 x 37 table) already at 224 x 224, for the 14 x 14 tables of the others above 224.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

OFFSET = 0.1  # the published "small number to avoid floating point error in the interpolation"


def resample_published(pos_embed: Tensor, grid: tuple[int, int], num_prefix_tokens: int) -> Tensor:
    """(1, P + M * M, C) table -> (1, P + gh * gw, C) for a (gh, gw) patch grid, the published way."""
    gh, gw = grid
    n = pos_embed.shape[1] - num_prefix_tokens
    if gh * gw == n and gh == gw:
        return pos_embed
    m = math.isqrt(n)
    prefix, table = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    table = table.float().reshape(1, m, m, -1).permute(0, 3, 1, 2)  # (1, C, M, M)
    table = F.interpolate(
        table, scale_factor=((gh + OFFSET) / m, (gw + OFFSET) / m), mode="bicubic", align_corners=False
    )  # (1, C, gh, gw)
    table = table.permute(0, 2, 3, 1).reshape(1, gh * gw, -1).to(pos_embed.dtype)  # (1, gh * gw, C)
    return torch.cat([prefix, table], dim=1)
