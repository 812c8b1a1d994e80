"""ShardWorker without Ray: rows land where the layout says, bad inputs are recorded, retried shards leave no stale rows."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import corpus
from tests.helpers import precompute as helpers

from pipeline.sources.decode import decode_sample  # noqa: E402
from pipeline.precompute.extract import FeatureExtractor  # noqa: E402
from pipeline.precompute.plan import BROKEN_KEY, make_plan  # noqa: E402
from pipeline.precompute.driver import open_store  # noqa: E402
from pipeline.sources.shards import iter_shard_samples  # noqa: E402
from pipeline.store.features import FeatureStore  # noqa: E402
from pipeline.precompute.worker import ShardTask, ShardWorker  # noqa: E402


@pytest.fixture(autouse=True)
def tiny_module(tmp_path, monkeypatch):
    """The tiny backbone importable in this process."""
    monkeypatch.syspath_prepend(str(helpers.write_tiny_module(tmp_path / "mods")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _decoded(config, url):
    """The shard's samples decoded independently of the worker, with the decode spec of a fresh plan."""
    spec = make_plan(config).spec
    return [decode_sample(raw, spec) for raw in iter_shard_samples(url)]


def test_rows_hold_each_samples_features_labels_and_image(tmp_path):
    shards = corpus.make_good_shards(tmp_path / "in", n_shards=2, per_shard=3, size=(40, 56))
    config = helpers.tiny_config(shards, tmp_path / "out.zarr", labels=("seg.png",), save_image=True)
    helpers.reference_store(config)
    arrays, index = helpers.read_store(config.output)

    extractor = FeatureExtractor(config)
    expected = [s for url in shards for s in _decoded(config, url)]
    assert [row["row"] for row in index] == list(range(6))
    assert [row["key"] for row in index] == [s.key for s in expected]
    assert all(row["status"] == "ok" and (row["width"], row["height"]) == (56, 40) for row in index)
    for row, sample in enumerate(expected):
        out = extractor(sample.image.unsqueeze(0))  # one image at a time: independent of the worker's batching
        np.testing.assert_allclose(arrays["features"][row], out["features"][0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(arrays["lowres"][row], out["lowres"][0], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(arrays["seg.png"][row], sample.labels["seg.png"])
        np.testing.assert_array_equal(arrays["image"][row], sample.image_uint8)
    assert arrays["features"].shape == (6, 16, 32, 32) and arrays["lowres"].shape == (6, 16, 4, 4)


def test_result_reports_counts_and_where_the_time_went(tmp_path):
    """The result's counts and time split; once the shard is returned, the worker reports no shard in flight."""
    shards = corpus.make_good_shards(tmp_path / "in", n_shards=1, per_shard=5)
    config = helpers.tiny_config(shards, tmp_path / "out.zarr")
    plan = make_plan(config)
    store, _, projection, _ = open_store(plan, "test", sys.stderr)
    worker = ShardWorker(config, projection=projection)
    result = worker.process_shard(ShardTask(plan.shards[0], 0))
    store.release_lock()
    assert worker.progress() == 0  # a kill now loses no shard: the fault tests pick only actors with progress
    assert (result.num_samples, result.num_ok, result.num_failed, result.reasons) == (5, 5, 0, {})
    assert result.model_s > 0 and result.decode_s > 0 and result.write_s > 0
    assert result.wall_s >= result.read_s + result.model_s + result.write_s
    assert store.committed_shards() == {0}


def test_bad_inputs_are_recorded_with_reasons_and_never_marked_ok(tmp_path):
    bad, expected = corpus.make_bad_shard(tmp_path / "in")
    truncated, truncated_ok = corpus.make_truncated_shard(tmp_path / "in")
    unreadable = corpus.make_unreadable_shard(tmp_path / "in")
    cut = corpus.make_damaged_shard(tmp_path / "in", "truncated-at-header")  # no end-of-archive marker
    good = corpus.make_good_shards(tmp_path / "in", n_shards=1, per_shard=2)
    config = helpers.tiny_config([bad, truncated, unreadable, cut.path, *good], tmp_path / "out.zarr")
    helpers.reference_store(config)
    arrays, index = helpers.read_store(config.output)

    by_shard = {}
    for row in index:
        by_shard.setdefault(row["shard"], []).append(row)
    statuses = {row["key"]: row["status"] for row in by_shard[bad]}
    assert statuses == expected
    for row in by_shard[bad]:
        if row["status"] == "error":
            assert corpus.BAD_REASONS[row["key"]] in row["error"]
    assert [(r["key"], r["status"]) for r in by_shard[truncated]] == [*truncated_ok.items(), (BROKEN_KEY, "error")]
    assert truncated in by_shard[truncated][-1]["error"] and "end of data" in by_shard[truncated][-1]["error"]
    assert [(r["key"], r["status"]) for r in by_shard[cut.path]] == [*((k, "ok") for k in cut.keys), (BROKEN_KEY, "error")]
    assert f"ends without it after {len(cut.keys)} samples" in by_shard[cut.path][-1]["error"]
    assert [(r["key"], r["status"]) for r in by_shard[unreadable]] == [(BROKEN_KEY, "error")]
    assert by_shard[unreadable][0]["error"]
    assert [r["status"] for r in by_shard[good[0]]] == ["ok", "ok"]
    failed = [r["row"] for r in index if r["status"] == "error"]
    valid = [r["row"] for r in index if r["status"] == "ok"]
    assert not arrays["features"][failed].any()  # no failed row carries features
    assert all(arrays["features"][r].any() for r in valid)
    assert not corpus.pickle_marker(tmp_path / "in").exists()  # nothing was unpickled


def test_a_retried_shard_leaves_no_stale_rows(tmp_path):
    bad, _ = corpus.make_bad_shard(tmp_path / "in")
    config = helpers.tiny_config([bad], tmp_path / "clean.zarr")
    helpers.reference_store(config)

    dirty = helpers.tiny_config([bad], tmp_path / "dirty.zarr")
    plan = make_plan(dirty)
    store, _, projection, _ = open_store(plan, "test", sys.stderr)
    ones = {s.name: np.ones((plan.num_rows, *s.shape_per_row), dtype=s.dtype) for s in plan.arrays}
    store.write_rows(0, ones)  # what a killed earlier attempt might have left in every row
    ShardWorker(dirty, projection=projection, torch_threads=1).process_shard(ShardTask(plan.shards[0], 0, attempt=2, clean=False))
    store.release_lock()
    helpers.assert_same_store(config.output, dirty.output, same_urls=True)


def test_seeded_random_weights_do_not_touch_the_global_generator(tmp_path):
    config = helpers.tiny_config(["unused.tar"], tmp_path / "out.zarr")
    state = torch.random.get_rng_state()
    first, second = ShardWorker(config), ShardWorker(config)
    assert torch.equal(state, torch.random.get_rng_state())
    for a, b in zip(first.extractor.backbone.state_dict().values(), second.extractor.backbone.state_dict().values()):
        assert torch.equal(a, b)


def test_store_is_opened_lazily_in_the_worker_process(tmp_path):
    shards = corpus.make_good_shards(tmp_path / "in", n_shards=1, per_shard=1)
    config = helpers.tiny_config(shards, tmp_path / "out.zarr")
    worker = ShardWorker(config)  # no store exists yet: construction must not need it
    assert worker._store is None
    plan = make_plan(config)
    store, *_ = open_store(plan, "test", sys.stderr)
    assert isinstance(worker.store(), FeatureStore) and worker.store() is worker.store()
    store.release_lock()
