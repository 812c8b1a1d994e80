"""Bicubic 2x upsampling, reflect padding and a per-pixel filter, composed into one filter over the source.

A JBU stage ends with ``adaptive_conv(reflect_pad(bicubic_2x(source), r), filters)``. Bicubic 2x is a
fixed separable 4-tap filter whose weights depend only on an output sample's parity, so each output
pixel's D x D filter over the upsampled map equals one K x K filter over the source (K = 7 for D = 7):
``out[b, c, y, x] = sum_{a, e} kernel[b, a * K + e, y, x] * source_padded[b, c, y // 2 + a, x // 2 + e]``.
The composed weights are a separable contraction of the D x D filter with fixed per-row and
per-column matrices (border rows and columns get their own: they fold in the reflection and
PyTorch's index clamping). The composed form reads the source, 4x fewer bytes than the upsampled
map, and never writes it; the result equals the upsampled form up to float rounding.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from featup.errors import InputError
from featup.ops.adaptive_conv import filter_diameter
from featup.ops.compiled import Backend, LazyCompiled
from featup.ops.resample import bicubic_sampling_2x
from featup.ops.tap_backward import eager_taps


def _reflect_index(size: int, radius: int) -> torch.Tensor:
    """(size, D): index that ``F.pad(..., mode="reflect")`` reads for tap t of output o (one overhang < size)."""
    index = torch.arange(size).view(-1, 1) + torch.arange(2 * radius + 1) - radius
    index = torch.where(index < 0, -index, index)
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def _tap_samples(size: int, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source offsets from o // 2 (2*size, D, 4) and weights of the bicubic samples in tap t of output o."""
    index, weight = bicubic_sampling_2x(size)  # (2*size, 4) each
    upsampled = _reflect_index(2 * size, radius)  # (2*size, D): the upsampled row each tap reads
    offsets = index[upsampled] - (torch.arange(2 * size) // 2).view(-1, 1, 1)
    return offsets, weight[upsampled]


@functools.lru_cache(maxsize=None)
def window(radius: int) -> tuple[int, int]:
    """(offset, width) of the source window: output o reads source samples o // 2 + offset + [0, width)."""
    offsets, _ = _tap_samples(4 * radius + 8, radius)  # borders and interior of any size alike
    lo, hi = int(offsets.min()), int(offsets.max())
    return lo, hi - lo + 1


@functools.lru_cache(maxsize=64)
def resample_taps(size: int, radius: int) -> torch.Tensor:
    """(2*size, D, K) float64: weight of source sample o // 2 + offset + k in tap t of output o (do not modify).

    Border outputs get their own weights; every output reads the same window, because reflection
    and clamping only pull samples towards the inside.
    """
    if 2 * size <= radius:
        raise InputError(
            f"upsample_filter: a source of size {size} is too small for radius {radius}: expected more than {radius / 2:g}"
        )
    lo, width = window(radius)
    offsets, weight = _tap_samples(size, radius)
    if offsets.min() < lo or offsets.max() >= lo + width:
        raise RuntimeError(f"bicubic samples of size {size}, radius {radius} fall outside the {width}-wide source window")
    taps = torch.zeros(2 * size, 2 * radius + 1, width, dtype=torch.float64)
    return taps.scatter_add_(2, offsets - lo, weight)


def _make_compose(diameter: int):
    """Composed K x K weights from D x D filters: rows contraction after columns, each a short sum of products."""
    width = window(diameter // 2)[1]

    def compose(filters: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        # filters (B, D*D, H, W); rows (D, K, H); cols (D, K, W) -> (B, K*K, H, W)
        b, _, h, w = filters.shape
        f = filters.view(b, diameter, diameter, h, w)
        by_cols = []
        for i in range(diameter):
            terms = [f[:, i, j, None] * cols[j][None, :, None, :] for j in range(diameter)]  # (B, K, H, W)
            by_cols.append(_sum(terms))
        kernel = _sum([by_cols[i][:, None] * rows[i][None, :, None, :, None] for i in range(diameter)])  # (B, K, K, H, W)
        return kernel.reshape(b, width * width, h, w)

    return compose


def _make_compose_eager(diameter: int):
    """Eager composed weights: the same two contractions as two ``einsum`` (batched matmuls), not 56 broadcast products."""

    def compose_eager(filters: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        # filters (B, D*D, H, W); rows (D, K, H); cols (D, K, W) -> (B, K*K, H, W)
        b, _, h, w = filters.shape
        f = filters.view(b, diameter, diameter, h, w)
        by_cols = torch.einsum("bijyx,jex->bieyx", f, cols)  # (B, D, K, H, W)
        kernel = torch.einsum("bieyx,iay->baeyx", by_cols, rows)  # (B, K, K, H, W)
        return kernel.reshape(b, -1, h, w)

    return compose_eager


def _make_composed_taps(width: int):
    """Taps over the source at half resolution: one nearest-upsampled view, then K*K shifted slices."""

    def composed_taps(source_padded: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        b, c, hp, wp = source_padded.shape
        h, w = kernel.shape[2], kernel.shape[3]
        # (B, 2hp, 2wp, C): sample [y, x] is source_padded[y // 2, x // 2], a view the compiler indexes.
        nearest = source_padded.permute(0, 2, 3, 1)[:, :, None, :, None, :]  # (B, hp, 1, wp, 1, C)
        nearest = nearest.expand(b, hp, 2, wp, 2, c).reshape(b, 2 * hp, 2 * wp, c)
        k = kernel.permute(0, 2, 3, 1)  # (B, H, W, K*K)
        terms = [
            nearest[:, 2 * i : 2 * i + h, 2 * j : 2 * j + w] * k[..., i * width + j : i * width + j + 1]
            for i in range(width)
            for j in range(width)
        ]
        return _sum(terms).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last

    return composed_taps


def _taps_forward(source_padded: torch.Tensor, kernel: torch.Tensor, width: int) -> torch.Tensor:
    """For each output parity, in-place ``addcmul_`` over half-resolution views, then interleave -> (B, C, 2h, 2w)."""
    source_padded = source_padded.contiguous(memory_format=torch.channels_last)
    b, c = source_padded.shape[:2]
    h, w = kernel.shape[2] // 2, kernel.shape[3] // 2
    acc_dtype = torch.promote_types(torch.promote_types(source_padded.dtype, kernel.dtype), torch.float32)
    rows = []
    for py in range(2):
        cols = []
        for px in range(2):
            k = kernel[:, :, py::2, px::2]  # (B, K*K, h, w)
            out = torch.zeros(b, h, w, c, device=kernel.device, dtype=acc_dtype).permute(0, 3, 1, 2)  # channels-last
            for i in range(width):
                for j in range(width):
                    t = i * width + j
                    out.addcmul_(source_padded[:, :, i : i + h, j : j + w], k[:, t : t + 1])
            cols.append(out.permute(0, 2, 3, 1))  # (B, h, w, C)
        rows.append(torch.stack(cols, dim=3))  # (B, h, w, 2, C)
    out = torch.stack(rows, dim=2).view(b, 2 * h, 2 * w, c)  # (B, 2h, 2w, C)
    return out.permute(0, 3, 1, 2)  # (B, C, 2h, 2w), channels-last


def _taps_backward(
    grad_out: torch.Tensor, source_padded: torch.Tensor, kernel: torch.Tensor, width: int, needs: tuple[bool, ...]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``_taps_forward`` accumulated in place, tap by tap (autograd of the forward allocates a whole
    source-sized gradient per shifted view: about 200 per stage)."""
    h, w = kernel.shape[2] // 2, kernel.shape[3] // 2
    acc_dtype = torch.promote_types(grad_out.dtype, torch.float32)
    grad_source = torch.zeros_like(source_padded, dtype=acc_dtype) if needs[0] else None  # (B, C, hp, wp)
    grad_kernel = torch.empty_like(kernel, dtype=acc_dtype) if needs[1] else None  # (B, K*K, 2h, 2w)
    for py in range(2):
        for px in range(2):
            g = grad_out[:, :, py::2, px::2]  # (B, C, h, w)
            k = kernel[:, :, py::2, px::2]  # (B, K*K, h, w)
            for i in range(width):
                for j in range(width):
                    t = i * width + j
                    shifted = source_padded[:, :, i : i + h, j : j + w]
                    if grad_kernel is not None:
                        torch.sum(g * shifted, dim=1, out=grad_kernel[:, t, py::2, px::2])
                    if grad_source is not None:
                        grad_source[:, :, i : i + h, j : j + w].addcmul_(g, k[:, t : t + 1])
    return (
        grad_source.to(source_padded.dtype) if grad_source is not None else None,
        grad_kernel.to(kernel.dtype) if grad_kernel is not None else None,
    )


def _make_composed_taps_eager(width: int):
    """Eager taps: in-place accumulation per output parity; the backward accumulates in place too (3.5x to 8.8x faster
    than autograd of the in-place forward, ``bench/bench_eager_backward.py``)."""
    return eager_taps(_taps_forward, _taps_backward, width)


def _sum(terms: list[torch.Tensor]) -> torch.Tensor:
    out = terms[0]
    for term in terms[1:]:
        out = out + term
    return out


_COMPOSE = LazyCompiled(_make_compose, _make_compose_eager)
_COMPOSED_TAPS = LazyCompiled(_make_composed_taps, _make_composed_taps_eager)


def compose_filters(
    filters: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, backend: Backend = "auto"
) -> torch.Tensor:
    """D x D filters (B, D*D, H, W) and resample taps (H, D, K), (W, D, K) -> K x K filters (B, K*K, H, W)."""
    diameter = filter_diameter(filters.shape[1], "compose_filters")
    rows = rows.to(filters.dtype).to(filters.device).permute(1, 2, 0).contiguous()  # (D, K, H)
    cols = cols.to(filters.dtype).to(filters.device).permute(1, 2, 0).contiguous()  # (D, K, W)
    return _COMPOSE(diameter, filters.contiguous(), rows, cols, backend=backend)


def composed_conv(source_padded: torch.Tensor, kernel: torch.Tensor, backend: Backend = "auto") -> torch.Tensor:
    """``out[b, c, y, x] = sum_{a, e} kernel[b, a*K + e, y, x] * source_padded[b, c, y//2 + a, x//2 + e]``.

    source_padded (B, C, h+K-1, w+K-1), kernel (B, K*K, 2h, 2w) -> (B, C, 2h, 2w) in the source's dtype.
    """
    width = math.isqrt(kernel.shape[1])
    hp, wp = source_padded.shape[2], source_padded.shape[3]
    if width * width != kernel.shape[1] or tuple(kernel.shape[2:]) != (2 * (hp - width + 1), 2 * (wp - width + 1)):
        raise InputError(f"composed_conv: kernel {tuple(kernel.shape)} does not fit source {tuple(source_padded.shape)}")
    source_padded = source_padded.contiguous(memory_format=torch.channels_last)
    kernel = kernel.contiguous(memory_format=torch.channels_last)
    return _COMPOSED_TAPS(width, source_padded, kernel, backend=backend).to(source_padded.dtype)


def upsample_filter(
    source: torch.Tensor, filters: torch.Tensor, rows: slice | None = None, backend: Backend = "auto"
) -> torch.Tensor:
    """``adaptive_conv`` of the reflect-padded bicubic 2x upsample of ``source``, for output rows ``rows``.

    source (B, C, h, w); filters (B, D*D, rows, 2w) for output rows ``rows`` (even bounds; default
    all 2h) -> (B, C, rows, 2w). Only the source rows the band needs are read.
    """
    if source.dim() != 4 or filters.dim() != 4:
        raise InputError(
            f"upsample_filter: expected 4-D source and filters, got {tuple(source.shape)} and {tuple(filters.shape)}"
        )
    diameter = filter_diameter(filters.shape[1], "upsample_filter")
    radius = diameter // 2
    h, w = source.shape[2], source.shape[3]
    rows = rows if rows is not None else slice(0, 2 * h)
    if rows.start % 2 or rows.stop % 2 or not 0 <= rows.start < rows.stop <= 2 * h:
        raise InputError(f"upsample_filter: expected even output rows within [0, {2 * h}], got {rows.start}:{rows.stop}")
    if (filters.shape[0], filters.shape[2], filters.shape[3]) != (source.shape[0], rows.stop - rows.start, 2 * w):
        raise InputError(
            f"upsample_filter: filters {tuple(filters.shape)} do not match rows {rows.start}:{rows.stop} "
            f"of source {tuple(source.shape)} upsampled 2x"
        )
    lo, width = window(radius)
    row_taps, col_taps = resample_taps(h, radius)[rows], resample_taps(w, radius)
    kernel = compose_filters(filters, row_taps, col_taps, backend)  # (B, K*K, rows, 2w)
    # Source rows y // 2 + lo + [0, K) for the band's outputs y, zero outside the source.
    top, bottom = rows.start // 2 + lo, rows.stop // 2 + lo + width - 1
    band = source[:, :, max(top, 0) : min(bottom, h)]
    padded = F.pad(band, [-lo, width - 1 + lo, max(-top, 0), max(bottom - h, 0)])  # (B, C, rows/2+K-1, w+K-1)
    return composed_conv(padded, kernel, backend)
