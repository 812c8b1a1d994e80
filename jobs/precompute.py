"""Precompute upsampled features of WebDataset shards into a Zarr store with Ray actors (resumable, fault-tolerant)."""

from __future__ import annotations

import argparse

from jobs.cli import command_line_of, positive_int
from jobs.implicit_options import add_implicit_arguments, implicit_settings
from jobs.models import CHECKPOINT_HELP, UPSAMPLER_HELP


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``featup precompute`` options."""
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="WebDataset shards: paths or fsspec URLs, brace patterns allowed")
    parser.add_argument("--output", required=True, help="the Zarr store: a local path or fsspec URL (s3://bucket/features.zarr)")
    model = parser.add_argument_group("model")
    model.add_argument("--backbone", default=None, help="dino16, dino8, dinov2, clip, clip-tokens, maskclip, vit, resnet50, timm:<name> or pkg.module:callable (default: the one a --checkpoint featup:<model>, jafar:, loftup: or uplift:<backbone> implies)")
    model.add_argument("--weights", default="auto", help="auto (the checkpoint's own backbone weights when it has them, else pretrained from the hub, cached), checkpoint, random (offline, meaningless) or a weights file/URL")
    model.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    model.add_argument("--upsampler", default=None, help=UPSAMPLER_HELP + ", or implicit (fitted per image: slow)")
    model.add_argument("--image-size", type=positive_int, default=224, help="resize shorter side + centre crop size (default 224)")
    size = model.add_mutually_exclusive_group()
    size.add_argument("--scale", type=positive_int, default=None, help="output size as a multiple of the low-res feature size")
    size.add_argument("--output-size", type=positive_int, default=None, help="output height and width (default: the image size)")
    model.add_argument("--dtype", default="float16", help="float16 (default), bfloat16 (stored as float32) or float32")
    model.add_argument("--channels", type=positive_int, default=None, help="PCA to K channels, fitted on a sample of the inputs")
    model.add_argument("--pca-images", type=positive_int, default=32, help="images the --channels PCA is fitted on (default 32)")
    model.add_argument("--seed", type=int, default=0, help="seed of random weights and of the PCA sample (default 0)")
    add_implicit_arguments(parser)
    data = parser.add_argument_group("data")
    data.add_argument("--labels", default="", help="label extensions to store with the features (seg.png,depth.npy)")
    data.add_argument("--image-key", default=None, help="the image extension when a sample has several (default: the one image extension)")
    data.add_argument("--save-image", action="store_true", help="also store the preprocessed image (uint8)")
    data.add_argument("--save-lowres", action="store_true", help="also store the backbone's low-res features")
    data.add_argument("--max-pixels", type=positive_int, default=64_000_000, help="larger images are recorded as errors (default 64e6)")
    data.add_argument("--max-errors", default=None,
                      help="give up past this many failed samples: a count (10), a fraction (0.01, 1%%) or none (default 5%%)")
    data.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE", help="fsspec storage option (repeatable)")
    store = parser.add_argument_group("store encoding")
    store.add_argument("--codec", default="auto", choices=("auto", "zstd", "zstd-3", "blosc-zstd", "blosc-lz4", "none"),
                       help="lossless codec (default auto: blosc byte-shuffle + zstd for float arrays, zstd for the rest)")
    store.add_argument("--quantize", default=None, choices=("int8",),
                       help="int8: per sample and channel 8-bit affine feature codes (~4x smaller, <1%% error; readers decode)")
    store.add_argument("--keep-bits", type=int, default=None, metavar="N",
                       help="keep N (1-10) float16 mantissa bits before the codec (lossy; not with --quantize)")
    store.add_argument("--compact", action="store_true",
                       help="store the upsampler's input (low-res features, guidance image) and the upsampler instead of the "
                            "features (~70x fewer bytes); readers upsample where they read, `featup materialize` writes the full store")
    store.add_argument("--tile", type=positive_int, default=64,
                       help="side of the spatial tiles inside each sample's shard, so crops read only theirs (default 64)")
    res = parser.add_argument_group("resources")
    res.add_argument(
        "--actors", type=actor_count, default=None,
        help="number of Ray actors, or auto: one per GPU (CPU-only: one per --cpus-per-actor CPUs) on every live node, "
        "more as nodes join (default: auto with --address, else 1)",
    )
    res.add_argument("--device", default="auto", help="auto (cuda when the actor has a GPU), cpu, cuda or cuda:N")
    res.add_argument("--gpus-per-actor", type=float, default=None, help="GPUs per actor, fractions allowed (default: 1 with CUDA)")
    res.add_argument("--cpus-per-actor", type=float, default=None,
                     help="CPUs per actor (default auto: a local run splits this machine's CPUs among --actors N; "
                          "with --address or --actors auto, 1)")
    res.add_argument("--batch-size", type=positive_int, default=8, help="images per model call (default 8)")
    res.add_argument(
        "--decode-threads", type=positive_int, default=None,
        help="background decoding threads per actor (default: from its node, the CPUs per GPU less one, 1..16; 2 without a GPU)",
    )
    res.add_argument(
        "--write-threads", type=int, default=None,
        help="threads per actor that encode and write rows while the model runs (default: the actor's CPUs; "
             "with a GPU, the CPUs per GPU; 0: write in the model's thread)",
    )
    res.add_argument("--kernel-backend", default="auto", help="JBU kernels: auto (torch.compile, eager fallback), compiled or eager")
    res.add_argument("--address", default=None, help="Ray cluster to join (auto, ray://host:10001); default: start a local Ray")
    res.add_argument("--in-process", action="store_true",
                     help="compute in this process without Ray (one worker): for debugging, notebooks and small jobs")
    run_opts = parser.add_argument_group("run")
    run_opts.add_argument("--overwrite", action="store_true", help="start over, deleting an existing store at --output")
    run_opts.add_argument("--dry-run", action="store_true", help="print the plan (shards, samples, arrays, bytes) and exit")
    run_opts.add_argument("--io-retry-seconds", type=float, default=120.0,
                          help="retry transient storage faults (resets, timeouts, 5xx, SlowDown) this long before stopping (default 120)")
    run_opts.add_argument("--json", action="store_true", help="print the whole run report (as in report.json) instead of the summary")


def actor_count(text: str) -> int | str:
    """An argparse type: a positive number of actors, or ``auto``."""
    if text == "auto":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {text!r}") from None


def build_config(args: argparse.Namespace):
    """The validated PrecomputeConfig of parsed arguments; a ``featup:`` checkpoint is fetched (or refused offline) here,
    before any work, and names its backbone when ``--backbone`` is left out."""
    from jobs.models import resolve_model_names

    resolve_model_names(args)
    args.upsampler = args.upsampler or "jbu"
    from pipeline.precompute.config import PrecomputeConfig, parse_max_errors
    from pipeline.runtime.storage import parse_storage_options

    return PrecomputeConfig(
        inputs=tuple(args.inputs),
        output=args.output,
        backbone=args.backbone,
        weights=args.weights,
        checkpoint=args.checkpoint,
        upsampler=args.upsampler,
        image_size=args.image_size,
        scale=args.scale,
        output_size=args.output_size,
        dtype=args.dtype,
        channels=args.channels,
        labels=tuple(label.strip() for label in args.labels.split(",") if label.strip()),
        image_key=args.image_key,
        save_image=args.save_image,
        save_lowres=args.save_lowres,
        actors=args.actors if args.actors is not None else ("auto" if args.address else 1),
        device=args.device,
        gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor,
        batch_size=args.batch_size,
        decode_threads=args.decode_threads,
        write_threads=args.write_threads,
        kernel_backend=args.kernel_backend,
        address=args.address,
        in_process=args.in_process,
        **({} if args.max_errors is None else {"max_errors": parse_max_errors(args.max_errors)}),
        io_retry_seconds=args.io_retry_seconds,
        codec=args.codec, quantize=args.quantize, keep_bits=args.keep_bits, tile=args.tile, compact=args.compact,
        max_pixels=args.max_pixels,
        overwrite=args.overwrite,
        dry_run=args.dry_run,
        storage_options=parse_storage_options(args.storage_option),
        seed=args.seed,
        pca_images=args.pca_images,
        implicit=implicit_settings(args),
    )


def run(args: argparse.Namespace) -> int:
    """Builds the config and runs the job; the exit code is non-zero when it stops early (--max-errors, failures)."""
    from pipeline.precompute.driver import run_precompute

    return run_precompute(build_config(args), command_line=command_line_of(args), json_output=args.json)
