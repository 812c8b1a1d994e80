"""NAF, zero-shot feature upsampling by neighbourhood attention filtering.

Chambon et al., "NAF: Zero-Shot Feature Upsampling via Neighborhood Attention Filtering" (arXiv 2511.18452),
published code github.com/valeoai/NAF (Apache-2.0; its RoPE file carries Meta's DINOv3 licence header).
This is an independent rewrite from the published math, not a copy.

One checkpoint serves every backbone: the weights only encode the guidance image. Two small conv encoders
(1x1 and 3x3, GroupNorm + SiLU, no residuals) turn the image into 256 channels, pooled to the output size
and rotated by an axial 2-D RoPE: these are the queries; their average pool to the low-res size are the
keys; the low-res features are the values. Each output pixel attends over a 9x9 window of the output grid
with a dilation of ``output // low-res`` (keys and values nearest-exact upsampled), i.e. over at most 81
low-res tokens, with no learned projections.

Same as published: parameter names (the released ``naf_release.pth`` loads strictly), the guidance
downscaling rule, the RoPE, NATTEN's neighbourhood rule (windows shifted inward at borders, never
truncated) and its size limits (``9 * (H' // h) <= H'``), bit-for-bit nearest-exact indexing.
Different: the neighbourhood attention is plain PyTorch, no NATTEN. The output grid is cut into tiles of
about one low-res cell; all pixels of a tile attend to one shared rectangle of low-res tokens (the union of
their windows, about 10x10), and a log-multiplicity bias restores each pixel's own 81-neighbour softmax
(a token repeated in a window, which happens for non-integer ratios, counts as often as it appears).
So no full-resolution key/value map is built, and tiles are processed in chunks of ``max_query_pixels``.
The encoders are not banded (their GroupNorms need whole-image statistics): they work at the guidance
size, capped at 4x the output per side; measured peak on CPU for a 1024x1024 image and output, 384
channels, 64x64 low-res: 4.5 GB RSS, of which 1.6 GB is the output and 0.8 GB the Python/torch baseline.
The unused ``use_encoder=False`` option is not offered (it cannot work with the 256-channel RoPE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from featup.errors import CheckpointError, ConfigError, InputError
from featup.upsamplers.base import (
    IMAGENET_NORM, PublishedWeights, UPSAMPLERS, check_inputs, check_state_dict, resolve_output_size,
)

GROUPS = 8  # GroupNorm groups of the image encoders
MAX_GUIDANCE_RATIO = 4  # the guidance is downscaled to at most 4x the output size before encoding


PUBLISHED: dict[str, PublishedWeights] = {
    "default": PublishedWeights(
        url="https://github.com/valeoai/NAF/releases/download/model/naf_release.pth",
        file_name="naf_release.pth",
        backbone=None,  # backbone-agnostic: one checkpoint for any features
        dim=None,
        patch=None,
    ),
}


class EncoderBlock(nn.Module):
    """GroupNorm -> SiLU -> conv -> GroupNorm -> SiLU -> conv, reflect padding, no residual."""

    def __init__(self, channels: int, kernel_size: int, *, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        conv = {"kernel_size": kernel_size, "padding": kernel_size // 2, "padding_mode": "reflect", **factory}
        self.norm1 = nn.GroupNorm(GROUPS, channels, **factory)
        self.conv1 = nn.Conv2d(channels, channels, **conv)
        self.norm2 = nn.GroupNorm(GROUPS, channels, **factory)
        self.conv2 = nn.Conv2d(channels, channels, **conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(F.silu(self.norm1(x), inplace=True))  # in place on the fresh norm output: saves a map
        return self.conv2(F.silu(self.norm2(x), inplace=True))


def image_encoder(channels: int, kernel_size: int, num_blocks: int, *, device=None, dtype=None) -> nn.Sequential:
    """RGB -> ``channels``: a conv then ``num_blocks`` EncoderBlocks, all with the same kernel size."""
    stem = nn.Conv2d(
        3, channels, kernel_size, padding=kernel_size // 2, padding_mode="reflect", device=device, dtype=dtype
    )
    blocks = [EncoderBlock(channels, kernel_size, device=device, dtype=dtype) for _ in range(num_blocks)]
    return nn.Sequential(stem, *blocks)


class AxialRoPE(nn.Module):
    """2-D rotary position embedding on [-1, 1] pixel-centre coordinates, the same rotation for every head.

    Each head's channels are two halves; channel ``c`` of the first half is rotated with the second half's
    channel ``c`` by the angle ``2 pi u / periods[c]`` (c < P) or ``2 pi v / periods[c - P]`` (c >= P),
    u and v the row and column coordinates, P = head_dim / 4.
    """

    def __init__(
        self, dim: int = 256, num_heads: int = 4, base: float = 100.0, rescale: float | None = None, *, device=None, dtype=None
    ) -> None:
        super().__init__()
        if dim % (4 * num_heads):
            raise ConfigError(f"RoPE: expected dim divisible by 4 * num_heads = {4 * num_heads}, got {dim}")
        self.num_heads = num_heads
        self.rescale = rescale
        quarter = dim // num_heads // 4
        exponents = 2 * torch.arange(quarter, device=device, dtype=dtype) / (2 * quarter)
        self.register_buffer("periods", base**exponents, persistent=True)  # (P,)

    def angles(self, height: int, width: int) -> torch.Tensor:
        """Rotation angles -> (2P, H, W): P row frequencies, then P column frequencies."""
        dd = {"device": self.periods.device, "dtype": self.periods.dtype}
        rows = 2.0 * (torch.arange(0.5, height, **dd) / height) - 1.0  # (H,)
        cols = 2.0 * (torch.arange(0.5, width, **dd) / width) - 1.0  # (W,)
        if self.training and self.rescale is not None:  # training-time zoom augmentation, as published
            limit = math.log(self.rescale)
            zoom = torch.empty(1, **dd).uniform_(-limit, limit).exp()
            rows, cols = rows * zoom, cols * zoom
        u = 2 * math.pi * rows[:, None] / self.periods  # (H, P)
        v = 2 * math.pi * cols[:, None] / self.periods  # (W, P)
        u = u.T[:, :, None].expand(-1, height, width)
        v = v.T[:, None, :].expand(-1, height, width)
        return torch.cat([u, v], dim=0)  # (2P, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> rotated (B, C, H, W), one head at a time to bound temporaries."""
        angles = self.angles(x.shape[2], x.shape[3])
        cos, sin = angles.cos(), angles.sin()  # (2P, H, W)
        heads = x.unflatten(1, (self.num_heads, 2, -1))  # (B, n, 2, 2P, H, W)
        out = torch.empty_like(heads)
        for head in range(self.num_heads):
            first, second = heads[:, head, 0], heads[:, head, 1]  # (B, 2P, H, W)
            out[:, head, 0] = first * cos - second * sin
            out[:, head, 1] = second * cos + first * sin
        return out.flatten(1, 3)


class GuidanceEncoder(nn.Module):
    """Image -> (B, dim, H', W') RoPE-rotated guidance features at the output size (``image_encoder``)."""

    def __init__(
        self, dim: int = 256, heads_rope: int = 4, rope_base: float = 100.0, rope_rescale: float | None = 2.0,
        img_layers: int = 2, *, device=None, dtype=None,
    ) -> None:
        super().__init__()
        if dim % 2:
            raise ConfigError(f"NAF: expected an even dim, got {dim}")
        factory = {"device": device, "dtype": dtype}
        self.encoder = image_encoder(dim // 2, 1, img_layers, **factory)
        self.sem_encoder = image_encoder(dim // 2, 3, img_layers, **factory)
        self.rope = AxialRoPE(dim, heads_rope, rope_base, rope_rescale, **factory)

    def forward(self, image: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
        height, width = output_size
        size = guidance_size(tuple(image.shape[2:]), output_size)
        if size != tuple(image.shape[2:]):
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        half = self.encoder[0].out_channels
        feats = image.new_empty(image.shape[0], 2 * half, height, width)  # (B, dim, H', W')
        feats[:, :half] = _pool(self.encoder(image), output_size)
        feats[:, half:] = _pool(self.sem_encoder(image), output_size)
        return self.rope(feats)  # (B, dim, H', W')


def _pool(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``adaptive_avg_pool2d``, skipped when it is the identity (saves a copy of a full-resolution map)."""
    return x if tuple(x.shape[2:]) == tuple(size) else F.adaptive_avg_pool2d(x, size)


def guidance_size(image_size: tuple[int, int], output_size: tuple[int, int]) -> tuple[int, int]:
    """Size the image is encoded at: unchanged unless a side exceeds 4x the output, then both sides are
    capped by 4x EITHER output side (as published, so the aspect ratio may change)."""
    (height, width), (out_h, out_w) = image_size, output_size
    cap = MAX_GUIDANCE_RATIO
    if height <= cap * out_h and width <= cap * out_w:
        return height, width
    return min(height, cap * out_h, cap * out_w), min(width, cap * out_w, cap * out_h)


def natten_neighbours(length: int, kernel_size: int, dilation: int, device=None) -> torch.Tensor:
    """Window of each position on a dilated axis -> (length, kernel_size) positions.

    Position i belongs to the sub-grid g = i mod d of Lg positions; its window is kernel_size consecutive
    sub-grid points centred on it, shifted inward (never truncated) where it would leave the sub-grid.
    """
    radius = kernel_size // 2
    i = torch.arange(length, device=device)
    group, index = i % dilation, i // dilation
    group_len = (length - group + dilation - 1) // dilation
    start = torch.minimum((index - radius).clamp(min=0), group_len - kernel_size)
    return (start[:, None] + torch.arange(kernel_size, device=device)) * dilation + group[:, None]


def nearest_exact_index(out_len: int, in_len: int, device=None) -> torch.Tensor:
    """Source index of each output position under ``F.interpolate(mode="nearest-exact")`` -> (out_len,).

    Computed by PyTorch's own kernel on ``device``, so it matches the published resize bit for bit.
    """
    source = torch.arange(in_len, device=device, dtype=torch.float64).view(1, 1, in_len)
    return F.interpolate(source, size=out_len, mode="nearest-exact").view(out_len).long()


@dataclass(frozen=True)
class AxisTiles:
    """One axis of the tiled attention: ``tile`` output positions share a window of ``tokens.shape[1]``
    consecutive low-res positions; ``bias`` is log(how often each window token is a neighbour), -inf if never."""

    tile: int
    tokens: torch.Tensor  # (n_tiles, S) low-res positions of each tile's window
    bias: torch.Tensor  # (n_tiles * tile, S)

    @property
    def num_tiles(self) -> int:
        return self.tokens.shape[0]


def axis_tiles(out_len: int, in_len: int, kernel_size: int, dilation: int, *, device=None, dtype=None) -> AxisTiles:
    """Plan one axis: every output position's low-res neighbours, grouped into tiles of about one low-res cell."""
    source = nearest_exact_index(out_len, in_len, device)
    neighbours = source[natten_neighbours(out_len, kernel_size, dilation, device)]  # (L, k) low-res positions
    tile = dilation * math.ceil(4 / dilation)  # a multiple of the dilation, at least 4
    num_tiles = math.ceil(out_len / tile)
    padded = torch.cat([neighbours, neighbours[-1:].expand(num_tiles * tile - out_len, -1)])  # (n*T, k)
    per_tile = padded.view(num_tiles, tile * kernel_size)
    low, high = per_tile.min(dim=1).values, per_tile.max(dim=1).values
    span = int((high - low).max()) + 1
    low = low.clamp(max=in_len - span)
    tokens = low[:, None] + torch.arange(span, device=device)  # (n_tiles, S)
    offsets = padded - low.repeat_interleave(tile)[:, None]  # (n*T, k) in [0, S)
    counts = F.one_hot(offsets, span).sum(dim=1).to(dtype or torch.get_default_dtype())  # (n*T, S)
    return AxisTiles(tile, tokens, counts.log())


def neighbourhood_attention(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, num_heads: int, kernel_size: int,
    *, max_query_pixels: int = 8192,
) -> torch.Tensor:
    """Dilated 2-D neighbourhood attention from the output grid to nearest-exact upsampled low-res tokens.

    queries (B, Dq, H', W'), keys (B, Dq, h, w), values (B, C, h, w) -> (B, C, H', W'); dilation
    ``(H' // h, W' // w)``, logits scaled by ``(Dq / num_heads) ** -0.5``, heads split along channels.
    """
    (batch, dq, height, width), (low_h, low_w) = queries.shape, keys.shape[2:]
    dilation = (height // low_h, width // low_w)
    factory = {"device": queries.device, "dtype": queries.dtype}
    rows = axis_tiles(height, low_h, kernel_size, dilation[0], **factory)
    cols = axis_tiles(width, low_w, kernel_size, dilation[1], **factory)
    q = queries.unflatten(1, (num_heads, -1))  # (B, n, D, H', W')
    k = keys.unflatten(1, (num_heads, -1))  # (B, n, D, h, w)
    v = values.to(queries.dtype).unflatten(1, (num_heads, -1))  # (B, n, Dv, h, w)
    out = values.new_empty(batch, values.shape[1], height, width, dtype=queries.dtype)  # (B, C, H', W')
    budget = max(1, max_query_pixels // (batch * rows.tile * cols.tile))  # tiles per chunk
    col_step = min(cols.num_tiles, budget)
    row_step = max(1, budget // col_step)
    for r0 in range(0, rows.num_tiles, row_step):
        for c0 in range(0, cols.num_tiles, col_step):
            r1, c1 = min(r0 + row_step, rows.num_tiles), min(c0 + col_step, cols.num_tiles)
            block = _attend_tiles(q, k, v, rows, cols, (r0, r1), (c0, c1), dq // num_heads)
            r_lo, c_lo = r0 * rows.tile, c0 * cols.tile
            r_hi, c_hi = min(r1 * rows.tile, height), min(c1 * cols.tile, width)
            out[:, :, r_lo:r_hi, c_lo:c_hi] = block[:, :, : r_hi - r_lo, : c_hi - c_lo]
    return out


def _attend_tiles(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: AxisTiles, cols: AxisTiles,
    row_tiles: tuple[int, int], col_tiles: tuple[int, int], head_dim: int,
) -> torch.Tensor:
    """Attention for a rectangle of tiles -> (B, C, nr * Th, nc * Tw), padded past the grid's end."""
    (r0, r1), (c0, c1) = row_tiles, col_tiles
    nr, nc, th, tw = r1 - r0, c1 - c0, rows.tile, cols.tile
    qb = q[..., r0 * th : r1 * th, c0 * tw : c1 * tw]
    qb = F.pad(qb, (0, nc * tw - qb.shape[-1], 0, nr * th - qb.shape[-2]))  # (B, n, D, nr*Th, nc*Tw)
    qb = qb.unflatten(-1, (nc, tw)).unflatten(-3, (nr, th)).permute(0, 1, 3, 5, 4, 6, 2).flatten(4, 5)
    kb = _token_windows(k, rows.tokens[r0:r1], cols.tokens[c0:c1])  # (B, n, nr, nc, R*S, D)
    vb = _token_windows(v, rows.tokens[r0:r1], cols.tokens[c0:c1])  # (B, n, nr, nc, R*S, Dv)
    row_bias = rows.bias[r0 * th : r1 * th].view(nr, 1, th, 1, -1, 1)
    col_bias = cols.bias[c0 * tw : c1 * tw].view(1, nc, 1, tw, 1, -1)
    bias = (row_bias + col_bias).flatten(4, 5).flatten(2, 3)  # (nr, nc, Th*Tw, R*S)
    logits = torch.matmul(qb, kb.transpose(-1, -2)) * head_dim**-0.5 + bias  # (B, n, nr, nc, Th*Tw, R*S)
    ob = torch.matmul(logits.softmax(dim=-1), vb)  # (B, n, nr, nc, Th*Tw, Dv)
    ob = ob.unflatten(4, (th, tw)).permute(0, 1, 6, 2, 4, 3, 5)  # (B, n, Dv, nr, Th, nc, Tw)
    return ob.reshape(ob.shape[0], -1, nr * th, nc * tw)  # (B, C, nr*Th, nc*Tw)


def _token_windows(x: torch.Tensor, row_tokens: torch.Tensor, col_tokens: torch.Tensor) -> torch.Tensor:
    """(B, n, D, h, w) low-res map, (nr, R) and (nc, S) windows -> (B, n, nr, nc, R*S, D)."""
    x = x[:, :, :, row_tokens]  # (B, n, D, nr, R, w)
    x = x[..., col_tokens]  # (B, n, D, nr, R, nc, S)
    return x.permute(0, 1, 3, 5, 4, 6, 2).flatten(4, 5)


class NAF(nn.Module):
    """Neighbourhood Attention Filtering upsampler, for features of any backbone and channel count."""

    image_norm = IMAGENET_NORM

    def __init__(
        self,
        dim: int = 256,
        heads_attn: int = 4,
        heads_rope: int = 4,
        kernel_size: int = 9,
        rope_base: float = 100.0,
        rope_rescale: float | None = 2.0,
        img_layers: int = 2,
        *,
        max_query_pixels: int = 8192,
        device=None,
        dtype=None,
    ) -> None:
        """``dim``: guidance channels (not the feature channels, which may be anything divisible by
        ``heads_attn``); ``rope_rescale`` only acts in training mode; ``max_query_pixels``: output pixels
        (summed over the batch) attended at once, which bounds the attention's working memory."""
        super().__init__()
        if dim % heads_attn:
            raise ConfigError(f"NAF: expected dim divisible by heads_attn={heads_attn}, got {dim}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"NAF: expected an odd positive kernel_size, got {kernel_size}")
        if max_query_pixels < 1:
            raise ConfigError(f"NAF: expected max_query_pixels >= 1, got {max_query_pixels}")
        self.heads_attn = heads_attn
        self.kernel_size = kernel_size
        self.max_query_pixels = max_query_pixels
        self.image_encoder = GuidanceEncoder(
            dim, heads_rope, rope_base, rope_rescale, img_layers, device=device, dtype=dtype
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.image_encoder.rope.periods.dtype

    def forward(
        self, lr_feats: torch.Tensor, image: torch.Tensor, output_size: Sequence[int] | int | None = None
    ) -> torch.Tensor:
        """(B, C, h, w) features, (B, 3, H, W) ImageNet-normalised image -> (B, C, H', W'), default (H, W)."""
        check_inputs(lr_feats, image, dim=None)
        size = resolve_output_size(image, output_size)
        self._check_sizes(lr_feats, size)
        queries = self.image_encoder(image.to(self.dtype), size)  # (B, dim, H', W')
        keys = F.adaptive_avg_pool2d(queries, lr_feats.shape[2:])  # (B, dim, h, w)
        out = neighbourhood_attention(
            queries, keys, lr_feats, self.heads_attn, self.kernel_size, max_query_pixels=self.max_query_pixels
        )
        return out.to(lr_feats.dtype)  # (B, C, H', W')

    def _check_sizes(self, lr_feats: torch.Tensor, size: tuple[int, int]) -> None:
        if lr_feats.shape[1] % self.heads_attn:
            raise InputError(f"NAF: expected a channel count divisible by {self.heads_attn}, got {lr_feats.shape[1]}")
        for axis, low, out in zip(("height", "width"), lr_feats.shape[2:], size):
            dilation = out // low
            if dilation < 1 or self.kernel_size * dilation > out:
                raise InputError(
                    f"NAF: output {axis} {out} does not fit a {self.kernel_size}-wide window at dilation "
                    f"{out} // {low} = {dilation}: expected output {axis} >= low-res {axis} and "
                    f"{self.kernel_size} * dilation <= {out} (a low-res {axis} of at least {self.kernel_size} always works)"
                )


def state_dict_from_checkpoint(raw: object) -> dict[str, torch.Tensor]:
    """The released ``naf_release.pth`` (a plain state dict, keys under ``image_encoder.``) -> state dict."""
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"NAF checkpoint: expected a state dict (a mapping of names to tensors), got {type(raw).__name__}")
    bad = [str(key) for key, value in raw.items() if not isinstance(key, str) or not isinstance(value, torch.Tensor)]
    if bad:
        raise CheckpointError(f"NAF checkpoint: expected only str -> Tensor entries, got other entries: {bad[:5]}")
    if not any(key.startswith("image_encoder.") for key in raw):
        raise CheckpointError(f"NAF checkpoint: expected keys under 'image_encoder.', got {sorted(raw)[:5]}")
    return dict(raw)


def from_state_dict(state: Mapping[str, torch.Tensor], *, device=None, dtype=None) -> NAF:
    """Build a NAF sized by ``state`` (guidance dim, encoder depth, RoPE heads) and load it strictly."""
    stem = _require(state, "image_encoder.encoder.0.weight")
    periods = _require(state, "image_encoder.rope.periods")
    dim = 2 * stem.shape[0]
    blocks = {key.split(".")[2] for key in state if key.startswith("image_encoder.encoder.")} - {"0"}
    if periods.dim() != 1 or periods.numel() == 0 or dim % (4 * periods.numel()):
        raise CheckpointError(f"NAF checkpoint: image_encoder.rope.periods has shape {tuple(periods.shape)}, "
                              f"which fits no head count for dim {dim}")
    try:
        model = NAF(dim, heads_rope=dim // (4 * periods.numel()), img_layers=len(blocks), device=device, dtype=dtype)
    except ConfigError as error:
        raise CheckpointError(f"NAF checkpoint: implies an invalid model: {error}") from None
    check_state_dict("NAF", model.state_dict(), state)
    model.load_state_dict(state, strict=True)
    return model


def _require(state: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"NAF checkpoint: missing key {key!r}")
    return state[key]


@UPSAMPLERS.register("naf")
def build_naf(dim: int, *, num_stages: int = 4, device=None, dtype=None, guidance_dim: int = 256, **kwargs) -> NAF:
    """Randomly initialised NAF with the published defaults. ``dim`` is the feature channel count (only
    checked: any multiple of ``heads_attn`` works); ``guidance_dim`` is NAF's own ``dim`` (its guidance channels);
    ``num_stages`` is ignored; ``kwargs`` go to ``NAF``."""
    heads = kwargs.get("heads_attn", 4)
    if dim < 1 or dim % heads:
        raise ConfigError(f"naf: expected a feature dim divisible by heads_attn={heads}, got {dim}")
    return NAF(guidance_dim, **kwargs, device=device, dtype=dtype)
