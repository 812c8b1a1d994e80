"""A first run as a new user sees it: ``featup demo`` (offline) with an empty inductor cache, then again with a warm one.

Each run is a fresh ``featup demo`` process on a pseudo-terminal (so its progress bar draws as on a screen) and times,
from the process start: when the precompute bar first appears, when its first image is done, and when the precompute
is complete. The cold run gets a new empty ``TORCHINDUCTOR_CACHE_DIR`` (what a fresh machine has); the warm run reuses
it. Targets (issue 19): the first image within 20 s of the bar, the whole precompute within 30 s, cold.

    python bench/bench_first_run.py [--runs cold,warm] [--timeout 600] [--keep-log DIR]
"""

from __future__ import annotations

import argparse
import fcntl
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROGRESS = re.compile(rb"precompute:[^\r\n]*?(\d+)/(\d+) img")
COMPLETE = re.compile(rb"complete in")
FIRST_IMAGE_TARGET_S, WHOLE_TARGET_S = 20.0, 30.0


@dataclass
class Timeline:
    """Seconds from the process start; None where the run never got there."""

    bar_s: float | None = None
    first_image_s: float | None = None
    complete_s: float | None = None
    exit_s: float | None = None
    images: int = 0
    returncode: int | None = None

    def row(self, name: str) -> str:
        def cell(value: float | None) -> str:
            return "-" if value is None else f"{value:.1f}"

        first_after_bar = None if None in (self.bar_s, self.first_image_s) else self.first_image_s - self.bar_s
        whole_after_bar = None if None in (self.bar_s, self.complete_s) else self.complete_s - self.bar_s
        return (f"| {name} | {cell(self.bar_s)} | {cell(first_after_bar)} | {cell(whole_after_bar)} | "
                f"{cell(self.exit_s)} | {self.images} | {self.returncode} |")


def _terminal(fd: int, rows: int = 40, cols: int = 160) -> None:
    """Give the pseudo-terminal a size, as a real screen has (tqdm sizes its bar from it)."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def run_demo(out: Path, env: dict[str, str], timeout: float, log: Path) -> Timeline:
    """One ``featup demo --out out`` on a pseudo-terminal, timed from its start."""
    main, child = pty.openpty()
    _terminal(child)
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "demo", "--out", str(out)], cwd=ROOT, env=env,
                            stdin=child, stdout=child, stderr=child, start_new_session=True)
    os.close(child)
    timeline, seen = Timeline(), b""
    try:
        while time.monotonic() - start < timeout:
            ready, _, _ = select.select([main], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(main, 65536)
                except OSError:  # the child closed the terminal
                    chunk = b""
                if not chunk and proc.poll() is not None:
                    break
                seen += chunk
                _update(timeline, seen, time.monotonic() - start)
            elif proc.poll() is not None:
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        timeline.returncode = proc.wait()
        timeline.exit_s = time.monotonic() - start
        os.close(main)
        log.write_bytes(seen)
    return timeline


def _update(timeline: Timeline, seen: bytes, now: float) -> None:
    """Record the first time each milestone shows in the output so far."""
    matches = [(int(m.group(1)), int(m.group(2))) for m in PROGRESS.finditer(seen[-4096:])]
    if matches and timeline.bar_s is None:
        timeline.bar_s = now
    for done, total in matches:
        timeline.images = max(timeline.images, done)
        if done >= total and timeline.complete_s is None:  # the bar's last image: the whole precompute
            timeline.complete_s = now
    if timeline.images >= 1 and timeline.first_image_s is None:
        timeline.first_image_s = now
    if timeline.complete_s is None and COMPLETE.search(seen[-4096:]):  # "featup precompute: complete in ..."
        timeline.complete_s = now


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="cold,warm", help="which runs, in order (cold empties the cache first)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before a run is killed")
    parser.add_argument("--keep-log", type=Path, default=None, help="folder for each run's raw terminal output")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="featup-first-run-"))
    cache = work / "inductor-cache"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("FEATUP_KERNELS", None)  # the default, "auto", as a user runs it
    logs = args.keep_log or work
    logs.mkdir(parents=True, exist_ok=True)
    print(f"featup demo, {os.cpu_count()} CPUs, cache {cache}; seconds from the process start / from the bar")
    print("| run | bar appears | first image after bar | whole precompute after bar | process exits | images | exit |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    failed = False
    try:
        for name in args.runs.split(","):
            if name == "cold":
                shutil.rmtree(cache, ignore_errors=True)
            timeline = run_demo(work / f"out-{name}", env, args.timeout, logs / f"{name}.log")
            print(timeline.row(name), flush=True)
            failed |= timeline.returncode != 0
            if name == "cold" and timeline.bar_s is not None:
                first = (timeline.first_image_s or float("inf")) - timeline.bar_s
                whole = (timeline.complete_s or float("inf")) - timeline.bar_s
                print(f"cold targets: first image {first:.1f} s <= {FIRST_IMAGE_TARGET_S:.0f} s: "
                      f"{'met' if first <= FIRST_IMAGE_TARGET_S else 'MISSED'}; whole precompute {whole:.1f} s <= "
                      f"{WHOLE_TARGET_S:.0f} s: {'met' if whole <= WHOLE_TARGET_S else 'MISSED'}")
    finally:
        if args.keep_log is None:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
