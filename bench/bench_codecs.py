"""Storage codecs on real feature maps: bytes per map, encode/decode MB/s per core and quality cost; sharded crops.

Makes ``--maps`` JBU outputs (ViT-S/16 with random weights + a randomly initialised 4-stage JBU, 384 channels at 224)
from scikit-image's sample photographs, then for every codec and lossy option of ``pipeline.store.codecs`` writes them
into a zarr v3 array (in memory, the store's sharded layout) on one thread and prints a markdown table:

- bytes per map and ratio to raw float16; encode and decode MB/s of float16 features per core (process CPU time, one
  blosc/zarr/torch thread; encode includes the lossy step, decode the dequantisation);
- relative L2 error of the features against the float16 maps, mean and worst map;
- probe mIoU and accuracy (``probe_quality``): the synthetic segmentation set (tests/pipeline/sources/test_synthetic.py's
  round trip: 4 shards of 16 images, the tiny random-weight backbone of tests/helpers/precompute.py, JBU at 64)
  precomputed with ``featup precompute`` and the option's flags on a local Ray, then ``featup probe --target seg.png
  --classes 4 --epochs 10 --lr 0.05`` (same keys, same held-out split); the difference in mIoU points to the float16
  auto store. ``--no-probe`` skips it.

Then a crop table: random 112x112 crops from a sharded and an unsharded store, local and s3:// (a moto server
subprocess on 127.0.0.1): samples/s and bytes read per crop.

    python bench/bench_codecs.py [--maps 4] [--size 224] [--crop 112] [--crops 24] [--crop-maps 3] [--repeats 3] [--no-probe]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numcodecs.blosc  # noqa: E402
import zarr  # noqa: E402
from zarr.storage import FsspecStore, LocalStore, MemoryStore, WrapperStore  # noqa: E402

from featup.backbones import build_backbone  # noqa: E402
from featup.upsamplers import build_upsampler  # noqa: E402
from pipeline.store.codecs import StorageCodec  # noqa: E402
from pipeline.store.quantize import dequantize_int8_numpy, quantize_int8, round_mantissa  # noqa: E402

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
PROBE_SHARDS, PROBE_PER_SHARD, PROBE_SIZE = 4, 16, 64  # the synthetic set of tests/pipeline/sources/test_synthetic.py
PROBE_ARGS = ("--target", "seg.png", "--classes", "4", "--epochs", "10", "--lr", "0.05")
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "immunohistochemistry", "retina", "hubble_deep_field")


@dataclass(frozen=True)
class Option:
    """One table row: a label and the storage config it writes."""

    label: str
    codec: StorageCodec


OPTIONS = (
    Option("zstd, one chunk per map (before)", StorageCodec("zstd", tile=None)),
    Option("zstd", StorageCodec("zstd")),
    Option("blosc-zstd (auto)", StorageCodec("auto")),
    Option("blosc-lz4", StorageCodec("blosc-lz4")),
    Option("none", StorageCodec("none")),
    Option("auto + keep-bits 7", StorageCodec("auto", keep_bits=7)),
    Option("auto + keep-bits 4", StorageCodec("auto", keep_bits=4)),
    Option("int8 + zstd", StorageCodec("zstd", quantize="int8")),
    Option("int8 + zstd-3 (auto)", StorageCodec("auto", quantize="int8")),
    Option("int8 + blosc-zstd", StorageCodec("blosc-zstd", quantize="int8")),
)


def photos(n: int, size: int) -> torch.Tensor:
    """(n, 3, size, size) float RGB in [0, 1]: scikit-image's sample photographs, centre-cropped and resized."""
    import skimage.data

    out = []
    for name in PHOTOS:
        img = np.asarray(getattr(skimage.data, name)())  # (H, W, 3) or (H, W) uint8, bundled with scikit-image
        img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
        side = min(img.shape[:2])
        top, left = (img.shape[0] - side) // 2, (img.shape[1] - side) // 2
        t = torch.from_numpy(np.ascontiguousarray(img[top:top + side, left:left + side])).permute(2, 0, 1).float() / 255
        out.append(F.interpolate(t[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0])
    while len(out) < n:  # more maps than photos: flipped copies
        out.append(out[len(out) % len(PHOTOS)].flip(-1))
    return torch.stack(out[:n])


@torch.inference_mode()
def feature_maps(n: int, size: int) -> np.ndarray:
    """(n, 384, size, size) float16 JBU outputs of ViT-S/16 features (random weights, seeded) on sample photographs."""
    torch.manual_seed(0)
    backbone = build_backbone("timm:vit_small_patch16_224", "random")
    upsampler = build_upsampler("jbu", backbone.dim, num_stages=4).eval()
    images = photos(n, size)
    mean, std = torch.tensor(backbone.mean)[:, None, None], torch.tensor(backbone.std)[:, None, None]
    maps = []
    for image in (images - mean) / std:
        lr = backbone(image[None])  # (1, 384, size/16, size/16)
        maps.append(upsampler(lr, image[None], (size, size)).half().numpy())  # (1, 384, size, size)
    return np.concatenate(maps)


def encode(option: Option, maps: np.ndarray, repeats: int) -> tuple[zarr.Group, float]:
    """The maps written row by row into an in-memory zarr group as the option stores them; CPU seconds taken
    (per map the best of ``repeats`` writes: the machine is shared). The lossy step runs as a CPU worker would run it:
    int8 codes in torch, mantissa rounding in numpy (2.5x faster than its torch twin on CPU)."""
    codec = option.codec
    group = zarr.open_group(MemoryStore(), mode="w")
    n, c = maps.shape[:2]
    arr = group.create_array("features", shape=maps.shape, fill_value=0, **codec.feature_kwargs(maps.dtype, maps.shape[1:]))
    side = {name: group.create_array(name, shape=(n, c), dtype="float32", fill_value=0,
                                     **codec.array_kwargs(np.float32, (c,)))
            for name in (("features_scale", "features_offset") if codec.quantize else ())}
    total = 0.0
    for i in range(n):
        best = float("inf")
        for _ in range(repeats):
            start = time.process_time()
            if codec.quantize:
                codes, scale, offset = quantize_int8(torch.from_numpy(maps[i:i + 1]))  # (1, C, H, W) uint8, (1, C)
                arr[i] = codes[0].numpy()
                side["features_scale"][i], side["features_offset"][i] = scale[0].numpy(), offset[0].numpy()
            else:
                arr[i] = round_mantissa(maps[i], codec.keep_bits) if codec.keep_bits else maps[i]
            best = min(best, time.process_time() - start)
        total += best
    return group, total


def decode(option: Option, group: zarr.Group, n: int, repeats: int) -> tuple[list[np.ndarray], float]:
    """Every map read back as float32 (dequantised when quantised); CPU seconds taken (per map the best of
    ``repeats``)."""
    total, out = 0.0, []
    for i in range(n):
        best = float("inf")
        for _ in range(repeats):
            start = time.process_time()
            value = group["features"][i]
            if option.codec.quantize:
                value = dequantize_int8_numpy(value, group["features_scale"][i], group["features_offset"][i])
            value = value.astype(np.float32, copy=False)
            best = min(best, time.process_time() - start)
        total += best
        out.append(value)
    return out, total


def codec_flags(codec: StorageCodec, size: int) -> list[str]:
    """The ``featup precompute`` flags that write a store with ``codec`` (tile None: one tile as large as the map)."""
    flags = ["--codec", codec.codec, "--tile", str(codec.tile or size)]
    flags += ["--quantize", codec.quantize] if codec.quantize else []
    return flags + (["--keep-bits", str(codec.keep_bits)] if codec.keep_bits else [])


@contextmanager
def probe_set() -> Iterator[Path]:
    """A folder with the synthetic segmentation shards of the round-trip test, and a local 2-CPU Ray whose workers
    import the tiny random-weight backbone of tests/helpers/precompute.py."""
    from pipeline.sources.synthetic import SyntheticSpec, write_synthetic_shards
    from tests.helpers import precompute as helpers

    with tempfile.TemporaryDirectory(prefix="bench-codecs-probe-") as tmp:
        root = Path(tmp)
        write_synthetic_shards(root / "in", PROBE_SHARDS, PROBE_PER_SHARD, SyntheticSpec(height=64, width=96, classes=4))
        with helpers.local_ray(helpers.write_tiny_module(root / "mods"), root / "slow.flag"):
            yield root


def probe_quality(option: Option, root: Path | None) -> dict | None:
    """``featup probe`` mIoU and accuracy on the synthetic segmentation set (``probe_set``), precomputed through the CLI
    with the round-trip test's backbone and settings plus ``option``'s flags; None without a set."""
    if root is None:
        return None
    from jobs.cli import main as featup
    from tests.helpers.precompute import TINY_BACKBONE

    name = "".join(c if c.isalnum() else "-" for c in option.label)
    store, shards = str(root / f"{name}.zarr"), str(root / "in" / f"synthetic-{{000000..{PROBE_SHARDS - 1:06d}}}.tar")
    with redirect_stdout(sys.stderr):  # the commands' summaries and tables: not the benchmark's
        code = featup(["precompute", shards, "--output", store, "--backbone", TINY_BACKBONE, "--weights", "random",
                       "--image-size", str(PROBE_SIZE), "--kernel-backend", "eager", "--device", "cpu",
                       "--labels", "seg.png", "--save-image", *codec_flags(option.codec, PROBE_SIZE)])
        code = code or featup(["probe", store, *PROBE_ARGS, "--out", str(root / "probe")])
    if code:
        raise SystemExit(f"probe of {option.label}: featup exited with {code}")
    metrics = json.loads((root / "probe" / f"{name}.metrics.json").read_text())
    return {"miou": metrics["miou"], "accuracy": metrics["accuracy"], "split": metrics["split_sha256"]}


def add_probes(rows: list[dict]) -> None:
    """Each row's ``probe`` metrics, and their mIoU difference to the float16 auto store's (the reference)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        with probe_set() as root:
            for row, option in zip(rows, OPTIONS):
                row["probe"] = probe_quality(option, root)
                print(f"probe {option.label}: mIoU {row['probe']['miou']:.4f}", file=sys.stderr)
    finally:
        torch.set_num_threads(threads)
    reference = next(r["probe"] for r, o in zip(rows, OPTIONS) if o.codec == StorageCodec("auto"))
    if len({r["probe"]["split"] for r in rows}) != 1:
        raise SystemExit("probe: the stores' held-out splits differ")
    for row in rows:
        row["probe"]["delta"] = row["probe"]["miou"] - reference["miou"]


def codec_rows(maps: np.ndarray, repeats: int) -> list[dict]:
    """One result per option: bytes per map, ratio, encode/decode MB/s per core, relative L2 error mean and max."""
    raw = maps[0].nbytes  # float16 bytes per map
    rows = []
    for option in OPTIONS:
        group, enc_s = encode(option, maps, repeats)
        stored = sum(group[name].nbytes_stored() for name in group.array_keys()) / len(maps)
        back, dec_s = decode(option, group, len(maps), repeats)
        ref = maps.astype(np.float32)
        errors = [np.linalg.norm(b - r) / np.linalg.norm(r) for b, r in zip(back, ref)]
        rows.append({"label": option.label, "bytes": stored, "ratio": raw / stored,
                     "enc": raw * len(maps) / enc_s / 1e6, "dec": raw * len(maps) / dec_s / 1e6,
                     "err_mean": float(np.mean(errors)), "err_max": float(np.max(errors)), "probe": None})
    return rows


class CountingStore(WrapperStore):
    """A real store counting the bytes its reads return; copies zarr makes of it (read-only views) share the count."""

    def __init__(self, store, tally: list[int] | None = None) -> None:
        super().__init__(store)
        self.tally = tally if tally is not None else [0]

    def _with_store(self, store) -> "CountingStore":
        return type(self)(store, self.tally)

    async def get(self, key, prototype, byte_range=None):
        buf = await self._store.get(key, prototype, byte_range)
        self.tally[0] += 0 if buf is None else len(buf)
        return buf

    async def get_partial_values(self, prototype, key_ranges):
        bufs = await self._store.get_partial_values(prototype, key_ranges)
        self.tally[0] += sum(len(b) for b in bufs if b is not None)
        return bufs


def crop_rows(where: str, make_store: Callable[[], object], maps: np.ndarray, crop: int, crops: int) -> list[dict]:
    """Random ``crop`` x ``crop`` crops of every map from a sharded and an unsharded store at one location."""
    rows = []
    layouts = (("sharded, tiles <= 64 (default)", StorageCodec()), ("sharded, tiles <= 32", StorageCodec(tile=32)),
               ("one chunk per map", StorageCodec(tile=None)))
    for label, codec in layouts:
        path = f"tile{codec.tile}"
        arr = zarr.create_array(make_store(), name=path, shape=maps.shape, dtype=maps.dtype, fill_value=0,
                                **codec.array_kwargs(maps.dtype, maps.shape[1:], (1, 2)))
        for i in range(len(maps)):
            arr[i] = maps[i]
        counting = CountingStore(make_store())
        reader = zarr.open_array(counting, path=path, mode="r")
        rng = np.random.default_rng(0)
        counting.tally[0] = 0
        start = time.perf_counter()
        for _ in range(crops):
            i, y, x = int(rng.integers(len(maps))), *map(int, rng.integers(0, maps.shape[-1] - crop + 1, 2))
            reader[i, :, y:y + crop, x:x + crop]
        seconds = time.perf_counter() - start
        rows.append({"where": where, "layout": label, "per_s": crops / seconds, "bytes": counting.tally[0] / crops,
                     "object": arr.nbytes_stored() / len(maps)})
    return rows


@contextmanager
def moto_server() -> Iterator[dict]:
    """A moto S3 server subprocess on a free port of 127.0.0.1 (out of this process's CPU time); s3fs options."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, **CREDENTIALS}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on port {port}") from None
                time.sleep(0.1)
        os.environ.update(CREDENTIALS)
        yield {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def print_tables(args: argparse.Namespace, codecs: list[dict], crops: list[dict], raw: int) -> None:
    """Markdown tables of both benchmarks."""
    print(f"\n{args.maps} JBU maps, 384x{args.size}x{args.size}, raw float16 {raw / 1e6:.1f} MB per map; "
          "one thread; MB/s of float16 features per core (CPU time)\n")
    print("| codec / option | MB per map | x smaller than float16 | encode MB/s | decode MB/s "
          "| rel. L2 error mean | worst map | probe mIoU (vs auto) | probe accuracy |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in codecs:
        p = r["probe"]
        probe = "not run | not run" if p is None else f"{p['miou']:.2%} ({100 * p['delta']:+.2f}) | {p['accuracy']:.2%}"
        print(f"| {r['label']} | {r['bytes'] / 1e6:.2f} | {r['ratio']:.2f} | {r['enc']:.0f} | {r['dec']:.0f} "
              f"| {r['err_mean']:.2%} | {r['err_max']:.2%} | {probe} |")
    if codecs[0]["probe"] is not None:
        print(f"\nprobe: featup probe {' '.join(PROBE_ARGS)} on the synthetic segmentation set ({PROBE_SHARDS} x "
              f"{PROBE_PER_SHARD} images, tiny random backbone + JBU at {PROBE_SIZE}, same held-out split); "
              "(vs auto): mIoU points against the float16 auto store; target for int8: within 0.5")
    print(f"\nRandom {args.crop}x{args.crop} crops (all channels) of {args.crop_maps} maps, {args.crops} per store, "
          "codec auto, wall clock\n")
    print("| where | layout | crops/s | MB read per crop | MB per stored map | read / map |")
    print("|---|---|---:|---:|---:|---:|")
    for r in crops:
        print(f"| {r['where']} | {r['layout']} | {r['per_s']:.1f} | {r['bytes'] / 1e6:.2f} | {r['object'] / 1e6:.2f} "
              f"| {r['bytes'] / r['object']:.2f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--maps", type=int, default=4, help="JBU maps made (about 10-25 s each on a busy 2-core CPU)")
    parser.add_argument("--crop-maps", type=int, default=3, help="maps written to each crop store")
    parser.add_argument("--size", type=int, default=224, help="image and feature side")
    parser.add_argument("--crop", type=int, default=112)
    parser.add_argument("--crops", type=int, default=24, help="random crops read per store")
    parser.add_argument("--repeats", type=int, default=3, help="timings per map (the best is kept)")
    parser.add_argument("--no-probe", action="store_true", help="skip the probe columns (a precompute and a probe "
                        "per option, about 30 s each)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    maps = feature_maps(args.maps, args.size)  # (N, 384, S, S) float16; built with the machine's torch threads
    print(f"{args.maps} maps made in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    torch.set_num_threads(1)
    numcodecs.blosc.set_nthreads(1)
    with zarr.config.set({"threading.max_workers": 1, "async.concurrency": 1}):
        codecs = codec_rows(maps, args.repeats)
    print(f"codec table done at {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if not args.no_probe:
        add_probes(codecs)
        print(f"probe column done at {time.perf_counter() - start:.0f} s", file=sys.stderr)
    folder = tempfile.mkdtemp(prefix="bench-codecs-")
    try:
        few = maps[:args.crop_maps]
        crops = crop_rows("local", lambda: LocalStore(os.path.join(folder, "crops.zarr")), few, args.crop, args.crops)
        with moto_server() as options:
            import s3fs

            s3fs.S3FileSystem(**options, skip_instance_cache=True).mkdir("bench-codecs")
            crops += crop_rows("s3 (moto, 127.0.0.1)", lambda: FsspecStore.from_url(
                "s3://bench-codecs/crops.zarr", storage_options=options), few, args.crop, args.crops)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print_tables(args, codecs, crops, maps[0].nbytes)


if __name__ == "__main__":
    main()
