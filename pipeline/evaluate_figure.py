"""The ground-truth benchmark's PNG: features as PCA colour maps, error maps, and bars of the mean errors (PIL only).

One row per held-out image: image | truth | bilinear | JBU | implicit (one 3-component PCA fitted on
the truth, one colour scale per row) | each method's per-pixel error ``||F^ - F||`` over the truth's
RMS norm (black 0, white >= 1). Below, a bar chart of every method's mean relative L2 error overall,
near edges and in flat regions, with the values written on the bars.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from featup.pca import fit_pca, flatten_pixels
from pipeline.evaluate import METHODS, EvalReport
from pipeline.visualize import joint_minmax, rgb_to_pil

if TYPE_CHECKING:
    from pipeline.evaluate_run import Scored

PAD, FONT_SIZE, MIN_SIDE = 6, 13, 96
BAR_W, BAR_GAP, CHART_H = 22, 14, 200
BAR_COLOURS = {"rel": (31, 119, 180), "rel_edge": (214, 39, 40), "rel_flat": (44, 160, 44)}
BAR_LABELS = {"rel": "all pixels", "rel_edge": "near edges", "rel_flat": "flat"}


def feature_tiles(item: "Scored") -> list[Image.Image]:
    """Truth and each method through one PCA fitted on the truth, scaled together -> RGB tiles."""
    pca = fit_pca(flatten_pixels(item.truth), 3, max_samples=8192, generator=torch.Generator().manual_seed(0))
    maps = [pca.transform(item.truth)] + [pca.transform(item.outputs[m]) for m in METHODS]
    return [rgb_to_pil(rgb[0]) for rgb in joint_minmax(maps)]


def error_tiles(item: "Scored") -> list[Image.Image]:
    """Per-pixel error norm of each method over the truth's RMS pixel norm, as grey tiles clipped at 1."""
    rms = item.truth.square().sum(1).mean().sqrt().clamp_min(1e-12)
    tiles = []
    for method in METHODS:
        err = (item.outputs[method] - item.truth).square().sum(1).sqrt()[0] / rms  # (H, W)
        grey = (err.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        tiles.append(Image.fromarray(grey, mode="L").convert("RGB"))
    return tiles


def image_row(item: "Scored", font) -> Image.Image:
    """One image's tiles side by side with captions."""
    tiles = [Image.fromarray(item.sample.image)] + feature_tiles(item) + error_tiles(item)
    captions = ["image", "truth (PCA)", *METHODS, *(f"error {m}" for m in METHODS)]
    h, w = item.sample.image.shape[:2]
    scale = max(1, math.ceil(MIN_SIDE / min(h, w)))
    tw, th, cap = w * scale, h * scale, FONT_SIZE + 6
    row = Image.new("RGB", (len(tiles) * (tw + PAD) + PAD, th + cap + PAD), "white")
    draw = ImageDraw.Draw(row)
    for i, (tile, caption) in enumerate(zip(tiles, captions)):
        left = PAD + i * (tw + PAD)
        row.paste(tile.resize((tw, th), Image.Resampling.NEAREST), (left, cap))
        draw.text((left, 2), caption, fill="black", font=font)
    return row


def bar_chart(report: EvalReport, font) -> Image.Image:
    """Mean relative error per method (overall, near edges, flat) as grouped bars with their values."""
    metrics = tuple(BAR_COLOURS)
    top = max(max(report.means[m][k] for k in metrics if not math.isnan(report.means[m][k])) for m in METHODS)
    group_w = len(metrics) * BAR_W + BAR_GAP * 2
    width, base = 60 + len(METHODS) * group_w + 140, CHART_H - 30
    chart = Image.new("RGB", (width, CHART_H), "white")
    draw = ImageDraw.Draw(chart)
    draw.text((8, 4), "mean relative L2 error (held-out)", fill="black", font=font)
    draw.line((50, base, 50 + len(METHODS) * group_w, base), fill="black")
    for g, method in enumerate(METHODS):
        left = 50 + BAR_GAP + g * group_w
        for j, metric in enumerate(metrics):
            value = report.means[method][metric]
            height = 0 if math.isnan(value) else int((base - 40) * value / max(top, 1e-12))
            x0 = left + j * BAR_W
            draw.rectangle((x0, base - height, x0 + BAR_W - 3, base), fill=BAR_COLOURS[metric])
            draw.text((x0, base - height - FONT_SIZE - 2), f"{value:.2f}", fill="black", font=ImageFont.load_default(size=9))
        draw.text((left, base + 4), method, fill="black", font=font)
    for j, metric in enumerate(metrics):
        y = 30 + j * (FONT_SIZE + 6)
        draw.rectangle((width - 130, y, width - 118, y + 10), fill=BAR_COLOURS[metric])
        draw.text((width - 112, y - 2), BAR_LABELS[metric], fill="black", font=font)
    return chart


def stack(parts: Sequence[Image.Image]) -> Image.Image:
    """Images one under the other, left-aligned, on white."""
    out = Image.new("RGB", (max(p.width for p in parts), sum(p.height for p in parts)), "white")
    y = 0
    for part in parts:
        out.paste(part, (0, y))
        y += part.height
    return out


def render_figure(items: Sequence["Scored"], report: EvalReport) -> bytes:
    """The whole figure as PNG bytes."""
    font = ImageFont.load_default(size=FONT_SIZE)
    png = io.BytesIO()
    stack([*(image_row(item, font) for item in items), bar_chart(report, font)]).save(png, "PNG")
    return png.getvalue()

