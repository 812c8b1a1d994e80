"""The ground-truth benchmark's figure (matplotlib, Agg): features as PCA colour maps, error maps, and the mean errors.

One row per held-out image: image | truth | bilinear | JBU | implicit [| the --upsampler scored besides] (one
3-component PCA fitted on the truth, one colour scale per row) | each method's per-pixel error ``||F^ - F||`` over the truth's RMS norm (one colour bar,
0 to 1). Below, grouped bars of every method's mean relative L2 error overall, near edges and in flat regions,
with the values written on the bars and a labelled y axis.
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
import torch

from featup.pca import fit_pca, flatten_pixels
from pipeline.analysis.pictures import joint_minmax
from pipeline.evaluate.scoring import EvalReport, Scored

BAR_METRICS = {"rel": "all pixels", "rel_edge": "near edges", "rel_flat": "flat"}
TILE_INCHES = 1.4
ERROR_CMAP = "magma"


def feature_maps(item: Scored) -> list[np.ndarray]:
    """Truth and each method through one PCA fitted on the truth, scaled together -> (H, W, 3) arrays in [0, 1]."""
    pca = fit_pca(flatten_pixels(item.truth), 3, max_samples=8192, generator=torch.Generator().manual_seed(0))
    maps = [pca.transform(item.truth)] + [pca.transform(output) for output in item.outputs.values()]
    return [rgb[0].permute(1, 2, 0).clamp(0, 1).numpy() for rgb in joint_minmax(maps)]


def error_maps(item: Scored) -> list[np.ndarray]:
    """Per-pixel error norm of each method over the truth's RMS pixel norm, (H, W) each."""
    rms = item.truth.square().sum(1).mean().sqrt().clamp_min(1e-12)
    return [((output - item.truth).square().sum(1).sqrt()[0] / rms).numpy() for output in item.outputs.values()]


def build_figure(items: Sequence[Scored], report: EvalReport):
    """The whole figure as a matplotlib Figure (rows of tiles, then the bar chart)."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, no display

    methods = list(items[0].outputs) if items else scored_methods(report)
    columns = 2 + 2 * len(methods)
    figure = Figure(figsize=(columns * TILE_INCHES, (len(items) + 2) * TILE_INCHES + 0.6), dpi=100, layout="constrained")
    rows = figure.subfigures(2, 1, height_ratios=[len(items) * TILE_INCHES + 0.4, 2 * TILE_INCHES])
    grid = rows[0].subplots(len(items), columns, squeeze=False)
    captions = ["image", "truth (PCA)", *methods, *(f"error {m}" for m in methods)]
    for r, item in enumerate(items):
        shown = error_row(grid[r], item)
        for axes, caption in zip(grid[r], captions):
            axes.set_xticks([])
            axes.set_yticks([])
            if r == 0:
                axes.set_title(caption, fontsize=9)
    rows[0].colorbar(shown, ax=grid[:, -len(methods):], shrink=0.8, label="error / RMS of truth")
    bar_chart(rows[1].subplots(), report)
    return figure


def error_row(axes_row, item: Scored):
    """Draws one image's tiles; returns the last error image (for the shared colour bar)."""
    tiles = [item.sample.image, *feature_maps(item)]
    for axes, tile in zip(axes_row, tiles):
        axes.imshow(tile, interpolation="nearest")
    shown = None
    for axes, error in zip(axes_row[len(tiles):], error_maps(item)):
        shown = axes.imshow(error, cmap=ERROR_CMAP, vmin=0.0, vmax=1.0, interpolation="nearest")
    return shown


def bar_chart(axes, report: EvalReport) -> None:
    """Mean relative error per method (overall, near edges, flat) as grouped bars with their values."""
    methods = scored_methods(report)
    width = 0.8 / len(BAR_METRICS)
    positions = np.arange(len(methods))
    for j, (metric, label) in enumerate(BAR_METRICS.items()):
        values = [report.means[m][metric] for m in methods]
        bars = axes.bar(positions + (j - 1) * width, [0.0 if math.isnan(v) else v for v in values], width, label=label)
        axes.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=8, padding=2)
    axes.set_xticks(positions, methods)
    axes.set_ylabel("mean relative L2 error")
    axes.set_title("held-out images")
    axes.legend(loc="upper right", fontsize=8)
    axes.margins(y=0.15)


def scored_methods(report: EvalReport) -> list[str]:
    """The methods of the report, in its order, without the truth."""
    return [m for m in report.means if m != "truth"]


def render_figure(items: Sequence[Scored], report: EvalReport) -> bytes:
    """The whole figure as RGB PNG bytes (Agg draws RGBA; the figure has no transparency to keep)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    canvas = FigureCanvasAgg(build_figure(items, report))
    canvas.draw()
    png = io.BytesIO()
    Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3]).save(png, "PNG")
    return png.getvalue()
