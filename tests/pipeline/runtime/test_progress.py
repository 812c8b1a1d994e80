"""The tqdm progress bars: counts, rate and ETA, how often they are drawn on a terminal or a log, TQDM_DISABLE."""

import io

from pipeline.runtime.progress import ProgressBar, format_duration, format_progress


def test_progress_line_gives_samples_shards_rate_eta_and_errors():
    line = format_progress(120, 400, 3, 10, 2, elapsed=10.0)
    assert line.startswith("precompute:  30%|")
    assert "| 120/400 img [00:10<00:23, 12.00img/s, shards 3/10, 2 errors]" in line
    assert "<?," in format_progress(0, 400, 0, 10, 0, elapsed=5.0)  # no rate yet: no ETA


def test_durations_are_short_and_readable():
    assert [format_duration(s) for s in (0, 45.4, 185, 7620)] == ["0s", "45s", "3m05s", "2h07m"]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_bar_is_redrawn_in_place_and_a_log_gets_new_states_rarely():
    tty = _Terminal()
    bar = ProgressBar(10, desc="precompute", unit="img", stream=tty)
    bar.set(1, "shards 0/2", force=True)
    bar.set(5, "shards 1/2", force=True)
    bar.close()
    text = tty.getvalue()
    assert "1/10 img" in text and "5/10 img" in text and "shards 1/2" in text
    assert text.count("\r") >= 3 and text.endswith("\n") and text.count("\n") == 1

    log = io.StringIO()
    bar = ProgressBar(10, desc="precompute", unit="img", stream=log)
    bar.set(2, "shards 0/2")  # within LOG_REFRESH_S of the start: not drawn
    assert "2/10" not in log.getvalue()
    bar.set(10, "shards 2/2", force=True)
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and "10/10 img" in lines[-1] and "shards 2/2" in lines[-1]
    assert len(lines) <= 3  # the start, the forced redraw and the close: one line each


def test_fractional_counts_are_shown_to_a_tenth_and_whole_ones_as_integers():
    line = format_progress(2.4, 6, 0, 2, 0, elapsed=12.0)
    assert "| 2.4/6 img [00:12<00:18," in line and "5.00s/img" in line
    assert "| 3/6 img" in format_progress(3.0, 6, 0, 2, 0, elapsed=12.0)


def test_rate_counts_only_this_process_steps_when_resumed():
    log = io.StringIO()
    bar = ProgressBar(100, desc="train-jbu", unit="step", noun="steps", stream=log, initial=40)
    bar.bar.start_t -= 10.0  # ten seconds ago
    bar.set(60, "loss 0.5", force=True)
    assert "60/100 steps" in log.getvalue() and "2.00step/s" in log.getvalue() and "loss 0.5" in log.getvalue()


def test_no_stream_or_tqdm_disable_draws_nothing(monkeypatch):
    ProgressBar(10, desc="x", unit="img", stream=None).set(5, force=True)  # non-zero ranks: nothing, no error
    monkeypatch.setenv("TQDM_DISABLE", "1")
    log = io.StringIO()
    bar = ProgressBar(10, desc="precompute", unit="img", stream=log)
    bar.set(5, force=True)
    bar.close()
    assert log.getvalue() == ""
