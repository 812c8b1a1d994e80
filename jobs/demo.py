"""The demo: shards from scikit-image's sample photos -> featup precompute on local Ray -> a summary and a PNG.

Online it uses the published model (``dino16`` with ``featup:dino16``: pretrained weights and the published JBU,
downloaded once). Offline (found out within seconds) it uses the ground-truth teacher backbone with a JBU
trained on it, shipped in ``jobs/assets`` (``python -m jobs.assets.reproduce`` remakes it): the picture then
shows synthetic teacher features, not real ones, and says so. Only these defaults fall back; a backbone,
weights or checkpoint given on the command line are used as given.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
from pathlib import Path
from typing import NamedTuple, Sequence

from jobs.cli import EXIT_OK, command_line_of, positive_int

VARIANTS = ("full", "flip", "left", "right", "top", "small")  # how each photo is turned into several samples


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``featup demo`` options."""
    parser.add_argument("--out", type=Path, default=Path("featup-demo"), help="folder of the shards, store and PNG (default ./featup-demo)")
    parser.add_argument("--backbone", default=None, help="backbone (default: dino16 online, the synthetic teacher offline)")
    parser.add_argument("--weights", default=None, help="auto, random, checkpoint or a weights file (default auto)")
    parser.add_argument("--checkpoint", default=None,
                        help="FeatUp JBU checkpoint (default: featup:dino16 online, the shipped teacher JBU offline)")
    parser.add_argument("--image-size", type=positive_int, default=224, help="resize + centre crop size (default 224)")
    parser.add_argument("--shards", type=positive_int, default=4, help="number of shards to write (default 4)")
    parser.add_argument("--actors", type=positive_int, default=2, help="Ray actors (default 2)")
    parser.add_argument("--kernel-backend", default="auto", help="JBU kernels: auto (torch.compile), compiled or eager")
    parser.add_argument("--panels", type=positive_int, default=4, help="samples drawn in the PNG (default 4)")
    parser.add_argument("--json", action="store_true", help="print the whole run report instead of the summary")


def run(args: argparse.Namespace) -> int:
    """Writes the shards, runs the precompute job on them, then draws a few samples' features."""
    from jobs.sample_images import sample_image_paths
    from pipeline.precompute.config import PrecomputeConfig
    from pipeline.precompute.driver import run_precompute

    model = choose_model(args)
    for line in model.notices:
        print(f"featup demo: {line}", file=sys.stderr)
    photos = sample_image_paths()
    shards = write_demo_shards(photos, args.out / "shards", args.shards)
    print(f"featup demo: wrote {len(shards)} shards of {len(photos) * len(VARIANTS)} samples to {args.out / 'shards'}", file=sys.stderr)
    store = str(args.out / "features.zarr")
    config = PrecomputeConfig(
        inputs=tuple(shards), output=store, backbone=model.backbone, weights=model.weights, checkpoint=model.checkpoint,
        image_size=args.image_size, save_image=True, save_lowres=True, actors=args.actors, device="cpu",
        batch_size=4, overwrite=True, kernel_backend=args.kernel_backend,
    )
    code = run_precompute(config, command_line=command_line_of(args), json_output=args.json)
    if code != EXIT_OK:
        return code
    png = args.out / "demo.png"
    draw_samples(store, png, args.panels, banner=model.notices)
    print(f"featup demo: wrote {png}", file=sys.stderr)
    return EXIT_OK


def write_demo_shards(photos: Sequence[Path], folder: Path, n_shards: int) -> list[str]:
    """Writes ``demo-000000.tar``...: every photo in every variant of VARIANTS, dealt round-robin over the shards."""
    from PIL import Image

    samples = []
    for photo in photos:
        with Image.open(photo) as img:
            rgb = img.convert("RGB")
        for variant in VARIANTS:
            samples.append((f"{photo.stem}-{variant}", variant_image(rgb, variant)))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        path = folder / f"demo-{s:06d}.tar"
        write_jpeg_tar(path, samples[s::n_shards])
        paths.append(str(path))
    return paths


def variant_image(img, variant: str):
    """A flipped, cropped or shrunk copy of the photo, so the demo has several distinct samples per photo."""
    from PIL import Image, ImageOps

    w, h = img.size
    boxes = {"left": (0, 0, w * 2 // 3, h), "right": (w // 3, 0, w, h), "top": (0, 0, w, h * 2 // 3)}
    if variant == "flip":
        return ImageOps.mirror(img)
    if variant in boxes:
        return img.crop(boxes[variant])
    if variant == "small":
        return img.resize((max(1, w // 3), max(1, h // 3)), Image.Resampling.BICUBIC)
    return img


def write_jpeg_tar(path: Path, samples: Sequence[tuple[str, object]]) -> None:
    """One WebDataset shard: ``<key>.jpg`` per sample (written to a temp name, then renamed)."""
    tmp = path.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tar:
        for key, img in samples:
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=92)
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size, info.mtime = buf.tell(), 0
            buf.seek(0)
            tar.addfile(info, buf)
    os.replace(tmp, path)


def draw_samples(store_url: str, png: Path, count: int, banner: Sequence[str] = ()) -> None:
    """One panel per sample (image | low-res PCA | upsampled PCA) for the first ``count`` valid rows, stacked into a PNG."""
    from PIL import Image

    from pipeline.analysis.pictures import pca_rgb, render_panel, save_panel
    from pipeline.store.reader import open_features

    reader = open_features(store_url)  # float features whatever the store's encoding; valid samples only
    panels = []
    for i in range(min(count, len(reader))):
        sample = reader[i]
        image = Image.fromarray(sample["image"].permute(1, 2, 0).numpy())  # (S, S, 3)
        lowres, feats = sample["lowres"][None], sample["features"][None]  # (1, C, h, w), (1, C, H, W)
        panels.append(render_panel(image, *pca_rgb(lowres, feats), banner=banner if i == 0 else ()))
    width = max(p.width for p in panels)
    sheet = Image.new("RGB", (width, sum(p.height for p in panels)), (255, 255, 255))
    top = 0
    for panel in panels:
        sheet.paste(panel, (0, top))
        top += panel.height
    save_panel(sheet, png)


class DemoModel(NamedTuple):
    """What the demo runs: backbone, weights and checkpoint, and the notices stamped on the picture."""

    backbone: str
    weights: str
    checkpoint: str | None
    notices: list[str]


ONLINE_CHECKPOINT = "featup:dino16"
TEACHER_BACKBONE = "featup.backbones.teacher:teacher16"
TEACHER_NOTICE = ("SYNTHETIC TEACHER FEATURES (offline demo): not a real backbone; a JBU trained on generated images "
                  "restores their edges")


def choose_model(args: argparse.Namespace) -> DemoModel:
    """The published dino16 model if it can be had (cached or downloaded now), else the shipped teacher model.

    A backbone, weights or checkpoint given by the user are used as given: only the defaults fall back.
    """
    from featup.errors import WeightsUnavailableError

    if args.backbone is not None or args.weights is not None or args.checkpoint is not None:
        from jobs.models import resolve_model_names
        from jobs.upsample import model_notices

        args.weights = args.weights or "auto"
        resolve_model_names(args)  # a featup: name is fetched now; offline, it fails here with one clear line
        return DemoModel(args.backbone, args.weights, args.checkpoint,
                         model_notices(args.weights if args.weights == "random" else "", args.checkpoint, "jbu"))
    from featup import hub

    try:
        hub.resolve_checkpoint(ONLINE_CHECKPOINT)
        return DemoModel(hub.implied_backbone(ONLINE_CHECKPOINT), "auto", ONLINE_CHECKPOINT, [])
    except WeightsUnavailableError as e:
        from jobs.assets import TEACHER_JBU

        print(f"featup demo: offline ({str(e).splitlines()[0][:160]}...); using the synthetic teacher", file=sys.stderr)
        return DemoModel(TEACHER_BACKBONE, "auto", str(TEACHER_JBU), [TEACHER_NOTICE])
