"""Storage faults in the store on real parts: a store on moto's S3 behind a fault proxy rides out outages in every
operation, an outage longer than the budget ends with one clear error, and content errors are never retried."""

import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from featup.errors import ConfigError, InputError
from pipeline.runtime.retry import RetryPolicy, TransientIOError
from pipeline.store.features import ArraySpec, FeatureStore
from pipeline.store.reader import open_features
from tests.helpers import store as sh

SPECS = [ArraySpec("features", (2, 3, 3), "float16", ("channel", "y", "x"))]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
RIDE_OUT = RetryPolicy(budget_s=20, first_wait_s=0.2, max_wait_s=1)


@pytest.fixture
def proxy(s3_server):
    host, port = s3_server.endpoint_url.removeprefix("http://").split(":")
    proxy = sh.FaultProxy((host, int(port)))
    yield proxy
    proxy.close()


def _through(s3_server, proxy) -> dict:
    """Storage options reaching moto through ``proxy``, without botocore's own retries (the RetryPolicy does them)."""
    return {**s3_server.storage_options, "client_kwargs": {"endpoint_url": proxy.endpoint_url},
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 5}}


def _rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 2, 3, 3)).astype(np.float16)


def _outage(proxy, seconds: float) -> float:
    """Takes the endpoint down now and back up after ``seconds``; returns when it started (monotonic)."""
    proxy.down()
    threading.Timer(seconds, proxy.up).start()
    return time.monotonic()


def test_every_store_operation_rides_out_an_outage(s3_server, proxy):
    url, options = s3_server.url("faults"), _through(s3_server, proxy)
    data = _rows(4, seed=0)
    operations = [
        ("create", lambda: FeatureStore.create(url, num_rows=4, arrays=SPECS, attrs={"a": 1}, storage_options=options,
                                               keys=["k0", "k1", "k2", "k3"], retry=RIDE_OUT)),
        ("open", lambda: FeatureStore.open(url, options, retry=RIDE_OUT)),
        ("exists", lambda: FeatureStore.exists(url, options, retry=RIDE_OUT)),
        ("lock", lambda: store.acquire_lock("run-a")),
        ("write_rows", lambda: store.write_rows(0, {"features": data[:2]})),
        ("commit", lambda: store.commit_shard(0, sh.index_table([0, 1]))),
        ("write_rows again", lambda: store.write_rows(2, {"features": data[2:]})),
        ("commit again", lambda: store.commit_shard(1, sh.index_table([2, 3], errors=[3]))),
        ("committed_shards", lambda: store.committed_shards()),
        ("read_index", lambda: store.read_index()),
        ("write_report", lambda: store.write_report({"status": "complete"})),
        ("read_report", lambda: store.read_report()),
        ("heartbeat", lambda: store.heartbeat()),
        ("release", lambda: store.release_lock()),
    ]
    store, waited = None, {}
    for name, operation in operations:
        start = _outage(proxy, 1.5)
        result = operation()
        waited[name] = time.monotonic() - start
        if name in ("create", "open"):
            store = result
    assert all(w > 1.0 for w in waited.values()), waited  # each one met the outage and waited for the endpoint
    clean = FeatureStore.open(url, s3_server.storage_options, mode="r")
    np.testing.assert_array_equal(clean.array("features")[:], data)
    assert clean.committed_shards() == {0, 1} and clean.read_index()["status"].to_pylist() == ["ok", "ok", "ok", "error"]
    assert clean.read_report() == {"status": "complete"} and clean.lock_holder() is None and clean.sample_keys()[3] == "k3"


def test_the_reader_rides_out_an_outage(s3_server, proxy):
    url = s3_server.url("reader")
    sh.coordinate_store(url, s3_server.storage_options)
    reader = open_features(url, retry=RIDE_OUT, **_through(s3_server, proxy))
    expected = open_features(url, **s3_server.storage_options)[1]["features"]
    start = _outage(proxy, 1.5)
    assert np.array_equal(reader[1]["features"].numpy(), expected.numpy())
    assert time.monotonic() - start > 1.0  # the row's read met the outage and waited for the endpoint


def test_an_outage_longer_than_the_budget_is_one_clear_error(s3_server, proxy):
    url = s3_server.url("long")
    FeatureStore.create(url, num_rows=2, arrays=SPECS, attrs={}, storage_options=s3_server.storage_options, keys=["a", "b"])
    store = FeatureStore.open(url, _through(s3_server, proxy), retry=RetryPolicy(budget_s=1, first_wait_s=0.1, max_wait_s=0.3))
    store.array("features")  # opened before the outage: the outage meets the write itself
    proxy.down()
    with pytest.raises(TransientIOError, match=r"write rows \[0, 2\) of s3://.*/features: storage unavailable for 1 s "
                                               r"\(.*\); rerun the same command to resume"):
        store.write_rows(0, {"features": _rows(2, seed=1)})
    with pytest.raises(TransientIOError, match="commit shard 0: write .*_featup/index/shard-000000.parquet"):
        store.commit_shard(0, sh.index_table([0, 1]))
    proxy.up()
    assert FeatureStore.open(url, s3_server.storage_options).committed_shards() == set()  # nothing half-committed


def test_content_errors_are_not_retried(tmp_path):
    url = str(tmp_path / "s.zarr")
    store = FeatureStore.create(url, num_rows=2, arrays=SPECS, attrs={}, keys=["a", "b"], retry=RetryPolicy(budget_s=60))
    store.commit_shard(0, sh.index_table([0, 1]))
    os.unlink(f"{url}/_featup/index/shard-000000.parquet")  # a marker without its index file: a fact, not a fault
    start = time.monotonic()
    with pytest.raises(InputError, match="expected an index file for every commit marker"):
        store.read_index()
    shutil.rmtree(url)
    with pytest.raises(InputError, match="expected a FeatUp feature store, got no store there"):
        FeatureStore.open(url, retry=RetryPolicy(budget_s=60))
    assert time.monotonic() - start < 5  # a 60 s budget, and no retry


_CREATE_IN = """
import sys
from featup.errors import FeatUpError
from pipeline.store.features import ArraySpec, FeatureStore
try:
    FeatureStore.create(sys.argv[1], num_rows=1, arrays=[ArraySpec("features", (1, 1, 1), "float16", ("c", "y", "x"))],
                        attrs={}, keys=["a"])
except FeatUpError as e:
    print(type(e).__name__, e)
    sys.exit(2)
"""


def test_permission_denied_on_the_output_is_a_clear_error(tmp_path):
    parent = tmp_path / "readonly"
    parent.mkdir()
    parent.chmod(0o555)
    # root ignores file modes: the child drops the capabilities that let it (a real EACCES, as for any other user)
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"] if os.geteuid() == 0 else []
    done = subprocess.run([*drop, sys.executable, "-c", _CREATE_IN, str(parent / "out.zarr")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    parent.chmod(0o755)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    message = done.stdout.strip()
    assert message.startswith("ConfigError take the lock of ") and str(parent / "out.zarr") in message  # its first write
    assert "permission denied (PermissionError: [Errno 13] Permission denied" in message and "\n" not in message
    assert issubclass(ConfigError, ValueError)
