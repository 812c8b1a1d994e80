"""Precompute throughput as a user sees it: wall-clock steady state of ``featup precompute`` with default flags.

Writes WebDataset shards of scikit-image's sample photos (several variants each, like ``featup demo``) for n and
2n images, and times the whole command (a fresh process: Ray start, model load, compile, scan, write) on each.
The pipeline's seconds per image in steady state are (T(2n) - T(n)) / n: start-up costs cancel (a first,
discarded run fills inductor's on-disk kernel cache, so that neither timed run pays the compilation alone). The yardstick
is the same model in one process on already decoded images: backbone + upsampler + float16 conversion, same
batch size, kernels and threads (all of this machine's CPUs, as the job's one default actor gets them). The
ratio model / pipeline says how well reading, decoding, encoding and writing hide behind the model (target
>= 0.85). On a machine without a GPU they cannot all hide: decoding and encoding take CPU time from the model's own
cores, so the same process also measures their CPU seconds per image and prints the ratio that leaves.

    python bench/bench_precompute.py [--images 24] [--backbone timm:vit_small_patch16_224] [--compare FLAGS] [-- extra precompute flags]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch


def write_shards(folder: Path, images: int, per_shard: int = 6) -> list[str]:
    """Shards of exactly ``images`` samples with distinct keys: the demo photos in their variants, repeated as needed."""
    from PIL import Image

    from jobs.demo import VARIANTS, variant_image, write_jpeg_tar
    from jobs.sample_images import sample_image_paths

    pictures = []
    for photo in sample_image_paths():
        with Image.open(photo) as img:
            rgb = img.convert("RGB")
        pictures += [(f"{photo.stem}-{variant}", variant_image(rgb, variant)) for variant in VARIANTS]
    samples = [(f"copy{i // len(pictures)}-{pictures[i % len(pictures)][0]}", pictures[i % len(pictures)][1]) for i in range(images)]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(0, images, per_shard):
        path = folder / f"bench-{s // per_shard:06d}.tar"
        write_jpeg_tar(path, samples[s : s + per_shard])
        paths.append(str(path))
    return paths


def command_seconds(shards: list[str], output: Path, args: argparse.Namespace) -> float:
    """Wall time of one ``featup precompute`` run with default flags (plus the benchmark's model and any extras)."""
    command = [sys.executable, "-m", "jobs.cli", "precompute", *shards, "--output", str(output), "--backbone", args.backbone,
               "--weights", "random", "--max-errors", "none", *args.extra]
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"precompute failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


@dataclass(frozen=True)
class ModelCosts:
    """The job's per-image costs measured in this process: the model step (wall), and the CPU time of decoding and
    of writing one image's rows with the store's default codec (process CPU, zarr's threads included)."""

    model_s: float
    decode_cpu_s: float
    write_cpu_s: float

    def shared_cores_ratio(self, cpus: int) -> float:
        """The ratio model / pipeline if decoding and writing took all their CPU time from the model's ``cpus`` cores:
        what a CPU-only actor gets when the model keeps every core busy (torch's threads leave some idle, so a run can
        do better; a GPU actor's model leaves its CPUs to the writers, so it is not bound by this)."""
        return self.model_s / (self.model_s + (self.decode_cpu_s + self.write_cpu_s) / cpus)


def model_costs(shards: list[str], root: Path, args: argparse.Namespace, written: int = 16, **settings) -> ModelCosts:
    """Seconds per image of the job's own model step (FeatureExtractor: model + float16 conversion) in this process,
    then the CPU seconds per image of decoding every sample and of writing ``written`` images' rows into a store of
    the job's arrays and default codec, one row per call as the actors' writer does. ``settings``: more
    ``PrecomputeConfig`` fields of the job (``compact=True``)."""
    from pipeline.precompute.config import PrecomputeConfig
    from pipeline.precompute.extract import FeatureExtractor
    from pipeline.precompute.plan import decode_spec, make_plan
    from pipeline.runtime.models import quiet_cpu_only_warnings
    from pipeline.sources.decode import DecodedSample, decode_sample
    from pipeline.sources.shards import iter_shard_samples
    from pipeline.store.features import FeatureStore

    quiet_cpu_only_warnings()
    config = PrecomputeConfig(inputs=tuple(shards), output=str(root / "costs.zarr"), backbone=args.backbone, weights="random",
                              **settings)
    torch.set_num_threads(os.cpu_count() or 1)
    plan = make_plan(config)  # the job's arrays; the plan's own extractor runs eager kernels, so it is not the one timed
    extractor = FeatureExtractor(config)
    spec = decode_spec(config, extractor)
    samples = [s for url in shards for s in iter_shard_samples(url)]
    start = time.process_time()
    images = [d.image for s in samples if isinstance(d := decode_sample(s, spec), DecodedSample)]
    decode_cpu = (time.process_time() - start) / len(samples)
    batches = [torch.stack(images[i : i + config.batch_size]) for i in range(0, len(images), config.batch_size)]
    extractor(batches[0])  # warm-up and kernel compilation, as the job's first batch
    start = time.perf_counter()
    for batch in batches:
        extractor(batch)
    model = (time.perf_counter() - start) / len(images)
    written = min(written, len(images))
    store = FeatureStore.create(config.output, num_rows=written, arrays=plan.arrays, attrs={}, codec=config.storage_codec)
    outputs = extractor(torch.stack(images[:written]))  # {name: (written, ...)}, as the job hands to its writer
    start = time.process_time()
    for row in range(written):
        store.write_rows(row, {name: value[row : row + 1] for name, value in outputs.items()})
    write_cpu = (time.process_time() - start) / written
    shutil.rmtree(config.output)
    return ModelCosts(model, decode_cpu, write_cpu)


def command_times(root: Path, small: list[str], large: list[str], args: argparse.Namespace, label: str) -> tuple[float, float]:
    """(T(n), T(2n)) of the command with ``args.extra`` flags (the stores are deleted after: they are large)."""
    seconds = []
    for shards, name in ((small, "n"), (large, "2n")):
        seconds.append(command_seconds(shards, root / f"{label}-{name}.zarr", args))
        shutil.rmtree(root / f"{label}-{name}.zarr")
    return seconds[0], seconds[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=24, help="n: images of the short run (the long one has 2n)")
    parser.add_argument("--backbone", default="timm:vit_small_patch16_224")
    parser.add_argument("--compare", default=None, metavar="FLAGS",
                        help='a second row, measured in the same run with these extra flags (e.g. "--write-threads 0")')
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds; each figure is their median")
    parser.add_argument("extra", nargs="*", help="extra featup precompute flags, after --")
    args = parser.parse_args(argv)
    variants = [("default" if not args.extra else " ".join(args.extra), args.extra)]
    if args.compare:
        variants.append((args.compare, [*args.extra, *args.compare.split()]))

    times: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in variants}
    costs: list[ModelCosts] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        small, large = write_shards(root / "n", args.images), write_shards(root / "2n", 2 * args.images)
        command_seconds(small[:1], root / "warm.zarr", args)  # fills inductor's on-disk kernel cache: both runs find it
        for r in range(args.repeats):  # rounds interleave the variants, so a busy spell of the machine hits both
            for i, (label, extra) in enumerate(variants):
                run_args = argparse.Namespace(**{**vars(args), "extra": extra})
                times[label].append(command_times(root, small, large, run_args, f"v{i}-r{r}"))
            costs.append(model_costs(small, root, args))
    model = statistics.median(c.model_s for c in costs)
    cpus = os.cpu_count() or 1
    decode_cpu, write_cpu = statistics.median(c.decode_cpu_s for c in costs), statistics.median(c.write_cpu_s for c in costs)
    shared = ModelCosts(model, decode_cpu, write_cpu).shared_cores_ratio(cpus)
    print(f"featup precompute, {args.backbone} (random weights) + JBU, {os.cpu_count()} CPUs, median of {args.repeats} round(s)")
    print(f"model alone in one process (model + float16, same batch): {model:.3f} s/image ({1 / model:.2f} images/s)")
    print(f"CPU per image, measured in the same process: decode {decode_cpu:.3f} s, write (default codec) {write_cpu:.3f} s; "
          f"if they took it all from the model's {cpus} cores, the ratio would be model / (model + (decode + write) / {cpus}) "
          f"= {shared:.2f}")
    for label, runs in times.items():
        t_n, t_2n = statistics.median(t for t, _ in runs), statistics.median(t for _, t in runs)
        pipeline = statistics.median((b - a) / args.images for a, b in runs)
        print(f"[{label}] T(n={args.images}) = {t_n:.1f} s, T(2n={2 * args.images}) = {t_2n:.1f} s (whole command, wall clock); "
              f"steady state (T(2n) - T(n)) / n: {pipeline:.3f} s/image ({1 / pipeline:.2f} images/s); "
              f"ratio model / pipeline: {model / pipeline:.2f}   (target >= 0.85; shared-cores estimate {shared:.2f})")


if __name__ == "__main__":
    main()
