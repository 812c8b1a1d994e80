"""Random jitter (reflect pad, zoom, crop, horizontal flip) shared by an image and its high-res features.

FeatUp's multi-view loss needs the *same* geometric transform applied to the input image (before
the backbone) and to the high-resolution features (before the downsampler). ``sample_jitter`` draws
the parameters from an explicit generator; ``apply_jitter`` applies them to any (B, C, H, W) tensor
of the size they were drawn for, following the published ``sample_transform`` / ``apply_jitter``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from featup.errors import ConfigError, InputError


@dataclass(frozen=True)
class JitterParams:
    """One jitter: pad by ``pad``, zoom the padded map to (new_h, new_w), crop at (start_h, start_w), maybe flip."""

    pad: int
    zoom: float
    flip: bool
    start_h: int
    start_w: int
    new_h: int
    new_w: int


def zoomed_size(size: int, pad: int, zoom: float) -> int:
    """Length of one axis after reflect padding by ``pad`` on both sides and zooming by ``zoom``."""
    return int((size + 2 * pad) * zoom)


def _uniform(generator: torch.Generator) -> float:
    return torch.rand((), generator=generator, device=generator.device).item()


def _randint(high: int, generator: torch.Generator) -> int:
    return int(torch.randint(0, high, (), generator=generator, device=generator.device).item())


def sample_jitter(
    height: int,
    width: int,
    *,
    max_pad: int,
    max_zoom: float,
    use_flips: bool = True,
    generator: torch.Generator,
) -> JitterParams:
    """Draw a jitter for an (height, width) map: flip w.p. 1/2, zoom in [1, max_zoom) w.p. 1/2, uniform crop."""
    if max_pad < 0 or max_zoom < 1.0:
        raise ConfigError(f"jitter max_pad/max_zoom: expected >= 0 and >= 1, got {max_pad} and {max_zoom}")
    if height <= max_pad or width <= max_pad:
        raise ConfigError(f"jitter max_pad: expected less than the size {height}x{width} (reflect pad), got {max_pad}")
    flip = use_flips and _uniform(generator) > 0.5
    zoom = 1.0
    if _uniform(generator) > 0.5:
        zoom = _uniform(generator) * (max_zoom - 1.0) + 1.0
    new_h, new_w = zoomed_size(height, max_pad, zoom), zoomed_size(width, max_pad, zoom)
    start_h = _randint(new_h - height + 1, generator)
    start_w = _randint(new_w - width + 1, generator)
    return JitterParams(max_pad, zoom, flip, start_h, start_w, new_h, new_w)


def _check(x: torch.Tensor, max_pad: int, params: JitterParams) -> None:
    """Raise InputError unless ``x`` is 4-D and of the size ``params`` were drawn for."""
    if x.dim() != 4:
        raise InputError(f"jitter input shape: expected (B, C, H, W), got {tuple(x.shape)}")
    if max_pad != params.pad:
        raise InputError(f"jitter max_pad: expected {params.pad} (as sampled), got {max_pad}")
    h, w = x.shape[2:]
    expected = (params.new_h, params.new_w)
    got = (zoomed_size(h, max_pad, params.zoom), zoomed_size(w, max_pad, params.zoom))
    if got != expected:
        raise InputError(f"jitter input size: expected one that zooms to {expected}, got {h}x{w} -> {got}")


def apply_jitter(x: torch.Tensor, max_pad: int, params: JitterParams) -> torch.Tensor:
    """Apply ``params`` to (B, C, H, W): reflect pad, bilinear zoom, crop back to (H, W), horizontal flip."""
    _check(x, max_pad, params)
    h, w = x.shape[2:]
    out = F.pad(x, [max_pad] * 4, mode="reflect") if max_pad > 0 else x  # (B, C, H+2p, W+2p)
    if params.zoom > 1.0:
        # scale_factor (not size) so that sampling positions are exactly 1/zoom apart, as published
        out = F.interpolate(out, scale_factor=params.zoom, mode="bilinear", align_corners=False)
    out = out[:, :, params.start_h : params.start_h + h, params.start_w : params.start_w + w]  # (B, C, H, W)
    return torch.flip(out, dims=[3]) if params.flip else out
