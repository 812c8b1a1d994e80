"""The precompute I/O ceiling: ``featup precompute`` with a near-free backbone, so its time is all I/O and conversion.

The backbone (a user module, ``featup_io_ceiling_net:near_free``) average-pools the image with stride 16 and projects
it with a 1x1 conv to 384 channels; the bilinear upsampler brings it back to 224x224. With two actors (the machine's
CPUs split between them), the job's time is reading the shards, decoding JPEG, converting to float16, encoding and
writing the store. Steady state as in ``bench_precompute.py``: one discarded warm-up run, then the whole command
(a fresh process each) on n and 2n images, ``--repeats`` times (the fastest of each kept: on a shared machine noise
only adds); (T(2n) - T(n)) / n is the cost of one image.

Printed against the targets: MB/s of float16 features per CPU core (n * 384 * 224 * 224 * 2 bytes over
T(2n) - T(n), divided by the CPUs the job's actors get: actors x cpus_per_actor from the run's report.json; the same
from the report's own wall times as a cross-check; and per CPU second: the command's whole process tree, Ray
included, sampled from /proc, CPU(2n) - CPU(n), which a busy shared machine inflates far less than wall time),
bytes on disk per map (the ``features`` array's stored bytes over
its rows) and its ratio to raw float16. Each for the default flags and for ``--codec zstd --tile 224`` (zstd, a tile
as large as the map, so one plain chunk per map: the store layout before issue 12), side by side in one run. The 2n
runs' time split (from ``_featup/run/report.json``) precedes the table.

    python bench/bench_io_ceiling.py [--images 24] [--repeats 1] [--layouts default,old] [-- extra precompute flags]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_precompute import write_shards  # noqa: E402

MODULE = "featup_io_ceiling_net"
BACKBONE = f"{MODULE}:near_free"
CHANNELS, SIZE, STRIDE = 384, 224, 16
RAW_BYTES = CHANNELS * SIZE * SIZE * 2  # one float16 map
TARGET_MB_S, TARGET_RATIO = 150.0, 1.55
SAMPLE_S = 0.25  # how often the command's process tree CPU time is read
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
LAYOUTS = {"default": [], "old": ["--codec", "zstd", "--tile", str(SIZE)]}
LABELS = {"default": "default flags (codec auto, tiles 64)", "old": f"--codec zstd --tile {SIZE} (one zstd chunk per map)"}

NEAR_FREE_SOURCE = f'''
"""A near-free backbone for bench_io_ceiling.py: stride-{STRIDE} average pooling and a 1x1 conv to {CHANNELS} channels."""
from torch import nn


class NearFree(nn.Module):
    stride = {STRIDE}
    dim = {CHANNELS}

    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool2d({STRIDE}, stride={STRIDE})
        self.project = nn.Conv2d(3, {CHANNELS}, 1)

    def forward(self, x):
        return self.project(self.pool(x))


def near_free():
    return NearFree()
'''


@dataclass(frozen=True)
class Run:
    """One timed command: wall and CPU seconds, the store's report.json and the features array's stored bytes and rows."""

    seconds: float
    cpu_seconds: float
    report: dict
    stored_bytes: int
    rows: int


def write_module(folder: Path) -> Path:
    """Writes the near-free backbone module into ``folder`` and returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{MODULE}.py").write_text(textwrap.dedent(NEAR_FREE_SOURCE))
    return folder


def precompute_command(shards: list[str], output: Path, flags: list[str]) -> list[str]:
    """``featup precompute`` as a user types it: the near-free backbone, bilinear, 224 px, two actors, ``flags``."""
    return [sys.executable, "-m", "jobs.cli", "precompute", *shards, "--output", str(output), "--backbone", BACKBONE,
            "--weights", "random", "--upsampler", "bilinear", "--image-size", str(SIZE), "--actors", "2", *flags]


def stored_bytes(store: Path) -> tuple[int, int]:
    """Bytes the ``features`` array takes on disk (its chunk and shard objects) and its number of rows."""
    import zarr

    arr = zarr.open_group(str(store), mode="r")["features"]
    return int(arr.nbytes_stored()), int(arr.shape[0])


def tree_cpu_seconds(root: int) -> dict[tuple[int, int], float]:
    """User + system CPU seconds of ``root`` and every live descendant (Ray's raylet, GCS, workers), keyed by (pid,
    start time) so that a reused pid is another process; read from /proc."""
    procs = {}
    for entry in os.scandir("/proc"):
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split() if entry.name.isdigit() else None
        except OSError:  # gone since the scan
            continue
        if fields:  # fields[1] ppid, [11] utime, [12] stime, [19] start time (proc(5) fields 4, 14, 15, 22)
            procs[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS, int(fields[19]))
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = {}, [root]
    while stack:
        pid = stack.pop()
        if pid in procs:
            found[(pid, procs[pid][2])] = procs[pid][1]
            stack += children.get(pid, [])
    return found


def run_command(shards: list[str], output: Path, flags: list[str], module_dir: Path) -> Run:
    """Runs one precompute in a fresh process (Ray workers import the module through PYTHONPATH) and reads its store;
    the process tree's CPU time is sampled every ``SAMPLE_S`` (each process counted at its last sample)."""
    path = os.pathsep.join(filter(None, [str(module_dir), str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
           "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    cpu: dict[tuple[int, int], float] = {}
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(precompute_command(shards, output, flags), env=env, cwd=REPO, stdout=log, stderr=log)
        while proc.poll() is None:
            cpu.update(tree_cpu_seconds(proc.pid))
            time.sleep(SAMPLE_S)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            log.seek(0)
            raise SystemExit(f"precompute failed ({proc.returncode}):\n{log.read()[-3000:]}")
    report = json.loads((output / "_featup" / "run" / "report.json").read_text())
    run = Run(seconds, sum(cpu.values()), report, *stored_bytes(output))
    shutil.rmtree(output)  # a 2n store of 96 maps is about 2 GB
    return run


def job_cpus(report: dict) -> float:
    """CPUs the job's actors hold: actors started x cpus_per_actor of the resolved config."""
    return report["actors"]["started"] * float(report["config"]["cpus_per_actor"])


def summarize(layout: str, short: list[Run], long: list[Run]) -> dict:
    """MB/s per core from the fastest T(n) and T(2n) (noise on a shared machine only adds) and the job's CPUs, the
    same from the runs' own report.json wall times (no process or Ray start-up), MB per CPU second of the command's
    process tree (CPU(2n) - CPU(n), least of each: what a core does when it is not shared), and bytes per map."""
    t_n, t_2n = min(short, key=lambda r: r.seconds), min(long, key=lambda r: r.seconds)
    n, cpus = t_2n.rows - t_n.rows, job_cpus(t_2n.report)
    per_image = (t_2n.seconds - t_n.seconds) / n
    in_job = (min(r.report["wall_s"] for r in long) - min(r.report["wall_s"] for r in short)) / n
    cpu_per_image = (min(r.cpu_seconds for r in long) - min(r.cpu_seconds for r in short)) / n
    return {"layout": layout, "t_n": t_n.seconds, "t_2n": t_2n.seconds, "per_image": per_image, "cpus": cpus,
            "mb_s_core": RAW_BYTES / per_image / cpus / 1e6, "mb_s_core_job": RAW_BYTES / in_job / cpus / 1e6,
            "cpu_per_image": cpu_per_image, "mb_cpu_s": RAW_BYTES / cpu_per_image / 1e6,
            "bytes": t_2n.stored_bytes / t_2n.rows, "report": t_2n.report}


def measure(args: argparse.Namespace, root: Path, module_dir: Path) -> list[dict]:
    """Per layout: one discarded warm-up, then ``--repeats`` rounds of T(n) and T(2n), the layouts interleaved."""
    small, large = write_shards(root / "n", args.images), write_shards(root / "2n", 2 * args.images)
    layouts = args.layouts.split(",")
    flags = {layout: LAYOUTS[layout] + args.extra for layout in layouts}
    runs: dict[str, tuple[list[Run], list[Run]]] = {layout: ([], []) for layout in layouts}
    for layout in layouts:
        run_command(small[:1], root / f"{layout}-warm.zarr", flags[layout], module_dir)  # imports, page cache
    for round_ in range(args.repeats):
        for layout in layouts:
            for shards, times in zip((small, large), runs[layout]):
                times.append(run_command(shards, root / f"{layout}.zarr", flags[layout], module_dir))
            short, long = runs[layout][0][-1], runs[layout][1][-1]
            print(f"round {round_ + 1}, {layout}: T(n) {short.seconds:.1f} s ({short.cpu_seconds:.1f} CPU s), "
                  f"T(2n) {long.seconds:.1f} s ({long.cpu_seconds:.1f} CPU s)", file=sys.stderr)
    return [summarize(layout, *runs[layout]) for layout in layouts]


def print_split(result: dict) -> None:
    """The 2n run's time split (summed over actors) and per-actor figures, as report.json gives them."""
    report = result["report"]
    split, fraction = report.get("time_split_s", {}), report.get("time_split_fraction", {})
    print(f"\n{LABELS[result['layout']]}: 2n run, report.json wall {report['wall_s']:.1f} s; time split, seconds summed "
          "over actors (fraction of read_wait + model + write):")
    print("  " + ", ".join(f"{k} {v:.1f} s" + (f" ({fraction[k]:.0%})" if k in fraction else "") for k, v in split.items()))
    for name, actor in report["actors"]["per_actor"].items():
        print(f"  actor {name}: {actor['samples']} samples, busy {actor['busy_s']:.1f} s, {actor['images_per_s']:.2f} "
              f"images/s, {actor['decode_threads']} decode, {actor['torch_threads']} torch, {actor.get('write_threads')} writer threads")


def print_table(args: argparse.Namespace, results: list[dict], load: tuple[float, float]) -> None:
    """The markdown table: measured figures next to the targets."""
    print(f"\nfeatup precompute, {BACKBONE} (avg-pool /16 + 1x1 conv to {CHANNELS}, random) + bilinear at {SIZE}, "
          f"--actors 2, {os.cpu_count()} CPUs on the machine (1-minute load {load[0]:.1f} before, {load[1]:.1f} after), "
          f"n = {args.images}, fastest of {args.repeats}; extra flags {args.extra or 'none'}\n")
    print(f"| store layout | T(n) s | T(2n) s | s per image | CPUs (job) | MB/s float16 per core (target >= "
          f"{TARGET_MB_S:.0f}) | same from report.json wall | CPU s per image | MB per CPU second | MB per map "
          f"| x smaller than float16 (target >= {TARGET_RATIO}) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {LABELS[r['layout']]} | {r['t_n']:.1f} | {r['t_2n']:.1f} | {r['per_image']:.3f} | {r['cpus']:g} "
              f"| {r['mb_s_core']:.0f} | {r['mb_s_core_job']:.0f} | {r['cpu_per_image']:.3f} | {r['mb_cpu_s']:.0f} "
              f"| {r['bytes'] / 1e6:.2f} | {RAW_BYTES / r['bytes']:.2f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=24, help="n: images of the short run (the long one has 2n)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of T(n) and T(2n) per layout (the fastest "
                        "of each is kept)")
    parser.add_argument("--layouts", default="default,old", help="comma-separated: default (flags as given), "
                        f"old (--codec zstd --tile {SIZE})")
    parser.add_argument("extra", nargs="*", help="extra featup precompute flags, after --")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-io-ceiling-") as tmp:
        results = measure(args, Path(tmp), write_module(Path(tmp) / "mods"))
    for result in results:
        print_split(result)
    print_table(args, results, (load, os.getloadavg()[0]))


if __name__ == "__main__":
    main()
