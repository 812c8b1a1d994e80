"""Adaptive (per-pixel) convolution and local similarity, the inner loops of the joint bilateral upsampler.

``adaptive_conv``: ``out[b, c, h, w] = sum_{i, j} filters[b, i * D + j, h, w] * x_padded[b, c, h + i, w + j]``
``local_similarity``: ``out[b, i * D + j, h, w] = sum_c keys_padded[b, c, h + i, w + j] * queries[b, c, h, w]``

The published FeatUp code builds both from an unfolded ``C x D^2 x H x W`` tensor (or a CUDA
extension). Here each is an accumulation over the ``D^2`` taps of shifted views, which never
materialises the unfolded tensor; under ``torch.compile`` the taps fuse into one kernel that
reads each input element once per output tile. Autograd differentiates the compiled kernels; the eager window
similarities have a hand-written backward that accumulates in place.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from featup.errors import InputError
from featup.ops.compiled import Backend, LazyCompiled
from featup.ops.tap_backward import eager_taps


def filter_diameter(taps: int, what: str) -> int:
    """D for D*D filter taps (D odd), or an InputError naming ``what``."""
    diameter = math.isqrt(taps)
    if diameter * diameter != taps or diameter % 2 == 0:
        raise InputError(f"{what}: expected an odd square number of filter taps, got {taps}")
    return diameter


def _check_padded(x_padded: torch.Tensor, other: torch.Tensor, taps: int, what: str) -> int:
    """Validate that ``x_padded`` is ``other``'s spatial size plus a D-1 border; return D."""
    if x_padded.dim() != 4 or other.dim() != 4:
        raise InputError(f"{what}: expected 4-D tensors, got {tuple(x_padded.shape)} and {tuple(other.shape)}")
    diameter = filter_diameter(taps, what)
    b, _, hp, wp = x_padded.shape
    if (other.shape[0], other.shape[2] + diameter - 1, other.shape[3] + diameter - 1) != (b, hp, wp):
        raise InputError(
            f"{what}: padded input {tuple(x_padded.shape)} does not fit a {diameter}x{diameter} window "
            f"over {tuple(other.shape)}"
        )
    return diameter


def _make_accumulate_taps(diameter: int):
    """Out-of-place tap accumulation for ``diameter``: the graph ``torch.compile`` fuses into one kernel."""

    def accumulate_taps(x_padded: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
        h, w = filters.shape[2], filters.shape[3]
        out = None
        for i in range(diameter):
            for j in range(diameter):
                k = i * diameter + j
                term = x_padded[:, :, i : i + h, j : j + w] * filters[:, k : k + 1]  # (B, C, H, W)
                out = term if out is None else out + term
        return out

    return accumulate_taps


def _make_accumulate_taps_eager(diameter: int):
    """Eager tap accumulation into one output buffer with in-place ``addcmul_`` (autograd-safe)."""

    def accumulate_taps_eager(x_padded: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
        x_padded, filters = x_padded.contiguous(), filters.contiguous()  # shifted views are fast in NCHW
        b, c = x_padded.shape[:2]
        h, w = filters.shape[2], filters.shape[3]
        dtype = torch.promote_types(x_padded.dtype, filters.dtype)
        # Accumulate reduced-precision inputs in float32, as the compiled kernel does.
        acc_dtype = torch.promote_types(dtype, torch.float32)
        out = torch.zeros(b, c, h, w, device=x_padded.device, dtype=acc_dtype)
        for i in range(diameter):
            for j in range(diameter):
                k = i * diameter + j
                out.addcmul_(x_padded[:, :, i : i + h, j : j + w], filters[:, k : k + 1])
        return out.to(dtype)

    return accumulate_taps_eager


def _make_similarity_taps(diameter: int):
    """Dot products of each query with the keys in its ``D x D`` window, tap by tap."""

    def similarity_taps(keys_padded: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        h, w = queries.shape[2], queries.shape[3]
        taps = [
            (keys_padded[:, :, i : i + h, j : j + w] * queries).sum(dim=1)  # (B, H, W)
            for i in range(diameter)
            for j in range(diameter)
        ]
        return torch.stack(taps, dim=1)  # (B, D*D, H, W)

    return similarity_taps


def _similarity_forward(keys_padded: torch.Tensor, queries: torch.Tensor, diameter: int) -> torch.Tensor:
    """The taps of ``similarity_taps`` written one by one into the output (no list of maps to stack): (B, D*D, H, W)."""
    b, _, h, w = queries.shape
    dtype = torch.promote_types(keys_padded.dtype, queries.dtype)
    out = torch.empty(b, diameter * diameter, h, w, device=queries.device, dtype=dtype)
    for i in range(diameter):
        for j in range(diameter):
            torch.sum(keys_padded[:, :, i : i + h, j : j + w] * queries, dim=1, out=out[:, i * diameter + j])
    return out


def _similarity_backward(
    grad_out: torch.Tensor, keys_padded: torch.Tensor, queries: torch.Tensor, diameter: int, needs: tuple[bool, ...]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``_similarity_forward`` accumulated in place, tap by tap (autograd of the taps allocates a whole
    keys-sized gradient per shifted view: D*D per call)."""
    h, w = queries.shape[2], queries.shape[3]
    acc_dtype = torch.promote_types(grad_out.dtype, torch.float32)
    grad_keys = torch.zeros_like(keys_padded, dtype=acc_dtype) if needs[0] else None  # (B, C, H+D-1, W+D-1)
    grad_queries = torch.zeros_like(queries, dtype=acc_dtype) if needs[1] else None  # (B, C, H, W)
    for i in range(diameter):
        for j in range(diameter):
            g = grad_out[:, i * diameter + j, None]  # (B, 1, H, W)
            if grad_keys is not None:
                grad_keys[:, :, i : i + h, j : j + w].addcmul_(queries, g)
            if grad_queries is not None:
                grad_queries.addcmul_(keys_padded[:, :, i : i + h, j : j + w], g)
    return (
        grad_keys.to(keys_padded.dtype) if grad_keys is not None else None,
        grad_queries.to(queries.dtype) if grad_queries is not None else None,
    )


def _make_similarity_taps_eager(diameter: int):
    """Eager window similarities: written tap by tap, with the in-place backward when recording gradients."""
    return eager_taps(_similarity_forward, _similarity_backward, diameter)


def _make_range_kernel(diameter: int, similarity_taps: Callable[..., torch.Tensor] | None = None):
    """Softmax of the window similarities times a spatial kernel, renormalised: one fused pass when compiled."""
    similarity_taps = similarity_taps or _make_similarity_taps(diameter)

    def range_kernel(keys_padded, queries, temperature, spatial):
        logits = similarity_taps(keys_padded, queries)  # (B, D*D, H, W)
        kernel = torch.softmax(temperature * logits, dim=1) * spatial
        return kernel / kernel.sum(dim=1, keepdim=True).clamp(min=1e-7)

    return range_kernel


def _make_range_kernel_eager(diameter: int):
    """The eager range kernel: the same math on the eager window similarities."""
    return _make_range_kernel(diameter, _make_similarity_taps_eager(diameter))


_ADAPTIVE_CONV = LazyCompiled(_make_accumulate_taps, _make_accumulate_taps_eager)
_LOCAL_SIMILARITY = LazyCompiled(_make_similarity_taps, _make_similarity_taps_eager)
_RANGE_KERNEL = LazyCompiled(_make_range_kernel, _make_range_kernel_eager)


def adaptive_conv(x_padded: torch.Tensor, filters: torch.Tensor, backend: Backend = "auto") -> torch.Tensor:
    """Apply per-pixel filters (B, D*D, H, W) to a padded map (B, C, H+D-1, W+D-1) -> (B, C, H, W).

    ``backend``: ``"compiled"`` fuses the taps with ``torch.compile`` (errors surface), ``"eager"``
    loops in PyTorch, ``"auto"`` compiles and falls back to eager, with one warning, if it cannot.
    """
    if filters.dim() != 4:
        raise InputError(f"adaptive_conv: expected 4-D filters (B, D*D, H, W), got shape {tuple(filters.shape)}")
    diameter = _check_padded(x_padded, filters, filters.shape[1], "adaptive_conv")
    # The fused kernel vectorises over channels in channels-last layout (about 2x faster than NCHW).
    x_padded = x_padded.contiguous(memory_format=torch.channels_last)
    filters = filters.contiguous(memory_format=torch.channels_last)
    return _ADAPTIVE_CONV(diameter, x_padded, filters, backend=backend)


def local_similarity(keys_padded: torch.Tensor, queries: torch.Tensor, diameter: int, backend: Backend = "auto") -> torch.Tensor:
    """Window dot products: keys (B, K, H+D-1, W+D-1), queries (B, K, H, W) -> (B, D*D, H, W)."""
    _check_padded(keys_padded, queries, diameter * diameter, "local_similarity")
    return _LOCAL_SIMILARITY(diameter, keys_padded, queries, backend=backend)


def bilateral_kernel(
    keys_padded: torch.Tensor, queries: torch.Tensor, temperature: torch.Tensor, spatial: torch.Tensor, backend: Backend = "auto"
) -> torch.Tensor:
    """``softmax(temperature * local_similarity) * spatial``, normalised over the window -> (B, D*D, H, W).

    ``spatial`` (1, D*D, 1, 1) is the spatial kernel; the normaliser is clamped at 1e-7 as published.
    """
    diameter = math.isqrt(spatial.numel())
    _check_padded(keys_padded, queries, diameter * diameter, "bilateral_kernel")
    return _RANGE_KERNEL(diameter, keys_padded, queries, temperature, spatial, backend=backend)


def adaptive_conv_unfold(x_padded: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """Reference: the published formulation through ``F.unfold`` (materialises C x D^2 x H x W; tests only)."""
    diameter = _check_padded(x_padded, filters, filters.shape[1], "adaptive_conv_unfold")
    b, c = x_padded.shape[:2]
    h, w = filters.shape[2], filters.shape[3]
    patches = torch.nn.functional.unfold(x_padded, diameter).view(b, c, diameter * diameter, h, w)
    return torch.einsum("bckhw,bkhw->bchw", patches, filters)
