"""AnyUp: one feature upsampler for any backbone and any channel count.

Wimmer et al., "AnyUp: Universal Feature Upsampling" (ICLR 2026), https://github.com/wimmerth/anyup
(published code and weights under CC BY 4.0). Re-implemented here from the published commit
351807a9c4287368732cc247f26c7c81c9139af4; parameter names follow the released checkpoints
(``anyup_paper.pth``, ``anyup_multi_backbone.pth``), which load with strict key checking.

How it works: the guidance image is encoded at full resolution (1x1 conv + two ResBlocks, then 2-D
RoPE). Queries are that encoding (re-encoded) averaged down to the output size; keys combine the
encoding averaged down to the feature grid with a *feature-unification* layer that turns any number
of feature channels into 128 (each channel convolved with 128 learned 5x5 filters, softmaxed over the
filters, averaged over channels), so the same weights serve every backbone. Each output pixel attends
to a window of low-res cells around it (+-10 % of the image a side); the head-averaged attention
weights are applied to the raw low-res features, so the output lives in the input feature space.

Same as published: the arithmetic of the standard (non-NATTEN) attention path, including the window
bounds (computed in float32), the feature-unification channel pairing of the released code (see
``FeatureUnification``), RMSNorm eps and the unused MHA value/output projections (kept for loading).

Different: the attention is computed per rectangular tile of output pixels against the low-res cells
its windows can reach (``max_query_pixels``), instead of every query against every key under a mask,
so memory and time grow with the output size only; the RoPE and feature unification run in bands.
Results match the published code to float32 round-off. The NATTEN variant (slightly different
windows) and the Gaussian-derivative initialisation (a training option) are not provided.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from featup.errors import CheckpointError, ConfigError, InputError
from featup.upsamplers.base import (
    IMAGENET_NORM, PublishedWeights, UPSAMPLERS, check_inputs, check_state_dict, resolve_output_size, state_shape,
)

NUM_GROUPS = 8  # GroupNorm groups in every ResBlock
_BAND_ELEMENTS = 1 << 24  # elements of one band of the RoPE and feature-unification intermediates


_RELEASES = "https://github.com/wimmerth/anyup/releases/download"

# Both checkpoints work with any backbone and channel count, hence no backbone/dim/patch. "default" is
# the paper model (hub entry ``anyup``), trained on DINOv2 ViT-S/14 features (project backbone
# ``dinov2``); "multi_backbone" (hub entry ``anyup_multi_backbone``) was trained on DINOv2-S, DINOv2-R-S,
# CLIP-B, SigLIP-B and ViT-B features. Same architecture and layout.
PUBLISHED: dict[str, PublishedWeights] = {
    "default": PublishedWeights(f"{_RELEASES}/checkpoint/anyup_paper.pth", "anyup_paper.pth", None, None, None),
    "multi_backbone": PublishedWeights(
        f"{_RELEASES}/checkpoint_v2/anyup_multi_backbone.pth", "anyup_multi_backbone.pth", None, None, None
    ),
}


class ResBlock(nn.Module):
    """Pre-norm residual block: (GroupNorm, SiLU, 1x1 conv) twice, plus an identity or 1x1 shortcut."""

    def __init__(self, in_channels: int, out_channels: int, *, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.block = nn.Sequential(
            nn.GroupNorm(NUM_GROUPS, in_channels, **factory),
            nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 1, bias=False, **factory),
            nn.GroupNorm(NUM_GROUPS, out_channels, **factory),
            nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, 1, bias=False, **factory),
        )
        same = in_channels == out_channels
        self.shortcut = nn.Identity() if same else nn.Conv2d(in_channels, out_channels, 1, bias=False, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) + self.shortcut(x)


def _encoder(first: nn.Module, in_channels: int, dim: int, factory: dict) -> nn.Sequential:
    """``first`` layer, then two ResBlocks ending at ``dim`` channels."""
    return nn.Sequential(first, ResBlock(in_channels, dim, **factory), ResBlock(dim, dim, **factory))


def _conv(in_channels: int, dim: int, kernel_size: int, factory: dict) -> nn.Conv2d:
    """A bias-free conv with reflect padding (a 1x1 conv pads nothing)."""
    pad = kernel_size // 2
    return nn.Conv2d(in_channels, dim, kernel_size, padding=pad, padding_mode="reflect", bias=False, **factory)


class FeatureUnification(nn.Module):
    """Maps (B, C, h, w) features with any C to (B, N, h, w) with N learned k x k basis filters.

    Every (input channel, basis filter) pair gives a response map, zero-padded and divided by the
    number of in-bounds taps. The released code lays these C*N responses out channel-major
    (index ``c * N + j``) but reads them back filter-major (``.view(B, N, C, h, w)``), so the
    softmax over the N filters at slot ``s`` mixes responses ``o * C + s`` for o < N, i.e. channel
    ``(o * C + s) // N`` with filter ``(o * C + s) % N``. The released weights were trained with that
    pairing, so it is reproduced here explicitly; the N-way softmaxes are then averaged over the C slots.
    """

    def __init__(self, out_channels: int = 128, kernel_size: int = 5, *, device=None, dtype=None) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.basis = nn.Parameter(torch.randn(out_channels, 1, kernel_size, kernel_size, device=device, dtype=dtype))

    def _tap_counts(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        """(h, w) number of the k x k taps around each cell that fall inside the map."""
        p = self.kernel_size // 2

        def counts(n: int) -> torch.Tensor:
            idx = torch.arange(n, device=like.device)
            return (torch.clamp(idx + p, max=n - 1) - torch.clamp(idx - p, min=0) + 1).to(like.dtype)

        return counts(h)[:, None] * counts(w)[None, :]

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        b, c, h, w = feats.shape
        n, p = self.out_channels, self.kernel_size // 2
        padded = F.pad(feats, (p, p, p, p))  # (B, C, h+2p, w+2p)
        taps = self._tap_counts(h, w, feats)  # (h, w)
        step = max(1, _BAND_ELEMENTS // (b * n * h * w))
        total = feats.new_zeros(b, n, h, w)
        for start in range(0, c, step):
            slots = torch.arange(start, min(start + step, c), device=feats.device)
            pair = torch.arange(n, device=feats.device)[:, None] * c + slots[None, :]  # (N, S) flat response index
            channel, filters = (pair // n).flatten(), (pair % n).flatten()
            resp = F.conv2d(padded[:, channel], self.basis[filters], groups=channel.numel())  # (B, N*S, h, w)
            resp = resp.view(b, n, slots.numel(), h, w) / taps
            total = total + resp.softmax(dim=1).sum(dim=2)
        return total / c  # (B, N, h, w)


class RoPE(nn.Module):
    """2-D rotary position encoding with learned frequencies (2, dim), over coordinates in [0, 1]."""

    def __init__(self, dim: int, theta: float = 100.0, *, device=None, dtype=None) -> None:
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.freqs = nn.Parameter(torch.empty(2, dim, device=device, dtype=dtype))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Published initial frequencies: y uses the first half of the channels, x the second half."""
        quarter = self.dim // 4
        one_axis = self.theta ** torch.linspace(0, -1, quarter)
        one_axis = torch.cat([one_axis, one_axis])
        freqs = torch.zeros(2, self.dim)
        freqs[0, : self.dim // 2] = one_axis
        freqs[1, self.dim // 2 :] = one_axis
        self.freqs.copy_(freqs * 2 * torch.pi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate (B, dim, H, W) channels by their pixel's angle; computed in row bands."""
        b, dim, height, width = x.shape
        ys = torch.linspace(0, 1, height, device=x.device, dtype=x.dtype)
        xs = torch.linspace(0, 1, width, device=x.device, dtype=x.dtype)
        out = torch.empty_like(x)
        rows = max(1, _BAND_ELEMENTS // (b * dim * width))
        for top in range(0, height, rows):
            band = slice(top, min(top + rows, height))
            grid = torch.stack(torch.meshgrid(ys[band], xs, indexing="ij"), dim=-1)  # (rows, W, 2)
            angle = grid @ self.freqs.to(x.dtype)  # (rows, W, dim)
            tokens = x[:, :, band].permute(0, 2, 3, 1)  # (B, rows, W, dim)
            half = dim // 2
            rotated = torch.cat([-tokens[..., half:], tokens[..., :half]], dim=-1)
            out[:, :, band] = (tokens * angle.cos() + rotated * angle.sin()).permute(0, 3, 1, 2)
        return out


class HeadProjections(nn.Module):
    """The parameters of ``nn.MultiheadAttention`` (packed q/k/v projection, output projection).

    Only the query and key rows of ``in_proj_*`` are used: AnyUp applies the attention weights to
    the raw features. The value rows and ``out_proj`` are kept so released checkpoints load strictly.
    """

    def __init__(self, dim: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim, device=device, dtype=dtype))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim, device=device, dtype=dtype))
        self.out_proj = nn.Linear(dim, dim, device=device, dtype=dtype)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def project(self, x: torch.Tensor, which: int) -> torch.Tensor:
        """(..., dim) -> (..., dim) through the query (0) or key (1) projection."""
        dim = self.in_proj_weight.shape[1]
        rows = slice(which * dim, (which + 1) * dim)
        return F.linear(x, self.in_proj_weight[rows], self.in_proj_bias[rows])


class CrossAttention(nn.Module):
    """RMS-normalised, projected multi-head query/key logits (parameter holder of the published block)."""

    def __init__(self, dim: int, num_heads: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm_q = nn.RMSNorm(dim, device=device, dtype=dtype)
        self.norm_k = nn.RMSNorm(dim, device=device, dtype=dtype)
        self.attention = HeadProjections(dim, device=device, dtype=dtype)

    def heads(self, tokens: torch.Tensor, which: int) -> torch.Tensor:
        """(B, N, dim) query (0) or key (1) tokens -> (B, heads, N, dim/heads), queries pre-scaled."""
        norm = self.norm_q if which == 0 else self.norm_k
        x = self.attention.project(norm(tokens), which)
        b, n, dim = x.shape
        head_dim = dim // self.num_heads
        x = x.view(b, n, self.num_heads, head_dim).transpose(1, 2)
        return x * math.sqrt(1.0 / head_dim) if which == 0 else x


def window_bounds(out_len: int, low_len: int, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """First and one-past-last low-res cell each output position may attend to along one axis.

    Output position i (centre ``(i + 0.5) / out_len``) reaches the cells overlapping
    ``[centre - ratio, centre + ratio]`` clamped to [0, 1]; computed in float32 as published.
    A ratio <= 0 means no window (every cell).
    """
    if ratio <= 0:
        return torch.zeros(out_len, dtype=torch.long), torch.full((out_len,), low_len, dtype=torch.long)
    centre = (torch.arange(out_len, dtype=torch.float32) + 0.5) / out_len
    start = ((centre - ratio).clamp(0.0, 1.0) * low_len).floor().long()
    stop = ((centre + ratio).clamp(0.0, 1.0) * low_len).ceil().long()
    return start, stop


def _tiles(length: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, length)) for i in range(0, length, size)]


class WindowCrossAttention(nn.Module):
    """Each output pixel's query attends to the low-res keys in its window; the head-averaged weights
    mix the raw low-res features. Registered as ``cross_decode`` (published ``CrossAttentionBlock``)."""

    def __init__(self, dim: int, num_heads: int, window_ratio: float, *, device=None, dtype=None) -> None:
        super().__init__()
        self.window_ratio = window_ratio
        self.cross_attn = CrossAttention(dim, num_heads, device=device, dtype=dtype)
        self.conv2d = nn.Conv2d(dim, dim, 3, padding=1, bias=False, device=device, dtype=dtype)

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, max_query_pixels: int | None
    ) -> torch.Tensor:
        """queries (B, D, H', W'), keys (B, D, h, w), values (B, C, h, w) -> (B, C, H', W')."""
        queries = self.conv2d(queries)  # (B, D, H', W')
        b, _, out_h, out_w = queries.shape
        h, w = keys.shape[2:]
        k = self.cross_attn.heads(keys.flatten(2).transpose(1, 2), 1)  # (B, heads, h*w, d)
        k = k.unflatten(2, (h, w))  # (B, heads, h, w, d)
        v = values.permute(0, 2, 3, 1)  # (B, h, w, C)
        row_start, row_stop = window_bounds(out_h, h, self.window_ratio)
        col_start, col_stop = window_bounds(out_w, w, self.window_ratio)
        row_ok = _allowed(row_start, row_stop, h, keys.device)  # (H', h)
        col_ok = _allowed(col_start, col_stop, w, keys.device)  # (W', w)
        tile_h, tile_w = _tile_shape(out_h, out_w, max_query_pixels)
        out = values.new_empty(b, values.shape[1], out_h, out_w)
        for rows in _tiles(out_h, tile_h):
            low_rows = slice(int(row_start[rows.start]), int(row_stop[rows.stop - 1]))  # rows its windows reach
            for cols in _tiles(out_w, tile_w):
                low_cols = slice(int(col_start[cols.start]), int(col_stop[cols.stop - 1]))
                allowed = row_ok[rows, low_rows][:, None, :, None] & col_ok[cols, low_cols][None, :, None, :]
                q = self.cross_attn.heads(queries[:, :, rows, cols].flatten(2).transpose(1, 2), 0)  # (B, heads, q, d)
                mixed = _attend(q, k[:, :, low_rows, low_cols], v[:, low_rows, low_cols], allowed)  # (B, q, C)
                out[:, :, rows, cols] = mixed.transpose(1, 2).unflatten(2, (rows.stop - rows.start, -1))
        return out  # (B, C, H', W')


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Window attention of one tile: q (B, heads, q, d), k (B, heads, kh, kw, d), v (B, kh, kw, C),
    allowed (th, tw, kh, kw) -> (B, q, C), the raw values mixed by the head-averaged weights."""
    logits = q @ k.flatten(2, 3).transpose(-1, -2)  # (B, heads, q, k)
    logits = logits.masked_fill(~allowed.flatten(2).flatten(0, 1), float("-inf"))
    weights = logits.softmax(dim=-1).mean(dim=1)  # (B, q, k)
    return weights @ v.flatten(1, 2)  # (B, q, C)


def _allowed(start: torch.Tensor, stop: torch.Tensor, low_len: int, device: torch.device) -> torch.Tensor:
    """(out_len, low_len) bool: cell j lies in [start[i], stop[i])."""
    cells = torch.arange(low_len)
    return ((cells[None, :] >= start[:, None]) & (cells[None, :] < stop[:, None])).to(device)


def _tile_shape(out_h: int, out_w: int, max_query_pixels: int | None) -> tuple[int, int]:
    """A near-square tile of at most ``max_query_pixels`` output pixels (the whole output when None)."""
    if max_query_pixels is None:
        return out_h, out_w
    tile_h = min(out_h, max(1, math.isqrt(max_query_pixels)))
    return tile_h, min(out_w, max(1, max_query_pixels // tile_h))


class AnyUp(nn.Module):
    """AnyUp upsampler: ``forward(lr_feats, image, output_size=None)`` for features of any channel count.

    ``max_query_pixels`` bounds the output pixels (per batch item) whose window attention is computed
    at once; None computes all at once (more memory, same result).
    """

    image_norm = IMAGENET_NORM

    def __init__(
        self,
        input_dim: int = 3,
        qk_dim: int = 128,
        kernel_size: int = 1,
        kernel_size_lfu: int = 5,
        window_ratio: float = 0.1,
        num_heads: int = 4,
        lfu_dim: int | None = None,
        *,
        max_query_pixels: int | None = 4096,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        lfu_dim = qk_dim if lfu_dim is None else lfu_dim
        _check_config(qk_dim, lfu_dim, num_heads, max_query_pixels)
        factory = {"device": device, "dtype": dtype}
        self.input_dim, self.qk_dim, self.lfu_dim = input_dim, qk_dim, lfu_dim
        self.max_query_pixels = max_query_pixels
        self.image_encoder = _encoder(_conv(input_dim, qk_dim, kernel_size, factory), qk_dim, qk_dim, factory)
        self.key_encoder = _encoder(_conv(qk_dim, qk_dim, 1, factory), qk_dim, qk_dim, factory)
        self.query_encoder = _encoder(_conv(qk_dim, qk_dim, 1, factory), qk_dim, qk_dim, factory)
        unify = FeatureUnification(lfu_dim, kernel_size_lfu, **factory)
        self.key_features_encoder = _encoder(unify, lfu_dim, qk_dim, factory)
        self.cross_decode = WindowCrossAttention(qk_dim, num_heads, window_ratio, **factory)
        self.aggregation = _encoder(_conv(2 * qk_dim, qk_dim, 3, factory), qk_dim, qk_dim, factory)
        self.rope = RoPE(qk_dim, **factory)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised image -> (B, D, H, W) position-encoded pixel embedding."""
        return self.rope(self.image_encoder(image))

    def keys(self, encoded: torch.Tensor, lr_feats: torch.Tensor) -> torch.Tensor:
        """Keys on the feature grid (B, D, h, w) from the image embedding and the unified features."""
        image_keys = F.adaptive_avg_pool2d(self.key_encoder(encoded), lr_feats.shape[2:])  # (B, D, h, w)
        feature_keys = self.key_features_encoder(F.normalize(lr_feats, dim=1))  # (B, D, h, w)
        return self.aggregation(torch.cat([image_keys, feature_keys], dim=1))  # (B, D, h, w)

    def forward(
        self, lr_feats: torch.Tensor, image: torch.Tensor, output_size: Sequence[int] | int | None = None
    ) -> torch.Tensor:
        """Upsample (B, C, h, w) features guided by the ImageNet-normalised (B, 3, H, W) image -> (B, C, H', W').

        ``output_size`` defaults to the image size; any size works (queries are averaged down or up
        to it). Computed in the parameters' dtype; the output has ``lr_feats``' dtype.
        """
        check_inputs(lr_feats, image, dim=None, guidance_dim=self.input_dim)
        size = resolve_output_size(image, output_size)
        if min(lr_feats.shape[2:]) < 2:
            cells = tuple(lr_feats.shape[2:])
            raise InputError(f"lr_feats: expected at least 2x2 cells (reflect padding), got {cells}")
        dtype = self.rope.freqs.dtype
        feats = lr_feats.to(dtype)  # (B, C, h, w)
        encoded = self.encode_image(image.to(dtype))  # (B, D, H, W)
        keys = self.keys(encoded, feats)  # (B, D, h, w)
        queries = F.adaptive_avg_pool2d(self.query_encoder(encoded), size)  # (B, D, H', W')
        del encoded
        out = self.cross_decode(queries, keys, feats, self.max_query_pixels)  # (B, C, H', W')
        return out.to(lr_feats.dtype)


def _check_config(qk_dim: int, lfu_dim: int, num_heads: int, max_query_pixels: int | None) -> None:
    if qk_dim % NUM_GROUPS or lfu_dim % NUM_GROUPS or qk_dim % 4:
        raise ConfigError(f"AnyUp: expected qk_dim and lfu_dim divisible by {NUM_GROUPS}, got {qk_dim} and {lfu_dim}")
    if num_heads < 1 or qk_dim % num_heads:
        raise ConfigError(f"AnyUp: expected num_heads dividing qk_dim={qk_dim}, got {num_heads}")
    if max_query_pixels is not None and max_query_pixels < 1:
        raise ConfigError(f"AnyUp: expected max_query_pixels >= 1 or None, got {max_query_pixels}")


def state_dict_from_checkpoint(raw: object) -> dict[str, torch.Tensor]:
    """The module state dict held by a released AnyUp file: a plain name -> tensor mapping (no wrapper)."""
    if not isinstance(raw, Mapping):
        found = type(raw).__name__
        raise CheckpointError(f"AnyUp checkpoint: expected a plain state dict (name -> tensor), got {found}")
    bad = [str(key) for key, value in raw.items() if not isinstance(key, str) or not isinstance(value, torch.Tensor)]
    if bad:
        raise CheckpointError(f"AnyUp checkpoint: expected a plain state dict of tensors, got other entries {bad[:5]}")
    return dict(raw)


def from_state_dict(
    state: Mapping[str, torch.Tensor],
    *,
    num_heads: int = 4,
    window_ratio: float = 0.1,
    max_query_pixels: int | None = 4096,
    device=None,
    dtype=None,
) -> AnyUp:
    """Build AnyUp with the sizes implied by ``state`` and load it strictly.

    ``num_heads`` and ``window_ratio`` are not recorded in the checkpoint (both releases use 4 and 0.1).
    Raises CheckpointError naming the missing, unexpected or wrongly shaped keys.
    """
    qk_dim, input_dim, kernel_size, _ = state_shape("AnyUp", state, "image_encoder.0.weight", 4)
    lfu_dim, _, kernel_size_lfu, _ = state_shape("AnyUp", state, "key_features_encoder.0.basis", 4)
    try:
        model = AnyUp(
            input_dim, qk_dim, kernel_size, kernel_size_lfu, window_ratio, num_heads, lfu_dim,
            max_query_pixels=max_query_pixels, device=device, dtype=dtype,
        )
    except ConfigError as err:
        raise CheckpointError(f"AnyUp state dict: implies an invalid model: {err}") from err
    check_state_dict("AnyUp", model.state_dict(), state)
    model.load_state_dict(state, strict=True)
    return model


@UPSAMPLERS.register("anyup")
def build_anyup(dim: int, *, num_stages: int = 4, device=None, dtype=None, **kwargs) -> AnyUp:
    """Randomly initialised AnyUp with the published defaults; works for any ``dim`` (checked, then
    unused); ``num_stages`` is accepted for a uniform factory signature and ignored."""
    if int(dim) < 1:
        raise ConfigError(f"anyup: expected a positive feature dim, got {dim}")
    return AnyUp(device=device, dtype=dtype, **kwargs)
