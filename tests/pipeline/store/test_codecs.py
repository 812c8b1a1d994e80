"""Tests of pipeline.store.codecs on real Zarr v3 arrays, on local disk and on s3:// (moto server on 127.0.0.1):
lossless round trips of every codec and layout, keep-bits and int8 stores, and crops from the sharded layout."""

from __future__ import annotations

import fsspec
import numpy as np
import pytest
import torch
import zarr
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from featup.errors import ConfigError
from pipeline.store.codecs import (CODEC_NAMES, StorageCodec, compressors_for, resolve_codec, sharded_layout,
                                   tile_side)
from pipeline.store.quantize import dequantize_int8_numpy, quant_attrs, quantize_int8, round_mantissa
from tests.pipeline.store.test_quantize import smooth_maps

SPEC_CODECS = {"bytes", "blosc", "zstd", "sharding_indexed", "crc32c"}  # codecs of the Zarr v3 specification


class CountingStore(WrapperStore):
    """A real store that counts the bytes its reads return (whole objects and byte ranges); copies zarr makes of it
    (``with_read_only``) share the count."""

    def __init__(self, store, tally: list[int] | None = None) -> None:
        super().__init__(store)
        self.tally = tally if tally is not None else [0]

    def _with_store(self, store) -> "CountingStore":
        return type(self)(store, self.tally)

    @property
    def bytes_read(self) -> int:
        return self.tally[0]

    @bytes_read.setter
    def bytes_read(self, value: int) -> None:
        self.tally[0] = value

    async def get(self, key, prototype, byte_range=None):
        buf = await self._store.get(key, prototype, byte_range)
        self.bytes_read += 0 if buf is None else len(buf)
        return buf

    async def get_partial_values(self, prototype, key_ranges):
        bufs = await self._store.get_partial_values(prototype, key_ranges)
        self.bytes_read += sum(len(b) for b in bufs if b is not None)
        return bufs


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path):
    """(url, storage_options) of a fresh store location, local or on the moto S3 server."""
    if request.param == "local":
        return str(tmp_path / "codecs.zarr"), None
    s3 = request.getfixturevalue("s3_server")
    return s3.url("codecs"), s3.storage_options


def open_store(url: str, options: dict | None) -> CountingStore:
    """A byte-counting zarr store at ``url`` (LocalStore or FsspecStore, as the feature store opens them)."""
    base = LocalStore(url) if options is None else FsspecStore.from_url(url, storage_options=options)
    return CountingStore(base)


def create(store, name: str, data: np.ndarray, codec: StorageCodec, spatial_axes=None, **kw) -> zarr.Array:
    """A zarr v3 array ``name`` holding ``data`` (rows first) with the codec's keywords, written row by row."""
    kwargs = codec.array_kwargs(data.dtype, data.shape[1:], spatial_axes)
    arr = zarr.create_array(store, name=name, shape=data.shape, dtype=data.dtype, fill_value=0, **kwargs, **kw)
    for i in range(len(data)):
        arr[i] = data[i]  # one writer per row: each row is one stored object
    return arr


def codec_names(arr: zarr.Array) -> set[str]:
    """Names of every codec in the array's metadata, inside the sharding codec too."""
    names = set()
    for codec in arr.metadata.to_dict()["codecs"]:
        names.add(codec["name"])
        for inner in (*codec.get("configuration", {}).get("codecs", ()), *codec.get("configuration", {}).get("index_codecs", ())):
            names.add(inner["name"])
    return names


def object_size(url: str, options: dict | None, key: str) -> int:
    """Size in bytes of one stored object under the store root."""
    fs, root = fsspec.core.url_to_fs(url, **(options or {}))
    return int(fs.size(f"{root}/{key}"))


def test_tile_side_splits_evenly_and_never_exceeds_the_request():
    assert [tile_side(n, 64) for n in (224, 227, 48, 64, 65, 128, 1)] == [56, 57, 48, 64, 33, 64, 1]
    assert tile_side(224, 32) == 32 and tile_side(224, 100) == 75
    with pytest.raises(ConfigError, match="tile: expected a positive side, got 0"):
        tile_side(224, 0)


@pytest.mark.parametrize("shape,axes,inner,shard", [
    ((384, 224, 224), (1, 2), (1, 384, 56, 56), (1, 384, 224, 224)),
    ((224, 224, 3), (0, 1), (1, 56, 56, 3), (1, 224, 224, 3)),
    ((8, 227, 40), (-2, -1), (1, 8, 57, 40), (1, 8, 228, 40)),  # 227: one padded row in the shard; 40 < 64: one tile
    ((384, 14, 14), (1, 2), (1, 384, 14, 14), None),  # one tile: a plain chunk, no shard index
    ((384,), None, (1, 384), None),
])
def test_sharded_layout_one_shard_per_row(shape, axes, inner, shard):
    assert sharded_layout(shape, axes) == (inner, shard)
    if shard is not None:
        assert all(s % c == 0 and n <= s < n + c for s, c, n in zip(shard[1:], inner[1:], shape))


def test_sharded_layout_refuses_bad_axes_and_tile_none_is_one_chunk():
    assert sharded_layout((3, 10, 10), (1, 2), tile=None) == ((1, 3, 10, 10), None)
    with pytest.raises(ConfigError, match=r"spatial_axes: expected distinct axes of a row of shape \(3, 10, 10\), got \(1, -2\)"):
        sharded_layout((3, 10, 10), (1, -2))


def test_codec_registry_and_auto():
    assert CODEC_NAMES == ("auto", "blosc-lz4", "blosc-zstd", "none", "zstd", "zstd-3")
    assert resolve_codec("auto", np.uint8, codes=True) == "zstd-3" and resolve_codec("zstd", np.uint8, codes=True) == "zstd"
    assert resolve_codec("auto", np.float16) == "blosc-zstd" and resolve_codec("auto", "float32") == "blosc-zstd"
    assert resolve_codec("auto", np.uint8) == "zstd" and resolve_codec("zstd", np.float16) == "zstd"
    (blosc,) = compressors_for("blosc-lz4", np.float32)
    assert (blosc.cname.value, blosc.shuffle.value, blosc.typesize, blosc.clevel) == ("lz4", "shuffle", 4, 1)
    assert compressors_for("none", np.float16) == ()
    with pytest.raises(ConfigError, match="codec: expected one of auto, blosc-lz4, blosc-zstd, none, zstd, zstd-3, got 'gzip'"):
        resolve_codec("gzip", np.float16)


@pytest.mark.parametrize("kwargs,message", [
    ({"codec": "lz4"}, "codec: expected one of auto, blosc-lz4, blosc-zstd, none, zstd, zstd-3, got 'lz4'"),
    ({"quantize": "int4"}, "quantize: expected None or one of int8, got 'int4'"),
    ({"keep_bits": 0}, "keep_bits: expected None or an integer from 1 to 10, got 0"),
    ({"keep_bits": 11}, "keep_bits: expected None or an integer from 1 to 10, got 11"),
    ({"keep_bits": 7.0}, "keep_bits: expected None or an integer from 1 to 10, got 7.0"),
    ({"keep_bits": 7, "quantize": "int8"}, "keep_bits: expected None together with quantize='int8', got 7"),
    ({"tile": 0}, "tile: expected None or a positive integer, got 0"),
])
def test_storage_codec_validates_at_construction(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        StorageCodec(**kwargs)


def test_storage_codec_fingerprint_and_dtypes():
    assert StorageCodec().fingerprint() == {"codec": "auto", "quantize": None, "keep_bits": None}
    assert StorageCodec("zstd", keep_bits=7).fingerprint() == {"codec": "zstd", "quantize": None, "keep_bits": 7}
    assert StorageCodec(quantize="int8").stored_dtype(np.float16) == np.uint8
    assert StorageCodec().stored_dtype("float32") == np.float32
    with pytest.raises(ConfigError, match="keep_bits: expected float16 features, got float32"):
        StorageCodec(keep_bits=7).stored_dtype(np.float32)
    plain = StorageCodec(keep_bits=7).feature_kwargs(np.float16, (384, 224, 224))
    assert plain["dtype"] == np.float16 and plain["chunks"] == (1, 384, 56, 56) and plain["shards"] == (1, 384, 224, 224)
    assert plain["compressors"][0].cname.value == "zstd" and plain["compressors"][0].typesize == 2
    with pytest.raises(ConfigError, match="keep_bits: expected float16 features, got float32"):
        StorageCodec(keep_bits=7).feature_kwargs(np.float32, (3, 8, 8))


@pytest.mark.parametrize("tile", [64, None], ids=["sharded", "one-chunk"])
@pytest.mark.parametrize("name", CODEC_NAMES)
def test_lossless_round_trip_bit_exact(location, name, tile):
    url, options = location
    codec = StorageCodec(codec=name, tile=tile)
    feats = smooth_maps(2, 8, 67).numpy().astype(np.float16)  # 67: tiles of 34, the shard padded to 68
    image = np.random.default_rng(0).integers(0, 256, (2, 67, 67, 3), dtype=np.uint8)
    store = open_store(url, options)
    create(store, "features", feats, codec, (1, 2))
    create(store, "image", image, codec, (0, 1))
    reopened = zarr.open_group(open_store(url, options), mode="r")
    np.testing.assert_array_equal(reopened["features"][:].view(np.uint16), feats.view(np.uint16))
    np.testing.assert_array_equal(reopened["image"][:], image)
    assert codec_names(reopened["features"]) <= SPEC_CODECS
    assert ("sharding_indexed" in codec_names(reopened["features"])) == (tile is not None)


@pytest.mark.parametrize("keep_bits", [3, 7])
def test_keep_bits_round_trip_within_bound_and_smaller(location, keep_bits):
    url, options = location
    feats = smooth_maps(2, 8, 64).numpy().astype(np.float16)
    store = open_store(url, options)
    exact = create(store, "exact", feats, StorageCodec())
    rounded = round_mantissa(feats, keep_bits)
    create(store, "rounded", rounded, StorageCodec(keep_bits=keep_bits))
    back = zarr.open_array(open_store(url, options), path="rounded", mode="r")[:]
    np.testing.assert_array_equal(back.view(np.uint16), rounded.view(np.uint16))
    normal = np.abs(feats) >= 2.0 ** -14
    rel = np.abs(back.astype(np.float64) - feats)[normal] / np.abs(feats.astype(np.float64))[normal]
    assert rel.max() <= 2.0 ** -(keep_bits + 1)
    assert zarr.open_array(open_store(url, options), path="rounded").nbytes_stored() < exact.nbytes_stored()


def test_int8_store_reads_back_within_one_percent(location):
    url, options = location
    x = smooth_maps(3, 16, 64)
    x[1, 5] = 0.75  # a constant channel
    codes, scale, offset = quantize_int8(x)
    codec = StorageCodec(quantize="int8")
    store = open_store(url, options)
    kwargs = codec.feature_kwargs(np.float32, codes.shape[1:])
    assert kwargs.pop("dtype") == np.uint8 and kwargs["compressors"][0].level == 3
    arr = zarr.create_array(store, name="features", shape=codes.shape, fill_value=0, dtype=np.uint8, **kwargs,
                            attributes=quant_attrs("features"))
    arr[:] = codes.numpy()
    create(store, "features_scale", scale.numpy(), codec)
    create(store, "features_offset", offset.numpy(), codec)
    group = zarr.open_group(open_store(url, options), mode="r")
    attrs = group["features"].attrs
    assert group["features"].dtype == np.uint8 and group[attrs["scale_array"]].dtype == np.float32
    back = dequantize_int8_numpy(group["features"][:], group[attrs["scale_array"]][:], group[attrs["offset_array"]][:])
    err = np.linalg.norm((back - x.numpy()).reshape(3, -1), axis=1) / np.linalg.norm(x.numpy().reshape(3, -1), axis=1)
    assert err.max() < 0.01
    np.testing.assert_array_equal(back[1, 5], np.full((64, 64), 0.75, np.float32))
    assert group["features"].nbytes_stored() < x.numel() * 2 / 2  # at least 2x below raw float16 before the codec


@pytest.mark.parametrize("name", ["blosc-zstd", "zstd"])
def test_crop_from_sharded_layout_equals_whole_map_crop_and_reads_less(location, name):
    url, options = location
    feats = smooth_maps(2, 16, 224).numpy().astype(np.float16)
    store = open_store(url, options)
    create(store, "sharded", feats, StorageCodec(name, tile=64), (1, 2))
    create(store, "whole", feats, StorageCodec(name, tile=None), (1, 2))
    reads = {}
    for layout in ("sharded", "whole"):
        counting = open_store(url, options)
        arr = zarr.open_array(counting, path=layout, mode="r")
        counting.bytes_read = 0
        crop = arr[1, :, 10:74, 20:84]  # a 64x64 crop within 2x2 of the 4x4 tiles of 56
        reads[layout] = counting.bytes_read
        np.testing.assert_array_equal(crop.view(np.uint16), feats[1, :, 10:74, 20:84].view(np.uint16))
    shard_object = object_size(url, options, "sharded/c/1/0/0/0")
    assert reads["whole"] >= object_size(url, options, "whole/c/1/0/0/0")  # the unsharded layout reads the whole row
    assert reads["sharded"] < 0.4 * shard_object
    assert reads["sharded"] < 0.4 * reads["whole"]


def test_crop_across_padded_edge_tiles(tmp_path):
    feats = smooth_maps(1, 4, 227).numpy().astype(np.float16)
    store = open_store(str(tmp_path / "pad.zarr"), None)
    arr = create(store, "f", feats, StorageCodec(tile=64), (1, 2))
    assert arr.shards == (1, 4, 228, 228) and arr.chunks == (1, 4, 57, 57)
    np.testing.assert_array_equal(arr[0, :, 150:227, 200:227], feats[0, :, 150:227, 200:227])
    assert torch.equal(torch.from_numpy(arr[:]), torch.from_numpy(feats))
