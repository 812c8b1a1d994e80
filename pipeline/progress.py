"""A plain-text progress line on stderr: samples, shards, images/s and ETA, redrawn about twice a second."""

from __future__ import annotations

import time
from typing import TextIO

REDRAW_S = 0.5  # on a terminal the line is redrawn in place this often
LOG_EVERY_S = 10.0  # elsewhere (logs, pipes) a new line is written this often


class StatusLine:
    """One throttled status line on a stream: redrawn in place on a terminal, a new line now and then elsewhere."""

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream  # None: draw nothing (e.g. non-zero ranks of a data-parallel run)
        self.start = time.monotonic()
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self._last = 0.0
        self._width = 0

    def due(self, force: bool = False) -> bool:
        """Whether a line should be drawn now: enough time since the last one, or ``force``."""
        if self.stream is None:
            return False
        return force or time.monotonic() - self._last >= (REDRAW_S if self.tty else LOG_EVERY_S)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def draw(self, line: str) -> None:
        """Writes ``line`` (over the previous one on a terminal)."""
        if self.stream is None:
            return
        self._last = time.monotonic()
        if self.tty:
            self.stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Ends the line on a terminal."""
        if self.stream is not None and self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()


class ProgressBar:
    """Tracks samples and shards done out of a known total and writes one status line."""

    def __init__(self, total_samples: int, total_shards: int, stream: TextIO) -> None:
        self.total_samples, self.total_shards = total_samples, total_shards
        self.line = StatusLine(stream)

    def update(self, samples: float, shards: int, errors: int = 0, force: bool = False) -> None:
        """Redraws the line if enough time has passed since the last one (or ``force``)."""
        if self.line.due(force):
            elapsed = self.line.elapsed()
            self.line.draw(format_progress(samples, self.total_samples, shards, self.total_shards, errors, elapsed))

    def close(self) -> None:
        """Ends the line on a terminal."""
        self.line.close()


def format_progress(samples: float, total: int, shards: int, total_shards: int, errors: int, elapsed: float) -> str:
    """``precompute: 120/400 samples (30.0%) | shards 3/10 | 12.5 img/s | ETA 22s | 1 errors``.

    ``samples`` may be fractional (implicit fits report the steps done of the images in progress): it is then
    shown to a tenth; below one image a second the rate is shown as seconds per image.
    """
    rate = samples / elapsed if elapsed > 0 else 0.0
    pct = 100.0 * samples / total if total else 100.0
    eta = format_duration((total - samples) / rate) if rate > 0 else "?"
    done = f"{samples:.1f}" if samples != int(samples) else f"{int(samples)}"
    speed = f"{rate:.1f} img/s" if rate >= 1.0 or rate == 0 else f"{1.0 / rate:.1f} s/img"
    return (
        f"precompute: {done}/{total} samples ({pct:.1f}%) | shards {shards}/{total_shards} | "
        f"{speed} | ETA {eta} | {errors} errors"
    )


def format_duration(seconds: float) -> str:
    """``45s``, ``3m05s``, ``2h07m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"
