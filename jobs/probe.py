"""Train a linear (1x1 conv) head on a store's features against one of its label arrays; report accuracy and mIoU, or RMSE."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from featup.errors import ConfigError
from jobs.cli import EXIT_OK, positive_int

RESOLUTION_NOTE = ("The head is trained and scored at the feature resolution: a label array of another size is resized "
                   "to the features' size by nearest neighbour at pixel centres (labels are never interpolated).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``featup probe`` options."""
    parser.description = f"{parser.description} {RESOLUTION_NOTE}"
    parser.add_argument("url", metavar="URL", help="the feature store: a local path or fsspec URL")
    parser.add_argument("--target", required=True, help="the label array to predict (a --labels extension, e.g. seg.png)")
    task = parser.add_mutually_exclusive_group(required=True)
    task.add_argument("--classes", type=positive_int, default=None, help="number of classes K: labels in [0, K) (and --ignore-index)")
    task.add_argument("--regression", action="store_true", help="depth-style targets: one output per label channel, RMSE")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="held-out fraction, split by key hash (default 0.2)")
    parser.add_argument("--compare", nargs="+", default=[], metavar="URL2", help="train the same head on other stores and print one table")
    parser.add_argument("--out", default=".", help="folder for <store>.head.pt and <store>.metrics.json (default: the current folder)")
    parser.add_argument("--epochs", type=positive_int, default=20, help="passes over the training split (default 20)")
    parser.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (default 0.01)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="samples per step (default 8)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers reading the store (default 0)")
    parser.add_argument("--ignore-index", type=int, default=255, help="label value left out of loss and scores (default 255)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffling order (default 0)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE", help="fsspec storage option (repeatable)")


def run(args: argparse.Namespace) -> int:
    """Trains one head per store, writes each head and its metrics, and prints one table."""
    from jobs.cli import resolve_device
    from pipeline.runtime.storage import parse_storage_options
    from pipeline.analysis.probe import ProbeConfig, save_head, train_probe
    from pipeline.store.reader import open_features

    config = ProbeConfig(target=args.target, classes=args.classes, regression=args.regression, val_fraction=args.val_fraction,
                         epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, workers=args.workers,
                         ignore_index=args.ignore_index, seed=args.seed)
    device, options = resolve_device(args.device), parse_storage_options(args.storage_option)
    urls = [args.url, *args.compare]
    _make_out_dir(args.out)
    rows = []
    for url, stem in zip(urls, output_stems(urls)):
        reader = open_features(url, **options)
        result = train_probe(reader, config, device)
        metrics = {"store": url, **_store_facts(reader), **result.metrics}
        save_head(result, os.path.join(args.out, f"{stem}.head.pt"))
        with open(os.path.join(args.out, f"{stem}.metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        rows.append(metrics)
        print(f"featup: {url}: head and metrics written to {os.path.join(args.out, stem)}.*", file=sys.stderr)
    print(format_table(rows, config))
    return EXIT_OK


def output_stems(urls: Sequence[str]) -> list[str]:
    """A file stem per store: its folder name without ``.zarr``, numbered when two stores share a name."""
    names = [os.path.basename(u.rstrip("/")).removesuffix(".zarr") or "store" for u in urls]
    return [n if names.count(n) == 1 else f"{n}-{i}" for i, n in enumerate(names)]


def _store_facts(reader: Any) -> dict[str, Any]:
    """What made the features, for the table and the metrics file."""
    a = reader.attrs
    return {"backbone": a.get("backbone"), "backbone_weights": a.get("backbone_weights"), "upsampler": a.get("upsampler"),
            "checkpoint_sha256": a.get("checkpoint_sha256"), "feature_shape": list(reader.shapes["features"][0])}


def format_table(rows: Sequence[dict[str, Any]], config: Any) -> str:
    """One line per store (accuracy and mIoU, or RMSE and MAE), then the per-class IoU of each store."""
    first = rows[0]
    task = "regression" if config.regression else f"{config.classes} classes"
    lines = [f"probe of {config.target} ({task}): linear 1x1 head, {config.epochs} epochs, {first['train_samples']} train / "
             f"{first['val_samples']} held-out samples (split by key), scored at the feature resolution"]
    if len({r["split_sha256"] for r in rows}) > 1:
        lines.append("note: the stores hold different samples, so their held-out splits differ: compare with care")
    scores = ("rmse", "mae") if config.regression else ("accuracy", "miou")
    lines.append(f"{'store':<40} {'upsampler':<10} {'features':<14} {scores[0]:>9} {scores[1]:>9} {'train samples/s':>16}")
    for r in rows:
        shape = "x".join(map(str, r["feature_shape"]))
        lines.append(f"{_fit(r['store'], 40):<40} {str(r['upsampler']):<10} {shape:<14} {r[scores[0]]:>9.4f} {r[scores[1]]:>9.4f} "
                     f"{r['train_samples_per_s']:>16.1f}")
    if not config.regression:
        lines.append("IoU per class:")
        for r in rows:
            ious = " ".join("-" if v is None else f"{v:.3f}" for v in r["iou"])
            lines.append(f"  {_fit(r['store'], 40):<40} {ious}")
    return "\n".join(lines)


def _fit(text: str, width: int) -> str:
    """``text`` cut from the left to ``width`` characters (the end of a path says the most)."""
    return text if len(text) <= width else "..." + text[-(width - 3) :]


def _make_out_dir(out: str) -> None:
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: expected a writable folder, got {e.strerror or e}") from None
