"""Tests of pipeline.store.features on real Zarr v3 stores: local folders and s3:// on a moto server (127.0.0.1)."""

import json
import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest
import zarr

import pipeline.store.features as store_module
from featup.errors import ConfigError, InputError
from pipeline.store.index import build_index_table
from pipeline.runtime.retry import RetryPolicy
from pipeline.store.features import ZSTD_LEVEL, ArraySpec, FeatureStore, StoreLockedError, check_compatible
from pipeline.store.lock import lock_payload

C, H, W, LR = 3, 4, 4, 2
SPECS = (
    ArraySpec("features", (C, H, W), "float16", ("channel", "y", "x")),
    ArraySpec("lowres", (C, LR, LR), "float32", ("channel", "lr_y", "lr_x")),
    ArraySpec("image", (H, W, 3), "uint8", ("y", "x", "rgb")),
)
ATTRS = {"backbone": "dino16", "weights": "random", "image_size": [H, W], "dtype": "float16", "channels": None}


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path):
    """(url, storage_options) of a fresh store location, local or on the moto S3 server."""
    if request.param == "local":
        return str(tmp_path / "store.zarr"), None
    s3 = request.getfixturevalue("s3_server")
    return s3.url("store"), s3.storage_options


@pytest.fixture
def local_url(tmp_path):
    return str(tmp_path / "store.zarr")


def _create(url, storage_options=None, num_rows=5, **kw) -> FeatureStore:
    return FeatureStore.create(url, num_rows=num_rows, arrays=SPECS, attrs=ATTRS, storage_options=storage_options, **kw)


def _rows(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "features": rng.standard_normal((n, C, H, W)).astype(np.float32),
        "lowres": rng.standard_normal((n, C, LR, LR)).astype(np.float32),
        "image": rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8),
    }


def _index(rows, errors=()) -> pa.Table:
    return build_index_table([
        {"row": r, "shard": "s3://b/train-000000.tar", "key": f"k{r}", "width": 10 + r, "height": 20,
         "status": "error" if r in errors else "ok", "error": "image is truncated" if r in errors else ""}
        for r in rows
    ])


def test_write_rows_then_read_back(location):
    url, options = location
    store = _create(url, options)
    data = _rows(2, seed=0)
    store.write_rows(1, data)
    again = FeatureStore.open(url, storage_options=options, mode="r")
    assert again.num_rows == 5 and again.attrs == ATTRS and again.array_names == ("features", "lowres", "image")
    for name, value in data.items():
        stored = again.array(name)[:]
        assert stored.shape == (5, *value.shape[1:]) and stored.dtype == np.dtype(dict((s.name, s.dtype) for s in SPECS)[name])
        np.testing.assert_array_equal(stored[1:3], value.astype(stored.dtype))
        assert not stored[[0, 3, 4]].any()  # unwritten rows hold the fill value 0


def test_layout_is_one_row_per_chunk_with_dimension_names_and_zstd(local_url):
    store = _create(local_url)
    store.write_rows(3, _rows(2, seed=1))
    features = store.array("features")
    assert features.chunks == (1, C, H, W)
    assert features.metadata.dimension_names == ("sample", "channel", "y", "x")
    assert store.array("lowres").metadata.dimension_names == ("sample", "channel", "lr_y", "lr_x")
    assert [type(c).__name__ for c in features.compressors] == ["ZstdCodec"] and features.compressors[0].level == ZSTD_LEVEL
    chunks = f"{local_url}/features/c"
    chunk_files = sorted(os.path.relpath(os.path.join(d, f), chunks) for d, _, fs in os.walk(chunks) for f in fs)
    assert chunk_files == ["3/0/0/0", "4/0/0/0"]  # each written row is its own object: one writer per object


@pytest.mark.filterwarnings("error")
def test_plain_zarr_opens_the_store(location):
    url, options = location
    store = _create(url, options)
    data = _rows(5, seed=2)
    store.write_rows(0, data)
    store.commit_shard(0, _index(range(5)))
    store.write_report({"samples": 5})
    group = zarr.open_group(url, mode="r", storage_options=options)
    assert set(group.array_keys()) == {"features", "lowres", "image", "sample"}  # format 2: the keys coordinate
    assert group.attrs["featup"] == ATTRS
    np.testing.assert_array_equal(group["features"][:], data["features"].astype(np.float16))
    np.testing.assert_array_equal(group["image"][2], data["image"][2])


def test_commit_and_read_index_round_trip_sorted_by_row(location):
    url, options = location
    store = _create(url, options)
    assert store.committed_shards() == set() and store.read_index().num_rows == 0
    store.commit_shard(1, _index([3, 4], errors=[4]))
    store.commit_shard(0, _index([2, 0, 1]))
    assert store.committed_shards() == {0, 1}
    index = FeatureStore.open(url, storage_options=options, mode="r").read_index()
    assert index["row"].to_pylist() == [0, 1, 2, 3, 4]
    assert index["key"].to_pylist() == ["k0", "k1", "k2", "k3", "k4"]
    assert index["width"].to_pylist() == [10, 11, 12, 13, 14]
    assert index["status"].to_pylist() == ["ok", "ok", "ok", "ok", "error"]
    assert index["error"].to_pylist()[4] == "image is truncated"


def test_index_file_without_marker_is_not_committed(local_url, monkeypatch):
    store = _create(local_url)
    store.commit_shard(0, _index([0, 1]))
    calls = []
    real_put = store_module.put_atomic

    def crash_before_marker(fs, path, data):
        calls.append(path.rsplit("/", 2)[-2:])
        if "commits" in path:
            raise KeyboardInterrupt("killed between the index file and the marker")
        real_put(fs, path, data)

    monkeypatch.setattr(store_module, "put_atomic", crash_before_marker)
    with pytest.raises(KeyboardInterrupt):
        store.commit_shard(1, _index([2, 3]))
    assert calls == [["index", "shard-000001.parquet"], ["commits", "shard-000001.json"]]  # the marker comes last
    assert os.path.exists(f"{local_url}/_featup/index/shard-000001.parquet")
    assert store.committed_shards() == {0}
    assert store.read_index()["row"].to_pylist() == [0, 1]


def test_marker_never_exists_without_its_index_file(local_url, monkeypatch):
    store = _create(local_url)
    real_put = store_module.put_atomic

    def fail_index_write(fs, path, data):
        if "index" in path:
            raise OSError("disk full")
        real_put(fs, path, data)

    monkeypatch.setattr(store_module, "put_atomic", fail_index_write)
    with pytest.raises(OSError, match="disk full"):
        store.commit_shard(0, _index([0, 1]))
    monkeypatch.undo()
    with pytest.raises(InputError, match="ok"):
        store.commit_shard(1, build_index_table([{"row": 2, "shard": "x", "key": "k", "width": 1, "height": 1,
                                                  "status": "error", "error": "bad"}]).set_column(5, "status", [["ok"]]))
    assert store.committed_shards() == set()
    assert not [f for f in os.listdir(f"{local_url}/_featup/commits") if f.startswith("shard-")]
    leftovers = [f for _, _, fs in os.walk(local_url) for f in fs if ".tmp-" in f]
    assert leftovers == []


def test_report_round_trip(location):
    url, options = location
    store = _create(url, options)
    assert store.read_report() is None
    store.write_report({"samples": 5, "throughput": 12.5, "actors": [{"id": 0, "images_per_s": 6.0}]})
    assert FeatureStore.open(url, storage_options=options).read_report()["actors"][0]["images_per_s"] == 6.0


def test_second_run_is_refused_while_the_lock_is_live(location):
    url, options = location
    first, second = _create(url, options), FeatureStore.open(url, storage_options=options)
    assert first.acquire_lock("run-a") is None
    with pytest.raises(StoreLockedError, match="run run-a"):
        second.acquire_lock("run-b")
    assert first.acquire_lock("run-a") is None  # the same run may take its lock again (resume in the same run)
    first.release_lock()
    assert second.acquire_lock("run-b") is None


def test_stale_lock_is_taken_over_and_the_old_owner_learns_it(location):
    url, options = location
    # a short retry budget: the old run's lock records the 60 s window (a default budget of 120 s records 150 s)
    old, new = _create(url, options, retry=RetryPolicy(budget_s=2)), FeatureStore.open(url, storage_options=options)
    old.acquire_lock("run-old")
    lock = json.loads(old.fs.cat_file(old._path("lock.json")))
    old.fs.pipe_file(old._path("lock.json"), json.dumps({**lock, "heartbeat": time.time() - 120}).encode())
    taken = new.acquire_lock("run-new", stale_after_s=60)
    assert taken["run_id"] == "run-old" and "no heartbeat for 120 s" in taken["stale_reason"]
    with pytest.raises(StoreLockedError, match="run run-new"):
        old.heartbeat()
    old.release_lock()  # not its lock any more: left alone
    assert json.loads(new.fs.cat_file(new._path("lock.json")))["run_id"] == "run-new"


def test_lock_of_a_dead_process_on_this_host_is_taken_over(local_url):
    store = _create(local_url)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    lock = {**lock_payload("run-killed"), "pid": int(dead.stdout)}  # fresh heartbeat, process gone
    store.fs.pipe_file(store._path("lock.json"), json.dumps(lock).encode())
    taken = store.acquire_lock("run-rerun")
    assert taken["run_id"] == "run-killed" and "gone" in taken["stale_reason"]


def test_heartbeat_refreshes_the_lock(local_url):
    store = _create(local_url)
    store.acquire_lock("run-a")
    before = json.loads(store.fs.cat_file(store._path("lock.json")))
    time.sleep(0.01)
    store.heartbeat()
    after = json.loads(store.fs.cat_file(store._path("lock.json")))
    assert after["heartbeat"] > before["heartbeat"] and after["acquired"] == before["acquired"]
    store.release_lock()
    assert not os.path.exists(store._path("lock.json"))


def test_create_refuses_an_existing_store_without_overwrite(local_url):
    _create(local_url)
    with pytest.raises(ConfigError, match="rerun the same command to resume it, or pass --overwrite"):
        _create(local_url)


def test_overwrite_starts_a_new_store(location):
    url, options = location
    old = _create(url, options)
    old.write_rows(0, _rows(5, seed=3))
    old.commit_shard(0, _index(range(5)))
    old.write_report({"samples": 5})
    assert FeatureStore.open(url, storage_options=options).committed_shards() == {0}
    new = _create(url, options, num_rows=3, overwrite=True)
    again = FeatureStore.open(url, storage_options=options, mode="r")
    assert new.num_rows == again.num_rows == 3 and again.array("features").shape == (3, C, H, W)
    assert again.committed_shards() == set() and again.read_index().num_rows == 0 and again.read_report() is None
    assert not again.array("features")[:].any()


def test_overwrite_is_refused_while_a_run_holds_the_lock(local_url):
    store = _create(local_url)
    store.commit_shard(0, _index([0]))
    store.acquire_lock("run-a")
    with pytest.raises(StoreLockedError, match="run-a"):
        _create(local_url, overwrite=True)
    assert store.committed_shards() == {0}


def test_create_never_deletes_data_that_is_not_a_store(local_url):
    os.makedirs(local_url)
    with open(f"{local_url}/thesis.tex", "w") as f:
        f.write("precious")
    with pytest.raises(ConfigError, match="nothing was deleted"):
        _create(local_url, overwrite=True)
    with open(f"{local_url}/thesis.tex") as f:
        assert f.read() == "precious"
    assert not FeatureStore.exists(local_url)
    with pytest.raises(InputError, match="expected a FeatUp feature store"):
        FeatureStore.open(local_url)


def test_check_compatible_names_every_difference():
    new = {**ATTRS, "backbone": "vit", "image_size": (H, W), "channels": 16, "upsampler": "jbu"}
    del new["weights"]
    with pytest.raises(ConfigError) as info:
        check_compatible(ATTRS, new, ["backbone", "weights", "image_size", "dtype", "channels", "upsampler"])
    message = str(info.value)
    for part in ['backbone: store has "dino16", this run has "vit"', 'weights: store has "random", this run has (not set)',
                 "channels: store has null, this run has 16", 'upsampler: store has (not set), this run has "jbu"']:
        assert part in message
    assert "image_size" not in message and "dtype" not in message  # a tuple equals the list JSON stored
    check_compatible(ATTRS, {**ATTRS, "image_size": (H, W)}, list(ATTRS))


def test_check_compatible_takes_a_setting_missing_from_an_older_store_as_unset():
    check_compatible(ATTRS, {**ATTRS, "implicit": None}, [*ATTRS, "implicit"])  # added later, unused by this run
    with pytest.raises(ConfigError, match='implicit: store has \\(not set\\), this run has {"steps": 5}'):
        check_compatible(ATTRS, {**ATTRS, "implicit": {"steps": 5}}, [*ATTRS, "implicit"])


def test_write_rows_refuses_wrong_shapes_ranges_and_lossy_casts(local_url):
    store = _create(local_url)
    with pytest.raises(InputError, match=r"expected shape \(n, 3, 4, 4\), got \(1, 3, 4, 5\)"):
        store.write_rows(0, {"features": np.zeros((1, C, H, W + 1), np.float32)})
    with pytest.raises(InputError, match=r"within \[0, 5\)"):
        store.write_rows(4, _rows(2, seed=4))
    with pytest.raises(InputError, match="same number of rows"):
        store.write_rows(0, {"features": _rows(2, 5)["features"], "image": _rows(1, 5)["image"]})
    with pytest.raises(InputError, match="fit uint8"):
        store.write_rows(0, {"image": np.full((1, H, W, 3), 0.5, np.float32)})
    with pytest.raises(InputError, match="fit uint8"):
        store.write_rows(0, {"image": np.full((1, H, W, 3), 256, np.int64)})
    store.write_rows(0, {"image": np.full((1, H, W, 3), 255, np.int64)})
    assert (store.array("image")[0] == 255).all()


def test_rewriting_rows_replaces_them(local_url):
    store = _create(local_url)
    store.write_rows(0, _rows(2, seed=6))
    redo = {name: np.zeros_like(v) for name, v in _rows(2, seed=6).items()}  # a redone shard writes the same rows again
    store.write_rows(0, redo)
    assert not any(store.array(name)[:].any() for name in store.array_names)


def test_read_only_store_refuses_writes(local_url):
    _create(local_url)
    store = FeatureStore.open(local_url, mode="r")
    with pytest.raises(ConfigError, match="mode 'r\\+'"):
        store.commit_shard(0, _index([0]))
    with pytest.raises(ConfigError, match="mode 'r\\+'"):
        store.acquire_lock("run-a")


@pytest.mark.parametrize(
    "spec, words",
    [
        (ArraySpec("features", (C, H, W), "bfloat16", ("channel", "y", "x")), "bfloat16"),
        (ArraySpec("lowres", (C, 2, 2), "float16", ("channel", "y", "x")), "dimension y: expected size 4"),
        (ArraySpec("index", (C,), "float16", ("channel",)), "not in"),
        (ArraySpec("labels", (H, W), "uint8", ("y",)), "dims: expected 2 names"),
    ],
)
def test_create_refuses_bad_array_specs(local_url, spec, words):
    with pytest.raises(ConfigError, match=words):
        FeatureStore.create(local_url, num_rows=2, arrays=[SPECS[0], spec] if spec.name != "features" else [spec], attrs=ATTRS)


def test_store_pickles_as_a_reopen(local_url):
    store = _create(local_url)
    store.write_rows(0, _rows(1, seed=7))
    clone = pickle.loads(pickle.dumps(store))
    np.testing.assert_array_equal(clone.array("features")[:], store.array("features")[:])
    assert clone.mode == "r+" and FeatureStore.exists(local_url)


_COMMIT_IN_CHILD = """
import json, sys
from pipeline.store.index import build_index_table
from pipeline.store.features import FeatureStore
url, options, shard, rows = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
store = FeatureStore.open(url, storage_options=options)
store.commit_shard(shard, build_index_table([{"row": r, "shard": "t.tar", "key": f"k{r}", "width": 1, "height": 1,
                                              "status": "ok"} for r in rows]))
"""


def test_commits_of_another_process_are_seen(location):
    url, options = location
    driver = _create(url, options)
    driver.commit_shard(0, _index([0, 1]))
    assert driver.committed_shards() == {0} and driver.read_index().num_rows == 2  # listings now cached, if any
    subprocess.run([sys.executable, "-c", _COMMIT_IN_CHILD, url, json.dumps(options), "1", "[2, 3, 4]"], check=True,
                   cwd=os.path.dirname(os.path.dirname(store_module.__file__)))
    assert driver.committed_shards() == {0, 1}
    assert driver.read_index()["row"].to_pylist() == [0, 1, 2, 3, 4]


_ACQUIRE_AT = """
import sys, time
from featup.errors import FeatUpError
from pipeline.store.features import FeatureStore
store = FeatureStore.open(sys.argv[1])
time.sleep(max(0.0, float(sys.argv[3]) - time.time()))  # both processes ask for the lock at the same moment
try:
    store.acquire_lock(sys.argv[2])
    print("won")
    time.sleep(1.0)  # hold it while the other one decides
except FeatUpError as e:
    print("refused:", e)
"""


def test_two_jobs_starting_together_get_one_lock(local_url):
    _create(local_url)
    start = str(time.time() + 2.0)
    cwd = os.path.dirname(os.path.dirname(store_module.__file__))
    jobs = [subprocess.Popen([sys.executable, "-c", _ACQUIRE_AT, local_url, f"run-{i}", start], cwd=cwd, stdout=subprocess.PIPE,
                             text=True) for i in range(2)]
    outputs = sorted(job.communicate(timeout=30)[0].strip() for job in jobs)
    assert outputs[1] == "won" and outputs[0].startswith("refused:") and "expected no other job writing to it" in outputs[0]
