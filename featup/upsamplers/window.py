"""Upsampling a crop, or some channels, from the low-res window its receptive field needs: equal to the whole map's.

The JBU stack is a chain of local 2x stages. A stage's output pixel reads the bicubic-upsampled source within
the filter radius ``r`` (reflect-padded at the map's edges), each upsampled pixel reads 4 source pixels (clamped
at the edges), and its filter reads the guidance within ``r``. So a stage computed on a window of its source
differs from the whole map's only within ``3 + r`` output pixels of a window edge that is not a map edge (bicubic:
3 upsampled pixels, then the radius): measured, exactly 6 pixels for ``r = 3``, with bit-identical values further
in (``tests/featup/upsamplers/test_window.py``). A window edge on the map's edge sees the same reflection and
clamping as the whole map. A crop is therefore planned backwards, one stage at a time: the source window a
stage needs is the output window halved and widened by that halo plus ``MARGIN``, clipped to the map; every
window of a crop size has one size (shifted inwards at the map's edges), so a batch of crops at different places
runs as one batched call per stage. The guidance is pooled per stage in whole blocks (``image size / stage size``
must be an integer, true for stride-16 and stride-8 backbones at their usual sizes); where it is not, or where a
final resize reaches the output size (stride 14), stages run on whole maps and the crop is cut at the end.

The stack is linear in the features with filters shared by all channels, and its only channel mix (the final
1x1 fix-up) runs at the lowest resolution: a channel subset mixes the low-res features, keeps its channels and
upsamples only those. ``bilinear`` is one local step of an integer scale. Any other upsampler runs on whole maps and
every channel, the crop and the channels cut from its output: FeatUp's successors declare so on their kind
(``featup.upsampler_hub.Kind``: ``whole_map``, ``all_channels``), and a kind whose published forward mixes the images
of a batch (``per_image``) runs one image at a time, as the pipeline runs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from featup.errors import ConfigError, InputError
from featup.upsampler_hub import module_kind
from featup.upsamplers.bilinear import BilinearUpsampler
from featup.upsamplers.jbu import JBUStack, _conv1x1

BICUBIC_REACH = 3  # upsampled pixels next to a window edge whose 4 bicubic taps are clamped there
MARGIN = 2  # output pixels of each stage's halo beyond what the receptive field needs

Pair = tuple[int, int]


@dataclass(frozen=True)
class Step:
    """One local upsampling step: output pixels per input pixel, and output pixels next to a window edge (that is not a
    map edge) which may differ from the whole map's, ``MARGIN`` included, per axis (rows, columns)."""

    scale: Pair
    halo: Pair


def window_steps(upsampler: nn.Module, lowres_size: Pair, image_size: Pair, output_size: Pair) -> tuple[Step, ...] | None:
    """The local steps ``upsampler`` maps ``lowres_size`` to ``output_size`` with, or None when a window of them is not
    exact (a final resize, guidance pooled by fractional blocks, or an upsampler without a known receptive field)."""
    (h, w), (big_h, big_w), (out_h, out_w) = lowres_size, image_size, output_size
    if isinstance(upsampler, JBUStack):
        factor = 2 ** upsampler.num_stages
        if (out_h, out_w) != (h * factor, w * factor) or big_h % out_h or big_w % out_w:
            return None
        return tuple(Step((2, 2), (BICUBIC_REACH + s.radius + MARGIN,) * 2) for s in upsampler.stages)
    if isinstance(upsampler, BilinearUpsampler):
        if out_h % h or out_w % w:
            return None
        fy, fx = out_h // h, out_w // w
        return (Step((fy, fx), (fy + MARGIN, fx + MARGIN)),)  # one source pixel of taps each side, and the margin
    kind = module_kind(upsampler)
    if kind is not None and not kind.whole_map:  # a kind that declares windows exact needs its rule written here
        raise ConfigError(f"{kind.name}: expected a window rule in featup.upsamplers.window for a kind declared "
                          "whole_map=False, got none")
    return None  # successors (whole_map) and unknown upsamplers: whole maps, then the crop


@dataclass(frozen=True)
class CropPlan:
    """Where a crop of ``lengths[-1]`` output pixels is computed from: a window of ``lengths[k]`` pixels at every level
    ``k`` (0: the low-res features, last: the output), per axis. ``steps`` None: whole maps, then the crop."""

    steps: tuple[Step, ...] | None
    sizes: tuple[Pair, ...]  # map size at every level
    lengths: tuple[Pair, ...]  # window size at every level (the crop at the last)
    output_size: Pair

    @classmethod
    def build(cls, steps: Sequence[Step] | None, lowres_size: Pair, output_size: Pair, crop: Pair | None = None) -> CropPlan:
        """The plan of crops of ``crop`` (default: the whole output) from ``lowres_size`` features."""
        crop = tuple(output_size) if crop is None else tuple(int(c) for c in crop)
        if len(crop) != 2 or not (0 < crop[0] <= output_size[0] and 0 < crop[1] <= output_size[1]):
            raise InputError(f"crop: expected a (height, width) within the output size {tuple(output_size)}, got {crop}")
        if steps is None:
            return cls(None, (tuple(lowres_size), tuple(output_size)), (tuple(lowres_size), crop), tuple(output_size))
        sizes = [tuple(lowres_size)]
        for step in steps:
            sizes.append((sizes[-1][0] * step.scale[0], sizes[-1][1] * step.scale[1]))
        if sizes[-1] != tuple(output_size):
            raise ConfigError(f"crop plan: expected steps reaching {tuple(output_size)}, got {sizes[-1]}")
        lengths = [crop]
        for k in range(len(steps), 0, -1):  # the window level k - 1 needs for level k's window
            step, size = steps[k - 1], sizes[k - 1]
            lengths.append(tuple(min(size[a], math.ceil((lengths[-1][a] + 2 * step.halo[a]) / step.scale[a]) + 1)
                                 for a in (0, 1)))
        return cls(tuple(steps), tuple(sizes), tuple(reversed(lengths)), tuple(output_size))

    @property
    def exact_windows(self) -> bool:
        """Whether crops are computed from windows (False: whole maps, then the crop)."""
        return self.steps is not None

    def positions(self, origin: Pair) -> list[Pair]:
        """The corner of the window at every level for a crop whose corner is ``origin`` (output pixels)."""
        top, left = int(origin[0]), int(origin[1])
        crop = self.lengths[-1]
        if not (0 <= top <= self.output_size[0] - crop[0] and 0 <= left <= self.output_size[1] - crop[1]):
            raise InputError(f"crop origin: expected a {crop[0]}x{crop[1]} crop inside {self.output_size}, got corner {origin}")
        if self.steps is None:
            return [(0, 0), (top, left)]
        corners = [(top, left)]
        for k in range(len(self.steps), 0, -1):
            step, size, length = self.steps[k - 1], self.sizes[k - 1], self.lengths[k - 1]
            corners.append(tuple(min(max((corners[-1][a] - step.halo[a]) // step.scale[a], 0), size[a] - length[a])
                                 for a in (0, 1)))
        return list(reversed(corners))

    def lowres_box(self, origin: Pair) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the low-res window a crop at ``origin`` needs."""
        (top, left), (height, width) = self.positions(origin)[0], self.lengths[0]
        return top, left, height, width


def needs_all_channels(upsampler: nn.Module) -> bool:
    """Whether a channel subset needs every input channel: the JBU's 1x1 fix-up mixes them (a zero fix-up does not),
    bilinear never does, a successor as its kind declares (``all_channels``), and any other upsampler is assumed to."""
    if isinstance(upsampler, JBUStack):
        return bool(upsampler.fixup_proj[1].weight.detach().ne(0).any())
    if isinstance(upsampler, BilinearUpsampler):
        return False
    kind = module_kind(upsampler)
    return kind is None or kind.all_channels


def _whole_maps(upsampler: nn.Module, lowres: torch.Tensor, image: torch.Tensor, size: Pair) -> torch.Tensor:
    """``upsampler`` on whole maps (B, C, *size); one image at a time for a kind whose forward mixes a batch's images."""
    kind = module_kind(upsampler)
    if kind is not None and kind.per_image and lowres.shape[0] > 1:
        return torch.cat([upsampler(lowres[b : b + 1], image[b : b + 1], size) for b in range(lowres.shape[0])])
    return upsampler(lowres, image, size)


@torch.no_grad()
def upsample_window(upsampler: nn.Module, lowres: torch.Tensor, image: torch.Tensor, plan: CropPlan,
                    origins: Sequence[Pair] | None = None, channels: Sequence[int] | None = None) -> torch.Tensor:
    """Crops of the upsampled features: (B, K, *crop) at ``origins`` (default: the top-left corner).

    ``lowres`` (B, C, *plan.lengths[0]) is each sample's low-res window at ``plan.lowres_box(origin)`` and ``image``
    (B, 3, ...) the normalised guidance over the same region at the image's resolution. ``channels`` picks output
    channels: ``lowres`` then holds every channel when ``needs_all_channels(upsampler)``, else only these.
    """
    origins = [(0, 0)] * lowres.shape[0] if origins is None else [tuple(map(int, o)) for o in origins]
    if len(origins) != lowres.shape[0]:
        raise InputError(f"crop origins: expected one per sample ({lowres.shape[0]}), got {len(origins)}")
    corners = [plan.positions(o) for o in origins]  # per sample, the window corner at every level
    if isinstance(upsampler, JBUStack):
        return _jbu_window(upsampler, lowres, image, plan, corners, channels)
    if isinstance(upsampler, BilinearUpsampler) and plan.exact_windows:  # per channel: the input holds the kept ones
        size = _scaled(plan.lengths[0], plan.steps[0].scale)
        out = F.interpolate(lowres, size=size, mode="bilinear", align_corners=False)
        return _take(out, [_shift(c[1], c[0], plan.steps[0].scale) for c in corners], plan.lengths[1])
    out = _whole_maps(upsampler, lowres, image, plan.output_size)  # whole maps, then the crops
    if channels is not None and needs_all_channels(upsampler):
        out = out[:, list(channels)]
    return _take(out, [c[-1] for c in corners], plan.lengths[-1])


def jbu_mixed_input(stack: JBUStack, lowres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``JBUStack.forward`` upsamples and adds at the end: ``(I + 0.1 W) x`` and ``0.1 b`` (its final 1x1 fix-up,
    applied at low resolution by the same operations)."""
    mix = stack.fixup_proj[1]
    mixed = lowres + 0.1 * _conv1x1(stack.fixup_proj[0](lowres), mix.weight)  # (B, C, h, w)
    return mixed, 0.1 * mix.bias.to(lowres.dtype)


def _jbu_window(stack: JBUStack, lowres: torch.Tensor, image: torch.Tensor, plan: CropPlan, corners: list[list[Pair]],
                channels: Sequence[int] | None) -> torch.Tensor:
    """The JBU on windows: mix (all channels, or none when the fix-up is zero), keep ``channels``, stage by stage."""
    if needs_all_channels(stack):
        feats, bias = jbu_mixed_input(stack, lowres)
        if channels is not None:
            feats, bias = feats[:, list(channels)], bias[list(channels)]
    else:  # a zero fix-up (a folded projection): the input holds the kept channels already
        feats, bias = lowres, 0.1 * stack.fixup_proj[1].bias.to(lowres.dtype)
        bias = bias if channels is None else bias[list(channels)]
    if not plan.exact_windows:
        for stage in stack.stages:
            feats = stack._run_stage(stage, feats, image)
        if tuple(feats.shape[2:]) != plan.output_size:
            feats = F.interpolate(feats, size=plan.output_size, mode="bilinear", align_corners=False)
        return _take(feats, [c[-1] for c in corners], plan.lengths[-1]) + bias.view(1, -1, 1, 1)
    image_per_lowres = (image.shape[2] // plan.lengths[0][0], image.shape[3] // plan.lengths[0][1])
    for k, stage in enumerate(stack.stages, start=1):
        scale = plan.steps[k - 1].scale
        out_len = _scaled(plan.lengths[k - 1], scale)  # this stage's output window
        ratio = (image_per_lowres[0] * plan.sizes[0][0] // plan.sizes[k][0],
                 image_per_lowres[1] * plan.sizes[0][1] // plan.sizes[k][1])  # image pixels per pixel of this level
        guide = _take(image, [_guide_shift(c, k, scale, ratio, image_per_lowres) for c in corners], _scaled(out_len, ratio))
        out = stack._run_stage(stage, feats, guide)  # (B, K, *out_len)
        feats = _take(out, [_shift(c[k], c[k - 1], scale) for c in corners], plan.lengths[k])
    return feats + bias.view(1, -1, 1, 1)


def _guide_shift(corner: list[Pair], k: int, scale: Pair, ratio: Pair, image_per_lowres: Pair) -> Pair:
    """Offset, in the image window, of stage ``k``'s output window (its level-(k-1) window times ``scale``)."""
    return tuple(corner[k - 1][a] * scale[a] * ratio[a] - corner[0][a] * image_per_lowres[a] for a in (0, 1))


def _shift(inner: Pair, outer: Pair, scale: Pair) -> Pair:
    """Offset of the window at ``inner`` (level k) inside the upsampled window at ``outer`` (level k - 1)."""
    return inner[0] - outer[0] * scale[0], inner[1] - outer[1] * scale[1]


def _scaled(length: Pair, scale: Pair) -> Pair:
    return length[0] * scale[0], length[1] * scale[1]


def _take(x: torch.Tensor, offsets: Sequence[Pair], size: Pair) -> torch.Tensor:
    """Per sample, the ``size`` window of ``x`` (B, C, H, W) at its offset: one view when every offset is the same."""
    height, width = size
    if len(set(offsets)) == 1:
        top, left = offsets[0]
        return x[:, :, top : top + height, left : left + width]
    return torch.stack([x[b, :, top : top + height, left : left + width] for b, (top, left) in enumerate(offsets)])
