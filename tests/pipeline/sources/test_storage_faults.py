"""Storage faults under pipeline.sources, injected by a real TCP proxy in front of moto's S3 server.

Transient faults (outages, resets mid-transfer, SlowDown bursts) are ridden out with every sample read exactly once;
an outage longer than the retry budget raises TransientIOError; access denied and missing objects are content errors
that name the shard and the cause. Also: the scan reads headers only (bytes through the proxy, not time).
"""

from __future__ import annotations

from urllib.parse import urlparse

import numpy as np
import pytest

from tests.helpers import corpus
from tests.helpers.faultproxy import FaultProxy

from featup.errors import InputError
from pipeline.runtime.retry import RetryPolicy, TransientIOError
from pipeline.sources.shards import expand_inputs, iter_shard_samples, scan_shard
from pipeline.sources.streams import ShardFile

BLOCK = 128 * 1024  # s3fs read-ahead per request, so one shard takes many requests and faults land mid-stream


@pytest.fixture
def proxy(s3_server):
    """A FaultProxy in front of the session's moto server."""
    endpoint = urlparse(s3_server.endpoint_url)
    with FaultProxy(endpoint.hostname, endpoint.port) as proxy:
        yield proxy


def _options(s3_server, proxy: FaultProxy, **extra) -> dict:
    """s3fs options that reach moto through the proxy (a fresh filesystem instance, small read-ahead)."""
    return {**s3_server.storage_options, "client_kwargs": {"endpoint_url": proxy.url}, "default_block_size": BLOCK,
            "skip_instance_cache": True, **extra}


def _shard(s3_server, n: int = 12, size: int = 150_000) -> tuple[str, list[dict]]:
    """An S3 shard of ``n`` samples with ``size`` random bytes each."""
    rng = np.random.default_rng(n)
    samples = [{"__key__": f"k{i:03d}", "bin": rng.bytes(size), "cls": str(i).encode()} for i in range(n)]
    url = f"{s3_server.url('faults')}/shard-000000.tar"
    corpus.write_shard(url, samples, s3_server.storage_options)
    return url, samples


def _read_with_fault(url: str, options: dict, fault, at: int = 2, retry: RetryPolicy | None = None) -> list[dict]:
    """All items of a shard's read, calling ``fault()`` once sample ``at`` has been received."""
    items = []
    for i, sample in enumerate(iter_shard_samples(url, options, retry)):
        items.append(sample)
        if i == at:
            fault()
    return items


def _assert_exactly_once(items: list[dict], samples: list[dict]) -> None:
    assert [s["__key__"] for s in items] == [s["__key__"] for s in samples]  # no marker, none lost, none twice
    assert all(got["bin"] == want["bin"] and got["cls"] == want["cls"] for got, want in zip(items, samples))


def test_a_3_second_outage_mid_stream_loses_and_repeats_nothing(s3_server, proxy):
    url, samples = _shard(s3_server)
    items = _read_with_fault(url, _options(s3_server, proxy), lambda: proxy.outage(3.0))
    _assert_exactly_once(items, samples)
    assert proxy.connections > 2  # the outage really cut connections that had to be made again


def test_connections_reset_mid_transfer_are_resumed(s3_server, proxy):
    url, samples = _shard(s3_server)
    items = _read_with_fault(url, _options(s3_server, proxy), lambda: proxy.reset_next(3, after_bytes=20_000))
    _assert_exactly_once(items, samples)
    assert proxy.injected == 3  # three responses really were cut after 20 kB


def test_a_slowdown_burst_is_ridden_out(s3_server, proxy):
    url, samples = _shard(s3_server)
    items = _read_with_fault(url, _options(s3_server, proxy), lambda: proxy.slowdown(4))
    _assert_exactly_once(items, samples)
    assert proxy.injected == 4  # all four requests of the burst were answered "503 SlowDown"


def test_shard_file_reopens_and_resumes_at_the_offset_consumed(s3_server, proxy):
    url, _ = _shard(s3_server, n=6)
    whole = ShardFile(url, s3_server.storage_options).open().read(10**9)
    # botocore's own retries off, so the fault reaches ShardFile, which must reopen and seek back itself
    options = _options(s3_server, proxy, config_kwargs={"retries": {"max_attempts": 1}})
    with ShardFile(url, options, RetryPolicy(budget_s=30, first_wait_s=0.2)) as f:
        parts = [f.open().read(100_000)]
        proxy.outage(1.5)
        while chunk := f.read(100_000):
            parts.append(chunk)
        assert b"".join(parts) == whole and f.opens >= 2


def test_an_outage_longer_than_the_budget_raises_transient_io_error(s3_server, proxy):
    url, _ = _shard(s3_server, n=6)
    options = _options(s3_server, proxy, config_kwargs={"retries": {"max_attempts": 1}})
    budget = RetryPolicy(budget_s=1.0, first_wait_s=0.1, max_wait_s=0.5)
    with pytest.raises(TransientIOError, match="rerun the same command") as e:
        _read_with_fault(url, options, lambda: proxy.outage(60.0), at=1, retry=budget)
    assert url in str(e.value) and "read" in str(e.value)
    with pytest.raises(TransientIOError, match=url):
        scan_shard(url, 0, options, retry=budget)  # the outage is still on: the scan gives up the same way
    proxy.clear()
    assert scan_shard(url, 0, options).num_samples == 6


def test_access_denied_names_the_shard_and_the_cause(s3_server, proxy):
    url, _ = _shard(s3_server, n=2)
    options = _options(s3_server, proxy)
    proxy.deny(1)
    with pytest.raises(InputError, match=r"access denied \(PermissionError") as e:
        scan_shard(url, 0, options)
    assert f"shard {url}" in str(e.value)
    proxy.deny(1)
    items = list(iter_shard_samples(url, options))
    assert len(items) == 1 and items[0]["__key__"] is None and "access denied" in items[0]["__error__"]


def test_missing_object_is_a_content_error(s3_server):
    url = f"{s3_server.url('missing')}/nothing.tar"
    with pytest.raises(InputError, match="no such file") as e:
        scan_shard(url, 0, s3_server.storage_options, retry=RetryPolicy(budget_s=5))
    assert url in str(e.value)


def test_the_scan_reads_headers_only(s3_server, proxy):
    # members of 2 MB: a whole read moves every byte; the scan seeks past member data (range reads)
    url, samples = _shard(s3_server, n=8, size=2_000_000)
    total = ShardFile(url, s3_server.storage_options).open().size
    options = {**s3_server.storage_options, "client_kwargs": {"endpoint_url": proxy.url}, "skip_instance_cache": True}
    info = scan_shard(url, 0, options)
    scanned = proxy.bytes_down
    proxy.reset_counters()
    assert len(list(iter_shard_samples(url, options))) == 8
    assert info.num_samples == 8 and proxy.bytes_down >= total
    assert scanned < total / 4, (scanned, total)


def test_s3_globs_expand_sorted_and_empty_globs_are_errors(s3_server):
    prefix = s3_server.url("glob")
    for name in ("b-001.tar", "a-002.tar", "a-001.tar", "notes.txt"):
        corpus.write_tar(f"{prefix}/{name}", [("x.cls", b"1")], s3_server.storage_options)
    urls = expand_inputs([f"{prefix}/*.tar", f"{prefix}/a-001.tar"], s3_server.storage_options)
    assert urls == [f"{prefix}/a-001.tar", f"{prefix}/a-002.tar", f"{prefix}/b-001.tar"]
    with pytest.raises(InputError, match=f"input {prefix}/c-\\*.tar: expected at least one file"):
        expand_inputs([f"{prefix}/c-*.tar"], s3_server.storage_options)
