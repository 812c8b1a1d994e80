"""Pieces of FeatUp's multi-view training objective, each returning a tensor (nothing is logged here).

Reconstruction with predicted uncertainty (``ScaleNet``), random channel projection, total
variation, the sampled CRF regulariser, and the implicit upsampler's magnitude and blur-pin terms,
with the published forms and defaults (``train_jbu_upsampler.py``, ``train_implicit_upsampler.py``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from featup.downsamplers import gaussian_blur2d
from featup.errors import InputError


def _draw_device(generator: torch.Generator | None, device) -> torch.device | str | None:
    """Draw random numbers on the generator's device (a generator only draws there), else on ``device``."""
    return generator.device if generator is not None else device


def reconstruction_loss(target: torch.Tensor, pred: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``(pred - target)^2 / (2 s^2) + log s`` with s (B, 1, h, w); plain MSE when ``scales`` is None."""
    if target.shape != pred.shape:
        raise InputError(f"reconstruction pred shape: expected {tuple(target.shape)}, got {tuple(pred.shape)}")
    sq_err = (pred - target).square()  # (B, C, h, w)
    if scales is None:
        return sq_err.mean()
    expected = (target.shape[0], 1, *target.shape[2:])
    if tuple(scales.shape) != expected:
        raise InputError(f"reconstruction scales shape: expected {expected}, got {tuple(scales.shape)}")
    return (sq_err / (2 * scales.square()) + scales.log()).mean()


class ScaleNet(nn.Module):
    """Per-pixel uncertainty s > 0 of low-res target features: ``exp(conv1x1(x) + 0.1)``, clamped at 1e-4."""

    def __init__(self, dim: int, *, device=None, dtype=None, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.net = nn.Conv2d(dim, 1, 1, device=device, dtype=dtype)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Torch's default conv init scaled by 0.1, so that scales start near exp(0.1)."""
        bound = 1.0 / math.sqrt(self.dim)  # torch's default for weight (kaiming, a=sqrt(5)) and bias
        for param in (self.net.weight, self.net.bias):
            draw_on = _draw_device(generator, param.device)
            u = torch.rand(param.shape, generator=generator, device=draw_on, dtype=param.dtype)
            param.copy_(0.1 * (u.to(param.device) * (2 * bound) - bound))

    def forward(self, lr_feats: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> scales (B, 1, h, w)."""
        return torch.exp(self.net(lr_feats) + 0.1).clamp_min(1e-4)


def random_projection(
    dim: int,
    k: int,
    *,
    generator: torch.Generator | None = None,
    device=None,
    dtype=None,
) -> torch.Tensor:
    """A (dim, k) Gaussian projection with unit-norm columns, to compare features in a random k-dim subspace."""
    proj = torch.randn(dim, k, generator=generator, device=_draw_device(generator, device), dtype=dtype)
    proj = proj.to(device) if device is not None else proj
    return proj / proj.norm(dim=0, keepdim=True)


def project(feats: torch.Tensor, proj: torch.Tensor | None) -> torch.Tensor:
    """(B, C, H, W) x (C, k) or per-sample (B, C, k) -> (B, k, H, W); identity when ``proj`` is None."""
    if proj is None:
        return feats
    if proj.dim() == 2:
        return torch.einsum("bchw,ck->bkhw", feats, proj)
    return torch.einsum("bchw,bck->bkhw", feats, proj)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Sum of squared vertical and horizontal neighbour differences of (B, C, H, W), divided by B*C*H*W."""
    b, c, h, w = x.shape
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).square().sum()
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).square().sum()
    return (dh + dw) / (b * c * h * w)


class TVLoss(nn.Module):
    """Module form of :func:`total_variation`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return total_variation(x)


def _pairwise_sq_dists(x: torch.Tensor) -> torch.Tensor:
    """(B, C, N) -> (B, N, N) squared distances between the N columns, without a (B, C, N, N) temporary."""
    sq = x.square().sum(1)  # (B, N)
    gram = torch.einsum("bcn,bcm->bnm", x, x)
    return (sq.unsqueeze(2) + sq.unsqueeze(1) - 2 * gram).clamp_min(0)


class SampledCRFLoss(nn.Module):
    """Dense-CRF-style smoothness on ``n_samples`` random pixels: similar colour and position -> similar features.

    Pair weight ``w1 exp(-|dp|^2 / 2 alpha - |dI|^2 / 2 beta) + w2 exp(-|dp|^2 / 2 gamma) - shift`` (positions
    normalised by the image size) times the squared feature distance, averaged over all pairs.
    Defaults are those of the published JBU training.
    """

    def __init__(
        self,
        n_samples: int = 1000,
        alpha: float = 0.1,
        beta: float = 0.15,
        gamma: float = 0.005,
        w1: float = 10.0,
        w2: float = 3.0,
        shift: float = 0.0,
    ) -> None:
        super().__init__()
        self.n_samples = n_samples
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.w1, self.w2, self.shift = w1, w2, shift

    def forward(
        self,
        guidance: torch.Tensor,
        features: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Guidance image (B, 3, H, W) and features (B, C, H, W) -> scalar; pixels drawn from ``generator``."""
        if guidance.shape[0] != features.shape[0] or guidance.shape[2:] != features.shape[2:]:
            raise InputError(
                f"crf features shape: expected batch and size of guidance {tuple(guidance.shape)}, "
                f"got {tuple(features.shape)}"
            )
        h, w = guidance.shape[2:]
        draw_on = _draw_device(generator, features.device)
        rows = torch.randint(0, h, (self.n_samples,), generator=generator, device=draw_on).to(features.device)
        cols = torch.randint(0, w, (self.n_samples,), generator=generator, device=draw_on).to(features.device)
        coords = torch.stack([rows / h, cols / w]).to(features.dtype)  # (2, N)
        coord_d = _pairwise_sq_dists(coords.unsqueeze(0))  # (1, N, N)
        guide_d = _pairwise_sq_dists(guidance[:, :, rows, cols])  # (B, N, N)
        kernel = (
            self.w1 * torch.exp(-coord_d / (2 * self.alpha) - guide_d / (2 * self.beta))
            + self.w2 * torch.exp(-coord_d / (2 * self.gamma))
            - self.shift
        )
        feat_d = _pairwise_sq_dists(features[:, :, rows, cols])  # (B, N, N)
        return (feat_d * kernel).mean()


def magnitude(feats: torch.Tensor) -> torch.Tensor:
    """Per-pixel L2 norm over channels: (B, C, H, W) -> (B, 1, H, W)."""
    return feats.square().sum(1, keepdim=True).sqrt()


def magnitude_loss(down_magnitude: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE between the downsampled high-res magnitude channel (B, 1, h, w) and the target's magnitude."""
    return (down_magnitude - magnitude(target)).square().mean()


def magnitude_tv(hr_feats: torch.Tensor) -> torch.Tensor:
    """Total variation of the high-res feature magnitude (the implicit upsampler's ``mag_tv`` term)."""
    return total_variation(magnitude(hr_feats))


def blur_pin_loss(hr_feats: torch.Tensor) -> torch.Tensor:
    """MSE between high-res features and their Gaussian blur (5, sigma 1): penalises pixel-level noise."""
    return (gaussian_blur2d(hr_feats, 5, 1.0) - hr_feats).square().mean()
