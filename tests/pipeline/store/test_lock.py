"""Tests of the store lock on real stores (local folders, moto's S3 server, a fault proxy in front of it): conditional
writes give one holder among jobs started together, and a holder riding out an outage keeps its lock."""

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time

import pytest

from pipeline.runtime.retry import RetryPolicy, TransientIOError
from pipeline.store.features import ArraySpec, FeatureStore, StoreLockedError
from tests.helpers import store as sh

SPECS = [ArraySpec("features", (1, 2, 2), "float16", ("channel", "y", "x"))]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store.zarr"), None
    s3 = request.getfixturevalue("s3_server")
    return s3.url("lock"), s3.storage_options


def _create(url, options, **kw) -> FeatureStore:
    return FeatureStore.create(url, num_rows=2, arrays=SPECS, attrs={}, storage_options=options, keys=["a", "b"], **kw)


def _lock_file(store: FeatureStore) -> dict:
    return json.loads(store.fs.cat_file(store._path("lock.json")))


def _age_heartbeat(store: FeatureStore, seconds: float) -> None:
    """As if the holder had not renewed its lock for ``seconds`` (its process is alive: an outage, not a crash)."""
    store.fs.pipe_file(store._path("lock.json"), json.dumps({**_lock_file(store), "heartbeat": time.time() - seconds}).encode())


def test_staleness_window_outlasts_the_retry_budget_and_is_recorded(location):
    url, options = location
    short = _create(url, options, retry=RetryPolicy(budget_s=2))
    short.acquire_lock("run-a")
    assert short.lock_stale_after_s == 60 > 2 and _lock_file(short)["stale_after_s"] == 60  # never under today's 60 s
    short.acquire_lock("run-a", heartbeat_s=30)
    assert short.lock_stale_after_s == 2 + 3 * 30 and _lock_file(short)["stale_after_s"] == 92
    default = FeatureStore.open(url, options)
    default.acquire_lock("run-a")  # the same run takes its lock again, with the default budget of 120 s
    assert default.lock_stale_after_s == 120 + 3 * 10 > default.retry.budget_s == 120
    assert _lock_file(default)["stale_after_s"] == 150
    default.release_lock()


def test_a_holder_without_a_heartbeat_within_its_own_window_keeps_its_lock(location):
    url, options = location
    holder = _create(url, options, retry=RetryPolicy(budget_s=2))
    holder.acquire_lock("run-holder", heartbeat_s=30)  # window 92 s
    _age_heartbeat(holder, 80)  # riding out an outage: older than the other job's own 60 s, within the holder's 92 s
    other = FeatureStore.open(url, options, retry=RetryPolicy(budget_s=2))
    with pytest.raises(StoreLockedError, match=r"run run-holder .* last heartbeat 80 s ago.* for 92 s is taken over"):
        other.acquire_lock("run-other", stale_after_s=60)
    holder.heartbeat()  # the outage ends: the holder renews its lock
    assert _lock_file(holder)["run_id"] == "run-holder"
    _age_heartbeat(holder, 100)  # past the holder's window: taken over
    assert other.acquire_lock("run-other", stale_after_s=60)["stale_reason"] == "no heartbeat for 100 s"
    with pytest.raises(StoreLockedError, match="run run-other"):
        holder.heartbeat()


def _proxied(s3_server, proxy) -> dict:
    """Storage options reaching moto through ``proxy``, without botocore's own retries (the RetryPolicy does them)."""
    return {**s3_server.storage_options, "client_kwargs": {"endpoint_url": proxy.endpoint_url},
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 5}}


@pytest.fixture
def proxy(s3_server):
    host, port = s3_server.endpoint_url.removeprefix("http://").split(":")
    proxy = sh.FaultProxy((host, int(port)))
    yield proxy
    proxy.close()


def test_heartbeat_rides_out_a_real_outage_and_no_one_takes_the_lock_meanwhile(s3_server, proxy):
    url = s3_server.url("outage")
    _create(url, s3_server.storage_options)
    holder = FeatureStore.open(url, _proxied(s3_server, proxy), retry=RetryPolicy(budget_s=20, first_wait_s=0.2, max_wait_s=1))
    holder.acquire_lock("run-holder")
    before = _lock_file(holder)["heartbeat"]
    proxy.down()
    threading.Timer(3.0, proxy.up).start()
    other = FeatureStore.open(url, s3_server.storage_options)  # reaches the server directly, during the outage
    with pytest.raises(StoreLockedError, match="run run-holder"):
        other.acquire_lock("run-other")
    start = time.monotonic()
    holder.heartbeat()
    assert time.monotonic() - start > 2.0  # it waited for the endpoint to come back
    lock = json.loads(other.fs.cat_file(other._path("lock.json")))
    assert lock["run_id"] == "run-holder" and lock["heartbeat"] > before
    holder.release_lock()
    assert other.lock_holder() is None


def test_an_outage_longer_than_the_budget_ends_with_a_clear_error(s3_server, proxy):
    url = s3_server.url("long-outage")
    _create(url, s3_server.storage_options)
    holder = FeatureStore.open(url, _proxied(s3_server, proxy), retry=RetryPolicy(budget_s=1.5, first_wait_s=0.2, max_wait_s=0.5))
    holder.acquire_lock("run-holder")
    proxy.down()
    with pytest.raises(TransientIOError, match=r"renew the lock of s3://.*: storage unavailable for 1.5 s .*rerun the same "
                                               "command to resume"):
        holder.heartbeat()
    proxy.up()
    holder.heartbeat()  # the lock is still this run's: the next heartbeat after the outage renews it
    holder.release_lock()


def _race(stores: list[FeatureStore], run_ids: list[str]) -> dict[str, str]:
    """Every store asks for the lock at the same moment (a barrier); run id -> "won" or the error's message."""
    barrier, results = threading.Barrier(len(stores)), {}

    def ask(store, run_id):
        barrier.wait()
        try:
            store.acquire_lock(run_id)
            results[run_id] = "won"
        except StoreLockedError as e:
            results[run_id] = str(e)

    threads = [threading.Thread(target=ask, args=pair) for pair in zip(stores, run_ids)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_eight_threads_asking_at_once_get_one_lock(location):
    url, options = location
    _create(url, options)
    stores = [FeatureStore.open(url, options) for _ in range(8)]
    results = _race(stores, [f"run-{i}" for i in range(8)])
    winners = [r for r, outcome in results.items() if outcome == "won"]
    assert len(results) == 8 and len(winners) == 1
    assert all("expected no other job writing to it" in results[r] for r in results if r not in winners)
    assert stores[0].lock_holder() == winners[0]


def test_eight_threads_taking_over_a_stale_lock_at_once_get_one_lock(location):
    url, options = location
    first = _create(url, options)
    first.acquire_lock("run-dead")
    _age_heartbeat(first, 1000)
    stores = [FeatureStore.open(url, options) for _ in range(8)]
    results = _race(stores, [f"run-{i}" for i in range(8)])
    winners = [r for r, outcome in results.items() if outcome == "won"]
    assert len(winners) == 1 and stores[0].lock_holder() == winners[0]


_ACQUIRE_ON_GO = """
import json, os, sys, time
from featup.errors import FeatUpError
from pipeline.store.features import FeatureStore
url, options, run_id, go = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
store = FeatureStore.open(url, options)
store.lock_holder()  # connected and warm before the start
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.001)
try:
    store.acquire_lock(run_id)
    print("won", flush=True)
    time.sleep(1.0)  # hold it while the others decide
except FeatUpError as e:
    print("refused:", e, flush=True)
"""


@pytest.mark.slow
def test_eight_jobs_started_together_get_one_lock(location, tmp_path):
    url, options = location
    _create(url, options)
    go = tmp_path / "go"
    jobs = [subprocess.Popen([sys.executable, "-c", _ACQUIRE_ON_GO, url, json.dumps(options), f"run-{i}", str(go)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True) for i in range(8)]
    for job in jobs:
        assert job.stdout.readline().strip() == "ready"
    go.touch()  # every job asks for the lock within a millisecond or so of the others
    outcomes = sorted(job.communicate(timeout=60)[0].strip() for job in jobs)
    assert outcomes.count("won") == 1
    assert all(o.startswith("refused:") and "expected no other job writing to it" in o for o in outcomes if o != "won")


def test_a_filesystem_without_conditional_writes_warns_and_locks_as_before(caplog):
    url = f"memory://lock-{time.time_ns()}/store.zarr"
    store = _create(url, None)
    with caplog.at_level(logging.WARNING, logger="pipeline.store.lock"):
        store.acquire_lock("run-a")
    assert any("memory storage has no conditional writes" in r.getMessage() and "may both take its lock" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(StoreLockedError, match="run run-a"):
        FeatureStore.open(url).acquire_lock("run-b")
    store.heartbeat()
    store.release_lock()
    assert store.lock_holder() is None


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_a_live_lock_of_another_machine_with_the_same_host_name_and_pid_namespace_is_not_taken(tmp_path):
    """Containers share host names and the initial PID namespace has one inode on every host: only the boot id tells the
    other machine apart. Its holder's pid is not alive here, yet its lock holds while its heartbeat is fresh."""
    from pipeline.store.lock import lock_payload

    store = _create(str(tmp_path / "store.zarr"), None)
    here = lock_payload("run-here")
    assert here["boot_id"] and here["pid_namespace"]  # this machine has an identity to compare
    other = {**lock_payload("run-other-machine"), "pid": _dead_pid(), "boot_id": "0b5e55ed-0000-4000-8000-000000000000"}
    assert (other["host"], other["pid_namespace"]) == (here["host"], here["pid_namespace"])
    for lock in (other, {k: v for k, v in other.items() if k != "boot_id"}):  # another machine; a lock without a boot id
        store.fs.pipe_file(store._path("lock.json"), json.dumps(lock).encode())
        with pytest.raises(StoreLockedError, match=r"got run run-other-machine \(host .*, pid \d+, last heartbeat 0 s ago\)"):
            store.acquire_lock("run-here")
    same_machine = {**other, "boot_id": here["boot_id"]}  # the same lock written here: its process is seen gone
    store.fs.pipe_file(store._path("lock.json"), json.dumps(same_machine).encode())
    assert "on this host is gone" in store.acquire_lock("run-here")["stale_reason"]
    _age_heartbeat(store, 1000)
    other_stale = {**other, "heartbeat": time.time() - 1000}  # the other machine's lock once its heartbeat is old
    store.fs.pipe_file(store._path("lock.json"), json.dumps(other_stale).encode())
    assert store.acquire_lock("run-here")["stale_reason"] == "no heartbeat for 1000 s"
    store.release_lock()


def _fault_proxy(s3_server):
    from tests.helpers.faultproxy import FaultProxy

    host, port = s3_server.endpoint_url.removeprefix("http://").split(":")
    return FaultProxy(host, int(port))


def _through(s3_server, proxy) -> dict:
    return {**s3_server.storage_options, "client_kwargs": {"endpoint_url": proxy.url},
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 5}}


def test_a_409_on_a_conditional_put_is_a_lost_race_retried_within_the_budget_then_refused(s3_server):
    """AWS answers a conditional write that races another with 409 ConditionalRequestConflict (s3fs: OSError EIO)."""
    url = s3_server.url("conflict")
    direct = _create(url, s3_server.storage_options)
    retry = RetryPolicy(budget_s=2, first_wait_s=0.05, max_wait_s=0.2)
    with _fault_proxy(s3_server) as proxy:
        store = FeatureStore.open(url, _through(s3_server, proxy), retry=retry)
        store.acquire_lock("run-a")  # the endpoint's conditional writes are checked once, here
        store.release_lock()
        proxy.reset_counters()
        proxy.conflict(2)
        assert store.acquire_lock("run-a") is None and proxy.injected == 2  # two 409s waited out, then created
        proxy.conflict(1)
        store.heartbeat()  # renewed through a 409
        store.release_lock()
        assert direct.lock_holder() is None and proxy.injected == 3

        proxy.conflict(10**6)  # every conditional PUT conflicts; meanwhile another job's write lands
        threading.Timer(0.2, direct.acquire_lock, args=("run-winner",)).start()
        with pytest.raises(StoreLockedError, match=r"expected no other job writing to it, got run run-winner \("):
            store.acquire_lock("run-loser")  # judged as after a 412: the lock that landed is live
        direct.release_lock()
        start = time.monotonic()
        with pytest.raises(StoreLockedError, match=r"expected to take the lock, got it changed by other jobs 8 times in a "
                                                   r"row \(the storage answered 409 ConditionalRequestConflict \d+ times\)"):
            store.acquire_lock("run-loser")  # nobody wins: refused once the budget is spent, never an OSError
        assert 2.0 <= time.monotonic() - start < 10
        assert direct.lock_holder() is None


def test_an_endpoint_that_ignores_if_none_match_is_found_once_and_locks_fall_back_to_reading_back(s3_server, caplog):
    """The endpoint answers 200 to a conditional create over an existing key: found by one probe per process with a
    one-line warning; four jobs asking at once still get one lock, by writing, waiting and reading back."""
    url = s3_server.url("ignores")
    direct = _create(url, s3_server.storage_options)
    with _fault_proxy(s3_server) as proxy:
        proxy.strip_if_none_match = True
        stores = [FeatureStore.open(url, _through(s3_server, proxy)) for _ in range(4)]
        with caplog.at_level(logging.WARNING, logger="pipeline.store.lock"):
            results = _race(stores, [f"run-{i}" for i in range(4)])
            winners = [r for r, outcome in results.items() if outcome == "won"]
            assert len(winners) == 1 and direct.lock_holder() == winners[0], results
            # Each loser names the run it read back: the winner, or (when the writes landed over more than the 1 s
            # wait, as on a loaded machine) a run whose write landed after its own and lost to a later one in turn.
            assert all(re.search(r"got run run-\d \(", results[r]) for r in results if r not in winners), results
            second = _create(s3_server.url("ignores-too"), _through(s3_server, proxy))  # same endpoint: no new probe
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "\n" not in warnings[0], warnings
        assert f"S3 endpoint {proxy.url}, bucket {s3_server.bucket}: expected a conditional create over an existing " \
               "object to be refused, got it accepted (If-None-Match is ignored)" in warnings[0]
        holder = stores[int(winners[0].split("-")[1])]
        holder.heartbeat()
        holder.release_lock()
        assert direct.lock_holder() is None and second.lock_holder() is None
