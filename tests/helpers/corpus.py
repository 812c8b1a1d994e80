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
from dataclasses import dataclass
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


# --- Damaged tars: real bytes of a good shard, damaged in place --------------------------------------------------

DAMAGE_KINDS = (
    "bad-checksum", "bad-checksum-first-member", "garbage-header", "zeroed-header", "zeroed-data", "garbage-mid-file",
    "truncated-at-header", "truncated-in-member", "garbage-appended", "garbage-tail",
)


@dataclass(frozen=True)
class DamagedShard:
    """A damaged shard and what reading it must give: the keys in order, which entries fail and why, what survives."""

    path: str
    kind: str
    keys: tuple[str, ...]  # expected ShardInfo.keys == read order
    failed: dict[int, str]  # position in keys -> a fragment of its "__error__"
    truncated: bool  # whether the scan's error is set and the read ends with the marker
    written: dict[str, dict[str, bytes]]  # key -> the payloads written (samples not listed in ``failed`` match them)
    partial: frozenset[str] = frozenset()  # keys that come through with fewer payloads (no "__error__" on them)


def member_offsets(path: str | os.PathLike) -> list[tuple[str, int, int, int]]:
    """(name, header offset, data offset, size) of each member of an intact tar, from ``tarfile``."""
    with tarfile.open(path) as tar:
        return [(m.name, m.offset, m.offset_data, m.size) for m in tar.getmembers()]


def make_damaged_shard(folder: str | os.PathLike, kind: str, per_shard: int = 8, seed: int = 11) -> DamagedShard:
    """Writes ``damaged-<kind>.tar``: a shard of ``per_shard`` good samples (jpg, seg.png, cls) damaged as ``kind``."""
    if kind not in DAMAGE_KINDS:
        raise ValueError(f"damage kind: expected one of {', '.join(DAMAGE_KINDS)}, got {kind}")
    rng = np.random.default_rng(seed)
    samples = [good_sample(f"d{i:05d}", rng) for i in range(per_shard)]
    path = _join(folder, f"damaged-{kind}.tar")
    write_shard(path, samples)
    data = bytearray(Path(path).read_bytes())
    members = member_offsets(path)
    keys = [s["__key__"] for s in samples]
    written = {s["__key__"]: {k: v for k, v in s.items() if k != "__key__"} for s in samples}
    data, expected = _DAMAGES[kind](data, members, keys, np.random.default_rng(seed + 1))
    Path(path).write_bytes(bytes(data))
    expected_keys, failed, truncated, partial = expected
    return DamagedShard(path, kind, tuple(expected_keys), failed, truncated, written, frozenset(partial))


def _garbage(rng: np.random.Generator, n: int) -> bytes:
    """``n`` random bytes (never a valid tar header: no aligned ``ustar`` magic with a matching checksum)."""
    return rng.integers(0, 256, n, dtype=np.uint8).tobytes()


def _bad_checksum(member: int):
    """Damage: one byte of the checksum field of member ``member``'s header changed (its name stays readable)."""
    def damage(data, members, keys, rng):
        name, header = members[member][0], members[member][1]
        data[header + 148] = ord("7") if data[header + 148] != ord("7") else ord("6")
        position = member // 3
        return data, (keys, {position: f"damaged tar header of member {name}"}, False, ())
    return damage


def _garbage_header(data, members, keys, rng):
    """Damage: the header of the middle member of sample 2 (``seg.png``) overwritten with random bytes."""
    header, following = members[7][1], members[8][1]
    data[header : header + 512] = _garbage(rng, 512)
    return data, (keys, {2: f"damaged tar data at bytes {header}-{following - 1} inside it"}, False, ())


def _zeroed_header(data, members, keys, rng):
    """Damage: the header of sample 1's first member (its ``jpg``) zeroed: a lost region naming no member."""
    header, following = members[3][1], members[4][1]
    data[header : header + 512] = bytes(512)
    span = f"<damaged bytes {header}-{following - 1}>"
    return data, (keys[:1] + [span] + keys[1:], {1: "zeroed header block"}, False, (keys[1],))


def _zeroed_data(data, members, keys, rng):
    """Damage: a 512-byte block inside sample 1's ``jpg`` data zeroed (a tar cannot tell: the payload differs)."""
    start = members[3][2] + 512 if members[3][3] > 1024 else members[3][2]
    data[start : start + 512] = bytes(512)
    return data, (keys, {}, False, ())


def _garbage_mid_file(data, members, keys, rng):
    """Damage: 800 random bytes over the end of sample 1's ``jpg`` data and the next header (its ``seg.png``)."""
    header, following = members[4][1], members[5][1]
    data[header - 100 : header + 700] = _garbage(rng, 800)
    return data, (keys, {1: f"damaged tar data at bytes {header}-{following - 1} inside it"}, False, ())


def _truncated_at_header(data, members, keys, rng):
    """Damage: the file cut exactly at sample 3's first header: no end-of-archive marker, so the read ends with the
    marker and sample 2, being grouped at the cut (more of its members may have followed), is left out."""
    return data[: members[9][1]], (keys[:2], {}, True, ())


def _truncated_in_member(data, members, keys, rng):
    """Damage: the file cut inside sample 3's ``seg.png`` data (the samples before it are kept)."""
    return data[: members[10][2] + members[10][3] // 2], (keys[:3], {}, True, ())


def _garbage_appended(data, members, keys, rng):
    """Damage: 3000 random bytes after the end-of-archive blocks (ignored)."""
    return data + _garbage(rng, 3000), (keys, {}, False, ())


def _garbage_tail(data, members, keys, rng):
    """Damage: cut at sample 3's first header, then 2048 random bytes (no end-of-archive marker): a lost region to the end."""
    cut = members[9][1]
    span = f"<damaged bytes {cut}-{cut + 2047}>"
    return data[:cut] + _garbage(rng, 2048), (keys[:3] + [span], {3: "no valid tar header after it"}, False, ())


_DAMAGES = {
    "bad-checksum": _bad_checksum(2), "bad-checksum-first-member": _bad_checksum(3), "garbage-header": _garbage_header,
    "zeroed-header": _zeroed_header, "zeroed-data": _zeroed_data, "garbage-mid-file": _garbage_mid_file,
    "truncated-at-header": _truncated_at_header, "truncated-in-member": _truncated_in_member,
    "garbage-appended": _garbage_appended, "garbage-tail": _garbage_tail,
}


def make_all_broken_shards(folder: str | os.PathLike) -> tuple[list[str], int]:
    """Two readable shards in which every sample fails to decode (bad images, no image, damaged tar regions).

    Returns their paths and the number of entries they hold (all of them failures under DecodeSpec's defaults).
    """
    members, expected = bad_members(folder)
    bad = [(name, data) for name, data in members if expected[name.split(".")[0]] == "error"]
    first = write_tar(_join(folder, "broken-000000.tar"), bad)
    rng = np.random.default_rng(21)
    samples = [good_sample(f"b{i:05d}", rng) for i in range(4)]
    for sample in samples:
        sample["jpg"] = sample["jpg"][: len(sample["jpg"]) // 3]  # truncated JPEG
    second = write_shard(_join(folder, "broken-000001.tar"), samples)
    raw = bytearray(Path(second).read_bytes())
    header = member_offsets(second)[4][1]
    raw[header : header + 512] = _garbage(rng, 512)  # sample 1's seg.png header: flags sample 1
    Path(second).write_bytes(bytes(raw))
    return [first, second], len({name.split(".")[0] for name, _ in bad}) + len(samples)


# --- EXIF orientation: JPEGs stored on a raw grid that EXIF says to turn, with masks on that raw grid -------------

EXIF_ORIENTATION = 0x0112
EXIF_PALETTE = np.array([[r, g, b] for r in (0, 255) for g in (0, 255) for b in (0, 255)], dtype=np.uint8)
EXIF_BLOCK = 16  # block side in pixels (a multiple of JPEG's 8-pixel grid, so colours stay clean)

# How each EXIF orientation's raw grid is stored, given the grid as displayed (the inverse of the display transform,
# written from the EXIF definitions: 6 = "rotate 90 degrees clockwise to display", 8 = "rotate 270 clockwise"...).
_TO_RAW = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored horizontally
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1],  # mirrored vertically
    5: lambda a: a.swapaxes(0, 1),  # transposed (its own inverse)
    6: lambda a: np.rot90(a, 1),  # displayed = raw turned 90 clockwise, so raw = displayed turned 90 counter-clockwise
    7: lambda a: np.rot90(a, 2).swapaxes(0, 1),  # transversed (its own inverse)
    8: lambda a: np.rot90(a, -1),  # displayed = raw turned 90 counter-clockwise
}


def exif_jpeg(raw: np.ndarray, orientation: int) -> bytes:
    """A JPEG of the (H, W, 3) uint8 raw grid with the EXIF orientation tag set (4:4:4, quality 95)."""
    img = Image.fromarray(np.ascontiguousarray(raw))
    exif = img.getexif()
    exif[EXIF_ORIENTATION] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, subsampling=0, exif=exif.tobytes())
    return buf.getvalue()


def exif_sample(key: str, orientation: int, shape: tuple[int, int], seed: int = 0) -> tuple[dict[str, bytes], np.ndarray]:
    """A sample whose JPEG says ``orientation`` and whose ``seg.png`` mask is on the JPEG's raw pixel grid.

    ``shape`` is (H, W) as displayed, in whole EXIF_BLOCKs. Returns the sample and the block ids as they must come out
    after orientation: (H, W) uint8 indexes into EXIF_PALETTE, for the image and the mask alike.
    """
    rng = np.random.default_rng(seed)
    height, width = shape
    blocks = rng.integers(0, len(EXIF_PALETTE), (height // EXIF_BLOCK, width // EXIF_BLOCK), dtype=np.uint8)
    displayed = np.repeat(np.repeat(blocks, EXIF_BLOCK, axis=0), EXIF_BLOCK, axis=1)  # (H, W) ids as displayed
    raw = np.ascontiguousarray(_TO_RAW[orientation](displayed))  # ids on the stored grid
    sample = {"__key__": key, "jpg": exif_jpeg(EXIF_PALETTE[raw], orientation), "seg.png": png_bytes(raw)}
    return sample, displayed


def palette_ids(rgb: np.ndarray) -> np.ndarray:
    """For each pixel of an (H, W, 3) uint8 image, the index of the nearest EXIF_PALETTE colour."""
    distance = ((rgb[:, :, None, :].astype(np.int32) - EXIF_PALETTE[None, None].astype(np.int32)) ** 2).sum(-1)
    return distance.argmin(-1).astype(np.uint8)
