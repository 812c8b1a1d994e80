"""Precompute throughput: the whole pipeline (read, decode, model, write) against the model alone, in one run.

Writes WebDataset shards from scikit-image's sample photos (several variants each, like ``featup demo``),
runs ``featup precompute`` with one actor on a local Ray, then times the same model on the same,
already decoded images in this process with the same thread count. The ratio says how well reading,
decoding and writing hide behind the model (target on CPU with one actor: at least 0.85).

    python bench/bench_precompute.py [--repeat 4] [--backbone timm:vit_small_patch16_224] [--kernel-backend eager]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def write_shards(folder: Path, repeat: int, n_shards: int) -> list[str]:
    from jobs.demo import write_demo_shards
    from jobs.sample_images import sample_image_paths

    return write_demo_shards(sample_image_paths() * repeat, folder, n_shards)


def model_only_throughput(config, shards: list[str], threads: int) -> tuple[float, int]:
    """Images/s of the FeatureExtractor alone on the decoded images of ``shards`` (after one warm-up batch)."""
    from pipeline.sources.decode import DecodedSample, decode_sample
    from pipeline.precompute.extract import FeatureExtractor
    from pipeline.precompute.plan import decode_spec
    from pipeline.sources.shards import iter_shard_samples

    torch.set_num_threads(threads)
    extractor = FeatureExtractor(config)
    spec = decode_spec(config, extractor)
    images = [d.image for url in shards for s in iter_shard_samples(url) if isinstance(d := decode_sample(s, spec), DecodedSample)]
    batches = [torch.stack(images[i : i + config.batch_size]) for i in range(0, len(images), config.batch_size)]
    extractor(batches[0])  # warm-up (and compilation, with the compiled kernels)
    start = time.perf_counter()
    for batch in batches:
        extractor(batch)
    return len(images) / (time.perf_counter() - start), len(images)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=4, help="copies of the 24 demo samples (default 4: 96 images)")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--backbone", default="timm:vit_small_patch16_224")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs (and torch threads) of the one actor")
    parser.add_argument("--kernel-backend", default="eager", help="JBU kernels; eager keeps compile time out of both sides")
    args = parser.parse_args(argv)

    from pipeline.precompute.config import PrecomputeConfig
    from pipeline.precompute.driver import run_precompute
    from pipeline.store.features import FeatureStore

    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(Path(tmp) / "shards", args.repeat, args.shards)
        config = PrecomputeConfig(
            inputs=tuple(shards), output=str(Path(tmp) / "store.zarr"), backbone=args.backbone, weights="random",
            image_size=args.image_size, actors=1, cpus_per_actor=args.cpus, device="cpu", batch_size=args.batch_size,
            kernel_backend=args.kernel_backend,
        )
        start = time.perf_counter()
        code = run_precompute(config, command_line=["bench_precompute"])
        wall = time.perf_counter() - start
        if code != 0:
            raise SystemExit(f"precompute failed with exit code {code}")
        report = FeatureStore.open(config.output, mode="r").read_report()
        actor = next(iter(report["actors"]["per_actor"].values()))
        model_ips, n_images = model_only_throughput(config, shards, args.cpus)

    pipeline_ips = actor["images_per_s"]
    print(f"\n{n_images} images, {args.backbone} + JBU ({args.kernel_backend} kernels), {args.image_size}px, "
          f"batch {args.batch_size}, 1 actor x {args.cpus} CPUs")
    print(f"model only (decoded images, in process):  {model_ips:7.2f} images/s")
    print(f"pipeline, actor busy time (read+decode+model+write): {pipeline_ips:7.2f} images/s")
    print(f"pipeline, whole job incl. Ray start and model load ({wall:.1f} s): {n_images / wall:7.2f} images/s")
    print(f"ratio pipeline / model only: {pipeline_ips / model_ips:.2f}   (target >= 0.85)")
    split = report["time_split_fraction"]
    print("actor time split: " + ", ".join(f"{k} {v:.1%}" for k, v in split.items()))


if __name__ == "__main__":
    main()
