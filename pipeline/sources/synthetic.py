"""A synthetic segmentation set made on the spot: images of coloured shapes with their masks, as WebDataset shards.

Class 0 is the background (a noisy grey); each other class is one shape kind drawn in its own hue, so even
features of a randomly initialised backbone (which keep colour) can separate the classes with a linear head.
Every sample is ``<key>.png`` (the RGB image) and ``<key>.seg.png`` (uint8 class ids, same size).
Deterministic: the same arguments write the same bytes.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from typing import Callable, Sequence

import fsspec
import numpy as np
from PIL import Image, ImageDraw

from featup.errors import ConfigError
from featup.registry import Registry

SHAPES = Registry("synthetic shape")
# Base colour of each foreground class, in class order (class 1 is the first).
CLASS_COLOURS = ((220, 40, 40), (40, 190, 60), (50, 80, 230), (230, 200, 40), (200, 60, 210))
CLASS_SHAPES = ("disc", "square", "triangle", "diamond", "bar")


@SHAPES.register("disc")
def _disc(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], fill) -> None:
    draw.ellipse(box, fill=fill)


@SHAPES.register("square")
def _square(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], fill) -> None:
    draw.rectangle(box, fill=fill)


@SHAPES.register("triangle")
def _triangle(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


@SHAPES.register("diamond")
def _diamond(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)


@SHAPES.register("bar")
def _bar(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle((x0, (y0 * 2 + y1) // 3, x1, (y0 + y1 * 2) // 3), fill=fill)


@dataclass(frozen=True)
class SyntheticSpec:
    """What the images look like: ``classes`` counts the background; sizes are in pixels."""

    height: int = 64
    width: int = 96
    classes: int = 4
    shapes_per_image: tuple[int, int] = (2, 4)  # inclusive range
    shape_size: tuple[int, int] = (14, 30)  # inclusive range of a shape's box side
    colour_jitter: int = 25  # per-shape offset of each RGB channel, uniform in [-j, j]
    pixel_noise: float = 6.0  # std of per-pixel Gaussian noise

    def __post_init__(self) -> None:
        if not 2 <= self.classes <= len(CLASS_COLOURS) + 1:
            raise ConfigError(f"synthetic classes: expected 2 to {len(CLASS_COLOURS) + 1} (background included), got {self.classes}")
        if min(self.height, self.width) < self.shape_size[1] + 2 or self.shape_size[0] < 3:
            raise ConfigError(f"synthetic size: expected images larger than shapes of {self.shape_size} pixels, "
                              f"got {self.height}x{self.width}")


def render_sample(rng: np.random.Generator, spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray]:
    """One image (H, W, 3) uint8 and its mask (H, W) uint8 of class ids; later shapes cover earlier ones."""
    grey = int(rng.integers(70, 186))
    image = Image.new("RGB", (spec.width, spec.height), (grey, grey, grey))
    mask = Image.new("L", (spec.width, spec.height), 0)
    draw_image, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(spec.shapes_per_image[0], spec.shapes_per_image[1] + 1))):
        cls = int(rng.integers(1, spec.classes))
        side = int(rng.integers(spec.shape_size[0], spec.shape_size[1] + 1))
        x0, y0 = int(rng.integers(0, spec.width - side)), int(rng.integers(0, spec.height - side))
        box = (x0, y0, x0 + side - 1, y0 + side - 1)
        colour = np.clip(np.array(CLASS_COLOURS[cls - 1]) + rng.integers(-spec.colour_jitter, spec.colour_jitter + 1, 3), 0, 255)
        draw = SHAPES.get(CLASS_SHAPES[cls - 1])
        draw(draw_image, box, tuple(int(c) for c in colour))
        draw(draw_mask, box, cls)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, spec.pixel_noise, (spec.height, spec.width, 3))
    return np.clip(pixels, 0, 255).round().astype(np.uint8), np.asarray(mask, dtype=np.uint8)


def synthetic_sample(key: str, rng: np.random.Generator, spec: SyntheticSpec) -> dict[str, bytes | str]:
    """A WebDataset sample: ``png`` (the image) and ``seg.png`` (its mask), both lossless."""
    image, mask = render_sample(rng, spec)
    return {"__key__": key, "png": png_bytes(image), "seg.png": png_bytes(mask)}


def write_synthetic_shards(
    folder: str | os.PathLike,
    num_shards: int,
    per_shard: int,
    spec: SyntheticSpec = SyntheticSpec(),
    *,
    seed: int = 0,
    storage_options: dict | None = None,
    transform_mask: Callable[[np.ndarray], np.ndarray] | None = None,
) -> list[str]:
    """Writes ``synthetic-000000.tar``... (a local folder or an fsspec URL prefix) and returns their paths.

    ``transform_mask`` (optional) alters each stored mask: a way to make deliberately misaligned labels.
    """
    if num_shards < 1 or per_shard < 1:
        raise ConfigError(f"synthetic shards: expected at least 1 shard of 1 sample, got {num_shards} of {per_shard}")
    paths = []
    for s in range(num_shards):
        rng = np.random.default_rng((seed, s))
        samples = []
        for i in range(per_shard):
            sample = synthetic_sample(f"syn{s:04d}-{i:05d}", rng, spec)
            if transform_mask is not None:
                mask = np.asarray(Image.open(io.BytesIO(sample["seg.png"])))
                sample["seg.png"] = png_bytes(transform_mask(mask))
            samples.append(sample)
        paths.append(write_shard(join_path(folder, f"synthetic-{s:06d}.tar"), samples, storage_options))
    return paths


def write_shard(path: str, samples: Sequence[dict], storage_options: dict | None = None) -> str:
    """Writes one WebDataset tar: member ``<__key__>.<ext>`` per payload, samples in order, reproducible headers."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                payload = data.encode() if isinstance(data, str) else data
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size, info.mtime, info.mode = len(payload), 0, 0o644
                tar.addfile(info, io.BytesIO(payload))
    if "://" not in path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with fsspec.open(path, "wb", **(storage_options or {})) as f:
        f.write(buf.getvalue())
    return path


def png_bytes(array: np.ndarray) -> bytes:
    """A uint8 image or mask array encoded as PNG."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def join_path(folder: str | os.PathLike, name: str) -> str:
    """``name`` inside ``folder``, a local path or an fsspec URL."""
    folder = os.fspath(folder)
    return f"{folder.rstrip('/')}/{name}" if "://" in folder else os.path.join(folder, name)
