"""LoftUp: a coordinate-based cross-attention transformer upsampler.

Huang, Chen, Havrylov, Geiger, Zhang, "LoftUp: Learning a Coordinate-Based Feature Upsampler for Vision
Foundation Models" (arXiv 2504.14032); published code github.com/andrehuang/loftup (commit
6620d9b, MIT licence). One checkpoint per backbone on the Hugging Face hub (``PUBLISHED``).

Every output pixel is a query: the min-max-scaled colour and the pixel coordinates go through a sine/cosine
encoding with learned phases, then a 3x3 conv stem. Each query attends to the low-resolution feature tokens
(channel-normalised, concatenated with a small sine encoding of their own grid position) in two pre-norm
cross-attention layers, and a 1x1 projection with a channel LayerNorm gives the output features.

Same as published: the math, in the same operation order, so the released checkpoints reproduce the
published outputs (1e-5 on the fixtures). The sinusoid arguments reach about 2e4 rad, where one float32 ulp
moves the output by ~1e-3, so the grids and frequencies are built in float32 exactly as torch's CPU
``linspace``/``exp`` round them (``linspace_f32``) on any device. The guidance colours are min-max scaled over
the whole batch (one image's output depends on the others in its batch), as published.

Differences:

* ``forward(lr_feats, image, output_size=None)`` takes the features first (published
  ``UpsamplerwithChannelNorm.forward(lr_feats, img)`` also does). Published has no size argument: the output
  takes the guidance image's size; here a different ``output_size`` resizes the guidance image to it
  (bilinear, antialiased when shrinking), which is what the published example does by hand.
* The published wrapper (``ChannelNorm`` + ``LoftUp``) is one module with readable parameter names;
  ``state_dict_from_checkpoint`` renames the released keys (``CHECKPOINT_RENAMES``).
* Memory: the conv stem runs in row bands with a 2-row halo (exact) of at most ``max_band_pixels``
  pixels, and attention in chunks of at most ``max_query_pixels`` queries (batch included), so peak memory
  grows with the output size, not with output pixels x tokens. In training mode the stem runs unbanded so
  BatchNorm sees the whole batch, as published.
* Only the released ``lr_pe_type="sine"`` variant; the unused ``lr_size`` and ``num_conv_layers`` are dropped.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from featup.errors import CheckpointError, ConfigError, InputError
from featup.upsamplers.base import (
    IMAGENET_NORM, PublishedWeights, UPSAMPLERS, check_inputs, check_state_dict, resolve_output_size, state_shape,
)

TOKEN_FREQS = 5  # frequencies of the low-res tokens' position encoding (fixed in the published code)
COLOR_DIM = 3


def _hub(name: str, backbone: str | None, dim: int, patch: int) -> PublishedWeights:
    url = f"https://huggingface.co/haiwen/loftup-{name}/resolve/main/pytorch_model.bin"
    return PublishedWeights(url, "pytorch_model.bin", backbone, dim, patch)


# Keyed by the hub suffix (``haiwen/loftup-<key>``, torch hub ``loftup_<key>``), from hubconf.py and the README.
PUBLISHED: dict[str, PublishedWeights] = {
    "dinov2s": _hub("dinov2s", "dinov2", 384, 14),  # DINOv2 ViT-S/14
    "dinov2s_reg": _hub("dinov2s_reg", None, 384, 14),  # DINOv2 ViT-S/14 with registers
    "dinov2b": _hub("dinov2b", None, 768, 14),  # DINOv2 ViT-B/14
    "dinov2b_reg": _hub("dinov2b_reg", None, 768, 14),  # DINOv2 ViT-B/14 with registers
    "clip": _hub("clip", "clip", 512, 16),  # CLIP ViT-B/16 projected patch tokens (MaskCLIP style)
    "siglip": _hub("siglip", None, 768, 16),  # timm ViT-B-16-SigLIP
    "siglip2": _hub("siglip2", None, 768, 16),  # timm ViT-B-16-SigLIP2
}


def linspace_f32(start: float, end: float, steps: int) -> torch.Tensor:
    """``torch.linspace(start, end, steps)`` in float32 bit for bit as torch's CPU kernel gives it, on the CPU.

    step = fl32((end - start) / (steps - 1)); entry i is start + step * i below steps // 2 and
    end - step * (steps - 1 - i) from there, each rounded once to float32 (exact in float64 first).
    """
    if steps < 1:
        raise ConfigError(f"linspace_f32: expected steps >= 1, got {steps}")
    start32, end32 = torch.tensor([start, end], dtype=torch.float32).tolist()
    if steps == 1:
        return torch.tensor([start32], dtype=torch.float32)
    step = (torch.tensor(end32 - start32, dtype=torch.float32) / (steps - 1)).double()
    i = torch.arange(steps, dtype=torch.float64)
    values = torch.where(i < steps // 2, start32 + step * i, end32 - step * (steps - 1 - i))
    return values.float()  # (steps,)


def log_spaced_freqs(n_freqs: int) -> torch.Tensor:
    """``exp(linspace(-2, 10, n_freqs))`` in float32 as torch's CPU kernels round it: (n_freqs,)."""
    return linspace_f32(-2.0, 10.0, n_freqs).double().exp().float()


def pixel_grid(height: int, width: int, rows: tuple[int, int], *, like: torch.Tensor) -> torch.Tensor:
    """(y, x) coordinates in [-1, 1] of rows ``rows[0]:rows[1]`` of a height x width grid: (1, 2, r, W)."""
    ys = linspace_f32(-1.0, 1.0, height)[rows[0] : rows[1]]
    xs = linspace_f32(-1.0, 1.0, width)
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"))  # (2, r, W)
    return grid.unsqueeze(0).to(device=like.device, dtype=like.dtype)


def minmax_scale(image: torch.Tensor) -> torch.Tensor:
    """Each colour channel mapped to [-0.5, 0.5] by its min and max over the whole batch: (B, 3, H, W)."""
    lo = image.amin(dim=(0, 2, 3), keepdim=True)  # (1, 3, 1, 1)
    hi = image.amax(dim=(0, 2, 3), keepdim=True)
    return (image - lo) / (hi - lo).clamp_min(1e-4) - 0.5


class FourierEncoding(nn.Module):
    """sin and cos of each input times ``n_freqs`` log-spaced frequencies, each with a learned phase.

    (B, D, h, w) -> (B, 2 * n_freqs * D, h, w): all sines, then all cosines, channel ``D * k + d`` holding
    input d at frequency k. The phases ``biases[s]`` are stored (D, n_freqs) but read as (n_freqs, D) by a
    reshape (no transpose), as published: the phase of (k, d) is ``biases[s].flatten()[D * k + d]``.
    """

    def __init__(self, in_dim: int, n_freqs: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.in_dim, self.n_freqs = in_dim, n_freqs
        self.biases = nn.Parameter(torch.randn(2, in_dim, n_freqs, device=device, dtype=dtype))

    @property
    def out_dim(self) -> int:
        return 2 * self.n_freqs * self.in_dim

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        b, d, h, w = inputs.shape
        k = self.n_freqs
        # float32-rounded values whatever the dtype, as published (its linspace/exp use the default dtype)
        freqs = log_spaced_freqs(k).to(device=inputs.device, dtype=inputs.dtype).view(1, k, 1, 1, 1)
        args = inputs.unsqueeze(1) * freqs  # (B, K, D, h, w); multiply and add stay two roundings (no FMA)
        sin = torch.sin(args + self.biases[0].reshape(1, k, d, 1, 1)).reshape(b, k * d, h, w)
        cos = torch.cos(args + self.biases[1].reshape(1, k, d, 1, 1)).reshape(b, k * d, h, w)
        return torch.cat([sin, cos], dim=1)  # (B, 2 K D, h, w)


class QueryStem(nn.Module):
    """Channel LayerNorm, then twice (3x3 conv, BatchNorm, ReLU): the per-pixel queries from the encoding."""

    halo = 2  # rows of context each side of a band that make banded output exact (two 3x3 convs)

    def __init__(self, in_dim: int, width: int, *, device=None, dtype=None) -> None:
        super().__init__()
        fk = dict(device=device, dtype=dtype)
        self.norm = nn.LayerNorm(in_dim, **fk)
        self.conv1 = nn.Conv2d(in_dim, width, 3, padding=1, **fk)
        self.bn1 = nn.BatchNorm2d(width, **fk)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, **fk)
        self.bn2 = nn.BatchNorm2d(width, **fk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, in_dim, r, W)
        x = F.relu(self.bn1(self.conv1(x)))  # (B, width, r, W)
        return F.relu(self.bn2(self.conv2(x)))  # (B, width, r, W)


class CrossAttention(nn.Module):
    """Multi-head attention with torch's packed in-projection (``nn.MultiheadAttention`` math and names)."""

    def __init__(self, width: int, num_heads: int, *, device=None, dtype=None) -> None:
        super().__init__()
        fk = dict(device=device, dtype=dtype)
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width, **fk))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width, **fk))
        self.out_proj = nn.Linear(width, width, **fk)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _heads(self, x: torch.Tensor, part: int) -> torch.Tensor:
        """(B, n, E) -> projection ``part`` (0 q, 1 k, 2 v) split into heads: (B, heads, n, head_dim)."""
        e = x.shape[-1]
        y = F.linear(x, self.in_proj_weight[part * e : (part + 1) * e], self.in_proj_bias[part * e : (part + 1) * e])
        return y.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def keys_values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised (B, N, E) tokens -> keys and values, each (B, heads, N, head_dim)."""
        return self._heads(tokens, 1), self._heads(tokens, 2)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        q = self._heads(queries, 0) * math.sqrt(1.0 / self.head_dim)  # (B, heads, n, hd)
        weights = torch.softmax(q @ keys.transpose(-2, -1), dim=-1)  # (B, heads, n, N)
        out = (weights @ values).transpose(1, 2).flatten(2)  # (B, n, E)
        return self.out_proj(out)


class CrossAttentionLayer(nn.Module):
    """q += attention(LN(q), LN(tokens)); q += Linear(GELU(Linear(LN(q))))."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int, *, device=None, dtype=None) -> None:
        super().__init__()
        fk = dict(device=device, dtype=dtype)
        self.norm_q = nn.LayerNorm(width, **fk)
        self.norm_kv = nn.LayerNorm(width, **fk)
        self.attn = CrossAttention(width, num_heads, **fk)
        self.ff_norm = nn.LayerNorm(width, **fk)
        self.ff_in = nn.Linear(width, mlp_dim, **fk)
        self.ff_out = nn.Linear(mlp_dim, width, **fk)

    def keys_values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attn.keys_values(self.norm_kv(tokens))

    def forward(self, q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q = self.attn(self.norm_q(q), *kv) + q  # (B, n, E)
        return self.ff_out(F.gelu(self.ff_in(self.ff_norm(q)))) + q  # (B, n, E)


class LoftUp(nn.Module):
    """LoftUp for ``dim``-channel features of one backbone (the published ``UpsamplerwithChannelNorm``)."""

    image_norm = IMAGENET_NORM

    def __init__(
        self,
        dim: int,
        color_feats: bool = True,
        n_freqs: int = 20,
        num_heads: int = 4,
        num_layers: int = 2,
        *,
        max_query_pixels: int = 4096,
        max_band_pixels: int = 1 << 16,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        width = dim + 2 * 2 * TOKEN_FREQS  # feature channels + their position encoding
        _check_config(dim, width, n_freqs, num_heads, num_layers, max_query_pixels, max_band_pixels)
        fk = dict(device=device, dtype=dtype)
        self.dim, self.width, self.color_feats = dim, width, color_feats
        self.max_query_pixels, self.max_band_pixels = max_query_pixels, max_band_pixels
        self.lr_norm = nn.LayerNorm(dim, **fk)
        self.image_encoding = FourierEncoding(2 + COLOR_DIM * color_feats, n_freqs, **fk)
        self.token_encoding = FourierEncoding(2, TOKEN_FREQS, **fk)
        stem_in = self.image_encoding.out_dim + COLOR_DIM * color_feats
        self.query_stem = QueryStem(stem_in, width, **fk)
        self.layers = nn.ModuleList(CrossAttentionLayer(width, num_heads, dim, **fk) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(width, **fk)
        self.head_proj = nn.Conv2d(width, dim, 1, **fk)  # a 1x1 conv as released, applied to tokens
        self.head_norm = nn.LayerNorm(dim, eps=1e-6, **fk)

    def tokens(self, lr_feats: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) features -> channel-normalised tokens with their position encoding: (B, h*w, C + 20)."""
        b, _, h, w = lr_feats.shape
        feats = self.lr_norm(lr_feats.flatten(2).transpose(1, 2))  # (B, h*w, C)
        grid = pixel_grid(h, w, (0, h), like=lr_feats).expand(b, -1, -1, -1)  # (B, 2, h, w)
        pe = self.token_encoding(grid).flatten(2).transpose(1, 2)  # (B, h*w, 20)
        return torch.cat([feats, pe], dim=2)

    def queries(self, colours: torch.Tensor, rows: tuple[int, int]) -> torch.Tensor:
        """Queries of output rows ``rows`` from the min-max-scaled (B, 3, H, W) guidance: (B, r*W, E)."""
        b, _, height, width = colours.shape
        lo, hi = max(0, rows[0] - QueryStem.halo), min(height, rows[1] + QueryStem.halo)
        grid = pixel_grid(height, width, (lo, hi), like=colours).expand(b, -1, -1, -1)  # (B, 2, r', W)
        band = colours[:, :, lo:hi]  # (B, 3, r', W)
        inputs = torch.cat([grid, band], dim=1) if self.color_feats else grid
        encoded = self.image_encoding(inputs)  # (B, 2 K D, r', W)
        if self.color_feats:
            encoded = torch.cat([encoded, band], dim=1)
        x = self.query_stem(encoded)[:, :, rows[0] - lo : rows[1] - lo]  # (B, E, r, W)
        return x.flatten(2).transpose(1, 2)

    def decode(self, q: torch.Tensor, kvs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """(B, n, E) queries -> (B, n, C) output features."""
        for layer, kv in zip(self.layers, kvs):
            q = layer(q, kv)
        q = F.linear(self.final_norm(q), self.head_proj.weight.flatten(1), self.head_proj.bias)  # (B, n, C)
        return self.head_norm(q)

    def forward(
        self, lr_feats: torch.Tensor, image: torch.Tensor, output_size: Sequence[int] | int | None = None
    ) -> torch.Tensor:
        """Upsample (B, C, h, w) features guided by the ImageNet-normalised (B, 3, H, W) image -> (B, C, H', W').

        ``output_size`` defaults to the image size; another size resizes the guidance image to it. Computed in the
        parameters' dtype; the output has ``lr_feats``' dtype.
        """
        check_inputs(lr_feats, image, dim=self.dim)
        height, width = resolve_output_size(image, output_size)
        out_dtype, dtype = lr_feats.dtype, self.layers[0].attn.in_proj_weight.dtype
        lr_feats, image = lr_feats.to(dtype), image.to(dtype)
        colours = minmax_scale(_resize_guidance(image, (height, width)))  # (B, 3, H', W')
        tokens = self.tokens(lr_feats)  # (B, N, E)
        kvs = [layer.keys_values(tokens) for layer in self.layers]
        b = lr_feats.shape[0]
        out = torch.empty(b, self.dim, height * width, device=lr_feats.device, dtype=tokens.dtype)  # (B, C, H'W')
        chunk = max(1, self.max_query_pixels // b)
        band_rows = height if self.training else max(1, self.max_band_pixels // (b * width))
        for r0 in range(0, height, band_rows):
            r1 = min(height, r0 + band_rows)
            q = self.queries(colours, (r0, r1))  # (B, r*W, E)
            for start in range(0, q.shape[1], chunk):
                part = self.decode(q[:, start : start + chunk], kvs)  # (B, n, C)
                offset = r0 * width + start
                out[:, :, offset : offset + part.shape[1]] = part.transpose(1, 2)
        return out.view(b, self.dim, height, width).to(out_dtype)


def _check_config(
    dim: int, width: int, n_freqs: int, num_heads: int, num_layers: int, max_query_pixels: int, max_band_pixels: int
) -> None:
    if dim < 1 or n_freqs < 1 or num_layers < 1:
        raise ConfigError(f"LoftUp: expected positive dim, n_freqs, num_layers, got {dim}, {n_freqs}, {num_layers}")
    if num_heads < 1 or width % num_heads:
        raise ConfigError(f"LoftUp: expected num_heads dividing dim + 20 = {width}, got {num_heads}")
    if max_query_pixels < 1 or max_band_pixels < 1:
        raise ConfigError(f"LoftUp: expected positive chunk sizes, got {max_query_pixels} and {max_band_pixels}")


def _resize_guidance(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, 3, H, W) to ``size``, antialiased when an axis shrinks; no-op at equal size."""
    if tuple(image.shape[2:]) == size:
        return image
    shrink = size[0] < image.shape[2] or size[1] < image.shape[3]
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=shrink)


# Released key prefix -> module key prefix, first match wins (``\\1`` is the layer index).
CHECKPOINT_RENAMES: tuple[tuple[str, str], ...] = (
    (r"channelnorm\.norm\.", "lr_norm."),
    (r"upsampler\.fourier_feat\.1\.", "image_encoding."),
    (r"upsampler\.lr_pe\.", "token_encoding."),
    (r"upsampler\.first_conv\.0\.norm\.", "query_stem.norm."),
    (r"upsampler\.first_conv\.1\.", "query_stem.conv1."),
    (r"upsampler\.first_conv\.2\.", "query_stem.bn1."),
    (r"upsampler\.first_conv\.4\.", "query_stem.conv2."),
    (r"upsampler\.first_conv\.5\.", "query_stem.bn2."),
    (r"upsampler\.ca_transformer\.layers\.(\d+)\.0\.attention\.", r"layers.\1.attn."),
    (r"upsampler\.ca_transformer\.layers\.(\d+)\.0\.", r"layers.\1."),
    (r"upsampler\.ca_transformer\.layers\.(\d+)\.1\.net\.0\.", r"layers.\1.ff_norm."),
    (r"upsampler\.ca_transformer\.layers\.(\d+)\.1\.net\.1\.", r"layers.\1.ff_in."),
    (r"upsampler\.ca_transformer\.layers\.(\d+)\.1\.net\.4\.", r"layers.\1.ff_out."),
    (r"upsampler\.ca_transformer\.norm\.", "final_norm."),
    (r"upsampler\.final_conv\.0\.", "head_proj."),
    (r"upsampler\.final_conv\.1\.", "head_norm."),
)


def _rename(key: str) -> str:
    for pattern, replacement in CHECKPOINT_RENAMES:
        renamed, hits = re.subn("^" + pattern, replacement, key)
        if hits:
            return renamed
    return key  # left for the strict check to report


def state_dict_from_checkpoint(raw: object) -> dict[str, torch.Tensor]:
    """The module state dict of a released file (``haiwen/loftup-*/pytorch_model.bin``).

    The release is the flat state dict of the published ``UpsamplerwithChannelNorm``: ``upsampler.*`` and
    ``channelnorm.norm.*`` keys, renamed here by ``CHECKPOINT_RENAMES``. A state dict already in this
    module's layout is returned as is.
    """
    if not isinstance(raw, Mapping):
        raise CheckpointError(
            f"LoftUp checkpoint: expected a flat state dict (name -> tensor), got {type(raw).__name__}"
        )
    bad = [str(k) for k, v in raw.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"LoftUp checkpoint: expected a flat state dict of tensors, got non-tensor entries {bad[:5]}"
        )
    if "lr_norm.weight" in raw:
        return dict(raw)
    if "channelnorm.norm.weight" not in raw or not any(k.startswith("upsampler.") for k in raw):
        raise CheckpointError(
            "LoftUp checkpoint: expected the released layout ('upsampler.*' and 'channelnorm.norm.*' keys, "
            f"an UpsamplerwithChannelNorm state dict), got keys {sorted(raw)[:6]}"
        )
    return {_rename(k): v for k, v in raw.items()}


def from_state_dict(
    state: Mapping[str, torch.Tensor],
    *,
    num_heads: int = 4,
    max_query_pixels: int = 4096,
    max_band_pixels: int = 1 << 16,
    device=None,
    dtype=None,
) -> LoftUp:
    """Build LoftUp with the sizes implied by ``state`` (module layout) and load it strictly, in eval mode.

    ``dim``, ``n_freqs``, ``color_feats`` and ``num_layers`` come from the tensor shapes; ``num_heads`` is not
    recorded (every release uses 4). Raises CheckpointError naming missing, unexpected or misshaped keys.
    """
    (dim,) = state_shape("LoftUp", state, "lr_norm.weight", 1)
    _, in_dim, n_freqs = state_shape("LoftUp", state, "image_encoding.biases", 3)
    if in_dim not in (2, 2 + COLOR_DIM):
        raise CheckpointError(
            f"LoftUp state dict: expected 'image_encoding.biases' of shape (2, 2 or 5, K), got {in_dim} inputs"
        )
    num_layers = len({m.group(1) for k in state if (m := re.match(r"layers\.(\d+)\.", k))})
    try:
        model = LoftUp(
            dim, in_dim == 2 + COLOR_DIM, n_freqs, num_heads, num_layers,
            max_query_pixels=max_query_pixels, max_band_pixels=max_band_pixels, device=device, dtype=dtype,
        )
    except ConfigError as err:
        raise CheckpointError(f"LoftUp state dict: implies an invalid model: {err}") from err
    check_state_dict("LoftUp", model.state_dict(), state)
    model.load_state_dict(state, strict=True)
    return model.eval()


@UPSAMPLERS.register("loftup")
def build_loftup(dim: int, *, num_stages: int = 4, device=None, dtype=None, **kwargs) -> LoftUp:
    """Randomly initialised LoftUp for ``dim``-channel features with the published defaults;
    ``num_stages`` is accepted for a uniform factory signature and ignored."""
    return LoftUp(int(dim), device=device, dtype=dtype, **kwargs)
