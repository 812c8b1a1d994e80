"""Draw a few samples of a feature store: image, low-res and upsampled features through one PCA, one row per sample."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, NamedTuple, Sequence

from featup.errors import ConfigError, InputError
from jobs.cli import EXIT_OK
from jobs.models import CHECKPOINT_HELP, UPSAMPLER_HELP

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from pipeline.store.reader import FeatureReader

RANDOM_WEIGHTS_NOTICE = "RANDOM WEIGHTS - these features are not meaningful"
PLACEHOLDER = (128, 128, 128)
DEFAULT_ROWS = 4
PCA_PIXELS = 50_000  # pixels the PCA is fitted on, drawn from every shown map


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``featup show`` options."""
    parser.add_argument("url", metavar="URL", help="the feature store: a local path or fsspec URL")
    parser.add_argument("--rows", default=None, help="comma-separated positions among the valid samples, as reader[i] counts "
                        f"them (default: the first {DEFAULT_ROWS})")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE", help="fsspec storage option (repeatable)")
    parser.add_argument("--upsampler", default=None,
                        help="also draw the stored low-res features upsampled from the stored image by this upsampler, as a "
                             "fourth tile (a store made with --save-lowres --save-image): " + UPSAMPLER_HELP)
    parser.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP + "; with --upsampler")


def run(args: argparse.Namespace) -> int:
    """Reads the rows, fits one PCA on all their features and writes the panels stacked into one PNG."""
    from pipeline.runtime.storage import parse_storage_options
    from pipeline.store.reader import open_features
    from pipeline.analysis.pictures import save_panel

    # A few samples: eager JBU kernels for a compact store (compiling them would take longer than drawing).
    reader = open_features(args.url, kernel_backend="eager", **parse_storage_options(args.storage_option))
    if reader.compact is not None:  # a compact store's low-res input is read only when asked for
        reader = reader.select(arrays=[*reader.array_names, "lowres"])
    positions = parse_rows(args.rows, len(reader))
    extra = load_extra(args, reader)
    save_panel(render_rows(reader, positions, extra), args.out)
    print(f"featup: {len(positions)} samples of {args.url} drawn to {args.out}", file=sys.stderr)
    return EXIT_OK


def parse_rows(text: str | None, available: int) -> list[int]:
    """Positions from ``--rows`` (each must be a valid sample), or the first DEFAULT_ROWS valid samples."""
    if available == 0:
        raise InputError("store: expected at least one valid sample to show, got none (see featup inspect)")
    if text is None:
        positions = list(range(min(DEFAULT_ROWS, available)))
    else:
        try:
            positions = [int(p) for p in text.split(",") if p.strip()]
        except ValueError:
            raise ConfigError(f"--rows: expected comma-separated integers, got {text!r}") from None
    bad = [p for p in positions if not 0 <= p < available]
    if bad or not positions:
        raise ConfigError(f"--rows: expected positions in [0, {available}) of the valid samples, got {bad or text}")
    return positions


class Extra(NamedTuple):
    """A second upsampler drawn next to the stored features: its name and the module, ready for the store's backbone."""

    label: str
    upsampler: torch.nn.Module
    backbone_norm: object  # featup.upsamplers.ImageNorm of the stored images' backbone


def load_extra(args: argparse.Namespace, reader: FeatureReader) -> Extra | None:
    """``--upsampler``/``--checkpoint`` loaded for the store's backbone (None without them); the store must hold the
    images and low-res features it upsamples."""
    from types import SimpleNamespace

    from featup import hub
    from featup.upsamplers import ImageNorm
    from featup.upsamplers.base import IMAGENET_NORM

    if args.upsampler is None and args.checkpoint is None:
        return None
    missing = [name for name in ("lowres", "image") if name not in reader.shapes]
    if missing:
        raise ConfigError(f"--upsampler: expected a store with 'lowres' and 'image' arrays to upsample (precompute with "
                          f"--save-lowres --save-image), got a store without {' and '.join(map(repr, missing))}")
    from jobs.models import resolve_names

    names = argparse.Namespace(upsampler=args.upsampler, checkpoint=args.checkpoint, backbone=reader.attrs.get("backbone", "store"))
    resolve_names(names)
    a = reader.attrs
    norm = ImageNorm(tuple(a["backbone_mean"]), tuple(a["backbone_std"])) if "backbone_mean" in a else IMAGENET_NORM
    backbone = SimpleNamespace(name=names.backbone, dim=reader.shapes["lowres"][0][0], stride=a.get("backbone_stride"),
                               mean=norm.mean, std=norm.std)
    kind = names.upsampler or "jbu"
    upsampler = hub.for_backbone(hub.load_upsampler(kind, names.checkpoint), backbone)
    return Extra(kind if names.checkpoint is None else f"{kind} ({names.checkpoint})", upsampler, norm)


def upsample_stored(sample: dict, extra: Extra) -> torch.Tensor:
    """The sample's stored low-res features upsampled to its features' size from its stored image: (1, C, H, W)."""
    import torch

    image = extra.backbone_norm.normalize(sample["image"].float().div(255.0)[None])  # (1, 3, S, S), as the backbone saw it
    with torch.inference_mode():
        return extra.upsampler(sample["lowres"][None].float(), image, tuple(sample["features"].shape[1:])).float()


def render_rows(reader: FeatureReader, positions: Sequence[int], extra: Extra | None = None) -> Image.Image:
    """One panel per sample (image | low-res PCA | upsampled PCA [| --upsampler's PCA]), all maps coloured by one PCA,
    stacked vertically."""
    import torch

    from featup.pca import fit_pca, flatten_pixels
    from pipeline.analysis.pictures import joint_minmax

    samples = [reader[p] for p in positions]
    hr = [s["features"][None] for s in samples]  # (1, C, H, W) each
    lr = [s["lowres"][None] for s in samples if "lowres" in s]  # (1, C, h, w) each
    more = [upsample_stored(s, extra) for s in samples] if extra is not None else []  # (1, C, H, W) each
    pixels = torch.cat([flatten_pixels(m) for m in hr + lr + more])  # (pixels, C)
    pca = fit_pca(pixels, min(3, pixels.shape[1]), max_samples=PCA_PIXELS, generator=torch.Generator().manual_seed(0))
    rgb = joint_minmax([_three(pca.transform(m)) for m in hr + lr + more])
    hr_rgb, lr_rgb, more_rgb = rgb[: len(hr)], rgb[len(hr) : len(hr) + len(lr)], rgb[len(hr) + len(lr) :]
    notices = [RANDOM_WEIGHTS_NOTICE] if reader.attrs.get("backbone_weights") == "random" else []
    panels = [_panel(s, h[0], lr_rgb[i][0] if lr_rgb else None, notices if i == 0 else [],
                     (more_rgb[i][0], extra.label) if more_rgb else None)
              for i, (s, h) in enumerate(zip(samples, hr_rgb))]
    return _stack(panels)


def _three(z: torch.Tensor) -> torch.Tensor:
    """(1, K, H, W) components padded with zeros to 3 (a store with fewer than 3 channels)."""
    import torch

    return torch.cat([z, z.new_zeros(1, 3 - z.shape[1], *z.shape[2:])], 1) if z.shape[1] < 3 else z


def _panel(sample: dict, hr_rgb: torch.Tensor, lr_rgb: torch.Tensor | None, banner: list[str],
           extra: tuple[torch.Tensor, str] | None = None) -> Image.Image:
    """The visualize panel of one sample, with grey placeholders for what the store does not hold."""
    from PIL import Image

    from pipeline.analysis.pictures import render_panel

    height, width = hr_rgb.shape[1:]
    if "image" in sample:
        image = Image.fromarray(sample["image"].permute(1, 2, 0).numpy(), mode="RGB")
        image_caption = f"{sample['key']} (row {sample['row']}) {image.width}x{image.height}"
    else:
        image = Image.new("RGB", (width, height), PLACEHOLDER)
        image_caption = f"{sample['key']} (row {sample['row']}): no image (--save-image)"
    if lr_rgb is None:
        lr_rgb = hr_rgb.new_full((3, 1, 1), 0.5)
        lr_caption = "no low-res (--save-lowres)"
    else:
        lr_caption = f"low-res {lr_rgb.shape[2]}x{lr_rgb.shape[1]} (PCA)"
    captions = [image_caption, lr_caption, f"upsampled {width}x{height} (PCA)"]
    if extra is not None:
        captions.append(f"{extra[1]} {width}x{height} (PCA)")
    return render_panel(image, lr_rgb, hr_rgb, banner=banner, captions=captions, extra=[extra[0]] if extra else [])


def _stack(panels: Sequence[Image.Image]) -> Image.Image:
    """Panels one under the other on a white background."""
    from PIL import Image

    out = Image.new("RGB", (max(p.width for p in panels), sum(p.height for p in panels)), (255, 255, 255))
    top = 0
    for panel in panels:
        out.paste(panel, (0, top))
        top += panel.height
    return out
