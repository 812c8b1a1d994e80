"""The loss log: its CSV, and the matplotlib figure of the terms (axes, steps, log scale where a term spans decades)."""

import io
import math

from PIL import Image

from pipeline.train.log import LOSS_TERMS, csv_bytes, log_paths, loss_figure, plot_png, use_log_scale

ROWS = [{"step": s, "total": 10.0 / s, "reconstruction": 2.0 - 0.1 * s, "crf": 0.5, "tv": math.nan} for s in (1, 5, 10, 20, 40)]


def test_the_figure_has_one_panel_per_term_with_steps_and_values():
    figure = loss_figure(ROWS)
    axes = figure.get_axes()
    assert [a.get_title() for a in axes] == list(LOSS_TERMS)
    assert all(a.get_xlabel() == "step" and a.get_ylabel() == "loss" for a in axes)
    total = axes[0].get_lines()[0]
    assert list(total.get_xdata()) == [1, 5, 10, 20, 40] and list(total.get_ydata()) == [r["total"] for r in ROWS]
    assert [t.get_text() for t in axes[3].texts] == ["no values"] and not axes[3].get_lines()  # tv: NaN only


def test_a_term_spanning_decades_gets_a_log_axis_and_others_stay_linear():
    axes = loss_figure(ROWS).get_axes()
    assert axes[0].get_yscale() == "log"  # total: 10 .. 0.25, 40x
    assert [a.get_yscale() for a in axes[1:3]] == ["linear", "linear"]
    assert use_log_scale([1.0, 11.0]) and not use_log_scale([1.0, 9.0]) and not use_log_scale([0.0, 100.0])


def test_plot_png_is_a_png_and_csv_and_paths_sit_beside_the_checkpoint():
    with Image.open(io.BytesIO(plot_png(ROWS))) as png:
        assert png.format == "PNG" and png.size == (900, 600)
    assert csv_bytes(ROWS[:1]).decode().splitlines() == ["step,total,reconstruction,crf,tv", "1,10.0,1.9,0.5,nan"]
    assert log_paths("runs/a.ckpt") == ("runs/a.losses.csv", "runs/a.losses.png")
