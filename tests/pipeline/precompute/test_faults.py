"""Whole precompute jobs on S3 through a fault-injecting TCP proxy in front of moto, and a worker killed mid-write.

Faults are real: the proxy resets connections, refuses them for a set time, or answers 503 SlowDown; the worker
is SIGKILLed. Every job either rides the fault out (exit 0, store equal to a clean run) or stops with one clear
message, and then the rerun of the same command completes it, equal to a clean run. Storage is the subject of the
ride-out and of the reruns, which run in process (``in_process=True``); the job stopped by a long outage runs as a user's
command on its own Ray (the storage error comes back through a Ray task), and the killed worker is a Ray actor.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
from urllib.parse import urlparse

import pytest

from pipeline.precompute.driver import run_precompute
from pipeline.store.features import FeatureStore
from tests.helpers import corpus
from tests.helpers import precompute as helpers
from tests.helpers.faultproxy import FaultProxy

N_SHARDS, PER_SHARD = 4, 4
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_modules):
    """The tiny backbone module (importable here) and a slow flag path for child jobs."""
    root = tmp_path_factory.mktemp("faults")
    return {"root": root, "flag": root / "slow.flag", "modules": tiny_modules}


@pytest.fixture
def proxy(s3_server):
    endpoint = urlparse(s3_server.endpoint_url)
    with FaultProxy(endpoint.hostname, endpoint.port) as proxy:
        yield proxy


def _through(s3_server, proxy) -> dict:
    """Storage options that reach moto through the proxy; botocore tries once, the job's retry policy does the rest."""
    return {**s3_server.storage_options, "client_kwargs": {"endpoint_url": proxy.url},
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 5}}


def _job(s3_server, name):
    """Shards on S3, the store's URL, and the clean reference store computed in-process without faults."""
    options = s3_server.storage_options
    shards = corpus.make_good_shards(s3_server.url(f"{name}-in"), N_SHARDS, PER_SHARD, storage_options=options)
    reference = helpers.tiny_config(shards, s3_server.url(f"{name}-ref") + "/ref.zarr", storage_options=options, batch_size=2)
    helpers.reference_store(reference)
    return shards, s3_server.url(f"{name}-out") + "/out.zarr", reference.output


def _commits(url: str, options: dict) -> int:
    return len(FeatureStore.open(url, options, mode="r").committed_shards()) if FeatureStore.exists(url, options) else 0


def test_a_job_on_s3_rides_out_an_outage_resets_and_slowdowns(env, s3_server, proxy):
    """In process: the worker reading and writing, the driver renewing its lock, all through the proxy."""
    shards, output, reference = _job(s3_server, "ride")
    config = helpers.tiny_config(shards, output, storage_options=_through(s3_server, proxy), batch_size=2, in_process=True,
                                 io_retry_seconds=60)
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(code=run_precompute(config, out=io.StringIO(), err=io.StringIO())))
    with helpers.slow_forwards():  # every forward sleeps: the faults land mid-job
        thread.start()
        helpers.wait_for(lambda: _commits(output, s3_server.storage_options) >= 1 or not thread.is_alive(), 120, "a first commit")
        proxy.outage(6.0)  # the worker reading and writing, the driver renewing its lock: all refused for 6 s
        helpers.wait_for(lambda: not proxy.in_outage(), 10, "the end of the outage")
        proxy.reset_next(3, after_bytes=2048)
        proxy.slowdown(4)
    thread.join(300)
    assert outcome.get("code") == 0
    assert proxy.injected >= 3  # the resets and slowdowns met real requests
    helpers.assert_same_store(reference, output, options_a=s3_server.storage_options, options_b=s3_server.storage_options)


def test_an_outage_longer_than_the_budget_stops_with_one_message_and_the_rerun_completes(env, s3_server, proxy, tmp_path):
    shards, output, reference = _job(s3_server, "long")
    options = _through(s3_server, proxy)
    args = [*shards, "--output", output, "--backbone", helpers.TINY_BACKBONE, "--weights", "random", "--image-size",
            str(helpers.IMAGE_SIZE), "--dtype", "float32", "--kernel-backend", "eager", "--batch-size", "2",
            "--decode-threads", "1", "--device", "cpu", "--save-lowres", "--cpus-per-actor", "1", "--max-errors", "none",
            "--io-retry-seconds", "2", *_option_flags(options)]
    child_env = {**os.environ, **s3_server.env, "PYTHONPATH": os.pathsep.join([str(env["modules"]), ROOT]),
                 helpers.SLOW_FLAG_ENV: str(env["flag"]), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env["flag"].touch()
    log = tmp_path / "job.log"
    with open(log, "wb") as log_file:
        job = subprocess.Popen([sys.executable, "-m", "jobs.cli", "precompute", *args], env=child_env, stdout=log_file,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        helpers.wait_for(lambda: _commits(output, s3_server.storage_options) >= 1 or job.poll() is not None, 180, "a first commit")
        env["flag"].unlink()
        proxy.outage(600)  # far longer than the 2 s budget
        assert job.wait(240) == 1
    finally:
        proxy.clear()
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    text = log.read_text()
    # Ray's worker log lines share the file (and may share a line): find the error wherever its line starts.
    errors = [line[line.index("featup: error:"):] for line in text.splitlines() if "featup: error:" in line]
    assert len(errors) == 1 and "storage unavailable for 2 s" in errors[0] and "rerun the same command to resume" in errors[0], text[-6000:]
    assert "Traceback" not in text
    stored = FeatureStore.open(output, s3_server.storage_options, mode="r").attrs["command_line"]  # the options' secret: masked
    assert "secret=***" in stored and "key=***" in stored and not [a for a in stored if options["secret"] in a]

    rerun = helpers.tiny_config(shards, output, storage_options=options, batch_size=2, io_retry_seconds=30, in_process=True)
    assert run_precompute(rerun, out=io.StringIO(), err=io.StringIO()) == 0  # takes over the dead job's lock, computes the rest
    helpers.assert_same_store(reference, output, options_a=s3_server.storage_options, options_b=s3_server.storage_options)


def test_a_worker_killed_while_it_writes_a_large_row_is_redone_equal(env, ray_env, tmp_path):
    import ray

    shards = corpus.make_good_shards(tmp_path / "in", 2, 3, size=(256, 256))
    reference = helpers.tiny_config(shards, tmp_path / "ref.zarr", image_size=256, batch_size=1, save_image=True)
    helpers.reference_store(reference)
    config = helpers.tiny_config(shards, tmp_path / "out.zarr", image_size=256, batch_size=1, save_image=True, actors=1)
    outcome: dict = {}
    ray_env.flag.touch()
    try:
        thread = threading.Thread(target=lambda: outcome.update(
            code=run_precompute(config, out=io.StringIO(), err=io.StringIO(), json_output=True)))
        thread.start()
        actor = helpers.wait_for(helpers.busy_actor, 180, "an actor part-way through a shard")
        written = tmp_path / "out.zarr" / "features" / "c"
        helpers.wait_for(lambda: written.exists() and any(written.rglob("*")), 180, "the first rows written")
        os.kill(ray.get(actor.pid.remote()), signal.SIGKILL)  # between (or inside) the writes of its rows
    finally:
        ray_env.flag.unlink()
    thread.join(300)
    assert outcome.get("code") == 0
    report = FeatureStore.open(config.output, mode="r").read_report()
    assert report["actors"]["restarts"] >= 1 and report["shards"]["retries"] >= 1
    helpers.assert_same_store(reference.output, config.output)


def _option_flags(options: dict, prefix: str = "") -> list[str]:
    """``--storage-option KEY=VALUE`` flags for nested storage options."""
    flags = []
    for key, value in options.items():
        if isinstance(value, dict):
            flags += _option_flags(value, f"{prefix}{key}.")
        else:
            flags += ["--storage-option", f"{prefix}{key}={json.dumps(value) if isinstance(value, bool) else value}"]
    return flags
