"""Train the JBU upsampler on any backbone and WebDataset shards (resumable; data-parallel with Ray Train)."""

from __future__ import annotations

import argparse
import sys

from jobs.cli import positive_int


def _optional_int(text: str) -> int | None:
    """``none`` or a positive integer (``--projection-dim none`` compares all channels)."""
    return None if text.lower() == "none" else positive_int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``featup train-jbu`` options; the defaults are the published JBU training's."""
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="WebDataset shards: paths or fsspec URLs, brace patterns allowed")
    parser.add_argument("--output", required=True, metavar="CKPT", help="the checkpoint to write (and to resume from if it exists)")
    model = parser.add_argument_group("model")
    model.add_argument("--backbone", required=True, help="dino16, dino8, dinov2, clip, vit, resnet50, timm:<name> or pkg.module:callable")
    model.add_argument("--weights", default="auto", help="auto (pretrained, cached), random (offline, meaningless) or a weights file")
    model.add_argument("--image-size", type=positive_int, default=224, help="resize shorter side + centre crop size (default 224)")
    model.add_argument("--stages", type=positive_int, default=None, help="2x JBU stages (default: the closest to the stride)")
    model.add_argument("--key-dim", type=positive_int, default=32, help="JBU range key channels (default 32)")
    model.add_argument("--downsampler", default="attention", help="attention (default) or simple")
    model.add_argument("--no-uncertainty", action="store_true", help="plain MSE instead of the predicted-uncertainty loss")
    model.add_argument("--no-channel-norm", action="store_true", help="do not LayerNorm the backbone's channels (published: norm)")
    obj = parser.add_argument_group("objective")
    obj.add_argument("--n-jitters", type=positive_int, default=5, help="jittered views per step (default 5)")
    obj.add_argument("--max-pad", type=int, default=20, help="largest reflect padding of a view, pixels (default 20)")
    obj.add_argument("--max-zoom", type=float, default=2.0, help="largest zoom of a view (default 2)")
    obj.add_argument("--projection-dim", type=_optional_int, default=30, help="random projection channels, or none (default 30)")
    obj.add_argument("--crf-weight", type=float, default=0.001, help="CRF regulariser weight (default 0.001)")
    obj.add_argument("--tv-weight", type=float, default=0.0, help="total-variation weight (default 0)")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--steps", type=positive_int, default=2000, help="optimizer steps in all (default 2000)")
    opt.add_argument("--batch-size", type=positive_int, default=4, help="images per step and worker (default 4)")
    opt.add_argument("--lr", type=float, default=1e-3, help="NAdam learning rate (default 1e-3)")
    opt.add_argument("--clip-steps", type=int, default=10, help="clip the gradient norm for this many first steps (default 10)")
    opt.add_argument("--clip-norm", type=float, default=1e-4, help="gradient norm of that clipping (default 1e-4)")
    opt.add_argument("--seed", type=int, default=0, help="seed of the initialisation, the views and the shard order (default 0)")
    run = parser.add_argument_group("run")
    run.add_argument("--checkpoint-every", type=positive_int, default=100, help="steps between checkpoints (default 100)")
    run.add_argument("--log-every", type=positive_int, default=10, help="steps per loss-log row (default 10)")
    run.add_argument("--workers", type=positive_int, default=1, help="data-parallel Ray Train workers (default 1: no Ray)")
    run.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per Ray Train worker (default 1)")
    run.add_argument("--address", default=None, help="Ray cluster to join (auto, ray://host:10001); default: a local Ray")
    run.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    run.add_argument("--kernel-backend", default="eager", help="JBU kernels: eager (default), compiled or auto")
    run.add_argument("--decode-threads", type=positive_int, default=2, help="image decoding threads (default 2)")
    run.add_argument("--image-key", default=None, help="the image extension when a sample has several")
    run.add_argument("--max-pixels", type=positive_int, default=64_000_000, help="larger images are skipped (default 64e6)")
    run.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE", help="fsspec storage option (repeatable)")
    run.add_argument("--overwrite", action="store_true", help="start over, deleting an existing checkpoint and logs at --output")


def build_config(args: argparse.Namespace):
    """The validated TrainConfig of parsed arguments."""
    from pipeline.runtime.storage import parse_storage_options
    from pipeline.train.loop import TrainConfig

    return TrainConfig(
        inputs=tuple(args.inputs), backbone=args.backbone, output=args.output, weights=args.weights,
        steps=args.steps, batch_size=args.batch_size, image_size=args.image_size, lr=args.lr,
        n_jitters=args.n_jitters, max_pad=args.max_pad, max_zoom=args.max_zoom, projection_dim=args.projection_dim,
        crf_weight=args.crf_weight, tv_weight=args.tv_weight, downsampler=args.downsampler,
        predicted_uncertainty=not args.no_uncertainty, channel_norm=not args.no_channel_norm,
        clip_steps=args.clip_steps, clip_norm=args.clip_norm, key_dim=args.key_dim, stages=args.stages,
        checkpoint_every=args.checkpoint_every, log_every=args.log_every, seed=args.seed, workers=args.workers,
        cpus_per_worker=args.cpus_per_worker, device=args.device, address=args.address,
        kernel_backend=args.kernel_backend, decode_threads=args.decode_threads, image_key=args.image_key,
        max_pixels=args.max_pixels, overwrite=args.overwrite, storage_options=parse_storage_options(args.storage_option),
    )


def run(args: argparse.Namespace) -> int:
    """Trains, then prints where the checkpoint and the loss log are and the last logged losses."""
    from pipeline.train.loop import train_jbu

    config = build_config(args)
    result = train_jbu(config, err=sys.stderr)
    if result.resumed_from:
        print(f"resumed from step {result.resumed_from}")
    last = result.losses[-1] if result.losses else {}
    terms = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k != "step")
    print(f"trained to step {result.steps}: {terms}" if terms else f"trained to step {result.steps}")
    print(f"checkpoint: {result.checkpoint}")
    print(f"loss log: {result.loss_csv} (plot: {result.loss_plot})")
    if result.skipped:
        print(f"skipped {result.skipped} bad samples")
    return 0
