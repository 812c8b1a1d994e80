"""The precompute driver: resume, errors, duplicates, encodings and S3 in process (``in_process=True``: the same driver
loop with one worker here, no Ray); actor count independence, a killed actor with a second job refused, and the actors'
CPUs on the run's real local Ray (2 CPUs)."""

import io
import json
import os
import signal
import sys
import threading
from pathlib import Path

import pytest

from tests.helpers import corpus
from tests.helpers import precompute as helpers

from pipeline.precompute.driver import run_precompute  # noqa: E402
from pipeline.store.features import FeatureStore, StoreLockedError  # noqa: E402

N_SHARDS, PER_SHARD = 4, 5


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_modules):
    """Four good shards (the tiny backbone module importable here; the Ray tests ask for ``ray_env`` too)."""
    root = tmp_path_factory.mktemp("scheduler")
    shards = corpus.make_good_shards(root / "in", n_shards=N_SHARDS, per_shard=PER_SHARD)
    return {"root": root, "shards": shards}


def _config(inputs, output, **overrides):
    """The tiny config run in process: the tests whose subject is not Ray."""
    return helpers.tiny_config(inputs, output, in_process=True, **overrides)


@pytest.fixture(scope="module")
def reference(env):
    """The store of the tiny config computed in-process by plain ShardWorker calls, shard after shard."""
    config = helpers.tiny_config(env["shards"], env["root"] / "reference.zarr")
    helpers.reference_store(config)
    return config.output


def _run(config):
    """run_precompute with captured output: (exit code, report, stderr text)."""
    out, err = io.StringIO(), io.StringIO()
    code = run_precompute(config, out=out, err=err, json_output=True)
    return code, json.loads(out.getvalue()), err.getvalue()


def _run_in_thread(config, outcome):
    def target():
        try:
            outcome["result"] = _run(config)
        except BaseException as e:  # reported by the test's assertions
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_in_process_one_actor_and_two_actors_write_the_same_store(env, ray_env, tmp_path):
    """One in-process run, then one run on 1 and on 2 Ray actors of the same config: the three stores are bit-identical,
    and each report says where it ran. (The in-process store is the reference here; the in-process runs of the other
    tests are compared with plain ShardWorker calls.)"""
    timm = dict(backbone="timm:vit_tiny_patch16_224", image_size=32, channels=8)  # the PCA travels to the actors
    expected = _config(env["shards"], tmp_path / "in-process.zarr", **timm)
    code, report, err = _run(expected)
    assert code == 0, err
    actors = report["actors"]
    assert actors["mode"] == "in-process" and actors["count"] == 1 and actors["started"] == 1 and actors["restarts"] == 0
    (worker,) = actors["per_actor"].values()
    assert worker["node_id"] == "local" and worker["torch_threads"] == 1 and worker["shards"] == N_SHARDS
    assert report["samples"] == {**report["samples"], "total": 20, "computed": 20, "ok": 20, "failed": 0}
    assert "precompute: 100%|" in err and "| 20/20 img [" in err and "shards 4/4" in err
    for actors in (1, 2):
        config = helpers.tiny_config(env["shards"], tmp_path / f"actors{actors}.zarr", actors=actors, **timm)
        ray_env.flag.touch()  # every forward sleeps: a loaded machine cannot let one actor finish before the other is up
        try:
            code, report, err = _run(config)
        finally:
            ray_env.flag.unlink()
        assert code == 0, err
        helpers.assert_same_store(expected.output, config.output)
        assert report["status"] == "complete" and report["shards"]["computed"] == N_SHARDS
        assert report["samples"] == {**report["samples"], "total": 20, "computed": 20, "ok": 20, "failed": 0}
        assert report["actors"]["mode"] == "ray" and len(report["actors"]["per_actor"]) == actors
        assert set(report["time_split_s"]) == {"read_wait", "decode_threads", "model", "write"}
        assert FeatureStore.open(config.output, mode="r").read_report() == report
        assert "precompute: 100%|" in err and "| 20/20 img [" in err and "shards 4/4" in err and "img/s" in err


def test_rerun_computes_only_uncommitted_shards(env, reference, tmp_path):
    config = _config(env["shards"], tmp_path / "partial.zarr")
    helpers.reference_store(config)
    store = FeatureStore.open(config.output)
    markers = {i: store.fs.cat_file(f"{store.root}/_featup/commits/shard-{i:06d}.json") for i in (0, 2)}
    for i in (1, 3):  # as if the job died while computing shards 1 and 3: uncommitted, rows half-written
        store.fs.rm_file(f"{store.root}/_featup/commits/shard-{i:06d}.json")
        store.write_rows(i * PER_SHARD, {"features": store.array("features")[0:2] + 7.0})

    code, report, err = _run(config)
    assert code == 0, err
    assert "2 of 4 shards already committed and skipped, 2 to compute" in err
    assert report["shards"]["skipped_committed"] == 2 and report["shards"]["computed"] == 2
    assert report["samples"]["computed"] == 2 * PER_SHARD
    assert {i: store.fs.cat_file(f"{store.root}/_featup/commits/shard-{i:06d}.json") for i in (0, 2)} == markers  # not redone
    helpers.assert_same_store(reference, config.output, same_urls=True)


def test_a_rerun_computes_again_the_shards_whose_committed_rows_lost_their_objects(env, reference, tmp_path):
    config = _config(env["shards"], tmp_path / "lost.zarr")
    helpers.reference_store(config)
    store = FeatureStore.open(config.output)
    markers = {i: store.fs.cat_file(f"{store.root}/_featup/commits/shard-{i:06d}.json") for i in (0, 2, 3)}
    for name, row in (("features", PER_SHARD + 1), ("lowres", PER_SHARD + 3)):  # two rows of shard 1 lose an object
        store.fs.rm_file(f"{store.root}/{name}/c/{row}/0/0/0")
    out, err = io.StringIO(), io.StringIO()
    assert run_precompute(_config(env["shards"], config.output, dry_run=True), out=out, err=err) == 0
    assert "3 shards committed, 1 to compute" in out.getvalue() and "a run computes those shards again" in err.getvalue()

    code, report, err = _run(config)
    assert code == 0, err
    assert (f"2 ok rows of 1 committed shards ({env['shards'][1]}) lost their stored objects and would read as zeros "
            f"(features row {PER_SHARD + 1} (sample s0001-00001); lowres row {PER_SHARD + 3} (sample s0001-00003)); "
            "those shards are computed again") in err
    assert report["shards"]["redone_for_lost_rows"] == [env["shards"][1]] and report["shards"]["computed"] == 1
    assert {i: store.fs.cat_file(f"{store.root}/_featup/commits/shard-{i:06d}.json") for i in (0, 2, 3)} == markers
    helpers.assert_same_store(reference, config.output, same_urls=True)


def test_a_second_job_is_refused_and_a_killed_actor_is_replaced_and_the_store_equals_a_clean_run(env, ray_env, reference, tmp_path):
    """One Ray run on 2 actors checks both: while it holds the store's lock a second job (resume or --overwrite) is
    refused, then an actor killed mid-shard is replaced, its shard redone, and the store equals a clean run; the lock is
    released at the end."""
    config = helpers.tiny_config(env["shards"], tmp_path / "killed.zarr", actors=2, batch_size=2)
    lock = tmp_path / "killed.zarr" / "_featup" / "run" / "lock.json"
    ray_env.flag.touch()
    outcome = {}
    try:
        thread = _run_in_thread(config, outcome)
        helpers.wait_for(lambda: lock.exists() or not thread.is_alive(), 180, "the first job's lock")
        assert thread.is_alive(), outcome
        with pytest.raises(StoreLockedError, match="expected no other job writing to it"):
            run_precompute(config, out=io.StringIO(), err=io.StringIO())
        with pytest.raises(StoreLockedError):
            run_precompute(helpers.tiny_config(env["shards"], config.output, overwrite=True), out=io.StringIO(), err=io.StringIO())
        victim = helpers.wait_for(helpers.busy_actor, 180, "an actor part-way through a shard")
        import ray

        os.kill(ray.get(victim.pid.remote()), signal.SIGKILL)
    finally:
        ray_env.flag.unlink()
    thread.join(120)
    assert "error" not in outcome, outcome.get("error")
    code, report, err = outcome["result"]
    assert code == 0, err  # the first job was not disturbed by the refused ones
    assert report["actors"]["restarts"] == 1 and report["shards"]["retries"] == 1
    assert "will be redone: its worker died" in err
    helpers.assert_same_store(reference, config.output, same_urls=True)
    assert not lock.exists()  # released at the end


def test_bad_inputs_are_recorded_and_the_job_goes_on(env, tmp_path):
    bad, expected = corpus.make_bad_shard(tmp_path / "in")
    truncated, _ = corpus.make_truncated_shard(tmp_path / "in")
    unreadable = corpus.make_unreadable_shard(tmp_path / "in")
    inputs = [bad, truncated, unreadable, env["shards"][0]]
    reference = helpers.tiny_config(inputs, tmp_path / "reference.zarr")
    helpers.reference_store(reference)
    config = _config(inputs, tmp_path / "bad.zarr")
    code, report, err = _run(config)
    assert code == 0, err
    helpers.assert_same_store(reference.output, config.output, same_urls=True)
    failed = sum(status == "error" for status in expected.values()) + 2  # + the truncated and unreadable shards' rows
    assert report["samples"]["failed"] == failed and report["samples"]["ok"] == report["samples"]["total"] - failed
    assert truncated in report["shards"]["read_errors"] and unreadable in report["shards"]["read_errors"]
    _, index = helpers.read_store(config.output)
    assert not [r for r in index if r["status"] == "ok" and expected.get(r["key"]) == "error"]


def test_exceeding_max_errors_stops_the_job_with_a_summary(env, tmp_path):
    bad, expected = corpus.make_bad_shard(tmp_path / "in")
    config = _config([bad, *env["shards"]], tmp_path / "errors.zarr", max_errors=3)
    code, report, err = _run(config)
    assert code == 1
    failed = sum(status == "error" for status in expected.values())
    assert report["status"] == "failed" and report["samples"]["failed_in_store"] == failed > 3
    assert f"{failed} failed samples exceed --max-errors 3" in err
    assert "above the pixel limit" in err  # the reasons are summarised
    assert 0 in FeatureStore.open(config.output, mode="r").committed_shards()  # what was done stays for a rerun


def test_s3_shards_in_and_s3_store_out(env, reference, tmp_path, s3_server):
    options = s3_server.storage_options
    shards = corpus.make_good_shards(s3_server.url("shards"), N_SHARDS, PER_SHARD, storage_options=options)
    output = s3_server.url("store") + "/features.zarr"
    config = _config(shards, output, storage_options=options)
    code, report, err = _run(config)
    assert code == 0, err
    assert report["samples"]["ok"] == N_SHARDS * PER_SHARD
    helpers.assert_same_store(reference, output, options_b=options, same_urls=False)


def test_duplicate_keys_are_failed_rows_naming_the_first_shard_and_never_served(env, tmp_path):
    from pipeline.store.reader import open_features

    rng = __import__("numpy").random.default_rng(7)
    first = corpus.write_shard(tmp_path / "in" / "a.tar", [corpus.good_sample(k, rng) for k in ("k1", "k2", "k3")])
    again = corpus.write_shard(tmp_path / "in" / "b.tar", [corpus.good_sample(k, rng) for k in ("k4", "k2", "k4")])
    config = _config([first, again], tmp_path / "dups.zarr", max_errors=None)
    code, report, _ = _run(config)
    assert code == 0 and report["samples"]["duplicate_keys"] == 2
    _, index = helpers.read_store(config.output)
    rows = {(r["shard"].rsplit("/", 1)[-1], r["key"], r["row"]): (r["status"], r["error"]) for r in index}
    assert rows[("b.tar", "k2", 4)] == ("error", f"duplicate key, first seen in shard {first}")
    assert rows[("b.tar", "k4", 5)] == ("error", f"duplicate key, first seen in shard {again}")
    assert rows[("b.tar", "k4", 3)][0] == "ok" and rows[("a.tar", "k2", 1)][0] == "ok"
    served = [open_features(config.output)[i]["key"] for i in range(len(open_features(config.output)))]
    assert sorted(served) == ["k1", "k2", "k3", "k4"]


def test_a_job_in_which_no_sample_succeeded_fails_with_its_reasons(env, tmp_path):
    broken = [corpus.write_shard(tmp_path / "in" / f"broken-{i}.tar", [{"__key__": f"b{i}-{j}", "jpg": b"not an image"}
                                                                        for j in range(3)]) for i in range(2)]
    config = _config(broken, tmp_path / "none.zarr", max_errors=1.0)  # the limit would allow every failure
    code, report, err = _run(config)
    assert code == 1 and report["status"] == "failed"
    assert report["failure"] == f"no sample succeeded: all {report['samples']['total']} samples failed"
    assert "most common reasons:" in err and "featup: error: no sample succeeded" in err


def test_the_default_error_limit_stops_a_mostly_broken_job(env, tmp_path):
    bad, expected = corpus.make_bad_shard(tmp_path / "in")
    from pipeline.precompute.config import DEFAULT_MAX_ERRORS, PrecomputeConfig

    assert PrecomputeConfig(inputs=("a.tar",), output="o.zarr", backbone="dino16").max_errors == DEFAULT_MAX_ERRORS == 0.05
    config = _config([bad, env["shards"][0]], tmp_path / "default-limit.zarr", max_errors=DEFAULT_MAX_ERRORS)
    code, report, err = _run(config)
    assert code == 1 and "failed samples exceed --max-errors 0.05" in report["failure"]


def test_the_lock_is_renewed_from_the_moment_it_is_taken(tmp_path):
    import time

    from pipeline.precompute.heartbeat import LockHeartbeat
    from tests.helpers.store import coordinate_store

    url = str(tmp_path / "beat.zarr")
    coordinate_store(url)
    store = FeatureStore.open(url)
    store.acquire_lock("run-1")
    lock_path = Path(store.root) / "_featup" / "run" / "lock.json"
    before = json.loads(lock_path.read_text())["heartbeat"]
    with LockHeartbeat(store, interval_s=0.05) as beat:
        time.sleep(0.4)
    assert beat.error is None and json.loads(lock_path.read_text())["heartbeat"] > before
    store.release_lock()


def test_one_actor_by_default_uses_every_cpu_of_the_local_ray_for_torch(env, ray_env, tmp_path):
    config = helpers.tiny_config(env["shards"][:1], tmp_path / "threads.zarr", cpus_per_actor=None)
    code, report, _ = _run(config)
    (actor,) = report["actors"]["per_actor"].values()
    assert code == 0 and actor["torch_threads"] == 2  # the test's local Ray has 2 CPUs, all given to the one actor
    assert actor["write_threads"] == 2  # and its rows are encoded and written on 2 threads
    assert report["config"]["cpus_per_actor"] == 2.0


@pytest.mark.parametrize("encoding", [dict(codec="blosc-lz4"), dict(quantize="int8"), dict(keep_bits=7, dtype="float16")])
def test_encoded_stores_read_back_as_float_features_close_to_the_float32_store(env, reference, tmp_path, encoding):
    import numpy as np
    import torch

    from pipeline.store.reader import open_features

    config = _config(env["shards"], tmp_path / "encoded.zarr", **encoding)
    code, report, _ = _run(config)
    assert code == 0
    exact, encoded = open_features(reference), open_features(config.output)
    assert len(encoded) == len(exact) and encoded.shapes["features"][0] == exact.shapes["features"][0]
    assert "features_scale" not in encoded.array_names  # int8 companions are read through the features
    for i in range(len(exact)):
        truth, got = exact[i]["features"], encoded[i]["features"]
        assert got.dtype == torch.float32
        error = float((got - truth).norm() / truth.norm())
        assert error <= (0.0 if "codec" in encoding else 0.01), (i, error)
    loader = torch.utils.data.DataLoader(encoded.torch_dataset(crop=16), batch_size=4, num_workers=2)
    assert sum(batch["features"].shape[0] for batch in loader) == len(exact)  # decoded in DataLoader workers too
    stored = FeatureStore.open(config.output, mode="r")
    if "quantize" in encoding:
        assert stored.array("features").dtype == np.uint8 and "formula" in stored.array("features").attrs
    assert {k: stored.attrs[k] for k in ("codec", "quantize", "keep_bits")} == {
        "codec": encoding.get("codec", "auto"), "quantize": encoding.get("quantize"), "keep_bits": encoding.get("keep_bits")}


def test_a_resume_with_another_encoding_is_refused_naming_it(env, tmp_path):
    from featup.errors import ConfigError

    config = _config(env["shards"][:1], tmp_path / "codec.zarr", quantize="int8")
    assert _run(config)[0] == 0
    with pytest.raises(ConfigError, match='quantize: store has "int8", this run has null'):
        run_precompute(_config(env["shards"][:1], config.output), out=io.StringIO(), err=io.StringIO())


def test_materialize_after_a_killed_actor_equals_the_full_store_of_the_same_command(env, ray_env, tmp_path):
    """One Ray run of featup materialize (2 actors, one killed mid-shard): the full store precompute writes, within 1e-4."""
    from pipeline.precompute.materialize import materialize_config, run_materialize

    per_shard = 8  # at 48 px an image takes about 45 ms: a shard takes long enough to be caught part-way
    shards = corpus.make_good_shards(tmp_path / "in", n_shards=2, per_shard=per_shard)
    command = dict(image_size=48, save_lowres=False, labels=("seg.png",))
    full = helpers.tiny_config(shards, tmp_path / "full.zarr", **command)
    compact = helpers.tiny_config(shards, tmp_path / "compact.zarr", compact=True, **command)
    helpers.reference_store(full)
    helpers.reference_store(compact)
    config = materialize_config(compact.output, str(tmp_path / "materialized.zarr"), actors=2, batch_size=1,
                                cpus_per_actor=1.0, device="cpu", kernel_backend="eager")
    outcome = {}

    def materialize():
        out, err = io.StringIO(), io.StringIO()
        outcome["result"] = (run_materialize(config, out=out, err=err, json_output=True), out.getvalue(), err.getvalue())

    thread = threading.Thread(target=materialize, daemon=True)
    thread.start()
    victim = helpers.wait_for(lambda: helpers.busy_actor(samples_per_shard=per_shard) or not thread.is_alive(), 180,
                              "a materialize actor part-way through a shard")
    assert victim is not True, f"the job ended before an actor was caught part-way through a shard: {outcome}"
    import ray

    os.kill(ray.get(victim.pid.remote()), signal.SIGKILL)
    thread.join(120)
    code, out, err = outcome["result"]
    report = json.loads(out)
    assert code == 0, err
    assert report["actors"]["restarts"] == 1 and report["shards"]["retries"] == 1 and "will be redone" in err
    assert report["samples"]["ok"] == 2 * per_shard and report["config"]["materialize_from"] == compact.output
    helpers.assert_materialized(full.output, config.output)
