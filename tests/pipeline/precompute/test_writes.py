"""Tests of pipeline.precompute.writes: rows written on a thread pool into real Zarr stores, local and s3:// (moto)."""

import threading
from types import SimpleNamespace

import numpy as np
import pytest

from featup.errors import InputError
from pipeline.precompute.writes import RowWriter
from pipeline.store.codecs import StorageCodec
from pipeline.store.features import ArraySpec, FeatureStore

ROWS, C, S = 12, 8, 32
SPECS = (
    ArraySpec("features", (C, S, S), "float16", ("channel", "y", "x"), spatial_axes=(1, 2)),
    ArraySpec("seg.png", (S, S), "uint8", ("y", "x"), spatial_axes=(0, 1)),
)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """An empty sharded store (16x16 tiles) of ROWS rows, local or on the moto S3 server."""
    if request.param == "local":
        url, options = str(tmp_path / "rows.zarr"), None
    else:
        s3 = request.getfixturevalue("s3_server")
        url, options = s3.url("rows"), s3.storage_options
    return FeatureStore.create(url, num_rows=ROWS, arrays=SPECS, attrs={}, storage_options=options,
                               codec=StorageCodec(tile=16))


def _batches(rng: np.random.Generator, rows: list[list[int]]) -> list[tuple[list[int], dict[str, np.ndarray]]]:
    return [(r, {"features": rng.standard_normal((len(r), C, S, S)).astype(np.float16),
                 "seg.png": rng.integers(0, 4, (len(r), S, S), dtype=np.uint8)}) for r in rows]


@pytest.mark.parametrize("threads", [0, 1, 4])
def test_every_row_of_every_batch_is_written_where_it_belongs(store, threads):
    batches = _batches(np.random.default_rng(threads), [[0, 1, 2, 3], [5, 4], [8, 9, 11]])  # out of order, with gaps
    result = SimpleNamespace(write_s=0.0)
    with RowWriter(store, threads) as writer:
        for rows, arrays in batches:
            writer.submit(result, rows, arrays)
            writer.wait(result)
        writer.wait(result, keep=0)
    for rows, arrays in batches:
        for name, value in arrays.items():
            np.testing.assert_array_equal(store.array(name)[rows], value)
    assert not store.array("features")[[6, 7, 10]].any()  # rows no batch named stay empty
    assert result.write_s > 0


def test_a_failed_write_is_raised_by_wait_and_the_other_rows_are_still_written(tmp_path):
    store = FeatureStore.create(str(tmp_path / "err.zarr"), num_rows=ROWS, arrays=SPECS[:1], attrs={})
    (rows, arrays), = _batches(np.random.default_rng(0), [[0, 1, ROWS]])  # row ROWS is past the end
    result = SimpleNamespace(write_s=0.0)
    with RowWriter(store, 2) as writer:
        writer.submit(result, rows, arrays)
        with pytest.raises(InputError, match=rf"rows within \[0, {ROWS}\)"):
            writer.wait(result, keep=0)
    np.testing.assert_array_equal(store.array("features")[:2], arrays["features"][:2])


class GatedStore:
    """A real store whose row writes wait until ``gate`` is set (to hold batches in flight)."""

    def __init__(self, store: FeatureStore) -> None:
        self.store, self.gate, self.started = store, threading.Event(), threading.Semaphore(0)

    def write_rows(self, start: int, arrays: dict) -> None:
        self.started.release()
        self.gate.wait()
        self.store.write_rows(start, arrays)


def test_wait_holds_the_model_back_until_at_most_one_batch_is_in_flight(tmp_path):
    gated = GatedStore(FeatureStore.create(str(tmp_path / "gate.zarr"), num_rows=ROWS, arrays=SPECS[:1], attrs={}))
    batches = [(rows, {"features": a["features"]}) for rows, a in _batches(np.random.default_rng(1), [[0, 1], [2, 3]])]
    result = SimpleNamespace(write_s=0.0)
    with RowWriter(gated, 4) as writer:
        writer.submit(result, *batches[0])
        writer.wait(result)  # one batch in flight: returns at once
        writer.submit(result, *batches[1])
        for _ in range(4):  # both batches' rows are being written concurrently, not one after the other
            assert gated.started.acquire(timeout=10)
        waiter = threading.Thread(target=writer.wait, args=(result,))
        waiter.start()
        waiter.join(timeout=0.5)
        assert waiter.is_alive()  # two batches in flight: the model's thread waits
        gated.gate.set()
        waiter.join(timeout=30)
        assert not waiter.is_alive()
        writer.wait(result, keep=0)
    assert result.write_s >= 0.4  # the time the model's thread was held counts as write time
    for rows, arrays in batches:
        np.testing.assert_array_equal(gated.store.array("features")[rows], arrays["features"])


def test_a_negative_thread_count_is_refused(tmp_path):
    with pytest.raises(ValueError, match="expected an integer >= 0, got -1"):
        RowWriter(None, -1)


def test_zero_rows_are_stored_and_read_back_as_zeros(tmp_path):
    store = FeatureStore.create(str(tmp_path / "zeros.zarr"), num_rows=2, arrays=SPECS[:1], attrs={}, codec=StorageCodec(tile=16))
    store.write_rows(0, {"features": np.ones((2, C, S, S), np.float16)})
    store.write_rows(1, {"features": np.zeros((1, C, S, S), np.float16)})  # a failed row zero-filled over an earlier write
    np.testing.assert_array_equal(store.array("features")[1], 0)
    np.testing.assert_array_equal(store.array("features")[0], 1)
