"""The end of a run on screen: a short human summary of ``report.json`` (which keeps every figure)."""

from __future__ import annotations

from collections import Counter

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
        f"({_workers(report['actors'])}, {shards['retries']} shard retries)",
        f"  store     {report['store']}",
        f"  report    {report_url}",
    ]
    if report["failure"]:
        lines.append(f"  stopped   {report['failure']}")
    return "\n".join(lines)


def _workers(actors: dict) -> str:
    """``2 actor(s)``, or ``1 worker in this process, no Ray`` for an in-process run."""
    if actors.get("mode") == "in-process":
        return "1 worker in this process, no Ray"
    return f"{actors['started']} actor(s)"


def summarize_reasons(reasons: dict[str, int], limit: int = 10) -> str:
    """The most common failure reasons as ``count x reason`` lines."""
    items = sorted(reasons.items(), key=lambda kv: -kv[1])[:limit]
    return "\n".join(f"    {count} x {reason}" for reason, count in items if reason != OTHER_REASONS)


def per_actor(stats: dict[str, Counter], nodes: dict[str, dict]) -> dict[str, dict]:
    """The report's ``actors.per_actor``: each worker's shards, samples, busy time, throughput, node and threads."""
    return {
        name: {"shards": s["shards"], "samples": s["samples"], "busy_s": round(s["busy_s"], 3),
               "images_per_s": round(s["samples"] / s["busy_s"], 3) if s["busy_s"] else 0.0,
               "node_id": nodes.get(name, {}).get("node_id"), "node_ip": nodes.get(name, {}).get("node_ip"),
               "decode_threads": nodes.get(name, {}).get("decode_threads"),
               "torch_threads": nodes.get(name, {}).get("torch_threads"),
               "write_threads": nodes.get(name, {}).get("write_threads")}
        for name, s in stats.items()
    }


def actors_per_node(stats: dict[str, Counter], nodes: dict[str, dict]) -> dict[str, dict]:
    """Actors, shards and samples per node id (two nodes on one machine share an IP, so nodes are told apart by id)."""
    out: dict[str, dict] = {}
    for name, s in stats.items():
        info = nodes.get(name, {})
        node = out.setdefault(
            str(info.get("node_id")),
            {"ip": info.get("node_ip"), "resources": info.get("node_resources", {}), "actors": 0, "shards": 0, "samples": 0},
        )
        node["actors"] += 1
        node["shards"] += s["shards"]
        node["samples"] += s["samples"]
    return out
