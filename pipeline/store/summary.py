"""What a feature store holds, for people: arrays (shapes, dtypes, codecs, bytes on disk), samples, failures, provenance."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from typing import Any

import pyarrow.compute as pc

from pipeline.runtime.progress import human_bytes
from pipeline.runtime.secrets import mask_json
from pipeline.store.features import FeatureStore
from pipeline.store.integrity import RECOMPUTE_HINT, LostRow, find_lost_rows

TOP_REASONS = 5


def store_summary(url: str, storage_options: dict | None = None, verify: bool = False) -> dict[str, Any]:
    """A JSON-ready summary of the store at ``url``: arrays, sample and shard counts, failure reasons, report, provenance;
    with ``verify``, every ``ok`` row of a committed shard whose stored object is missing (``lost_rows``)."""
    store = FeatureStore.open(url, storage_options, mode="r")
    index = store.read_index()
    checked = _verify(store, index) if verify else {}
    statuses = Counter(index["status"].to_pylist())
    failed = index.filter(pc.equal(index["status"], "error"))
    attrs = store.attrs
    report = store.read_report()
    return mask_json({  # a store written before masking may still hold credentials in its command line
        "url": url,
        "arrays": [_array_summary(name, store.array(name)) for name in store.array_names],
        "rows": store.num_rows,
        "samples": {"committed": index.num_rows, "ok": statuses.get("ok", 0), "failed": statuses.get("error", 0),
                    "not_committed": store.num_rows - index.num_rows},
        "failure_reasons": Counter(failed["error"].to_pylist()).most_common(TOP_REASONS),
        "shards": {"committed": len(store.committed_shards()), "total": attrs.get("num_shards")},
        "report": _report_summary(report),
        "compact": _compact_summary(store),
        **checked,
        "provenance": attrs,
    })


def _verify(store: FeatureStore, index: Any) -> dict[str, Any]:
    """The rows checked (``ok`` rows of committed shards, every array) and those whose stored object is missing."""
    lost = find_lost_rows(store, index)
    return {"verified_rows": int(pc.sum(pc.equal(index["status"], "ok")).as_py() or 0),
            "lost_rows": [asdict(r) for r in lost]}


def _compact_summary(store: FeatureStore) -> dict[str, Any] | None:
    """A compact store's upsampler (kind, sizes, sha256, bytes), checked; None for a store whose features are stored."""
    from pipeline.store.compact import is_compact, read_upsampler

    if not is_compact(store.attrs):
        return None
    found = read_upsampler(store)
    if found is None:
        return {"upsampler": None}
    record, _ = found
    return {"upsampler": record.kind, "features_shape": [record.dim, *record.output_size], "sha256": record.sha256,
            "bytes": record.nbytes, "source": record.source}


def _array_summary(name: str, array: Any) -> dict[str, Any]:
    """Shape, dtype, chunking, codecs and bytes (logical and stored) of one Zarr array."""
    codecs = [*array.filters, array.serializer, *array.compressors]
    stored = int(array.nbytes_stored())
    return {"name": name, "shape": list(array.shape), "dtype": str(array.dtype), "chunks": list(array.chunks),
            "dims": list(array.metadata.dimension_names or ()), "codecs": [_codec_name(c) for c in codecs if c is not None],
            "bytes": int(array.nbytes), "bytes_stored": stored}


def _codec_name(codec: Any) -> str:
    """``zstd(level=3)``-style name of a Zarr v3 codec."""
    config = codec.to_dict()
    params = config.get("configuration") or {}
    shown = ", ".join(f"{k}={v}" for k, v in params.items() if k not in ("checksum", "endian") or v not in (False, "little"))
    return f"{config['name']}({shown})" if shown else config["name"]


def _report_summary(report: dict | None) -> dict[str, Any] | None:
    """The last run's status, time and throughput, when it wrote a report."""
    if report is None:
        return None
    return {"status": report.get("status"), "failure": report.get("failure"), "wall_s": report.get("wall_s"),
            "images_per_s": report.get("throughput_images_per_s"), "started_at": report.get("started_at")}


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as an aligned text table."""
    lines = [f"store {summary['url']}", "arrays:"]
    header = f"  {'name':<12} {'shape':<24} {'dtype':<8} {'chunks':<22} {'codecs':<24} {'stored':>10} {'ratio':>6}"
    lines.append(header)
    for a in summary["arrays"]:
        ratio = a["bytes"] / a["bytes_stored"] if a["bytes_stored"] else float("nan")
        lines.append(f"  {a['name']:<12} {str(tuple(a['shape'])):<24} {a['dtype']:<8} {str(tuple(a['chunks'])):<22} "
                     f"{'+'.join(a['codecs']):<24} {human_bytes(a['bytes_stored']):>10} {ratio:>5.2f}x")
    total = sum(a["bytes_stored"] for a in summary["arrays"])
    lines.append(f"  total stored {human_bytes(total)} ({total} bytes)")
    s = summary["samples"]
    lines.append(f"samples: {summary['rows']} rows; {s['committed']} committed ({s['ok']} ok, {s['failed']} failed); "
                 f"{s['not_committed']} in shards not committed yet")
    if summary["failure_reasons"]:
        lines.append("  most common failure reasons:")
        lines.extend(f"  {count:>6}  {reason}" for reason, count in summary["failure_reasons"])
    shards = summary["shards"]
    lines.append(f"shards: {shards['committed']} committed" + (f" of {shards['total']}" if shards["total"] is not None else ""))
    report = summary["report"]
    if report is not None:
        speed = f", {report['images_per_s']} images/s" if report.get("images_per_s") is not None else ""
        lines.append(f"last run: {report['status']} in {report['wall_s']} s{speed}"
                     + (f" ({report['failure']})" if report.get("failure") else ""))
    compact = summary.get("compact")
    if compact is not None:
        shape = "x".join(map(str, compact.get("features_shape") or []))
        lines.append(f"features: not stored (compact store): upsampled where read by its stored {compact['upsampler']} "
                     f"upsampler to {shape} (sha256 {compact.get('sha256')}, {compact.get('bytes')} bytes); "
                     "`featup materialize` writes them into a full store")
    if "lost_rows" in summary:
        lines.extend(_verify_lines(summary))
    lines.append("provenance:")
    lines.extend(f"  {key:<18} {_show_value(key, value)}" for key, value in summary["provenance"].items())
    return "\n".join(lines)


def _verify_lines(summary: dict[str, Any]) -> list[str]:
    """Every lost row, one per line, and what to do; or that every checked row's objects are there."""
    lost, checked = summary["lost_rows"], summary["verified_rows"]
    if not lost:
        return [f"verify: the stored objects of all {checked} ok rows of committed shards are there"]
    rows = len({r["row"] for r in lost})
    lines = [f"verify: {rows} of {checked} ok rows of committed shards have lost stored objects (they would read as "
             "zeros through plain zarr; the reader refuses them):"]
    lines.extend(f"  {LostRow(**r).describe()}" for r in lost)
    lines.append(f"  {RECOMPUTE_HINT}")
    return lines


def _show_value(key: str, value: Any) -> str:
    """A provenance value on one line (the PCA basis by its shape, the command line joined)."""
    if key == "pca" and isinstance(value, dict) and "weight" in value:
        return f"{len(value['weight'])} x {len(value['weight'][0]) if value['weight'] else 0} projection (stored in the attributes)"
    if key == "command_line" and isinstance(value, list):
        return " ".join(map(str, value))
    return value if isinstance(value, str) else json.dumps(value)
