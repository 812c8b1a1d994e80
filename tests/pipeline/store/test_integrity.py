"""Lost stored objects: a committed ok row whose chunk or shard object is missing is an error naming the store, array and
row, never zeros; ``find_lost_rows`` and ``featup inspect --verify`` list every such row. Plain chunks and sharded tiles,
local and on moto's S3."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.store import index_table

from jobs.cli import main  # noqa: E402
from pipeline.store.codecs import StorageCodec  # noqa: E402
from pipeline.store.features import ArraySpec, FeatureStore  # noqa: E402
from pipeline.store.integrity import LostRow, LostRowError, find_lost_rows  # noqa: E402
from pipeline.store.reader import open_features  # noqa: E402

LOST = (("features", 1), ("seg.png", 4))  # (array, row) whose object each test deletes


def _store(url: str, tile: int | None, options: dict | None = None) -> FeatureStore:
    """Shard 0: rows 0-2 (row 2 failed, never written); shard 1: rows 3-4; shard 2: row 5, uncommitted and unwritten.
    Every ``seg.png`` label is all zeros: a legitimate all-fill row that must never be taken for a lost one."""
    specs = [ArraySpec("features", (3, 8, 8), "float16", ("channel", "y", "x"), spatial_axes=(1, 2)),
             ArraySpec("seg.png", (16, 16), "uint8", ("image_y", "image_x"), spatial_axes=(0, 1))]
    store = FeatureStore.create(url, num_rows=6, arrays=specs, attrs={}, storage_options=options,
                                keys=[f"k{r}" for r in range(6)], codec=StorageCodec(tile=tile))
    for row in (0, 1, 3, 4):
        store.write_rows(row, {"features": np.full((1, 3, 8, 8), row + 1, np.float16), "seg.png": np.zeros((1, 16, 16), np.uint8)})
    store.commit_shard(0, index_table([0, 1, 2], errors=[2], shard="a.tar"))
    store.commit_shard(1, index_table([3, 4], shard="b.tar"))
    return store


def _lose(store: FeatureStore) -> list[str]:
    """Deletes the objects of LOST; returns their keys."""
    keys = [f"{name}/c/{row}/0/0" + ("/0" if name == "features" else "") for name, row in LOST]
    for key in keys:
        store.fs.rm_file(f"{store.root}/{key}")
    return keys


def _check(url: str, store: FeatureStore, options: dict, capsys) -> None:
    assert find_lost_rows(store) == []
    keys = _lose(store)
    assert find_lost_rows(store) == [LostRow("features", 1, "k1", "a.tar", keys[0]), LostRow("seg.png", 4, "k4", "b.tar", keys[1])]
    reader = open_features(url, **options)
    assert len(reader) == 4 and float(reader[0]["features"].mean()) == 1.0 and not reader[0]["seg.png"].any()
    for position, (name, row), key in ((1, LOST[0], keys[0]), (3, LOST[1], keys[1])):
        for view in (reader, reader.select(crop=4)):  # a whole row, and a partial read of the shard or chunk
            with pytest.raises(LostRowError) as e:
                view[position]
            assert str(e.value).startswith(f"store {url}: array {name} row {row} (sample k{row}): expected its stored "
                                           f"object {key}, got none") and "featup inspect --verify" in str(e.value)
    assert float(reader[2]["features"].mean()) == 4.0  # the row after a lost one reads as before


@pytest.mark.parametrize("tile", [None, 4], ids=["plain-chunks", "sharded-tiles"])
def test_a_lost_object_of_a_committed_row_is_an_error_naming_it_not_zeros(tmp_path, tile, capsys):
    url = str(tmp_path / "store.zarr")
    store = _store(url, tile)
    assert main(["inspect", url, "--verify"]) == 0
    assert "verify: the stored objects of all 4 ok rows of committed shards are there" in capsys.readouterr().out
    _check(url, store, {}, capsys)
    assert main(["inspect", url, "--verify"]) == 1
    out = capsys.readouterr().out
    assert "verify: 2 of 4 ok rows of committed shards have lost stored objects" in out
    assert "  array features row 1 (sample k1 of shard a.tar): object features/c/1/0/0/0 missing" in out
    assert "  array seg.png row 4 (sample k4 of shard b.tar): object seg.png/c/4/0/0 missing" in out
    assert "Rerun the precompute command that made the store" in out


def test_a_lost_object_on_s3_is_an_error_naming_it_not_zeros(s3_server, capsys):
    options = s3_server.storage_options
    url = s3_server.url("lost") + "/store.zarr"
    _check(url, _store(url, 4, options), options, capsys)
