"""A plain eager transcription of the published JBU math: slow, obviously right, the yardstick.

Used by tests (the fast ``JBUStack`` must match it) and by ``bench/bench_jbu.py`` (the speed-up is
measured against it). It follows the published code step by step: unfolded range kernel, bicubic
upsample, reflect pad, 49-tap accumulation at full resolution, fix-up 1x1 conv at full resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from featup.upsamplers.jbu import JBUStack, JBUStage


def random_jbu_stack(dim: int, num_stages: int = 4, *, seed: int = 0, device=None, **options) -> JBUStack:
    """A JBU stack drawn from ``seed`` with its scalars moved off their initial values, so every term matters.

    ``options`` go to ``JBUStack`` (for example ``method`` or ``backend``).
    """
    generator = torch.Generator().manual_seed(seed)
    stack = JBUStack(dim, num_stages, **options)
    stack.reset_parameters(generator)
    with torch.no_grad():
        for stage in stack.stages:
            stage.range_temp.add_(0.5 * torch.randn((), generator=generator))
            stage.sigma_spatial.mul_(0.5 + torch.rand((), generator=generator))
    return stack.to(device).eval()


def reference_stage(stage: JBUStage, source: torch.Tensor, guidance: torch.Tensor, *, in_place: bool = False) -> torch.Tensor:
    """One published ``JBULearnedRange.forward``: (B, C, h, w), (B, 3, H, W) -> (B, C, H, W).

    ``in_place`` accumulates the taps into one buffer (``addcmul_``) instead of a new tensor per tap:
    the same math as an engineer would write it for speed, the benchmark's main yardstick.
    """
    b, _, height, width = guidance.shape
    r, d = stage.radius, stage.diameter
    keys = stage.range_proj(guidance)  # (B, K, H, W)
    patches = F.unfold(F.pad(keys, [r] * 4, mode="reflect"), d).view(b, keys.shape[1], d * d, height, width)
    temperature = stage.range_temp.exp().clamp(1e-4, 1e4)
    range_kernel = torch.softmax(temperature * torch.einsum("bkphw,bkhw->bphw", patches, keys), dim=1)
    kernel = range_kernel * stage.spatial_kernel()
    kernel = kernel / kernel.sum(1, keepdim=True).clamp(min=1e-7)
    kernel = kernel + 0.1 * stage.fixup_proj(torch.cat([kernel, guidance], dim=1))  # (B, D*D, H, W)
    hr = F.interpolate(source, (height, width), mode="bicubic", align_corners=False)
    hr_padded = F.pad(hr, [r] * 4, mode="reflect")  # (B, C, H+2r, W+2r)
    out = torch.zeros_like(hr)
    for i in range(d):
        for j in range(d):
            tap = hr_padded[:, :, i : i + height, j : j + width], kernel[:, i * d + j : i * d + j + 1]
            out = out.addcmul_(*tap) if in_place else out + tap[0] * tap[1]
    return out


def reference_stack(
    stack: JBUStack, lr_feats: torch.Tensor, image: torch.Tensor, *, in_place: bool = False
) -> list[torch.Tensor]:
    """Published ``JBUStack.forward``: every stage's output, then the full-resolution fix-up output last."""
    outputs, feats = [], lr_feats
    for stage in stack.stages:
        guidance = F.adaptive_avg_pool2d(image, (feats.shape[2] * 2, feats.shape[3] * 2))
        feats = reference_stage(stage, feats, guidance, in_place=in_place)
        outputs.append(feats)
    outputs.append(feats + 0.1 * stack.fixup_proj(feats))
    return outputs
