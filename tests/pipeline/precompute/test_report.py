"""The end-of-run summary: counts, the most common reasons, speed, wall time and where store and report are."""

from pipeline.precompute.report import OTHER_REASONS, format_run_summary


def _report(**overrides):
    report = {
        "status": "failed", "failure": "13 failed samples exceed --max-errors 0.01", "wall_s": 185.2, "store": "s3://b/x.zarr",
        "shards": {"total": 4, "skipped_committed": 1, "computed": 3, "retries": 2, "read_errors": {}},
        "samples": {"total": 40, "computed": 30, "ok": 17, "failed": 13, "failed_in_store": 13, "error_limit": 0,
                    "error_reasons": {"image is truncated": 9, "not an image": 3, "huge": 1, OTHER_REASONS: 4}},
        "throughput_images_per_s": 0.162, "actors": {"started": 2},
    }
    report.update(overrides)
    return report


def test_the_summary_counts_samples_names_reasons_and_says_where_things_are():
    text = format_run_summary(_report(), "s3://b/x.zarr/report.json")
    lines = text.splitlines()
    assert lines[0] == "featup precompute: failed in 3m05s"
    assert "27 ok, 13 failed of 40 (30 computed in this run, 1 shards already committed)" in lines[1]
    assert lines[2:6] == ["  most common failure reasons:", "    9 x image is truncated", "    3 x not an image", "    1 x huge"]
    assert "0.16 images/s" in text and "2 actor(s), 2 shard retries" in text
    assert "  store     s3://b/x.zarr" in lines and "  report    s3://b/x.zarr/report.json" in lines
    assert lines[-1] == "  stopped   13 failed samples exceed --max-errors 0.01"


def test_a_clean_run_has_no_reason_list_and_no_stop_line():
    report = _report(status="complete", failure=None)
    report["samples"] = {**report["samples"], "failed_in_store": 0, "error_reasons": {}}
    text = format_run_summary(report, "x/report.json")
    assert "40 ok, 0 failed of 40" in text and "reasons" not in text and "stopped" not in text
