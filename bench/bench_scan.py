"""Header-only scan against a whole read of one S3 shard (moto on 127.0.0.1), side by side: bytes moved, requests, time.

Bytes and requests are counted by tests.helpers.faultproxy.FaultProxy between the client and moto (no faults on).
Two shard shapes: large members (the scan skips their data with range reads) and small members (it reads through
them in growing range reads, so it never makes more requests than the read).

    python bench/bench_scan.py [--mb 64] [--large-member-mb 2] [--small-member-kb 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from urllib.parse import urlparse

import numpy as np

from pipeline.sources.shards import iter_shard_samples, scan_shard
from tests.helpers import corpus, s3
from tests.helpers.faultproxy import FaultProxy


def measure(fn, proxy: FaultProxy, repeats: int) -> tuple[float, int, int]:
    """Median seconds of ``fn()``, and the response bytes and requests of its last run."""
    times = []
    for _ in range(repeats):
        proxy.reset_counters()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), proxy.bytes_down, proxy.requests


def bench_shape(server: s3.S3Server, proxy: FaultProxy, total_mb: int, member_bytes: int, repeats: int) -> None:
    """Writes one shard of ``total_mb`` MB in members of ``member_bytes`` and prints scan vs read."""
    rng = np.random.default_rng(0)
    n = max(1, total_mb * 1_000_000 // member_bytes)
    url = f"{server.url('bench-scan')}/shard.tar"
    corpus.write_shard(url, [{"__key__": f"k{i:06d}", "bin": rng.bytes(member_bytes)} for i in range(n)], server.storage_options)
    options = {**server.storage_options, "client_kwargs": {"endpoint_url": proxy.url}}
    scan = measure(lambda: scan_shard(url, 0, options), proxy, repeats)
    read = measure(lambda: sum(1 for _ in iter_shard_samples(url, options)), proxy, repeats)
    print(f"{n} members of {member_bytes / 1e6:g} MB ({total_mb} MB shard):")
    for name, (seconds, moved, requests) in (("header-only scan", scan), ("whole read", read)):
        print(f"  {name:17s} {seconds * 1000:8.1f} ms  {moved / 1e6:9.2f} MB moved  {requests:5d} requests")
    print(f"  ratio read/scan:  time {read[0] / scan[0]:.1f}x  bytes {read[1] / max(scan[1], 1):.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=64, help="shard size in MB")
    parser.add_argument("--large-member-mb", type=float, default=2.0)
    parser.add_argument("--small-member-kb", type=float, default=40.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with s3.s3_server() as server:
        endpoint = urlparse(server.endpoint_url)
        with FaultProxy(endpoint.hostname, endpoint.port) as proxy:
            bench_shape(server, proxy, args.mb, int(args.large_member_mb * 1e6), args.repeats)
            bench_shape(server, proxy, args.mb, int(args.small_member_kb * 1e3), args.repeats)


if __name__ == "__main__":
    main()
