"""Compact stores against full ones, side by side in one run: bytes per sample, reading for training, precompute's cost.

1. Bytes per sample: ``featup precompute`` on shards of scikit-image's photos (a random-weight ViT-S/16 + JBU at 224,
   384 channels) three ways, default flags, ``--quantize int8`` and ``--compact``; stored bytes per sample of each array.
2. Reading for training, samples/s and MB/s of stored bytes read: the full store through its DataLoader, the compact
   store upsampled in DataLoader workers on the CPU, and (with a GPU) ``torch_dataset(upsample=False)`` batches
   upsampled on the GPU by ``reader.upsampler(device="cuda")``; whole maps and the usual training read (a random 112
   crop of 64 channels); locally and on moto's S3 server. Bytes read are what the read touches: tiles of the full
   store's rows, the low-res and image windows of the compact store's.
   The compact store's guidance image with its stored codec (the store's default, a Zarr spec codec) against PNG and
   lossless WebP (Pillow) of the same uint8 images: what a non-spec image codec would save.
3. ``featup precompute --compact`` wall-clock steady state ((T(2n) - T(n)) / n, as bench_precompute.py) against the
   backbone alone in one process (the compact job's model step: backbone, channel norm, float16): target >= 0.9. Also
   the CPU seconds per image of decoding and of writing the compact rows, and the ratio they allow when they share the
   model's cores (bench_precompute.py's shared-cores estimate): the bound of a CPU-only machine.

    python bench/bench_compact.py [--images 12] [--workers 2] [--batch-size 4] [--kernel-backend auto|eager]
                                  [--skip-s3] [--skip-precompute | --only-precompute | --only-image-codecs]
                                  [--repeats 1] [--per-shard 6]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_precompute import command_seconds, command_times, model_costs, write_shards  # noqa: E402
from bench_reader import moto_server  # noqa: E402
from pipeline.store.features import FeatureStore  # noqa: E402
from pipeline.store.reader import open_features  # noqa: E402

VARIANTS = {"full (default codec)": [], "full --quantize int8": ["--quantize", "int8"], "compact": ["--compact"]}
KERNELS = "auto"
READS = {"whole maps": dict(), "112 crop, 64 channels": dict(crop=112, channels=range(64))}


def make_stores(root: Path, shards: list[str], args: argparse.Namespace,
                only: tuple[str, ...] = tuple(VARIANTS)) -> dict[str, str]:
    """One store per variant (of those in ``only``), written by the real command."""
    stores = {}
    for i, (label, flags) in enumerate((label, flags) for label, flags in VARIANTS.items() if label in only):
        url = root / f"store{i}.zarr"
        run = argparse.Namespace(**{**vars(args), "extra": [*flags, "--batch-size", str(args.batch_size)]})
        seconds = command_seconds(shards, url, run)
        print(f"  precompute {label}: {seconds:.1f} s", file=sys.stderr)
        stores[label] = str(url)
    return stores


def row_bytes(url: str, options: dict | None = None) -> dict[str, float]:
    """Stored bytes per row of each array."""
    store = FeatureStore.open(url, options, mode="r")
    return {name: store.array(name).nbytes_stored() / store.num_rows for name in store.array_names}


def print_image_codecs(url: str, stored_bytes: float) -> None:
    """The compact store's uint8 guidance images: raw, as stored (the store's codec), and as PNG and lossless WebP."""
    import io

    from PIL import Image

    store = FeatureStore.open(url, None, mode="r")
    images = store.array("image")[:]  # (N, H, W, 3) uint8
    encoded = {"PNG": 0, "WebP lossless": 0}
    for image in images:
        for name, options in (("PNG", {"format": "PNG"}), ("WebP lossless", {"format": "WEBP", "lossless": True})):
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, **options)
            encoded[name] += len(buffer.getvalue())
    raw = images[0].nbytes
    sizes = {"stored (store codec)": stored_bytes, **{name: b / len(images) for name, b in encoded.items()}}
    print(f"guidance image per sample, {len(images)} images, raw {raw / 1e3:.1f} KB:")
    for name, size in sizes.items():
        print(f"  {name:<22} {size / 1e3:7.1f} KB  ({raw / size:4.2f}x smaller than raw)")


def touched(url: str, crop: int | None) -> dict[str, float]:
    """The fraction of each array's row a random ``crop`` reads (averaged over the crop's places; 1 for whole rows)."""
    reader = open_features(url, kernel_backend="eager")
    if crop is None:
        return {}
    if reader.compact is not None:  # the low-res and image windows of every crop place
        plan = reader.compact.plan((crop, crop))
        size = reader.compact.record.output_size[0]
        tops = range(0, size - crop + 1)
        area = np.mean([[plan.lowres_box((t, l))[2] * plan.lowres_box((t, l))[3] for l in tops[::7]] for t in tops[::7]])
        fraction = area / np.prod(reader.compact.record.lowres_size)
        return {"lowres": fraction, "image": fraction}
    array = FeatureStore.open(url, mode="r").array("features")
    tile, size = array.chunks[-1], array.shape[-1]
    per_axis = np.mean([(-(-(t + crop) // tile) - t // tile) * tile / size for t in range(size - crop + 1)])
    return {"features": per_axis**2}  # a tile holds every channel


def read_rate(url: str, options: dict, read: dict, workers: int, batch_size: int, gpu: bool = False) -> tuple[float, float, int]:
    """(start-up seconds, seconds, samples) to read every sample once: the first batch of each worker pays start-up and
    the kernels' compilation, and is timed apart."""
    reader = open_features(url, kernel_backend=KERNELS, **options)
    dataset = reader.torch_dataset(**read, upsample=not gpu)
    up = reader.select(**read).upsampler(device="cuda", dtype=torch.float16) if gpu else None
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, multiprocessing_context="fork" if workers else None)
    samples, batches, begin, start = 0, 0, time.perf_counter(), None
    for batch in loader:
        if gpu:
            up(batch["lowres"].cuda(non_blocking=True), batch["image"].cuda(non_blocking=True), batch.get("origin"))
            torch.cuda.synchronize()
        batches += 1
        if batches <= max(1, workers):
            start = time.perf_counter()
            continue
        samples += len(batch["key"])
    if start is None or samples == 0:
        raise SystemExit(f"--images: expected more than {max(1, workers) * batch_size} samples to time reads, got fewer")
    return start - begin, time.perf_counter() - start, samples


def read_table(stores: dict[str, str], options: dict, where: str, args: argparse.Namespace, rows: dict,
               local: dict[str, str]) -> list[str]:
    """One table row per (store, read, workers, device); ``local``: the same stores on local disk (their geometry)."""
    lines = []
    for label in ("full (default codec)", "compact"):
        url = stores[label]
        for read_name, read in READS.items():
            fractions = touched(local[label], read.get("crop"))
            per_sample = sum(b * fractions.get(name, 1.0) for name, b in rows[label].items()
                             if name in ("features", "lowres", "image"))
            runs = [(w, False) for w in (0, args.workers)]
            if label == "compact" and torch.cuda.is_available():
                runs.append((args.workers, True))
            for workers, gpu in runs:
                startup, seconds, samples = read_rate(url, options, read, workers, args.batch_size, gpu)
                how = "GPU, batched" if gpu else ("CPU" if label == "compact" else "-")
                lines.append(f"| {where:<10} | {label:<21} | {read_name:<21} | {how:<12} | {workers:>7} | "
                             f"{samples / seconds:>9.1f} | {per_sample * samples / seconds / 1e6:>9.1f} | {startup:>10.1f} |")
                print(lines[-1], file=sys.stderr)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=12, help="images per store (and n of the precompute timing)")
    parser.add_argument("--backbone", default="timm:vit_small_patch16_224")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the parallel reads")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--kernel-backend", default="auto", help="the compact reader's JBU kernels: auto (compiled) or eager")
    parser.add_argument("--skip-s3", action="store_true")
    parser.add_argument("--skip-precompute", action="store_true", help="leave out part 3 (precompute --compact timing)")
    parser.add_argument("--only-precompute", action="store_true", help="part 3 only")
    parser.add_argument("--only-image-codecs", action="store_true", help="the compact store's image codecs only")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of part 3; its figures are their median")
    parser.add_argument("--per-shard", type=int, default=6,
                        help="samples per shard of part 3 (each shard's commit is two synced writes; real shards hold hundreds)")
    args = parser.parse_args(argv)
    args.extra = []
    global KERNELS
    KERNELS = args.kernel_backend
    with tempfile.TemporaryDirectory(prefix="bench-compact-") as tmp:
        root = Path(tmp)
        if args.only_precompute:
            print_precompute(root, args)
            return
        shards = write_shards(root / "n", args.images)
        if args.only_image_codecs:
            stores = make_stores(root, shards, args, only=("compact",))
            print_image_codecs(stores["compact"], row_bytes(stores["compact"])["image"])
            return
        stores = make_stores(root, shards, args)
        rows = {label: row_bytes(url) for label, url in stores.items()}
        print_bytes(rows)
        print_image_codecs(stores["compact"], rows["compact"]["image"])
        lines = read_table(stores, {}, "local", args, rows, stores)
        if not args.skip_s3:
            with moto_server() as options:
                import s3fs

                fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
                fs.mkdir("bench-compact")
                remote = {label: f"s3://bench-compact/{Path(url).name}" for label, url in stores.items()}
                for label in ("full (default codec)", "compact"):
                    fs.put(stores[label], remote[label], recursive=True)
                lines += read_table(remote, options, "s3 (moto)", args, rows, stores)
        print(f"\nreading, {os.cpu_count()} CPUs, batch {args.batch_size}, kernels {args.kernel_backend}; samples/s after each "
              f"worker's first batch, which pays start-up and compilation (its time: start-up s); "
              f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
        print("| store      | kind                  | read                  | upsampled    | workers | samples/s | MB/s read | start-up s |")
        print("| ---------- | --------------------- | --------------------- | ------------ | ------- | --------- | --------- | ---------- |")
        print("\n".join(lines))
        if not args.skip_precompute:
            print_precompute(root, args)


def print_bytes(rows: dict[str, dict[str, float]]) -> None:
    full = sum(rows["full (default codec)"].values())
    print("bytes per sample at 224, 384 channels (stored, per array):")
    for label, arrays in rows.items():
        total = sum(arrays.values())
        parts = ", ".join(f"{name} {b / 1e3:.1f} KB" for name, b in arrays.items())
        print(f"  {label:<22} {total / 1e6:8.3f} MB  ({full / total:5.1f}x fewer than the default full store; {parts})")


def print_precompute(root: Path, args: argparse.Namespace) -> None:
    small, large = (write_shards(root / f"p{k}n", k * args.images, args.per_shard) for k in (1, 2))
    run = argparse.Namespace(**{**vars(args), "extra": ["--compact"]})
    command_seconds(small[:1], root / "warm.zarr", run)
    runs = [command_times(root, small, large, run, f"compact-{r}") for r in range(args.repeats)]
    t_n, t_2n = statistics.median(a for a, _ in runs), statistics.median(b for _, b in runs)
    pipeline = statistics.median((b - a) / args.images for a, b in runs)
    costs = model_costs(small, root, args, compact=True)  # the compact job's model step, decode and writes, in this process
    cpus = os.cpu_count() or 1
    print(f"\nfeatup precompute --compact, {args.backbone} (random weights), {cpus} CPUs, {args.per_shard} images per "
          f"shard, median of {args.repeats} "
          f"round(s): T(n={args.images}) = {t_n:.1f} s, T(2n) = {t_2n:.1f} s; steady state {pipeline:.3f} s/image; backbone "
          f"alone {costs.model_s:.3f} s/image; ratio backbone / pipeline {costs.model_s / pipeline:.2f} (target >= 0.9)")
    print(f"CPU per image, measured in this process: decode {costs.decode_cpu_s:.4f} s, write (compact arrays) "
          f"{costs.write_cpu_s:.4f} s; if they took it all from the model's {cpus} cores, the ratio would be "
          f"{costs.shared_cores_ratio(cpus):.2f} (a CPU-only run's bound; a GPU actor leaves its CPUs to them)")


if __name__ == "__main__":
    main()
