"""Tests of pipeline.store.reader on stores written directly: valid rows only, layouts, channels, aligned crops, fork-safe loading."""

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader

from tests.helpers import store as sh

from featup.errors import ConfigError  # noqa: E402
from pipeline.store.reader import FeatureDataset, open_features  # noqa: E402

VALID = [0, 1, 3, 4, 6]  # rows of the default coordinate store that are served (2 and 5 failed)


@pytest.fixture
def local_store(tmp_path):
    url = str(tmp_path / "features.zarr")
    sh.coordinate_store(url)
    return url


def _check_aligned(sample: dict) -> None:
    """The crop of every array shows the same region: compared through the coordinates each array holds."""
    f, img, seg = sample["features"], sample["image"].long(), sample["seg.png"].long()
    assert torch.equal(img[0, ::2, ::2], f[0].long()) and torch.equal(img[1, ::2, ::2], f[1].long())
    fy, fx = f[0].long(), f[1].long()
    assert torch.equal(seg[::2, ::2], (2 * fy) * sh.IMAGE_W + 2 * fx)  # image pixel ids at each feature pixel's corner
    assert torch.equal(seg[1::2, 1::2], (2 * fy + 1) * sh.IMAGE_W + 2 * fx + 1)
    if "lowres" in sample:
        assert torch.equal(sample["lowres"][0].long(), fy[::4, ::4] // 4) and torch.equal(sample["lowres"][1].long(), fx[::4, ::4] // 4)


def test_only_valid_rows_of_committed_shards_are_served_in_row_order(tmp_path):
    url = str(tmp_path / "s.zarr")
    sh.coordinate_store(url, shards=((0, 1, 2), (3, 4), (5, 6, 7)), errors=(1,), uncommitted=(1,))
    reader = open_features(url)
    assert len(reader) == 5 and reader.rows.tolist() == [0, 2, 5, 6, 7]
    assert reader.index["row"].to_pylist() == [0, 1, 2, 5, 6, 7]  # the index keeps failed rows, not uncommitted ones
    assert reader.index["status"].to_pylist().count("error") == 1
    assert [reader[i]["key"] for i in range(len(reader))] == ["k0", "k2", "k5", "k6", "k7"]
    assert reader[-1]["row"] == 7
    with pytest.raises(IndexError):
        reader[5]
    assert reader.attrs == sh.ATTRS and reader.num_rows == 8


def test_a_sample_holds_every_stored_array_in_its_documented_layout(local_store):
    reader = open_features(local_store)
    stored = zarr.open_group(local_store, mode="r")
    for i, row in enumerate(VALID):
        s = reader[i]
        assert set(s) == {"key", "row", "features", "lowres", "image", "seg.png"} and s["row"] == row
        assert s["features"].dtype == torch.float32 and s["features"].shape == (sh.C, sh.H, sh.W)
        np.testing.assert_array_equal(s["features"].numpy(), stored["features"][row].astype(np.float32))
        assert s["lowres"].shape == (sh.C, sh.LOW_H, sh.LOW_W) and s["lowres"].dtype == torch.float32
        assert s["image"].dtype == torch.uint8 and s["image"].shape == (3, sh.IMAGE_H, sh.IMAGE_W)
        np.testing.assert_array_equal(s["image"].permute(1, 2, 0).numpy(), stored["image"][row])
        assert s["seg.png"].dtype == torch.int32  # uint16 labels are widened for torch
        np.testing.assert_array_equal(s["seg.png"].numpy(), stored["seg.png"][row])
        _check_aligned(s)


def test_channel_subset_keeps_the_requested_channels_in_order(local_store):
    reader = open_features(local_store)
    view = reader.select(channels=[3, 0, 1], arrays=["lowres"])
    full, part = reader[1], view[1]
    assert set(part) == {"key", "row", "features", "lowres"}
    assert torch.equal(part["features"], full["features"][[3, 0, 1]])
    assert torch.equal(part["lowres"], full["lowres"][[3, 0, 1]])
    with pytest.raises(ConfigError, match="channels"):
        reader.select(channels=[sh.C])


def test_random_crop_is_the_same_region_in_every_array_and_seeded(local_store):
    reader = open_features(local_store)
    view = reader.select(crop=(4, 8), seed=3)  # lowres included: corners on its 4-pixel grid
    corners = set()
    for _ in range(12):
        s = view[0]
        assert s["features"].shape == (sh.C, 4, 8) and s["image"].shape == (3, 8, 16) and s["seg.png"].shape == (8, 16)
        assert s["lowres"].shape == (sh.C, 1, 2)
        _check_aligned(s)
        corners.add((int(s["features"][0, 0, 0]), int(s["features"][1, 0, 0])))
    assert corners <= {(y, x) for y in (0, 4) for x in (0, 4)} and len(corners) > 1
    again = reader.select(crop=(4, 8), seed=3)
    first = reader.select(crop=(4, 8), seed=3)
    assert all(torch.equal(again[i]["features"], first[i]["features"]) for i in range(len(reader)))


def test_without_lowres_a_crop_may_start_at_any_feature_pixel(local_store):
    view = open_features(local_store).select(arrays=["image", "seg.png"], crop=3, seed=0)
    corners = set()
    for _ in range(40):
        s = view[2]
        assert s["features"].shape == (sh.C, 3, 3) and "lowres" not in s
        _check_aligned(s)
        corners.add((int(s["features"][0, 0, 0]), int(s["features"][1, 0, 0])))
    assert any(y % 4 or x % 4 for y, x in corners)


@pytest.mark.parametrize("crop, words", [((9, 4), "at most the feature size"), ((3, 4), "multiple of"), ((0, 4), "positive")])
def test_impossible_crops_are_refused_when_asked_for(local_store, crop, words):
    with pytest.raises(ConfigError, match=words):
        open_features(local_store).select(crop=crop)


def test_unknown_arrays_are_refused(local_store):
    with pytest.raises(ConfigError, match="depth.npy"):
        open_features(local_store).select(arrays=["depth.npy"])


def test_a_pickled_reader_carries_no_open_store_and_reads_the_same(local_store):
    reader = open_features(local_store)
    reader[0]
    state = reader.__getstate__()
    assert state["_store"] is None and state["_generator"] is None
    copy = pickle.loads(pickle.dumps(reader))
    assert torch.equal(copy[3]["features"], reader[3]["features"]) and copy.keys == reader.keys


def _load(dataset, workers: int, seed: int = 0) -> list[dict]:
    loader = DataLoader(dataset, batch_size=2, num_workers=workers, multiprocessing_context="fork" if workers else None,
                        generator=torch.Generator().manual_seed(seed))
    return list(loader)


def test_two_fork_workers_read_a_local_store_that_the_parent_already_read(local_store):
    reader = open_features(local_store)
    expected = torch.stack([reader[i]["features"] for i in range(len(reader))])  # zarr used in the parent before the fork
    dataset = reader.torch_dataset()
    dataset[0]  # the dataset's own handle is open before the fork: the workers must not use it
    batches = _load(dataset, workers=2)
    assert torch.equal(torch.cat([b["features"] for b in batches]), expected)
    assert [k for b in batches for k in b["key"]] == reader.keys
    assert torch.cat([b["row"] for b in batches]).tolist() == VALID


def test_two_fork_workers_read_an_s3_store_with_aligned_seeded_crops(s3_server):
    url = s3_server.url("reader")
    sh.coordinate_store(url, s3_server.storage_options)
    reader = open_features(url, **s3_server.storage_options)
    whole = [reader[i] for i in range(len(reader))]  # s3fs and zarr used in the parent before the fork
    dataset = reader.torch_dataset(arrays=["image", "seg.png"], crop=(4, 5))
    assert isinstance(dataset, FeatureDataset)
    dataset[0]  # the dataset's own s3 handle is open before the fork: the workers must not use it
    runs = [_load(dataset, workers=2, seed=7) for _ in range(2)]
    for a, b in zip(*runs):  # the loader's generator seeds the workers' crops: same seed, same crops
        assert torch.equal(a["features"], b["features"]) and torch.equal(a["seg.png"], b["seg.png"])
    samples = [{k: v[j] for k, v in batch.items()} for batch in runs[0] for j in range(len(batch["key"]))]
    assert [s["row"].item() for s in samples] == VALID
    for s, w in zip(samples, whole):
        _check_aligned(s)
        top, left = int(s["features"][0, 0, 0]), int(s["features"][1, 0, 0])
        assert torch.equal(s["features"], w["features"][:, top : top + 4, left : left + 5])
    corners = {(int(s["features"][0, 0, 0]), int(s["features"][1, 0, 0])) for s in samples}
    assert len(corners) > 1


def test_plain_zarr_opens_the_store_with_named_dimensions(local_store):
    group = zarr.open_group(local_store, mode="r")
    assert group["features"].metadata.dimension_names == ("sample", "channel", "y", "x")
    assert group["seg.png"].metadata.dimension_names == ("sample", "image_y", "image_x")
    reader = open_features(local_store)
    np.testing.assert_array_equal(group["features"][reader.rows[2]].astype(np.float32), reader[2]["features"].numpy())
