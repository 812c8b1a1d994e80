"""Joint bilateral upsampler (JBU) stack, the feed-forward FeatUp upsampler.

Same math and parameter names as the published ``JBULearnedRange`` / ``JBUStack`` (``up1``..``upN``,
each with ``range_temp``, ``range_proj``, ``fixup_proj``, ``sigma_spatial``; a final ``fixup_proj``),
so official checkpoints load with strict key checking. Four things make it fast:

* The per-pixel 7x7 filtering never unfolds the features (``featup.ops.adaptive_conv``).
* The filters depend on the guidance image only, so the whole stack is one linear spatial operator
  ``L`` shared by all channels. Any channel mix commutes with it: the final ``fixup_proj`` 1x1 conv
  (and an optional caller projection such as PCA) is applied at the lowest resolution, and its bias
  is added at the end: ``out = L((I + 0.1 W) x) + 0.1 b``.
* The bicubic 2x upsample of the source, its reflect pad and the 7x7 filter compose into one 7x7
  filter over the source (``featup.ops.upsample_filter``), so the full-resolution upsampled map is
  never written (method ``"composed"``, the default on CPU). Method ``"upsample"`` upsamples first
  and filters the upsampled map; it keeps PyTorch's native bicubic, the default on other devices.
* Each stage is computed in row bands with a halo, which bounds memory on large images; the halo
  makes banded output exactly equal to unbanded output.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from featup.errors import ConfigError, InputError
from featup.ops.adaptive_conv import adaptive_conv, bilateral_kernel
from featup.ops.compiled import Backend
from featup.ops.resample import bicubic_upsample_2x
from featup.ops.upsample_filter import upsample_filter
from featup.upsamplers.base import IMAGENET_NORM, UPSAMPLERS, check_inputs, resolve_output_size

# Source rows of context kept on each side of a band so bicubic resampling inside the band is exact.
_BICUBIC_HALO = 3

METHODS: tuple[str, ...] = ("auto", "composed", "upsample")


class JBUStage(nn.Module):
    """One 2x joint bilateral upsampling step (published ``JBULearnedRange``)."""

    def __init__(self, guidance_dim: int = 3, key_dim: int = 32, radius: int = 3, *, device=None, dtype=None) -> None:
        super().__init__()
        self.radius = radius
        self.diameter = 2 * radius + 1
        taps = self.diameter**2
        factory = {"device": device, "dtype": dtype}
        self.range_temp = nn.Parameter(torch.tensor(0.0, **factory))
        self.range_proj = nn.Sequential(
            nn.Conv2d(guidance_dim, key_dim, 1, **factory),
            nn.GELU(),
            nn.Dropout2d(0.1),
            nn.Conv2d(key_dim, key_dim, 1, **factory),
        )
        self.fixup_proj = nn.Sequential(
            nn.Conv2d(guidance_dim + taps, taps, 1, **factory),
            nn.GELU(),
            nn.Dropout2d(0.1),
            nn.Conv2d(taps, taps, 1, **factory),
        )
        self.sigma_spatial = nn.Parameter(torch.tensor(1.0, **factory))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Published initial values (PyTorch's default conv init), drawn from ``generator`` when given."""
        self.range_temp.zero_()
        self.sigma_spatial.fill_(1.0)
        for layer in (*self.range_proj, *self.fixup_proj):
            if isinstance(layer, nn.Conv2d):
                _reset_conv(layer, generator)

    @property
    def filter_dtype(self) -> torch.dtype:
        """Filters are computed in at least float32, whatever the parameter or feature dtype."""
        return torch.promote_types(self.sigma_spatial.dtype, torch.float32)

    def spatial_kernel(self) -> torch.Tensor:
        """Gaussian over the window's offsets on a [-1, 1] grid -> (1, D*D, 1, 1)."""
        sigma = self.sigma_spatial.to(self.filter_dtype)
        offsets = torch.linspace(-1, 1, self.diameter, device=sigma.device, dtype=sigma.dtype)
        dist2 = offsets.view(-1, 1).square() + offsets.view(1, -1).square()  # (D, D)
        return torch.exp(-dist2 / (2 * sigma**2)).reshape(1, -1, 1, 1)

    def project_guidance(self, guidance: torch.Tensor) -> torch.Tensor:
        """Range keys for the whole guidance map, reflect-padded by the radius -> (B, K, H+2r, W+2r)."""
        keys = _run_in_dtype(self.range_proj, guidance.to(self.filter_dtype))  # (B, K, H, W)
        return F.pad(keys, [self.radius] * 4, mode="reflect")

    def filters(self, guidance: torch.Tensor, keys_padded: torch.Tensor, rows: slice, backend: Backend = "auto") -> torch.Tensor:
        """Normalised joint bilateral filters for guidance rows ``rows`` -> (B, D*D, rows, W)."""
        r = self.radius
        band_keys = keys_padded[:, :, rows.start : rows.stop + 2 * r]  # (B, K, rows+2r, W+2r)
        queries = band_keys[:, :, r:-r, r:-r]  # (B, K, rows, W)
        temperature = self.range_temp.to(self.filter_dtype).exp().clamp(1e-4, 1e4)
        kernel = bilateral_kernel(band_keys, queries, temperature, self.spatial_kernel(), backend)  # (B, D*D, rows, W)
        band_guidance = guidance[:, :, rows].to(kernel.dtype)  # (B, 3, rows, W)
        fixup = _run_in_dtype(self.fixup_proj, torch.cat([kernel, band_guidance], dim=1))
        return torch.add(kernel, fixup, alpha=0.1)

    def upsampled_source(self, source: torch.Tensor, rows: slice, height: int) -> torch.Tensor:
        """Bicubic 2x upsample of ``source``, output rows ``rows`` plus a reflected ``radius`` halo.

        Only the source rows the band needs are resampled; resampling a sub-band by exactly 2x
        uses the same sample positions as resampling the whole map, so the band is exact.
        """
        r = self.radius
        lo, hi = max(rows.start - r, 0), min(rows.stop + r, height)
        src_lo = max(lo // 2 - _BICUBIC_HALO, 0)
        src_hi = min((hi + 1) // 2 + _BICUBIC_HALO, source.shape[2])
        band = bicubic_upsample_2x(source[:, :, src_lo:src_hi])  # (B, C, 2*(src_hi-src_lo), W)
        band = band[:, :, lo - 2 * src_lo : hi - 2 * src_lo]  # (B, C, hi-lo, W)
        pad_top, pad_bottom = r - (rows.start - lo), r - (hi - rows.stop)
        return F.pad(band, [r, r, pad_top, pad_bottom], mode="reflect")  # (B, C, rows+2r, W+2r)

    def forward(
        self,
        source: torch.Tensor,
        guidance: torch.Tensor,
        *,
        band_rows: int | None = None,
        backend: Backend = "auto",
        method: str = "auto",
    ) -> torch.Tensor:
        """Upsample ``source`` (B, C, h, w) 2x, guided by ``guidance`` (B, G, 2h, 2w) -> (B, C, 2h, 2w)."""
        height, width = guidance.shape[2], guidance.shape[3]
        if (height, width) != (2 * source.shape[2], 2 * source.shape[3]):
            raise InputError(f"JBU stage: guidance {height}x{width} must be twice the source {tuple(source.shape[2:])}")
        if min(height, width) <= self.radius:
            raise InputError(
                f"JBU stage: guidance {height}x{width} is too small for radius {self.radius}: "
                f"expected more than {self.radius} pixels a side"
            )
        apply = _APPLY[resolve_method(method, source.device)]
        keys_padded = self.project_guidance(guidance)
        bands = row_bands(height, band_rows or height, self.radius)
        if len(bands) == 1:
            return apply(self, source, self.filters(guidance, keys_padded, bands[0], backend), bands[0], backend)
        shape = (source.shape[0], source.shape[1], height, width)
        out = torch.empty(shape, device=source.device, dtype=source.dtype, memory_format=torch.channels_last)
        for rows in bands:
            out[:, :, rows] = apply(self, source, self.filters(guidance, keys_padded, rows, backend), rows, backend)
        return out


def _apply_upsampled(stage: JBUStage, source: torch.Tensor, filters: torch.Tensor, rows: slice, backend: Backend) -> torch.Tensor:
    """Upsample the band's source rows, reflect-pad them, then filter: (B, C, rows, W)."""
    padded = stage.upsampled_source(source, rows, 2 * source.shape[2])  # (B, C, rows+2r, W+2r)
    return adaptive_conv(padded, filters.to(padded.dtype), backend=backend)


def _apply_composed(stage: JBUStage, source: torch.Tensor, filters: torch.Tensor, rows: slice, backend: Backend) -> torch.Tensor:
    """Filter the source directly with the filters composed with bicubic 2x and the reflect pad: (B, C, rows, W)."""
    return upsample_filter(source, filters, rows, backend=backend)


_APPLY = {"composed": _apply_composed, "upsample": _apply_upsampled}


def resolve_method(method: str, device: torch.device) -> str:
    """``"auto"``: the composed kernel on CPU; PyTorch's native bicubic then the filter elsewhere."""
    if method not in METHODS:
        raise ConfigError(f"JBU method: expected one of {METHODS}, got {method!r}")
    if method == "auto":
        return "composed" if device.type == "cpu" else "upsample"
    return method


@torch.no_grad()
def _reset_conv(conv: nn.Conv2d, generator: torch.Generator | None) -> None:
    """PyTorch's default Conv2d init (uniform in +-1/sqrt(fan_in)), from an explicit generator."""
    bound = 1.0 / math.sqrt(conv.weight[0].numel())
    for param in (conv.weight, conv.bias):
        if param is not None:
            param.copy_(torch.rand(param.shape, generator=generator, dtype=param.dtype).mul_(2 * bound).sub_(bound))


def _conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A 1x1 convolution as a matmul in ``x``'s dtype: cuBLAS keeps float32 exact, where cuDNN would use TF32."""
    weight = weight.reshape(weight.shape[0], -1).to(x.dtype)  # (O, C)
    if bias is not None and x.is_contiguous():  # NCHW: one batched matmul that starts from the bias
        b, c, h, w = x.shape
        start = bias.to(x.dtype).view(1, -1, 1).expand(b, -1, h * w)
        return torch.baddbmm(start, weight.expand(b, -1, -1), x.view(b, c, h * w)).view(b, -1, h, w)
    out = torch.einsum("oc,bchw->bohw", weight, x)  # (B, O, H, W)
    return out if bias is None else out + bias.to(x.dtype).view(1, -1, 1, 1)


def _run_in_dtype(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Run a stack of 1x1 convs and activations in ``x``'s dtype, whatever the parameters' dtype."""
    for layer in layers:
        x = _conv1x1(x, layer.weight, layer.bias) if isinstance(layer, nn.Conv2d) else layer(x)
    return x


def row_bands(height: int, band_rows: int, radius: int) -> list[slice]:
    """Split ``height`` (even) rows into near-equal bands of at most ``band_rows`` and at least ``radius`` rows.

    Band edges are even, so each band starts on the same bicubic phase as the whole map.
    """
    pairs, min_pairs = height // 2, max(1, math.ceil(radius / 2))
    count = max(1, math.ceil(height / max(band_rows, radius, 2)))
    count = min(count, max(1, pairs // min_pairs))
    edges = [2 * round(i * pairs / count) for i in range(count + 1)]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]


class JBUStack(nn.Module):
    """``num_stages`` 2x JBU stages and a final residual 1x1 ``fixup_proj`` (published ``JBUStack``)."""

    image_norm = IMAGENET_NORM  # the published FeatUp code guides with the backbone's ImageNet-normalised image

    def __init__(
        self,
        dim: int,
        num_stages: int = 4,
        *,
        key_dim: int = 32,
        radius: int = 3,
        guidance_dim: int = 3,
        max_band_pixels: int = 1 << 18,
        backend: Backend = "auto",
        method: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if num_stages < 1:
            raise ConfigError(f"JBU num_stages: expected >= 1, got {num_stages}")
        if dim < 1:
            raise ConfigError(f"JBU dim: expected >= 1, got {dim}")
        if method not in METHODS:
            raise ConfigError(f"JBU method: expected one of {METHODS}, got {method!r}")
        self.dim = dim
        self.num_stages = num_stages
        self.guidance_dim = guidance_dim
        self.max_band_pixels = max_band_pixels
        self.backend = backend
        self.method = method  # "auto", "composed" or "upsample": see the module docstring
        for i in range(1, num_stages + 1):
            self.add_module(f"up{i}", JBUStage(guidance_dim, key_dim, radius, device=device, dtype=dtype))
        self.fixup_proj = nn.Sequential(nn.Dropout2d(0.2), nn.Conv2d(dim, dim, 1, device=device, dtype=dtype))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-initialise every parameter as at construction, drawn from ``generator`` when given."""
        for stage in self.stages:
            stage.reset_parameters(generator)
        _reset_conv(self.fixup_proj[1], generator)

    @property
    def stages(self) -> list[JBUStage]:
        return [getattr(self, f"up{i}") for i in range(1, self.num_stages + 1)]

    @property
    def scale(self) -> int:
        return 2**self.num_stages

    def forward_stages(self, lr_feats: torch.Tensor, image: torch.Tensor) -> list[torch.Tensor]:
        """The output of every 2x stage, without the final fix-up: [(B, C, 2h, 2w), ..., (B, C, 2^n h, 2^n w)]."""
        check_inputs(lr_feats, image, dim=self.dim, guidance_dim=self.guidance_dim)
        outputs, feats = [], lr_feats
        for stage in self.stages:
            feats = self._run_stage(stage, feats, image)
            outputs.append(feats)
        return outputs

    def forward(
        self,
        lr_feats: torch.Tensor,
        image: torch.Tensor,
        output_size: Sequence[int] | None = None,
        *,
        projection: torch.Tensor | None = None,
        projection_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Upsample (B, C, h, w) features guided by the (B, 3, H, W) image -> (B, C', H', W').

        ``output_size`` defaults to the image size; a size other than ``2^n (h, w)`` is reached by
        a final bilinear resize (as the published training code does). ``projection`` (K, C) and
        ``projection_bias`` (K,) map the output channels (for example PCA), applied at low resolution.
        """
        check_inputs(lr_feats, image, dim=self.dim, guidance_dim=self.guidance_dim)
        size = resolve_output_size(image, output_size)
        mix = self.fixup_proj[1]
        mixed = lr_feats + 0.1 * _conv1x1(self.fixup_proj[0](lr_feats), mix.weight)  # (B, C, h, w)
        bias = 0.1 * mix.bias.to(lr_feats.dtype)  # (C,)
        if projection is not None:
            mixed, bias = _project(mixed, bias, projection, projection_bias)
        feats = mixed
        for stage in self.stages:
            feats = self._run_stage(stage, feats, image)
        if tuple(feats.shape[2:]) != size:
            feats = F.interpolate(feats, size=size, mode="bilinear", align_corners=False)
        return feats.add_(bias.view(1, -1, 1, 1)) if _may_modify(feats) else feats + bias.view(1, -1, 1, 1)

    def _run_stage(self, stage: JBUStage, feats: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h, w = feats.shape[2] * 2, feats.shape[3] * 2
        guidance = F.adaptive_avg_pool2d(image.to(stage.filter_dtype), (h, w))  # (B, 3, 2h, 2w)
        band_rows = max(1, self.max_band_pixels // (w * feats.shape[0]))
        return stage(feats, guidance, band_rows=band_rows, backend=self.backend, method=self.method)


def _may_modify(x: torch.Tensor) -> bool:
    """In-place updates are safe outside autograd (a fresh 4-byte-per-value buffer costs page faults)."""
    return not (torch.is_grad_enabled() and x.requires_grad)


def _project(mixed: torch.Tensor, bias: torch.Tensor, projection: torch.Tensor, projection_bias: torch.Tensor | None):
    """Apply a (K, C) channel map to low-res features and to the bias that is added at the end."""
    if projection.dim() != 2 or projection.shape[1] != mixed.shape[1]:
        raise InputError(f"projection: expected shape (K, {mixed.shape[1]}), got {tuple(projection.shape)}")
    projection = projection.to(mixed.dtype)
    mixed = torch.einsum("kc,bchw->bkhw", projection, mixed)  # (B, K, h, w)
    bias = projection @ bias
    if projection_bias is not None:
        bias = bias + projection_bias.to(bias.dtype)
    return mixed, bias


@UPSAMPLERS.register("jbu")
def build_jbu(dim: int, *, num_stages: int = 4, device=None, dtype=None, **kwargs) -> JBUStack:
    """A JBU stack with its initial (untrained) parameters; load a checkpoint to make it useful."""
    return JBUStack(dim, num_stages, device=device, dtype=dtype, **kwargs)
