"""Turn a compact store (precompute --compact) into a full one: its features upsampled into a plain Zarr array, with Ray actors (resumable)."""

from __future__ import annotations

import argparse
import sys

from jobs.cli import positive_int
from jobs.precompute import actor_count


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``featup materialize`` options."""
    parser.add_argument("url", metavar="COMPACT", help="the compact store: a local path or fsspec URL")
    parser.add_argument("--output", required=True, help="the full store to write (the store `featup precompute` without "
                        "--compact writes; rerunning resumes it)")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec storage option for both stores (repeatable)")
    parser.add_argument("--tile", type=positive_int, default=64,
                        help="side of the spatial tiles inside each sample's shard (default 64, as precompute)")
    res = parser.add_argument_group("resources")
    res.add_argument("--actors", type=actor_count, default=None, help="number of Ray actors, or auto (default: auto with "
                     "--address, else 1)")
    res.add_argument("--device", default="auto", help="auto (cuda when the actor has a GPU), cpu, cuda or cuda:N")
    res.add_argument("--gpus-per-actor", type=float, default=None, help="GPUs per actor, fractions allowed (default: 1 with CUDA)")
    res.add_argument("--cpus-per-actor", type=float, default=None, help="CPUs per actor (default as precompute)")
    res.add_argument("--batch-size", type=positive_int, default=8, help="samples per upsampler call (default 8)")
    res.add_argument("--write-threads", type=int, default=None, help="threads per actor that encode and write rows")
    res.add_argument("--kernel-backend", default="auto", help="JBU kernels: auto (torch.compile, eager fallback), compiled or eager")
    res.add_argument("--address", default=None, help="Ray cluster to join (auto, ray://host:10001); default: start a local Ray")
    run_opts = parser.add_argument_group("run")
    run_opts.add_argument("--overwrite", action="store_true", help="start over, deleting an existing store at --output")
    run_opts.add_argument("--io-retry-seconds", type=float, default=120.0,
                          help="retry transient storage faults this long before stopping (default 120)")
    run_opts.add_argument("--json", action="store_true", help="print the whole run report instead of the summary")


def run(args: argparse.Namespace) -> int:
    """Builds the config from the compact store's own command and runs the job."""
    from pipeline.precompute.materialize import materialize_config, run_materialize
    from pipeline.runtime.storage import parse_storage_options

    config = materialize_config(
        args.url, args.output, storage_options=parse_storage_options(args.storage_option), tile=args.tile,
        actors=args.actors if args.actors is not None else ("auto" if args.address else 1), device=args.device,
        gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor, batch_size=args.batch_size,
        write_threads=args.write_threads, kernel_backend=args.kernel_backend, address=args.address,
        overwrite=args.overwrite, io_retry_seconds=args.io_retry_seconds,
    )
    return run_materialize(config, command_line=list(sys.argv), json_output=args.json)
