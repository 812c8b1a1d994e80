"""Progress on screen (tqdm: rate, ETA, notebooks, logs, ``TQDM_DISABLE``) and the units people read in reports."""

from __future__ import annotations

import os
from typing import TextIO

from tqdm.auto import tqdm

TTY_REFRESH_S = 0.5  # a terminal's bar is redrawn at most this often
LOG_REFRESH_S = 10.0  # elsewhere (logs, pipes, Ray job logs) a new state is written at most this often
BAR_FORMAT = "{{desc}}: {{percentage:3.0f}}%|{{bar}}| {{n_fmt}}/{{total_fmt}} {noun} [{{elapsed}}<{{remaining}}, {{rate_fmt}}{{postfix}}]"


class ProgressBar:
    """A tqdm bar over a known total whose count and postfix are set (not incremented) by the caller.

    ``stream=None`` draws nothing (e.g. the non-zero ranks of a data-parallel run); so does ``TQDM_DISABLE=1``.
    Counts may be fractional (implicit fits report the steps done of the images in progress): shown to a tenth.
    The rate is the plain average since the start (``initial`` excluded), not tqdm's moving average.
    """

    def __init__(
        self, total: int, *, desc: str, unit: str, stream: TextIO | None, initial: int = 0, noun: str | None = None
    ) -> None:
        tty = bool(getattr(stream, "isatty", lambda: False)())
        disabled = stream is None or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
        self.bar = tqdm(
            total=total, initial=initial, desc=desc, unit=unit, file=stream if tty or stream is None else _Lines(stream),
            bar_format=BAR_FORMAT.format(noun=noun or unit), smoothing=0,
            miniters=0, mininterval=TTY_REFRESH_S if tty else LOG_REFRESH_S, dynamic_ncols=tty, ascii=not tty,
            leave=True, disable=disabled,
        )

    def set(self, done: float, postfix: str = "", force: bool = False) -> None:
        """Shows ``done`` of the total with ``postfix``; redrawn now if ``force``, else when the refresh interval has passed."""
        self.bar.n = _count(done)
        self.bar.set_postfix_str(postfix, refresh=False)
        if force:
            self.bar.refresh()
        else:
            self.bar.update(0)

    def close(self) -> None:
        """Draws the final state and ends the line."""
        self.bar.close()


class _Lines:
    """A log stream for tqdm: each redraw becomes a line of its own (no carriage returns in log files)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


COMPILING_NOTE = "compiling kernels, first run on this machine (eager kernels meanwhile)"


def precompute_postfix(shards: int, total_shards: int, errors: int, compiling: bool = False) -> str:
    """The bar's postfix: shards done, errors, and a note while an actor compiles its kernels in the background."""
    text = f"shards {shards}/{total_shards}, {errors} errors"
    return f"{text}, {COMPILING_NOTE}" if compiling else text


def format_progress(samples: float, total: int, shards: int, total_shards: int, errors: int, elapsed: float) -> str:
    """What the precompute bar shows for these numbers, e.g. ``precompute:  30%|###| 120/400 samples [00:10<00:23, ...]``."""
    return tqdm.format_meter(_count(samples), total, elapsed, ncols=80, prefix="precompute", unit="img",
                             bar_format=BAR_FORMAT.format(noun="img"), postfix=precompute_postfix(shards, total_shards, errors), ascii=True)


def _count(value: float) -> float:
    """Whole counts as ints, fractional ones to a tenth."""
    return int(value) if float(value).is_integer() else round(float(value), 1)


def format_duration(seconds: float) -> str:
    """``45s``, ``3m05s``, ``2h07m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def human_bytes(n: float) -> str:
    """Bytes with a binary unit: 1.5 KiB, 23.4 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
