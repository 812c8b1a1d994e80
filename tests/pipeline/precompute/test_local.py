"""The in-process pool (``in_process=True``, ``--in-process``): a worker that cannot start or compute fails the job with
its error, and a job that ends mid-shard leaves that shard uncommitted. Its stores equal the Ray runs' (see
``test_driver.test_in_process_one_actor_and_two_actors_write_the_same_store``); no Ray here."""

import io
import json
import sys

import pytest

from tests.helpers import corpus
from tests.helpers import precompute as helpers

from pipeline.precompute.driver import open_store, run_precompute  # noqa: E402
from pipeline.store.features import FeatureStore  # noqa: E402

# Backbones that load and run on the driver's thread (the plan builds the model once) but not on the worker's.
THREAD_FAILING_SOURCE = '''
"""Tiny backbones that fail only on the in-process worker's thread (written by tests/pipeline/precompute/test_local.py)."""
import threading

from featup_tiny_net import tiny


def _on_worker():
    return threading.current_thread().name.startswith("featup-shard")


def at_start():
    if _on_worker():
        raise RuntimeError("the model cannot load here")
    return tiny()


def in_forward():
    net = tiny()
    forward = net.forward

    def checked(x):
        if _on_worker():
            raise RuntimeError("the model broke mid-shard")
        return forward(x)

    net.forward = checked
    return net
'''


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_modules):
    """Two good shards of three samples and the thread-failing backbones (importable here)."""
    root = tmp_path_factory.mktemp("local")
    (tiny_modules / "featup_thread_failing_net.py").write_text(THREAD_FAILING_SOURCE)
    return {"root": root, "shards": corpus.make_good_shards(root / "in", n_shards=2, per_shard=3)}


def _run(config):
    out, err = io.StringIO(), io.StringIO()
    code = run_precompute(config, out=out, err=err, json_output=True)
    return code, json.loads(out.getvalue()), err.getvalue()


def test_a_worker_that_cannot_start_or_compute_fails_the_job_with_its_error(env, tmp_path):
    """A constructor that raises stops the job at once (in this process it would fail the same way again); a shard that
    raises is retried like a Ray task's and, after 3 tries, stops the job naming it; nothing is committed."""
    start = helpers.tiny_config(env["shards"], tmp_path / "start.zarr", backbone="featup_thread_failing_net:at_start",
                                in_process=True)
    code, report, err = _run(start)
    assert code == 1 and report["status"] == "failed"
    assert report["failure"] == "the in-process worker failed to start: RuntimeError: the model cannot load here"
    assert report["actors"]["started"] == 1 and report["shards"]["computed"] == 0
    assert "featup: error: the in-process worker failed to start" in err

    broken = helpers.tiny_config(env["shards"], tmp_path / "broken.zarr", backbone="featup_thread_failing_net:in_forward",
                                 in_process=True)
    code, report, err = _run(broken)
    assert code == 1 and report["shards"]["retries"] == 3 and report["shards"]["computed"] == 0
    assert report["failure"] == (f"shard {env['shards'][0]} was tried 3 times and not committed; last time its worker failed "
                                 "(RuntimeError: the model broke mid-shard)")
    assert err.count(f"shard {env['shards'][0]} will be redone: its worker failed (RuntimeError: the model broke mid-shard)") == 2
    assert FeatureStore.open(broken.output, mode="r").committed_shards() == set()


def test_closing_the_pool_mid_shard_stops_the_shard_uncommitted_and_the_process_keeps_its_torch_threads(env, tmp_path):
    """What a job that stops early (a lost lock, Ctrl-C) does to the shard its worker is computing: a thread cannot be
    killed like a Ray actor, so the worker stops at its next sample and the shard is not committed. The worker computes
    on 1 torch thread (its --cpus-per-actor); the driver's thread keeps its own count."""
    import torch

    from pipeline.precompute.local import LocalPool
    from pipeline.precompute.plan import make_plan
    from pipeline.precompute.worker import ShardCancelled, ShardTask

    config = helpers.tiny_config(env["shards"], tmp_path / "closed.zarr", in_process=True, batch_size=1)
    plan = make_plan(config)
    store, _, projection, _ = open_store(plan, "run-1", sys.stderr)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pool = LocalPool(config, projection=projection, run_id="run-1")
        pool.fill(1)
        helpers.wait_for(lambda: pool.poll() or pool.idle(), 180, "the worker to be built")
        (slot,) = pool.idle()
        assert slot.info["torch_threads"] == 1 and slot.info["node_id"] == "local"
        with helpers.slow_forwards():
            pool.submit(slot, ShardTask(plan.shards[0], plan.offsets[0]))
            computing = slot.ref
            helpers.wait_for(lambda: slot.actor.progress() >= 1, 60, "the first sample computed")
            pool.close()
        assert isinstance(computing.exception(), ShardCancelled)
        assert store.committed_shards() == set() and pool.slots == []
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
        store.release_lock()
