"""The progress line: its numbers and how often it is written to a terminal or a log."""

import io

from pipeline.progress import ProgressBar, format_duration, format_progress


def test_progress_line_gives_samples_shards_rate_eta_and_errors():
    line = format_progress(120, 400, 3, 10, 2, elapsed=10.0)
    assert line == "precompute: 120/400 samples (30.0%) | shards 3/10 | 12.0 img/s | ETA 23s | 2 errors"
    assert "ETA ?" in format_progress(0, 400, 0, 10, 0, elapsed=5.0)


def test_durations_are_short_and_readable():
    assert [format_duration(s) for s in (0, 45.4, 185, 7620)] == ["0s", "45s", "3m05s", "2h07m"]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_line_is_redrawn_in_place_and_a_log_gets_new_lines_rarely():
    tty = _Terminal()
    bar = ProgressBar(10, 2, tty)
    bar.update(1, 0, force=True)
    bar.update(5, 1, force=True)
    bar.close()
    text = tty.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and text.count("\n") == 1

    log = io.StringIO()
    bar = ProgressBar(10, 2, log)
    bar.update(1, 0)
    bar.update(2, 0)  # within LOG_EVERY_S of the first: not written
    bar.update(10, 2, force=True)
    assert log.getvalue().count("\n") == 2 and "\r" not in log.getvalue()
