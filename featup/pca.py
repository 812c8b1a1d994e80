"""Principal component analysis of feature maps in pure torch, to show or compress C-channel features."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from featup.errors import ConfigError, InputError


@dataclass(frozen=True)
class PCA:
    """A fitted PCA: ``mean`` (C,) and orthonormal ``components`` (K, C), largest variance first."""

    mean: torch.Tensor  # (C,)
    components: torch.Tensor  # (K, C)

    @property
    def dim(self) -> int:
        """Number of input channels C."""
        return self.components.shape[1]

    @property
    def k(self) -> int:
        """Number of components K."""
        return self.components.shape[0]

    def project_only(self, x: torch.Tensor) -> torch.Tensor:
        """The linear part ``x @ components.T`` without centring, so it commutes with linear upsamplers."""
        _check_channels(x, self.dim, "features to project")
        comps = self.components.to(device=x.device, dtype=x.dtype)
        if x.ndim == 2:
            return x @ comps.T  # (N, C) -> (N, K)
        return torch.einsum("bchw,kc->bkhw", x, comps)  # (B, C, H, W) -> (B, K, H, W)

    def offset(self) -> torch.Tensor:
        """The constant ``mean @ components.T`` that ``transform`` subtracts after ``project_only``."""
        return self.components @ self.mean  # (K,)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Centred projection of (N, C) rows or (B, C, H, W) maps onto the K components."""
        offset = self.offset().to(device=x.device, dtype=x.dtype)
        if x.ndim == 2:
            return self.project_only(x) - offset  # (N, K)
        return self.project_only(x) - offset.view(1, -1, 1, 1)  # (B, K, H, W)

    def inverse_transform(self, z: torch.Tensor) -> torch.Tensor:
        """Maps K-component rows (N, K) or maps (B, K, H, W) back to C channels (the least-squares inverse)."""
        _check_channels(z, self.k, "components to invert")
        comps = self.components.to(device=z.device, dtype=z.dtype)
        mean = self.mean.to(device=z.device, dtype=z.dtype)
        if z.ndim == 2:
            return z @ comps + mean  # (N, C)
        return torch.einsum("bkhw,kc->bchw", z, comps) + mean.view(1, -1, 1, 1)  # (B, C, H, W)


def fit_pca(
    feats: torch.Tensor,
    k: int,
    *,
    max_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> PCA:
    """Fits a K-component PCA to (N, C) rows or the pixels of (B, C, H, W) maps by an exact SVD.

    ``max_samples`` fits on that many rows drawn without replacement through ``generator``
    (a fresh one seeded 0 if None, so the fit is reproducible). Computation is in float64 for
    float64 input and float32 otherwise; signs follow ``_fix_signs``.
    """
    rows = flatten_pixels(feats)  # (N, C)
    n, c = rows.shape
    if not 1 <= k <= min(n, c):
        raise ConfigError(f"PCA k: expected 1 <= k <= min(samples, channels) = {min(n, c)}, got {k}")
    rows = _subsample(rows, max_samples, generator)
    rows = rows.to(torch.float64 if rows.dtype == torch.float64 else torch.float32)
    mean = rows.mean(dim=0)  # (C,)
    _, _, vh = torch.linalg.svd(rows - mean, full_matrices=False)  # vh: (min(N, C), C)
    return PCA(mean=mean, components=_fix_signs(vh[:k]))


def flatten_pixels(feats: torch.Tensor) -> torch.Tensor:
    """(N, C) rows unchanged, or (B, C, H, W) maps as (B*H*W, C) rows of pixels."""
    if feats.ndim == 2:
        return feats
    if feats.ndim == 4:
        return feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])  # (B*H*W, C)
    raise InputError(f"PCA features: expected shape (N, C) or (B, C, H, W), got {tuple(feats.shape)}")


def _subsample(rows: torch.Tensor, max_samples: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """At most ``max_samples`` rows of ``rows``, drawn without replacement through ``generator``."""
    if max_samples is None or rows.shape[0] <= max_samples:
        return rows
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    idx = torch.randperm(rows.shape[0], generator=generator, device=generator.device)[:max_samples]
    return rows[idx.to(rows.device)]


def _fix_signs(components: torch.Tensor) -> torch.Tensor:
    """Flips each component so its entry of largest magnitude is positive (SVD signs are arbitrary)."""
    pivot = components.abs().argmax(dim=1, keepdim=True)  # (K, 1)
    signs = torch.sign(components.gather(1, pivot))  # (K, 1)
    return components * torch.where(signs == 0, torch.ones_like(signs), signs)


def _check_channels(x: torch.Tensor, expected: int, what: str) -> None:
    """Raises InputError unless ``x`` is (N, expected) or (B, expected, H, W)."""
    if x.ndim not in (2, 4) or x.shape[1] != expected:
        raise InputError(f"PCA {what}: expected shape (N, {expected}) or (B, {expected}, H, W), got {tuple(x.shape)}")
