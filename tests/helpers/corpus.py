"""Test data for the pipeline: real WebDataset tar shards, good ones and a corpus of bad inputs.

Import it as ``from tests.helpers import corpus``.
Everything is deterministic: the same arguments write the same bytes.
"""

from __future__ import annotations

import functools
import gzip
import io
import os
import pickle
import tarfile
from pathlib import Path

import fsspec
import numpy as np
from PIL import Image

PICKLE_MARKER = "UNPICKLED-MARKER"  # file the corpus pickles create when (wrongly) unpickled
HUGE_SIZE = (8200, 8200)  # width, height: above DecodeSpec's default 64M pixel limit, a 1-bit PNG of ~25 KB
LABEL_GRID = 4  # good samples are a LABEL_GRID x LABEL_GRID grid of colour blocks; seg.png holds the block ids

# Why each "error" sample of make_bad_shard fails: a fragment of its FailedSample reason.
BAD_REASONS = {
    "bad-corrupt": "corrupt",
    "bad-truncated": "truncated",
    "bad-empty": "0 bytes",
    "bad-text": "unrecognised data",
    "bad-huge": "above the pixel limit",
    "bad-no-image": "expected an image",
    "bad-label-only": "expected an image",
    "bad-pickle-only": "expected an image",
    "bad-duplicate": "twice",
}


def png_bytes(image: np.ndarray | Image.Image) -> bytes:
    """PNG encoding of an array ((H, W) uint8/uint16, (H, W, 3|4) uint8) or of a PIL image in any PNG mode (P, I;16...)."""
    return _encode(image, "PNG")


def jpeg_bytes(image: np.ndarray | Image.Image, quality: int = 95) -> bytes:
    """JPEG encoding of an (H, W, 3) / (H, W) uint8 array or a PIL image (RGB, L or CMYK)."""
    return _encode(image, "JPEG", quality=quality)


def _encode(image: np.ndarray | Image.Image, fmt: str, **options) -> bytes:
    """Encodes an array or PIL image in ``fmt``."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def write_tar(path: str | os.PathLike, members: list[tuple[str, bytes | None]], storage_options: dict | None = None) -> str:
    """Writes a tar of ``(name, data)`` members in order (data None: a directory entry); ``.gz``/``.tgz``: gzipped."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.mtime, info.mode = 0, 0o644
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    payload = buf.getvalue()
    path = os.fspath(path)
    if path.endswith((".gz", ".tgz")):
        payload = gzip.compress(payload, mtime=0)
    if "://" not in path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with fsspec.open(path, "wb", **(storage_options or {})) as f:
        f.write(payload)
    return path


def write_shard(path: str | os.PathLike, samples: list[dict[str, bytes]], storage_options: dict | None = None) -> str:
    """Writes a WebDataset shard: each sample's ``ext: bytes`` as member ``<__key__>.<ext>``, in order (str is UTF-8)."""
    members = []
    for sample in samples:
        for ext, data in sample.items():
            if ext != "__key__":
                members.append((f"{sample['__key__']}.{ext}", data.encode() if isinstance(data, str) else data))
    return write_tar(path, members, storage_options)


def good_sample(key: str, rng: np.random.Generator, size: tuple[int, int] = (40, 56)) -> dict[str, bytes]:
    """A sample of random colour blocks (``jpg``), its block ids as a label of the same size (``seg.png``), and ``cls``."""
    height, width = size
    blocks = rng.integers(0, LABEL_GRID * LABEL_GRID, (LABEL_GRID, LABEL_GRID), dtype=np.uint8)
    rows = np.arange(height) * LABEL_GRID // height
    cols = np.arange(width) * LABEL_GRID // width
    seg = blocks[rows][:, cols]  # (H, W) block ids
    palette = rng.integers(0, 256, (LABEL_GRID * LABEL_GRID, 3), dtype=np.uint8)
    image = palette[seg]  # (H, W, 3)
    return {"__key__": key, "jpg": jpeg_bytes(image), "seg.png": png_bytes(seg), "cls": str(int(blocks[0, 0])).encode()}


def make_good_shards(
    folder: str | os.PathLike, n_shards: int, per_shard: int, size: tuple[int, int] = (40, 56), seed: int = 0,
    storage_options: dict | None = None,
) -> list[str]:
    """Writes ``shard-000000.tar``... of ``per_shard`` good samples each (``size`` is height, width); returns their paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for s in range(n_shards):
        samples = [good_sample(f"s{s:04d}-{i:05d}", rng, size) for i in range(per_shard)]
        paths.append(write_shard(_join(folder, f"shard-{s:06d}.tar"), samples, storage_options))
    return paths


def _join(folder: str | os.PathLike, name: str) -> str:
    """``folder/name`` for a local folder or an fsspec URL."""
    folder = os.fspath(folder)
    return f"{folder.rstrip('/')}/{name}" if "://" in folder else os.path.join(folder, name)


class _CreatesFile:
    """Pickles to a call of ``open(path, "w")``: unpickling it creates ``path``, which tests check never exists."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def marker_pickle(marker_path: str | os.PathLike) -> bytes:
    """A pickle whose unpickling creates ``marker_path`` (proof that nothing unpickled it if the file is absent)."""
    return pickle.dumps(_CreatesFile(os.fspath(marker_path)))


def pickle_marker(folder: str | os.PathLike) -> Path:
    """Where make_bad_shard's pickles would create their marker file if anything unpickled them."""
    return Path(folder) / PICKLE_MARKER


@functools.lru_cache(maxsize=1)
def huge_png() -> bytes:
    """A valid HUGE_SIZE 1-bit PNG (~25 KB): tiny on disk, far above the pixel limit once decoded."""
    return png_bytes(Image.new("1", HUGE_SIZE, 1))


def corrupt_png(rng: np.random.Generator) -> bytes:
    """A PNG with a valid header (PIL identifies it, size known) whose compressed pixel data is scrambled."""
    data = png_bytes(_rgb(rng))
    start = data.index(b"IDAT") + 4 + 10  # past the chunk type and the zlib header
    return data[:start] + bytes(b ^ 0x5A for b in data[start : start + 200]) + data[start + 200 :]


def _rgb(rng: np.random.Generator, height: int = 40, width: int = 56) -> np.ndarray:
    """Random (H, W, 3) uint8 noise."""
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def bad_members(folder: str | os.PathLike) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    """The bad-input corpus as tar members, and each key's expected status under DecodeSpec's defaults (no labels)."""
    rng = np.random.default_rng(1234)
    jpg = jpeg_bytes(_rgb(rng))
    poison = marker_pickle(pickle_marker(folder))
    palette = Image.fromarray(_rgb(rng)).quantize(16)
    transparent = palette.copy()
    transparent.info["transparency"] = 0
    ok = [
        ("ok-rgb.jpg", jpg),
        ("ok-gray.png", png_bytes(rng.integers(0, 256, (40, 56), dtype=np.uint8))),
        ("ok-rgba.png", png_bytes(rng.integers(0, 256, (40, 56, 4), dtype=np.uint8))),
        ("ok-cmyk.jpg", jpeg_bytes(Image.fromarray(_rgb(rng)).convert("CMYK"))),
        ("ok-16bit.png", png_bytes(rng.integers(0, 65536, (40, 56), dtype=np.uint16))),
        ("ok-palette.png", png_bytes(palette)),
        ("ok-palette-alpha.png", png_bytes(transparent)),
        ("ok-1x1.png", png_bytes(np.array([[[200, 10, 30]]], dtype=np.uint8))),
        ("ok-with-label.jpg", jpg), ("ok-with-label.seg.png", png_bytes(np.zeros((40, 56), np.uint8))),
        ("ok-with-label.cls", b"3"),
        ("ok-pickle.jpg", jpg), ("ok-pickle.pyd", poison),
    ]
    bad = [
        ("bad-corrupt.png", corrupt_png(rng)),
        ("bad-truncated.jpg", jpg[: len(jpg) // 2]),
        ("bad-empty.jpg", b""),
        ("bad-text.jpg", b"this is a text file, not an image\n"),
        ("bad-huge.png", huge_png()),
        ("bad-no-image.cls", b"1"), ("bad-no-image.txt", b"a caption without its image"),
        ("bad-label-only.seg.png", png_bytes(np.zeros((40, 56), np.uint8))),
        ("bad-pickle-only.pickle", poison),
        ("bad-duplicate.jpg", jpg), ("bad-duplicate.jpg", jpeg_bytes(_rgb(rng))),
    ]
    expected = {name.split(".")[0]: "ok" for name, _ in ok} | {name.split(".")[0]: "error" for name, _ in bad}
    return ok + bad, expected


def make_bad_shard(folder: str | os.PathLike) -> tuple[str, dict[str, str]]:
    """Writes ``bad-000000.tar`` (local folder) with the bad-input corpus; returns its path and key -> "ok" | "error"."""
    members, expected = bad_members(folder)
    return write_tar(_join(folder, "bad-000000.tar"), members), expected


def make_truncated_shard(
    folder: str | os.PathLike, per_shard: int = 6, keep: int = 3, seed: int = 7
) -> tuple[str, dict[str, str]]:
    """A good shard cut inside the ``seg.png`` data of sample ``keep``: only the ``keep`` samples before it count."""
    rng = np.random.default_rng(seed)
    samples = [good_sample(f"t{i:05d}", rng) for i in range(per_shard)]
    full = write_shard(_join(folder, "truncated-full.tar"), samples)
    with tarfile.open(full) as tar:
        member = tar.getmember(f"{samples[keep]['__key__']}.seg.png")
        cut = member.offset_data + member.size // 2
    with open(full, "rb") as f:
        data = f.read(cut)
    os.remove(full)
    path = _join(folder, "truncated-000000.tar")
    with open(path, "wb") as f:
        f.write(data)
    return path, {s["__key__"]: "ok" for s in samples[:keep]}


def make_unreadable_shard(folder: str | os.PathLike) -> str:
    """A ``.tar`` file that is not a tar archive (random bytes): scanning it is an InputError."""
    path = _join(folder, "unreadable-000000.tar")
    os.makedirs(os.fspath(folder), exist_ok=True)
    Path(path).write_bytes(np.random.default_rng(5).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path
