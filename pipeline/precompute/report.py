"""The end of a run on screen: a short human summary of ``report.json`` (which keeps every figure)."""

from __future__ import annotations

from pipeline.runtime.progress import format_duration

TOP_REASONS = 5  # failure reasons listed in the summary (report.json keeps the 20 most common)
OTHER_REASONS = "other reasons"  # the bucket of reasons beyond those a shard result carries


def format_run_summary(report: dict, report_url: str) -> str:
    """Samples ok and failed with the top reasons, throughput, wall time, and where the store and report are."""
    samples, shards = report["samples"], report["shards"]
    lines = [
        f"featup precompute: {report['status']} in {format_duration(report['wall_s'])}",
        f"  samples   {samples['total'] - samples['failed_in_store']} ok, {samples['failed_in_store']} failed of {samples['total']}"
        f" ({samples['computed']} computed in this run, {shards['skipped_committed']} shards already committed)",
    ]
    reasons = summarize_reasons(samples["error_reasons"], TOP_REASONS)
    if reasons:
        lines += ["  most common failure reasons:", reasons]
    lines += [
        f"  speed     {report['throughput_images_per_s']:.2f} images/s over the run's wall time "
        f"({report['actors']['started']} actor(s), {shards['retries']} shard retries)",
        f"  store     {report['store']}",
        f"  report    {report_url}",
    ]
    if report["failure"]:
        lines.append(f"  stopped   {report['failure']}")
    return "\n".join(lines)


def summarize_reasons(reasons: dict[str, int], limit: int = 10) -> str:
    """The most common failure reasons as ``count x reason`` lines."""
    items = sorted(reasons.items(), key=lambda kv: -kv[1])[:limit]
    return "\n".join(f"    {count} x {reason}" for reason, count in items if reason != OTHER_REASONS)
