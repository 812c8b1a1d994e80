"""Tests of pipeline.store.summary (what ``featup inspect`` prints) on an s3:// store served by moto on 127.0.0.1."""

import sys
from pathlib import Path

import s3fs

from tests.helpers import store as sh

from pipeline.store.summary import format_summary, store_summary  # noqa: E402


def test_summary_of_an_s3_store_counts_rows_and_the_bytes_of_its_objects(s3_server):
    url = s3_server.url("summary")
    sh.coordinate_store(url, s3_server.storage_options)
    summary = store_summary(url, s3_server.storage_options)
    assert summary["samples"] == {"committed": 7, "ok": 5, "failed": 2, "not_committed": 0}
    assert summary["failure_reasons"] == [("image is truncated", 2)] and summary["shards"]["committed"] == 2
    fs = s3fs.S3FileSystem(**s3_server.storage_options, skip_instance_cache=True)
    for a in summary["arrays"]:
        objects = fs.find(f"{url.removeprefix('s3://')}/{a['name']}", detail=True)
        assert a["bytes_stored"] == sum(o["size"] for o in objects.values()), a["name"]
    assert "7 committed (5 ok, 2 failed)" in format_summary(summary)
