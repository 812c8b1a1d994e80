"""Storage codecs of the feature store: lossless codec names, lossy options (int8 codes, kept float16 mantissa bits) and
the sharded layout (one shard per sample, spatial inner chunks) as ``zarr.create_array`` keyword arguments.

Only codecs of the Zarr v3 specification are written (``blosc``, ``zstd``, ``bytes``, ``sharding_indexed``, ``crc32c``),
so any Zarr v3 implementation reads the store; the lossy steps run before encoding (``pipeline.store.quantize``),
on the model's device, and leave plain ``uint8`` / ``float16`` arrays. Typical use::

    codec = StorageCodec(codec="auto", quantize=None, keep_bits=None)
    group.create_array("features", shape=(rows, 384, 224, 224), fill_value=0,
                       **codec.feature_kwargs(np.float16, (384, 224, 224)))  # dtype included: uint8 when quantized
    group.create_array("image", shape=(rows, 224, 224, 3), dtype="uint8", fill_value=0,
                       **codec.array_kwargs(np.uint8, (224, 224, 3), spatial_axes=(0, 1)))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import BloscCodec, ZstdCodec

from featup.errors import ConfigError
from featup.registry import Registry

ZSTD_LEVEL = 1  # level 1: float16 maps compress about as much as at level 3 in half the CPU time
BLOSC_LEVEL = 1
# Blosc's own block size at level 1 is a few tens of KB, and zstd pays a set-up per block: with 1 MiB blocks the
# JBU maps of bench/bench_codecs.py encode at 352 against 263 MB/s per core, decode at 430 against 316, and are 2%
# smaller. Blosc records the block size in each chunk's header, so any reader decodes either.
BLOSC_BLOCKSIZE = 1 << 20
DEFAULT_TILE = 64  # requested side of the spatial inner chunks (the actual side divides the map evenly, see tile_side)
QUANTIZE_MODES = ("int8",)
MAX_KEEP_BITS = 10  # float16 has a 10-bit mantissa

# name -> factory(dtype) -> the array's bytes-to-bytes codecs (zarr's ``compressors=``). A shuffle codec takes the
# dtype's item size as its typesize (zarr sets it from the array's dtype; given here too so the list stands alone).
LOSSLESS: Registry[Callable[[np.dtype], tuple[BytesBytesCodec, ...]]] = Registry("storage codec")


@LOSSLESS.register("zstd")
def _zstd(dtype: np.dtype) -> tuple[BytesBytesCodec, ...]:
    """Zstandard level 1 on the raw bytes (the store's codec before issue 12)."""
    return (ZstdCodec(level=ZSTD_LEVEL),)


@LOSSLESS.register("zstd-3")
def _zstd3(dtype: np.dtype) -> tuple[BytesBytesCodec, ...]:
    """Zstandard level 3: what ``auto`` picks for int8 codes (about 1.3x smaller than level 1 on them, and codes are
    half the bytes of float16, so it still encodes 260-330 MB/s of float16-equivalent features per core)."""
    return (ZstdCodec(level=3),)


def _blosc(cname: str, dtype: np.dtype) -> tuple[BytesBytesCodec, ...]:
    """Blosc with byte shuffle at BLOSC_LEVEL in BLOSC_BLOCKSIZE blocks, compressing with ``cname``."""
    return (BloscCodec(cname=cname, clevel=BLOSC_LEVEL, shuffle="shuffle", typesize=np.dtype(dtype).itemsize,
                       blocksize=BLOSC_BLOCKSIZE),)


@LOSSLESS.register("blosc-zstd")
def _blosc_zstd(dtype: np.dtype) -> tuple[BytesBytesCodec, ...]:
    """Blosc with byte shuffle and zstd level 1: float16 exponent bytes grouped together compress far better."""
    return _blosc("zstd", dtype)


@LOSSLESS.register("blosc-lz4")
def _blosc_lz4(dtype: np.dtype) -> tuple[BytesBytesCodec, ...]:
    """Blosc with byte shuffle and lz4 level 1: 13% larger than blosc-zstd, a little faster (416 against 352 MB/s)."""
    return _blosc("lz4", dtype)


@LOSSLESS.register("none")
def _none(dtype: np.dtype) -> tuple[BytesBytesCodec, ...]:
    """No compression: raw little-endian bytes."""
    return ()


# What ``auto`` means, chosen by bench/bench_codecs.py on JBU outputs (table in /work/notes/codecs12.md): float maps
# blosc-zstd (1.8x smaller than float16 at ~230 MB/s per core; lz4 is faster but 1.6x); images and labels zstd;
# int8 feature codes zstd-3 (bytes shuffling does nothing on 1-byte items; level 3 reaches ~4x against float16).
AUTO = {"f": "blosc-zstd", "u": "zstd", "i": "zstd", "b": "zstd"}
AUTO_CODES = "zstd-3"
CODEC_NAMES = ("auto", *LOSSLESS.names())


def resolve_codec(name: str, dtype: np.dtype | str | type, codes: bool = False) -> str:
    """The concrete lossless codec ``name`` stands for on arrays of ``dtype`` (``auto``: by dtype kind, or
    ``AUTO_CODES`` for the int8 codes of quantized features when ``codes``)."""
    if name not in CODEC_NAMES:
        raise ConfigError(f"codec: expected one of {', '.join(CODEC_NAMES)}, got {name!r}")
    if name != "auto":
        return name
    if codes:
        return AUTO_CODES
    kind = np.dtype(dtype).kind
    if kind not in AUTO:
        raise ConfigError(f"codec auto: expected a numeric array dtype, got {np.dtype(dtype)}")
    return AUTO[kind]


def compressors_for(name: str, dtype: np.dtype | str | type, codes: bool = False) -> tuple[BytesBytesCodec, ...]:
    """Zarr v3 ``compressors=`` of codec ``name`` for arrays of ``dtype`` (``codes``: int8 feature codes)."""
    return LOSSLESS.get(resolve_codec(name, dtype, codes))(np.dtype(dtype))


def tile_side(size: int, requested: int) -> int:
    """Side of the inner chunks along an axis of ``size``: the map split into ceil(size / requested) equal tiles.

    224 with 64 gives 56 (4 tiles, no padding); 227 gives 57 (the shard is 228, zarr pads the last tile with the fill
    value); a map smaller than ``requested`` is one tile. Tiles are never larger than ``requested``.
    """
    if requested < 1:
        raise ConfigError(f"tile: expected a positive side, got {requested}")
    count = math.ceil(size / requested)
    return math.ceil(size / count)


def sharded_layout(shape_per_row: Sequence[int], spatial_axes: Sequence[int] | None,
                   tile: int | None = DEFAULT_TILE) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """(chunks, shards) of an array of rows of ``shape_per_row``: one shard per row, spatial inner chunks.

    ``spatial_axes`` are the per-row axes to tile (``(1, 2)`` for (C, H, W), ``(0, 1)`` for (H, W, 3)); other axes are
    whole in every inner chunk. With ``spatial_axes`` None or ``tile`` None: one chunk per row, no sharding.
    """
    row = (1, *map(int, shape_per_row))  # (1, *shape_per_row)
    if spatial_axes is None or tile is None:
        return row, None
    axes = {a % len(shape_per_row) for a in spatial_axes} if shape_per_row else set()
    if len(axes) != len(tuple(spatial_axes)) or not axes:
        raise ConfigError(f"spatial_axes: expected distinct axes of a row of shape {tuple(shape_per_row)}, "
                          f"got {tuple(spatial_axes)}")
    inner = [1] + [tile_side(n, tile) if i in axes else n for i, n in enumerate(row[1:])]
    # The shard is the row rounded up to whole inner chunks: zarr requires a shard divisible by its inner chunks and
    # pads edge tiles with the fill value; every row still has exactly one stored object (one writer).
    if tuple(inner) == row:  # one tile holds the whole row: a plain chunk, without a shard index to pay for
        return row, None
    shard = [1] + [math.ceil(n / c) * c for n, c in zip(row[1:], inner[1:])]
    return tuple(inner), tuple(shard)


@dataclass(frozen=True)
class StorageCodec:
    """How the store encodes its arrays: lossless ``codec``, optional ``quantize`` ("int8") of the features or
    ``keep_bits`` (1..10 float16 mantissa bits kept), and the side of the spatial inner chunks (``tile``, None: none).

    ``quantize`` and ``keep_bits`` are lossy steps the writer applies to the features before encoding
    (``pipeline.store.quantize``); this config validates them and records them in the store's fingerprint.
    """

    codec: str = "auto"
    quantize: str | None = None
    keep_bits: int | None = None
    tile: int | None = DEFAULT_TILE

    def __post_init__(self) -> None:
        if self.codec not in CODEC_NAMES:
            raise ConfigError(f"codec: expected one of {', '.join(CODEC_NAMES)}, got {self.codec!r}")
        if self.quantize is not None and self.quantize not in QUANTIZE_MODES:
            raise ConfigError(f"quantize: expected None or one of {', '.join(QUANTIZE_MODES)}, got {self.quantize!r}")
        if self.keep_bits is not None:
            if isinstance(self.keep_bits, bool) or not isinstance(self.keep_bits, (int, np.integer)) \
                    or not 1 <= self.keep_bits <= MAX_KEEP_BITS:
                raise ConfigError(f"keep_bits: expected None or an integer from 1 to {MAX_KEEP_BITS}, got {self.keep_bits!r}")
            if self.quantize is not None:
                raise ConfigError(f"keep_bits: expected None together with quantize={self.quantize!r}, "
                                  f"got {self.keep_bits} (choose one lossy step)")
        if self.tile is not None and (isinstance(self.tile, bool) or not isinstance(self.tile, (int, np.integer))
                                      or self.tile < 1):
            raise ConfigError(f"tile: expected None or a positive integer, got {self.tile!r}")

    def fingerprint(self) -> dict[str, Any]:
        """The values that must match to resume a store (JSON): codec name as given, quantize, keep_bits."""
        return {"codec": self.codec, "quantize": self.quantize, "keep_bits": self.keep_bits}

    def check_features_dtype(self, dtype: np.dtype | str | type) -> None:
        """Refuses lossy options that do not fit features computed as ``dtype`` (keep_bits needs float16)."""
        dtype = np.dtype(dtype)
        if self.keep_bits is not None and dtype != np.float16:
            raise ConfigError(f"keep_bits: expected float16 features, got {dtype} (store features as float16 "
                              "or leave keep_bits out)")
        if self.quantize is not None and dtype.kind != "f":
            raise ConfigError(f"quantize: expected float features, got {dtype}")

    def stored_dtype(self, dtype: np.dtype | str | type) -> np.dtype:
        """The dtype the features are stored as: uint8 codes when quantized, else ``dtype``."""
        self.check_features_dtype(dtype)
        return np.dtype(np.uint8) if self.quantize == "int8" else np.dtype(dtype)

    def array_kwargs(self, dtype: np.dtype | str | type, shape_per_row: Sequence[int],
                     spatial_axes: Sequence[int] | None = None, codes: bool = False) -> dict[str, Any]:
        """``zarr`` ``create_array`` keywords (chunks, shards, filters, serializer, compressors) for stored ``dtype``.

        ``dtype`` is what is stored (``stored_dtype`` for the features); ``spatial_axes`` as in ``sharded_layout``;
        ``codes``: the array holds int8 feature codes (``auto`` picks their codec).
        """
        chunks, shards = sharded_layout(shape_per_row, spatial_axes, self.tile)
        return {"chunks": chunks, "shards": shards, "filters": (), "serializer": "auto",
                "compressors": compressors_for(self.codec, dtype, codes)}

    def feature_kwargs(self, dtype: np.dtype | str | type, shape_per_row: Sequence[int],
                       spatial_axes: Sequence[int] = (1, 2)) -> dict[str, Any]:
        """``create_array`` keywords of a feature array computed as ``dtype``, dtype included (uint8 when quantized)."""
        stored = self.stored_dtype(dtype)
        return {"dtype": stored, **self.array_kwargs(stored, shape_per_row, spatial_axes, codes=self.quantize is not None)}
