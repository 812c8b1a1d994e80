"""Summarise a feature store: arrays (shapes, dtypes, codecs, bytes on disk), samples and failures, shards, provenance."""

from __future__ import annotations

import argparse
import json

from jobs.cli import EXIT_FAILED, EXIT_OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``featup inspect`` options."""
    parser.add_argument("url", metavar="URL", help="the feature store: a local path or fsspec URL")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    parser.add_argument("--verify", action="store_true",
                        help="also check that every ok row of a committed shard has its stored objects (one listing per "
                             "array); lists each row whose object is missing and exits 1 if there is one")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE", help="fsspec storage option (repeatable)")


def run(args: argparse.Namespace) -> int:
    """Prints the summary of the store."""
    from pipeline.runtime.storage import parse_storage_options
    from pipeline.store.summary import format_summary, store_summary

    summary = store_summary(args.url, parse_storage_options(args.storage_option) or None, verify=args.verify)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return EXIT_FAILED if summary.get("lost_rows") else EXIT_OK
