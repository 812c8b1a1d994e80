"""What ``train-jbu`` shows and leaves besides the checkpoint: a progress line, the loss log (CSV) and its plot (PNG).

The plot is drawn with PIL (no plotting library needed): one panel per loss term, its value against the step.
Files are written under a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Sequence, TextIO

from PIL import Image, ImageDraw

from pipeline.progress import StatusLine, format_duration

LOSS_TERMS = ("total", "reconstruction", "crf", "tv")
COLUMNS = ("step", *LOSS_TERMS)
_PANEL_W, _PANEL_H, _MARGIN = 360, 220, 48
_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))


def log_paths(output: str) -> tuple[str, str]:
    """The loss log and plot next to the checkpoint: ``run.ckpt`` -> ``run.losses.csv``, ``run.losses.png``."""
    stem = output[: -len(".ckpt")] if output.endswith(".ckpt") else output
    return f"{stem}.losses.csv", f"{stem}.losses.png"


def csv_bytes(rows: Sequence[dict]) -> bytes:
    """The loss log as CSV: one row per logged step (``step``, then each term)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({"step": int(r["step"]), **{t: repr(float(r[t])) for t in LOSS_TERMS}} for r in rows)
    return buf.getvalue().encode()


def plot_png(rows: Sequence[dict], title: str = "featup train-jbu") -> bytes:
    """A PNG with one panel per loss term (value against step), the value range written on each axis."""
    cols = 2
    panels = math.ceil(len(LOSS_TERMS) / cols)
    image = Image.new("RGB", (cols * _PANEL_W, panels * _PANEL_H + 24), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), f"{title}: {len(rows)} logged steps", fill="black")
    for i, term in enumerate(LOSS_TERMS):
        left, top = (i % cols) * _PANEL_W, 24 + (i // cols) * _PANEL_H
        _panel(draw, left, top, [(float(r["step"]), float(r[term])) for r in rows], term, _COLOURS[i])
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _panel(draw: ImageDraw.ImageDraw, left: int, top: int, points: list[tuple[float, float]], name: str, colour) -> None:
    """One term's line in the box at (left, top), with its step and value ranges."""
    x0, y0 = left + _MARGIN, top + 18
    x1, y1 = left + _PANEL_W - 12, top + _PANEL_H - 24
    draw.rectangle((x0, y0, x1, y1), outline=(160, 160, 160))
    draw.text((x0, top + 4), name, fill=colour)
    finite = [(s, v) for s, v in points if math.isfinite(v)]
    if not finite:
        draw.text((x0 + 8, y0 + 8), "no values", fill="black")
        return
    smin, smax = min(s for s, _ in finite), max(s for s, _ in finite)
    vmin, vmax = min(v for _, v in finite), max(v for _, v in finite)
    span_s, span_v = (smax - smin) or 1.0, (vmax - vmin) or 1.0
    xy = [(x0 + (s - smin) / span_s * (x1 - x0), y1 - (v - vmin) / span_v * (y1 - y0)) for s, v in finite]
    if len(xy) == 1:
        draw.ellipse((xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2), fill=colour)
    else:
        draw.line(xy, fill=colour, width=2)
    draw.text((left + 2, y0), f"{vmax:.3g}", fill="black")
    draw.text((left + 2, y1 - 10), f"{vmin:.3g}", fill="black")
    draw.text((x0, y1 + 4), f"step {smin:.0f}", fill="black")
    draw.text((x1 - 60, y1 + 4), f"{smax:.0f}", fill="black")


class TrainProgress:
    """``train-jbu: step 120/2000 (6.0%) | loss 0.1234 | 2.1 step/s | ETA 14m55s`` on a stream (redrawn on a tty)."""

    def __init__(self, total_steps: int, first_step: int, stream: TextIO | None) -> None:
        self.total, self.first = total_steps, first_step
        self.line = StatusLine(stream)

    def update(self, step: int, loss: float, force: bool = False) -> None:
        """Redraw if enough time has passed (or ``force``)."""
        if self.line.due(force):
            self.line.draw(format_train_progress(step, self.total, loss, step - self.first, self.line.elapsed()))

    def close(self) -> None:
        """End the line on a terminal."""
        self.line.close()


def format_train_progress(step: int, total: int, loss: float, done_here: int, elapsed: float) -> str:
    """One progress line; the rate counts the steps of this process only (a resumed run starts its clock anew)."""
    rate = done_here / elapsed if elapsed > 0 else 0.0
    eta = format_duration((total - step) / rate) if rate > 0 else "?"
    pct = 100.0 * step / total if total else 100.0
    return f"train-jbu: step {step}/{total} ({pct:.1f}%) | loss {loss:.4g} | {rate:.2f} step/s | ETA {eta}"
