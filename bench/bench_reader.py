"""Feature store reading speed (local and s3://, 0 and 2 DataLoader workers) and the linear probe's training speed.

Writes one store of random float16 features (zstd ratio ~1.1, like real upsampled features) with a uint8 label
array, locally and on a moto S3 server started as a subprocess on 127.0.0.1, then reads every valid sample through
``FeatureReader.torch_dataset`` with a DataLoader. Prints samples/s, MB/s of stored (compressed) bytes fetched and
MB/s of float32 tensors delivered; then trains ``featup probe``'s head on the local store (in memory and streamed).

    python bench/bench_reader.py [--rows 48] [--channels 384] [--size 112] [--batch-size 4] [--epochs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.store.index import build_index_table  # noqa: E402
from pipeline.analysis.probe import ProbeConfig, train_probe  # noqa: E402
from pipeline.store.reader import open_features  # noqa: E402
from pipeline.store.features import ArraySpec, FeatureStore  # noqa: E402

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def write_store(url: str, options: dict | None, rows: int, channels: int, size: int, classes: int, per_shard: int = 8) -> int:
    """A store of ``rows`` valid samples; returns its stored bytes of features and labels."""
    rng = np.random.default_rng(0)
    specs = [ArraySpec("features", (channels, size, size), "float16", ("channel", "y", "x")),
             ArraySpec("seg.png", (size, size), "uint8", ("image_y", "image_x"))]
    store = FeatureStore.create(url, num_rows=rows, arrays=specs, attrs={"bench": True}, storage_options=options)
    for start in range(0, rows, per_shard):
        n = min(per_shard, rows - start)
        store.write_rows(start, {"features": rng.standard_normal((n, channels, size, size), dtype=np.float32).astype(np.float16),
                                 "seg.png": rng.integers(0, classes, (n, size, size), dtype=np.uint8)})
        store.commit_shard(start // per_shard, build_index_table([
            {"row": r, "shard": "bench.tar", "key": f"k{r:06d}", "width": size, "height": size, "status": "ok"}
            for r in range(start, start + n)]))
    return sum(int(store.array(name).nbytes_stored()) for name in store.array_names)


def read_all(url: str, options: dict, workers: int, batch_size: int) -> tuple[float, int, int]:
    """Seconds to read every sample through a DataLoader (store opened fresh), samples read, float32 bytes delivered."""
    start = time.perf_counter()
    reader = open_features(url, **options)
    loader = DataLoader(reader.torch_dataset(), batch_size=batch_size, num_workers=workers,
                        multiprocessing_context="fork" if workers else None)
    samples = delivered = 0
    for batch in loader:
        samples += len(batch["key"])
        delivered += batch["features"].numel() * 4 + batch["seg.png"].numel()
    return time.perf_counter() - start, samples, delivered


@contextmanager
def moto_server() -> Iterator[dict]:
    """A moto S3 server subprocess on a free port of 127.0.0.1; yields s3fs storage options for it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **CREDENTIALS}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        os.environ.update(CREDENTIALS)
        yield {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def probe_rows(url: str, epochs: int, classes: int, batch_size: int) -> list[tuple[str, dict]]:
    """The probe's training speed on the local store: cached in memory, and streamed with 2 workers."""
    reader = open_features(url)
    out = []
    for label, cache, workers in (("in memory", 2 << 30, 0), ("streamed, 2 workers", 0, 2)):
        config = ProbeConfig(target="seg.png", classes=classes, epochs=epochs, batch_size=batch_size, cache_bytes=cache,
                             workers=workers)
        out.append((label, train_probe(reader, config).metrics))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--channels", type=int, default=384)
    parser.add_argument("--size", type=int, default=112, help="feature height and width")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3, help="probe training epochs")
    parser.add_argument("--classes", type=int, default=27)
    args = parser.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="bench-reader-")
    try:
        local = os.path.join(folder, "features.zarr")
        stored = write_store(local, None, args.rows, args.channels, args.size, args.classes)
        results = []
        for workers in (0, 2):
            results.append(("local", workers, *read_all(local, {}, workers, args.batch_size)))
        with moto_server() as options:
            import s3fs

            s3fs.S3FileSystem(**options, skip_instance_cache=True).mkdir("bench-reader")
            remote = "s3://bench-reader/features.zarr"
            write_store(remote, options, args.rows, args.channels, args.size, args.classes)
            for workers in (0, 2):
                results.append(("s3 (moto, 127.0.0.1)", workers, *read_all(remote, options, workers, args.batch_size)))
        probes = probe_rows(local, args.epochs, args.classes, args.batch_size)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print_tables(args, stored, results, probes)


def print_tables(args: argparse.Namespace, stored: int, results: list, probes: list) -> None:
    row_mb = args.channels * args.size * args.size * 2 / 1e6
    print(f"store: {args.rows} rows of features ({args.channels}, {args.size}, {args.size}) float16 ({row_mb:.1f} MB/row raw) "
          f"+ uint8 labels; {stored / 1e6:.1f} MB stored (zstd); batch size {args.batch_size}; {os.cpu_count()} CPUs; "
          f"torch threads {torch.get_num_threads()}")
    print(f"| {'store':<22} | workers | samples/s | MB/s stored | MB/s delivered (float32) |")
    print(f"| {'-' * 22} | ------- | --------- | ----------- | ------------------------ |")
    for where, workers, seconds, samples, delivered in results:
        print(f"| {where:<22} | {workers:>7} | {samples / seconds:>9.1f} | {stored * samples / args.rows / seconds / 1e6:>11.1f} "
              f"| {delivered / seconds / 1e6:>24.1f} |")
    print()
    print(f"probe: linear 1x1 head, {args.channels} -> {args.classes} classes at {args.size}x{args.size}, {args.epochs} epochs, "
          f"batch {args.batch_size}, {probes[0][1]['train_samples']} training samples")
    print("| training data          | samples/s | Mpixels/s | seconds |")
    print("| ---------------------- | --------- | --------- | ------- |")
    for label, m in probes:
        print(f"| {label:<22} | {m['train_samples_per_s']:>9.1f} | {m['train_pixels_per_s'] / 1e6:>9.2f} | {m['train_seconds']:>7.2f} |")


if __name__ == "__main__":
    main()
