"""Tests of the store layout (format 2): zarr, xarray and dask open it without warnings, the keys are a coordinate, and
format-1 stores stay readable but are never resumed into the new layout."""

import json
import os
import warnings

import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr

from featup.errors import ConfigError
from pipeline.store.features import STORE_FORMAT, ArraySpec, FeatureStore
from pipeline.store.index import build_index_table
from pipeline.store.reader import open_features
from pipeline.store.summary import store_summary
from tests.helpers import store as sh

KEYS = ["cat", "dog", "dog", "eel"]  # a duplicate key: its second row is an error row, still in the coordinate


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store.zarr"), None
    s3 = request.getfixturevalue("s3_server")
    return s3.url("layout"), s3.storage_options


def _full_store(url, options) -> FeatureStore:
    """A store with every kind of side file: index files, markers, a report and a held lock."""
    specs = [ArraySpec("features", (2, 3, 4), "float16", ("channel", "y", "x")), ArraySpec("image", (6, 8, 3), "uint8",
                                                                                          ("image_y", "image_x", "rgb"))]
    store = FeatureStore.create(url, num_rows=4, arrays=specs, attrs={"backbone": "test"}, storage_options=options, keys=KEYS)
    features = np.arange(4 * 2 * 3 * 4, dtype=np.float32).reshape(4, 2, 3, 4)
    store.write_rows(0, {"features": features, "image": np.full((4, 6, 8, 3), 7, np.uint8)})
    store.commit_shard(0, sh.index_table([0, 1], keys=KEYS))
    store.commit_shard(1, sh.index_table([2, 3], errors=[2], reason="duplicate key, first seen in shard 0", keys=KEYS))
    store.write_report({"status": "complete"})
    store.acquire_lock("run-a")
    return store


def test_zarr_xarray_and_dask_open_the_store_without_a_warning(location):
    url, options = location
    store = _full_store(url, options)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        group = zarr.open_group(url, mode="r", storage_options=options)
        members = dict(group.members(max_depth=None))  # descends into the _featup sub-group too
        np.testing.assert_array_equal(group["features"][1], store.array("features")[1])
        ds = xr.open_zarr(url, consolidated=False, storage_options=options)
        tree = xr.open_datatree(url, engine="zarr", consolidated=False, storage_options=options)
        lazy = da.from_zarr(url, component="features", storage_options=options)
        assert lazy.shape == (4, 2, 3, 4) and float(lazy.sum().compute()) == float(store.array("features")[:].sum())
    assert {"features", "image", "sample", "_featup", "_featup/index", "_featup/commits", "_featup/run"} == set(members)
    assert set(ds.data_vars) == {"features", "image"} and list(ds["sample"].values) == KEYS
    assert set(tree.children) == {"_featup"}
    store.release_lock()


def test_sel_by_key_returns_that_row(location):
    url, options = location
    store = _full_store(url, options)
    ds = xr.open_zarr(url, consolidated=False, storage_options=options)
    np.testing.assert_array_equal(ds.sel(sample="eel")["features"].values, store.array("features")[3])
    assert ds.sel(sample="dog")["features"].shape == (2, 2, 3, 4)  # duplicates stay: the index says which row is valid
    assert store.sample_keys() == KEYS
    store.release_lock()


def test_side_files_live_in_the_featup_sub_group(tmp_path):
    url = str(tmp_path / "s.zarr")
    store = _full_store(url, None)
    found = sorted(os.path.relpath(os.path.join(d, f), url) for d, _, fs in os.walk(url) for f in fs
                   if not f.startswith(".") and f != "zarr.json" and "/c/" not in os.path.join(d, f) + "/")
    assert found == ["_featup/commits/shard-000000.json", "_featup/commits/shard-000001.json",
                     "_featup/index/shard-000000.parquet", "_featup/index/shard-000001.parquet",
                     "_featup/run/lock.json", "_featup/run/report.json"]
    assert store.report_url == f"{url}/_featup/run/report.json"
    assert sorted(os.listdir(url)) == ["_featup", "features", "image", "sample", "zarr.json"]
    meta = json.loads(open(f"{url}/zarr.json").read())["attributes"]["featup_store"]
    assert meta["format"] == STORE_FORMAT == 2 and meta["keys"] == "sample"
    store.release_lock()


def test_keys_must_be_one_string_per_row(tmp_path):
    spec = [ArraySpec("features", (1, 2, 2), "float16", ("channel", "y", "x"))]
    with pytest.raises(ConfigError, match="expected 3 strings"):
        FeatureStore.create(str(tmp_path / "a.zarr"), num_rows=3, arrays=spec, attrs={}, keys=["a", "b"])
    with pytest.raises(ConfigError, match="expected 2 strings"):
        FeatureStore.create(str(tmp_path / "b.zarr"), num_rows=2, arrays=spec, attrs={}, keys=["a", 2])
    unnamed = FeatureStore.create(str(tmp_path / "c.zarr"), num_rows=2, arrays=spec, attrs={})
    assert unnamed.sample_keys() == ["", ""]  # keys not given: "" (unknown)
    empty = FeatureStore.create(str(tmp_path / "d.zarr"), num_rows=0, arrays=spec, attrs={}, keys=[])
    assert empty.sample_keys() == [] and empty.num_rows == 0


def test_a_format_1_store_reads_as_before(tmp_path):
    url = str(tmp_path / "old.zarr")
    data = sh.format1_store(url, shards=((0, 1, 2), (3, 4)), errors=(1,), report={"status": "complete", "wall_s": 3})
    store = FeatureStore.open(url, mode="r")
    assert store.format == 1 and store.committed_shards() == {0, 1} and store.read_report()["wall_s"] == 3
    index = store.read_index()
    assert index["row"].to_pylist() == [0, 1, 2, 3, 4] and index["orientation"].to_pylist() == [0] * 5
    assert store.report_url == f"{url}/report.json"
    reader = open_features(url)
    assert reader.rows.tolist() == [0, 2, 3, 4] and reader.keys == ["k0", "k2", "k3", "k4"]
    np.testing.assert_array_equal(reader[1]["features"].numpy(), data["features"][2].astype(np.float16).astype(np.float32))
    assert store_summary(url)["samples"] == {"committed": 5, "ok": 4, "failed": 1, "not_committed": 0}


def test_a_format_1_store_is_never_resumed_into_the_new_layout(tmp_path):
    url = str(tmp_path / "old.zarr")
    sh.format1_store(url)
    before = sorted(os.path.relpath(os.path.join(d, f), url) for d, _, fs in os.walk(url) for f in fs)
    assert FeatureStore.exists(url)
    with pytest.raises(ConfigError, match="got format 1 .* never resumed .* pass --overwrite to start over, or write to a new"):
        FeatureStore.open(url, mode="r+")
    after = sorted(os.path.relpath(os.path.join(d, f), url) for d, _, fs in os.walk(url) for f in fs)
    assert after == before  # nothing written
    spec = [ArraySpec("features", (1, 2, 2), "float16", ("channel", "y", "x"))]
    new = FeatureStore.create(url, num_rows=1, arrays=spec, attrs={}, keys=["a"], overwrite=True)  # --overwrite replaces it
    assert new.format == 2 and not os.path.exists(f"{url}/index") and FeatureStore.open(url).committed_shards() == set()


def test_a_store_of_a_newer_format_is_refused_by_name(tmp_path):
    url = str(tmp_path / "new.zarr")
    sh.format1_store(url)
    meta = json.loads(open(f"{url}/zarr.json").read())
    meta["attributes"]["featup_store"]["format"] = 9
    with open(f"{url}/zarr.json", "w") as f:
        json.dump(meta, f)
    with pytest.raises(Exception, match="got format 9 .*newer featup"):
        FeatureStore.open(url, mode="r")


def test_the_reader_serves_no_error_row_and_keeps_orientations(tmp_path):
    url = str(tmp_path / "s.zarr")
    store = _full_store(url, None)  # row 2 repeats key "dog": an error row
    store.commit_shard(0, build_index_table([{"row": 0, "shard": "a.tar", "key": "cat", "width": 8, "height": 6,
                                              "status": "ok", "orientation": 6},
                                             {"row": 1, "shard": "a.tar", "key": "dog", "width": 8, "height": 6,
                                              "status": "ok"}]))
    reader = open_features(url)
    assert reader.rows.tolist() == [0, 1, 3] and reader.keys == ["cat", "dog", "eel"]
    assert reader.index["orientation"].to_pylist() == [6, 0, 0, 0]
    store.release_lock()
