"""The evaluation figure drawn with matplotlib: tiles per held-out image, a colour bar, and a bar chart with axes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.evaluate.figure import build_figure, error_maps, render_figure
from pipeline.evaluate.scoring import METHODS
from tests.helpers.evaluate import scored, small_report


def test_each_image_gets_its_tiles_and_the_chart_has_labelled_axes_and_values():
    items = [scored(32, 48), scored(48, 32)]
    report = small_report()
    figure = build_figure(items, report)
    axes = figure.get_axes()
    tiles = [a for a in axes if a.get_images()]
    assert len(tiles) == len(items) * (2 + 2 * len(METHODS))
    assert [a.get_title() for a in tiles[:8]] == ["image", "truth (PCA)", *METHODS, *(f"error {m}" for m in METHODS)]
    assert tiles[0].get_images()[0].get_array().shape == (32, 48, 3) and tiles[8].get_images()[0].get_array().shape == (48, 32, 3)
    colorbar = [a for a in axes if a.get_ylabel() == "error / RMS of truth"]
    assert len(colorbar) == 1
    chart = next(a for a in axes if a.get_ylabel() == "mean relative L2 error")
    assert [t.get_text() for t in chart.get_xticklabels()] == list(METHODS)
    assert [t.get_text() for t in chart.get_legend().get_texts()] == ["all pixels", "near edges", "flat"]
    heights = [[bar.get_height() for bar in container] for container in chart.containers]
    assert heights[0] == pytest.approx([report.means[m]["rel"] for m in METHODS])
    labels = [t.get_text() for t in chart.texts]
    assert f"{report.means['jbu']['rel']:.2f}" in labels


def test_error_maps_are_zero_for_a_perfect_method_and_the_png_is_rgb():
    item = scored(16, 16)
    item.outputs["bilinear"] = item.truth.clone()
    assert np.abs(error_maps(item)[0]).max() == 0.0 and error_maps(item)[1].max() > 0
    with Image.open(io.BytesIO(render_figure([item], small_report()))) as png:
        assert png.format == "PNG" and png.mode == "RGB" and png.width >= 8 * 96
