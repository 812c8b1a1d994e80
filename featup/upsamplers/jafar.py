"""JAFAR, an attention upsampler whose low-res keys are modulated by the features themselves.

JAFAR ("Jack up Any Feature at Any Resolution", Couairon, Chambon et al. 2025, arXiv:2506.11136;
code at github.com/PaulCouairon/JAFAR, Apache-2.0, reproduced here from commit 94d4d54). One network
per backbone, trained to upsample that backbone's features to any output size:

* The guidance image is encoded at its own resolution (a 1x1 conv and two GroupNorm/SiLU residual
  blocks) and rotated by a 2-D rotary position encoding whose frequencies are learned.
* Queries: a second encoder, adaptive average pooling to the output size, a parameter-free
  GroupNorm, a 3x3 conv and an RMSNorm.
* Keys: a third encoder pooled to the low-res grid, GroupNorm, then a spatial feature transform
  ``gamma(E) * keys + beta(E)`` where ``E`` encodes the L2-normalised low-res features; then RMSNorm.
* The keys and queries are projected per head, every output pixel attends to every low-res token
  (global attention), and the head-averaged attention weights mix the *raw* low-res features.

Same as published: parameter names (the released ``["jafar"]`` state dict loads strictly, unused
tensors included), the arithmetic, and the published eval-mode outputs to about 1e-6 in float32.
Differs: the argument order is this project's ``(lr_feats, image, output_size)``; ``output_size``
defaults to the image size; the attention is computed in chunks of output pixels and the rotary
encoding in row bands, so memory grows with the output size, not with output pixels x tokens;
the attention weights come from plain tensor ops instead of ``nn.MultiheadAttention``, whose value
and output projections (and ``norm_v``) never reach the output and are only kept for loading.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from featup.errors import CheckpointError, ConfigError
from featup.upsamplers.base import (
    IMAGENET_NORM, PublishedWeights, UPSAMPLERS, check_inputs, check_state_dict, resolve_output_size, state_shape,
)

NUM_GROUPS = 8  # GroupNorm groups everywhere in the published model
NUM_RES_BLOCKS = 2  # residual blocks after each encoder's first conv
ROPE_THETA = 100.0


class ResBlock(nn.Module):
    """GN -> SiLU -> conv -> GN -> SiLU -> conv, plus the identity (published ``ResBlock``, square case)."""

    def __init__(self, dim: int, *, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.norm1 = nn.GroupNorm(NUM_GROUPS, dim, **factory)
        self.conv1 = nn.Conv2d(dim, dim, 1, bias=False, **factory)
        self.norm2 = nn.GroupNorm(NUM_GROUPS, dim, **factory)
        self.conv2 = nn.Conv2d(dim, dim, 1, bias=False, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(_silu(self.norm1(x)))
        return self.conv2(_silu(self.norm2(y))).add_(x)  # conv's backward does not need its output


def _silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU of a fresh temporary, in place unless autograd needs ``x`` for the backward pass."""
    return F.silu(x, inplace=not x.requires_grad)


def make_encoder(in_dim: int, dim: int, kernel_size: int = 1, *, device=None, dtype=None) -> nn.Sequential:
    """A bias-free conv from ``in_dim`` to ``dim`` channels (reflect padding), then the residual blocks."""
    factory = {"device": device, "dtype": dtype}
    conv = nn.Conv2d(in_dim, dim, kernel_size, padding=kernel_size // 2, padding_mode="reflect", bias=False, **factory)
    return nn.Sequential(conv, *(ResBlock(dim, **factory) for _ in range(NUM_RES_BLOCKS)))


class RoPE2d(nn.Module):
    """2-D rotary encoding with learned angular frequencies ``freqs`` (2, dim): row and column rates per channel."""

    def __init__(self, dim: int, theta: float = ROPE_THETA, *, device=None, dtype=None) -> None:
        super().__init__()
        self.theta = theta
        self.freqs = nn.Parameter(torch.empty(2, dim, device=device, dtype=dtype))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Published start: rows drive the first half of the channels, columns the second half."""
        dim = self.freqs.shape[1]
        rates = self.theta ** torch.linspace(0, -1, dim // 4)
        rates = torch.cat([rates, rates]) * 2 * math.pi
        init = torch.zeros(2, dim)
        init[0, : dim // 2] = rates
        init[1, dim // 2 :] = rates
        self.freqs.copy_(init)

    def forward(self, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` (B, C, n, W) whose pixels sit at coordinates ``rows`` (n,) x ``cols`` (W,)."""
        coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1)  # (n, W, 2)
        angle = (coords @ self.freqs).permute(2, 0, 1)  # (C, n, W)
        first, second = x.chunk(2, dim=1)
        rotated = torch.cat([-second, first], dim=1)  # (B, C, n, W)
        return x * angle.cos() + rotated * angle.sin()


class AttentionWeights(nn.Module):
    """The parameters of the published ``CrossAttention`` (RMSNorms and ``nn.MultiheadAttention``'s projections).

    Only ``norm_q``, ``norm_k``, the query/key projections and the first two thirds of ``in_proj_bias``
    are used: the published block reads the head-averaged attention weights and applies them to the raw
    values, so ``norm_v``, ``v_proj_weight``, the value bias and ``out_proj`` are kept for loading only.
    """

    def __init__(self, qk_dim: int, v_dim: int, num_heads: int, *, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.norm_q = nn.RMSNorm(qk_dim, **factory)
        self.norm_k = nn.RMSNorm(qk_dim, **factory)
        self.norm_v = nn.RMSNorm(v_dim, **factory)
        self.attention = nn.Module()
        self.attention.q_proj_weight = nn.Parameter(torch.empty(qk_dim, qk_dim, **factory))
        self.attention.k_proj_weight = nn.Parameter(torch.empty(qk_dim, qk_dim, **factory))
        self.attention.v_proj_weight = nn.Parameter(torch.empty(qk_dim, v_dim, **factory))
        self.attention.in_proj_bias = nn.Parameter(torch.zeros(3 * qk_dim, **factory))
        self.attention.out_proj = nn.Linear(qk_dim, qk_dim, **factory)
        for weight in (self.attention.q_proj_weight, self.attention.k_proj_weight, self.attention.v_proj_weight):
            nn.init.xavier_uniform_(weight)
        nn.init.zeros_(self.attention.out_proj.bias)

    def project(self, x: torch.Tensor, which: int) -> torch.Tensor:
        """(B, n, qk_dim) -> (B, heads, n, head_dim): the query (``which=0``) or key (1) projection."""
        att = self.attention
        weight = att.q_proj_weight if which == 0 else att.k_proj_weight
        dim = weight.shape[0]
        bias = att.in_proj_bias[which * dim : (which + 1) * dim]
        norm = self.norm_q if which == 0 else self.norm_k
        y = F.linear(norm(x), weight, bias)
        return y.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def weights(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Head-averaged softmax weights (B, n, m) of projected queries (B, heads, n, d) over keys (B, heads, m, d)."""
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, heads, n, m)
        return scores.softmax(dim=-1).mean(dim=1)


class CrossDecode(nn.Module):
    """The query 3x3 conv and the attention parameters (published ``CrossAttentionBlock``)."""

    def __init__(self, qk_dim: int, v_dim: int, num_heads: int, *, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.cross_attn = AttentionWeights(qk_dim, v_dim, num_heads, **factory)
        self.conv2d = nn.Conv2d(qk_dim, qk_dim, 3, padding=1, bias=False, **factory)


class SFTModulation(nn.Module):
    """Spatial feature transform: ``gamma(cond) * GroupNorm(x) + beta(cond)`` with 1x1 convs."""

    def __init__(self, dim: int, *, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.gamma = nn.Conv2d(dim, dim, 1, bias=False, **factory)
        self.beta = nn.Conv2d(dim, dim, 1, bias=False, **factory)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.gamma(cond) * F.group_norm(x, NUM_GROUPS) + self.beta(cond)


class JAFAR(nn.Module):
    """JAFAR upsampler for ``v_dim``-channel features (published ``src.upsampler.JAFAR``).

    ``max_query_pixels`` bounds the output pixels whose attention rows are held at once (and the guidance
    pixels of one row band of the rotary encoding); it changes memory, never the result.
    """

    image_norm = IMAGENET_NORM  # as the published dataloaders feed the timm DINOv2 backbone (the fixtures)

    def __init__(
        self,
        input_dim: int = 3,
        qk_dim: int = 128,
        v_dim: int = 384,
        kernel_size: int = 1,
        num_heads: int = 4,
        *,
        max_query_pixels: int = 2048,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_config(input_dim, qk_dim, v_dim, kernel_size, num_heads, max_query_pixels)
        factory = {"device": device, "dtype": dtype}
        self.input_dim, self.qk_dim, self.v_dim, self.num_heads = input_dim, qk_dim, v_dim, num_heads
        self.max_query_pixels = max_query_pixels
        self.image_encoder = make_encoder(input_dim, qk_dim, kernel_size, **factory)
        self.key_encoder = make_encoder(qk_dim, qk_dim, **factory)
        self.query_encoder = make_encoder(qk_dim, qk_dim, **factory)
        self.key_features_encoder = make_encoder(v_dim, qk_dim, **factory)
        self.cross_decode = CrossDecode(qk_dim, v_dim, num_heads, **factory)
        self.sft_key = SFTModulation(qk_dim, **factory)
        self.rope = RoPE2d(qk_dim, **factory)

    def forward(
        self, lr_feats: torch.Tensor, image: torch.Tensor, output_size: Sequence[int] | int | None = None
    ) -> torch.Tensor:
        """Upsample ``lr_feats`` (B, v_dim, h, w) guided by ``image`` (B, 3, H, W) to ``output_size`` (default H, W).

        Computed in the parameters' dtype; the output has ``lr_feats``' dtype."""
        check_inputs(lr_feats, image, dim=self.v_dim, guidance_dim=self.input_dim)
        size = resolve_output_size(image, output_size)
        dtype = self.rope.freqs.dtype
        feats = lr_feats.to(dtype)  # (B, C, h, w)
        encoded = self.encode_image(image.to(dtype))  # (B, qk, H, W)
        keys = self.keys(encoded, feats)  # (B, h*w, qk)
        queries = self.queries(encoded, size)  # (B, Ho*Wo, qk)
        del encoded  # the guidance-resolution maps are freed before the output is allocated
        out = self.attend(queries, keys, feats.flatten(2))  # (B, C, Ho*Wo)
        return out.unflatten(2, size).to(lr_feats.dtype)  # (B, C, Ho, Wo)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Encoded guidance (B, qk, H, W) with the rotary encoding at coordinates linspace(0, 1) per axis."""
        x = self.image_encoder(image)  # (B, qk, H, W)
        height, width = x.shape[-2:]
        rows = torch.linspace(0, 1, height, device=x.device, dtype=x.dtype)
        cols = torch.linspace(0, 1, width, device=x.device, dtype=x.dtype)
        band = max(1, self.max_query_pixels // width)
        out = torch.empty_like(x)  # filled band by band: no second full-size copy, autograd still flows
        for r in range(0, height, band):
            out[:, :, r : r + band] = self.rope(x[:, :, r : r + band], rows[r : r + band], cols)
        return out  # (B, qk, H, W)

    def queries(self, encoded: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Query tokens (B, Ho*Wo, qk), row-major, before their RMSNorm and projection."""
        q = F.adaptive_avg_pool2d(self.query_encoder(encoded), size)  # (B, qk, Ho, Wo)
        q = self.cross_decode.conv2d(F.group_norm(q, NUM_GROUPS))
        return q.flatten(2).transpose(1, 2)

    def keys(self, encoded: torch.Tensor, lr_feats: torch.Tensor) -> torch.Tensor:
        """Key tokens (B, h*w, qk): pooled guidance modulated by the encoded, L2-normalised features."""
        k = F.adaptive_avg_pool2d(self.key_encoder(encoded), lr_feats.shape[-2:])  # (B, qk, h, w)
        k = self.sft_key(k, self.key_features_encoder(F.normalize(lr_feats, dim=1)))
        return k.flatten(2).transpose(1, 2)

    def attention_weights(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Head-averaged attention (B, n, h*w) of query tokens (B, n, qk) over key tokens (B, h*w, qk); unchunked."""
        attn = self.cross_decode.cross_attn
        return attn.weights(attn.project(queries, 0), attn.project(keys, 1))

    def attend(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Mix ``values`` (B, C, h*w) by the attention of ``queries`` (B, N, qk): (B, C, N), in query chunks."""
        attn = self.cross_decode.cross_attn
        k = attn.project(keys, 1)  # (B, heads, h*w, d)
        out = values.new_empty(*values.shape[:2], queries.shape[1])  # (B, C, N)
        for start in range(0, queries.shape[1], self.max_query_pixels):
            q = attn.project(queries[:, start : start + self.max_query_pixels], 0)  # (B, heads, n, d)
            out[:, :, start : start + q.shape[2]] = values @ attn.weights(q, k).transpose(1, 2)  # (B, C, n)
        return out


def _check_config(input_dim: int, qk_dim: int, v_dim: int, kernel_size: int, num_heads: int, chunk: int) -> None:
    if min(input_dim, qk_dim, v_dim, num_heads, chunk) < 1:
        raise ConfigError(
            f"JAFAR: expected positive sizes, got input_dim={input_dim}, qk_dim={qk_dim}, v_dim={v_dim}, "
            f"num_heads={num_heads}, max_query_pixels={chunk}"
        )
    if qk_dim % NUM_GROUPS or qk_dim % num_heads or qk_dim % 4:
        raise ConfigError(
            f"JAFAR: expected qk_dim divisible by {NUM_GROUPS} groups, 4 (rotary pairs) and num_heads={num_heads}, "
            f"got {qk_dim}"
        )
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ConfigError(f"JAFAR: expected an odd positive kernel_size, got {kernel_size}")


# ---------------------------------------------------------------------------------------------- checkpoints


_RELEASE = "https://github.com/PaulCouairon/JAFAR/releases/download/Weights/"


def _published(file_name: str, dim: int, patch: int, backbone: str | None = None) -> PublishedWeights:
    return PublishedWeights(_RELEASE + file_name, file_name, backbone, dim, patch)


# From the repository README's "Available Models" (upstream 25c08c9); the file stem is the timm model name
# (or the RADIO version) the weights were trained on. Nothing is downloaded here and no checksum is published.
PUBLISHED: dict[str, PublishedWeights] = {
    "vit_b16": _published("vit_base_patch16_224.pth", 768, 16),
    "dino_vitb16": _published("vit_base_patch16_224.dino.pth", 768, 16),
    "dinov2_vits14": _published("vit_small_patch14_dinov2.lvd142m.pth", 384, 14, "dinov2"),
    "dinov2_vitb14": _published("vit_base_patch14_dinov2.lvd142m.pth", 768, 14),
    "dinov2_vits14_reg4": _published("vit_small_patch14_reg4_dinov2.pth", 384, 14),
    "dinov3_vits16": _published("vit_small_patch16_dinov3.lvd1689m.pth", 384, 16),
    "dinov3_vits16plus": _published("vit_small_plus_patch16_dinov3.lvd1689m.pth", 384, 16),
    "dinov3_vitb16": _published("vit_base_patch16_dinov3.lvd1689m.pth", 768, 16),
    "dinov3_vitl16": _published("vit_large_patch16_dinov3.lvd1689m.pth", 1024, 16),
    "clip_vitb16": _published("vit_base_patch16_clip_384.pth", 768, 16),
    "siglip2_vitb16": _published("vit_base_patch16_siglip_512.v2_webli.pth", 768, 16),
    "radio_v2.5-b": _published("radio_v2.5-b.pth", 768, 16),
    "radio_v2.5-l": _published("radio_v2.5-l.pth", 1024, 16),
    "radio_v2.5-h": _published("radio_v2.5-h.pth", 1280, 16),
}

_WRAPPER_KEY = "jafar"
_MARKER_KEY = "rope.freqs"


def state_dict_from_checkpoint(raw: object) -> dict[str, torch.Tensor]:
    """The model's state dict from a released file: its ``["jafar"]`` entry (other entries are ignored).

    A bare state dict (holding ``rope.freqs``) is accepted as is.
    """
    if not isinstance(raw, Mapping):
        kind = type(raw).__name__
        raise CheckpointError(f"JAFAR checkpoint: expected a dict with a {_WRAPPER_KEY!r} entry, got {kind}")
    state = raw.get(_WRAPPER_KEY, raw if _MARKER_KEY in raw else None)
    if not isinstance(state, Mapping):
        found = ", ".join(repr(k) for k in list(raw)[:8])
        raise CheckpointError(
            f"JAFAR checkpoint: expected a {_WRAPPER_KEY!r} state dict (or a bare one with {_MARKER_KEY!r}), "
            f"found keys {found}"
        )
    bad = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"JAFAR checkpoint: expected tensors, got other values at {', '.join(bad[:8])}")
    return dict(state)


def from_state_dict(
    state: Mapping[str, torch.Tensor], *, num_heads: int = 4, max_query_pixels: int = 2048, device=None, dtype=None
) -> JAFAR:
    """A JAFAR sized from ``state`` (channels and image-conv kernel from tensor shapes) with ``state`` loaded strictly.

    ``num_heads`` cannot be read from the shapes; the published config (``config/model/jafar.yaml``) uses 4.
    """
    qk_dim, v_dim = state_shape("JAFAR", state, "key_features_encoder.0.weight", 4)[:2]
    _, input_dim, kernel_size, _ = state_shape("JAFAR", state, "image_encoder.0.weight", 4)
    try:
        sizes = {"input_dim": input_dim, "qk_dim": qk_dim, "v_dim": v_dim, "kernel_size": kernel_size}
        model = JAFAR(**sizes, num_heads=num_heads, max_query_pixels=max_query_pixels, device=device, dtype=dtype)
    except ConfigError as err:
        raise CheckpointError(f"JAFAR state dict: shapes imply an invalid model: {err}") from err
    check_state_dict("JAFAR", model.state_dict(), state)
    model.load_state_dict(state, strict=True)
    return model


@UPSAMPLERS.register("jafar")
def build_jafar(dim: int, *, num_stages: int = 4, device=None, dtype=None, **kwargs) -> JAFAR:
    """A randomly initialised JAFAR for ``dim``-channel features (published defaults); ``num_stages`` is ignored."""
    return JAFAR(v_dim=dim, device=device, dtype=dtype, **kwargs)
