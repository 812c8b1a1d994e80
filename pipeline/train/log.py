"""What ``train-jbu`` shows and leaves besides the checkpoint: a progress line, the loss log (CSV) and its plot (PNG).

The plot is drawn with matplotlib (Agg, no display): one panel per loss term against the step, on a log scale
where a term spans more than a decade. Files are written under a temporary name and renamed, so a reader never
sees half a file.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Sequence, TextIO

from pipeline.runtime.progress import ProgressBar

LOSS_TERMS = ("total", "reconstruction", "crf", "tv")
COLUMNS = ("step", *LOSS_TERMS)
LOG_SCALE_SPAN = 10.0  # a term whose positive values span more than this factor is plotted on a log axis


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
    """The loss figure as PNG bytes."""
    buf = io.BytesIO()
    loss_figure(rows, title).savefig(buf, format="png")
    return buf.getvalue()


def loss_figure(rows: Sequence[dict], title: str = "featup train-jbu"):
    """A matplotlib Figure with one panel per loss term (value against step, log axis where the term spans decades)."""
    from matplotlib.figure import Figure  # the object API draws without pyplot's global state or a display

    figure = Figure(figsize=(9, 6), dpi=100, layout="constrained")
    figure.suptitle(f"{title}: {len(rows)} logged steps")
    for i, (axes, term) in enumerate(zip(figure.subplots(2, 2).flat, LOSS_TERMS)):
        points = [(float(r["step"]), float(r[term])) for r in rows if math.isfinite(float(r[term]))]
        axes.set_title(term)
        axes.set_xlabel("step")
        axes.set_ylabel("loss")
        axes.grid(True, alpha=0.3)
        if not points:
            axes.text(0.5, 0.5, "no values", ha="center", va="center", transform=axes.transAxes)
            continue
        steps, values = zip(*points)
        axes.plot(steps, values, marker="o" if len(points) == 1 else None, color=f"C{i}")
        if use_log_scale(values):
            axes.set_yscale("log")
    return figure


def use_log_scale(values: Sequence[float]) -> bool:
    """Whether a term's values are all positive and span more than LOG_SCALE_SPAN (a decade)."""
    return bool(values) and min(values) > 0 and max(values) / min(values) > LOG_SCALE_SPAN


class TrainProgress:
    """The ``train-jbu`` bar: steps of the total, rate and ETA of this process's steps, the latest loss."""

    def __init__(self, total_steps: int, first_step: int, stream: TextIO | None) -> None:
        self.bar = ProgressBar(total_steps, desc="train-jbu", unit="step", noun="steps", stream=stream, initial=first_step)

    def update(self, step: int, loss: float, force: bool = False) -> None:
        """Shows ``step`` and ``loss`` (redrawn when the refresh interval has passed, or now if ``force``)."""
        self.bar.set(step, f"loss {loss:.4g}", force=force)

    def close(self) -> None:
        self.bar.close()
