"""Upsample the features of images and write PNG panels: image, low-res features, upsampled features (shared PCA)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, NamedTuple, Sequence

from featup.errors import CheckpointError, ConfigError, InputError
from jobs.cli import EXIT_FAILED, EXIT_OK, positive_int, resolve_device
from jobs.models import CHECKPOINT_HELP, UPSAMPLER_HELP

if TYPE_CHECKING:
    import torch
    from PIL import Image

RANDOM_WEIGHTS_NOTICE = "RANDOM WEIGHTS - features are not meaningful"
UNTRAINED_JBU_NOTICE = "untrained JBU (no --checkpoint)"


class Models(NamedTuple):
    """What every image goes through: the backbone, the upsampler and the device they live on."""

    backbone: torch.nn.Module
    upsampler: torch.nn.Module
    device: torch.device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``featup upsample`` options."""
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files or fsspec URLs")
    parser.add_argument("--backbone", default=None, help="dino16, dino8, dinov2, clip, clip-tokens, maskclip, vit, resnet50, timm:<name> or pkg.module:callable (default: the one a --checkpoint featup:<model>, jafar:, loftup: or uplift:<backbone> implies)")
    parser.add_argument("--weights", default="auto", help="auto (the checkpoint's own backbone weights when it has them, else pretrained from the hub, cached), checkpoint, random (offline, meaningless) or a weights file/URL")
    parser.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    parser.add_argument("--upsampler", default=None, help=UPSAMPLER_HELP)
    parser.add_argument("--image-size", type=positive_int, default=224, help="resize + centre crop size (default 224)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--out", required=True, type=Path, help="folder for the PNG panels")


def run(args: argparse.Namespace) -> int:
    """Loads the models once, then renders one panel per image; bad images are reported and skipped."""
    import torch  # heavy imports stay out of ``featup --help``

    from jobs.models import resolve_model_names

    resolve_model_names(args)
    device = resolve_device(args.device)
    make_out_dir(args.out)
    with torch.inference_mode():
        models = load_models(args, device)
        notices = model_notices(models.backbone.weights_id, args.checkpoint, args.upsampler)
        print(f"featup: {describe(models, args)}", file=sys.stderr)
        for notice in notices:
            print(f"featup: warning: {notice}", file=sys.stderr)
        targets = output_paths(args.images, args.out)
        failed = sum(not _render_one(src, dst, models, args.image_size, notices) for src, dst in targets)
    print(f"featup: {len(targets) - failed} of {len(targets)} images written to {args.out}", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def make_out_dir(out: Path) -> None:
    """Creates the output folder, or raises a ConfigError saying why it cannot be used."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: expected a writable folder, got {e.strerror or e}") from None


def load_models(args: argparse.Namespace, device: torch.device) -> Models:
    """The backbone and the upsampler (trained from ``--checkpoint`` or freshly built), both in eval mode."""
    from featup import hub
    from featup.backbones import build_backbone
    from featup.checkpoint import load_featup_checkpoint
    from featup.upsamplers import build_upsampler

    if args.upsampler in hub.upsampler_hub.KINDS:  # a successor: published weights, guidance in its normalisation
        backbone = build_backbone(args.backbone, args.weights, device=device).eval()
        upsampler = hub.load_upsampler(args.upsampler, args.checkpoint, device=device)
        return Models(backbone, hub.for_backbone(upsampler, backbone).eval(), device)
    if args.checkpoint is not None and args.upsampler not in (None, "jbu"):
        raise ConfigError(f"--upsampler: expected jbu (or nothing) with --checkpoint, got {args.upsampler!r}")
    if args.checkpoint is None:
        backbone = build_backbone(args.backbone, args.weights, device=device).eval()
        upsampler = build_upsampler(args.upsampler or "jbu", backbone.dim, device=device)
        return Models(backbone, upsampler.eval(), device)
    upsampler = load_featup_checkpoint(args.checkpoint, device=device)  # first: it may carry the backbone's weights
    backbone = build_backbone(args.backbone, args.weights, checkpoint=upsampler, device=device).eval()
    if upsampler.dim != backbone.dim:
        raise CheckpointError(
            f"checkpoint {args.checkpoint}: expected {backbone.dim} channels (backbone {args.backbone}), got {upsampler.dim}"
        )
    return Models(backbone, upsampler.eval(), device)


def model_notices(weights_id: str, checkpoint: str | None, upsampler: str | None) -> list[str]:
    """Warnings to print and stamp on every panel when the features or the upsampler are not trained."""
    notices = []
    if weights_id == "random":
        notices.append(RANDOM_WEIGHTS_NOTICE)
    if checkpoint is None and (upsampler or "jbu") == "jbu":
        notices.append(UNTRAINED_JBU_NOTICE)
    return notices


def describe(models: Models, args: argparse.Namespace) -> str:
    """One line saying which backbone, weights, upsampler and device the run uses."""
    upsampler = f"{args.upsampler or 'jbu'} from {args.checkpoint}" if args.checkpoint else (args.upsampler or "jbu")
    return f"backbone {args.backbone} ({models.backbone.weights_id}), upsampler {upsampler}, device {models.device}"


def output_paths(images: Sequence[str], out_dir: Path) -> list[tuple[str, Path]]:
    """(image, panel path) pairs named after each image's stem, made unique with -2, -3, ... suffixes."""
    seen: dict[str, int] = {}
    pairs = []
    for image in images:
        stem = PurePosixPath(str(image).replace("\\", "/")).stem or "image"
        seen[stem] = seen.get(stem, 0) + 1
        name = stem if seen[stem] == 1 else f"{stem}-{seen[stem]}"
        pairs.append((image, out_dir / f"{name}.png"))
    return pairs


def upsample_panel(path: str, models: Models, image_size: int, notices: Sequence[str]) -> Image.Image:
    """Preprocesses one image, computes low-res and upsampled features and renders their panel."""
    from pipeline.sources.images import load_and_preprocess
    from pipeline.analysis.pictures import pca_rgb, render_panel

    backbone, upsampler, device = models
    display, x = load_and_preprocess(path, image_size, backbone.stride, backbone.mean, backbone.std)
    x = x.unsqueeze(0).to(device)  # (1, 3, S, S)
    lr_feats = backbone(x)  # (1, C, S/stride, S/stride)
    hr_feats = upsampler(lr_feats, x)  # (1, C, S, S)
    return render_panel(display, *pca_rgb(lr_feats, hr_feats), banner=notices)


def _render_one(src: str, dst: Path, models: Models, image_size: int, notices: Sequence[str]) -> bool:
    """Renders and saves one panel; reports an InputError for this image and returns False instead of raising."""
    from pipeline.analysis.pictures import save_panel

    try:
        save_panel(upsample_panel(src, models, image_size, notices), dst)
    except InputError as e:
        print(f"featup: error: {e}", file=sys.stderr)
        return False
    print(f"wrote {dst}")
    return True
