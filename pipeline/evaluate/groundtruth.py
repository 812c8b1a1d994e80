"""Images for the ground-truth benchmark: piecewise regions with textures and sharp edges, as WebDataset shards.

Each image is a Voronoi partition with a few ellipses on top; every region has its own base colour
from a palette of well-separated colours, a faint striped texture and a little noise, so colour
changes sharply at region edges and only slightly inside a region. With the teacher of
``featup.backbones.teacher`` (whose true features are a function of colour) this makes features
that are sharp at edges: bilinear resizing of their area means is visibly wrong there.
Every sample is ``<key>.png`` (the RGB image), ``<key>.seg.png`` (uint8 region ids) and
``<key>.edge.png`` (uint8, 255 on pixels whose right or lower neighbour is in another region, and
on that neighbour). Sides are multiples of the teacher stride, at several aspect ratios.
Deterministic: the same arguments write the same bytes.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from featup.errors import ConfigError, InputError
from pipeline.sources.shards import iter_shard_samples
from pipeline.sources.synthetic import join_path, png_bytes, write_shard

# Region base colours (RGB in [0, 1]), far apart from each other.
PALETTE = np.array([
    (0.90, 0.15, 0.15), (0.15, 0.75, 0.25), (0.20, 0.30, 0.90), (0.95, 0.85, 0.20), (0.80, 0.25, 0.85),
    (0.15, 0.80, 0.85), (0.95, 0.55, 0.10), (0.10, 0.10, 0.10), (0.92, 0.92, 0.92), (0.50, 0.50, 0.50),
    (0.45, 0.20, 0.05), (0.55, 0.85, 0.55),
])
SPLITS = ("train", "test")


@dataclass(frozen=True)
class GroundTruthSpec:
    """What the images look like; ``image_size`` is the shorter side, both sides are multiples of ``multiple``."""

    image_size: int = 64
    multiple: int = 16
    aspect_ratios: tuple[float, ...] = (1.0, 1.5, 0.75)  # width / height, used in turn
    regions: tuple[int, int] = (3, 6)  # inclusive range of Voronoi cells
    ellipses: tuple[int, int] = (1, 2)  # inclusive range of ellipses drawn on top
    texture: float = 0.04  # amplitude of the striped texture, in colour units
    colour_jitter: float = 0.04  # per-region offset of the base colour, uniform in [-j, j]
    noise: float = 0.01  # std of per-pixel Gaussian noise, in colour units

    def __post_init__(self) -> None:
        if self.multiple < 1 or self.image_size < self.multiple:
            raise ConfigError(f"image size: expected at least the multiple {self.multiple} (>= 1), got {self.image_size}")
        if not self.aspect_ratios or min(self.aspect_ratios) <= 0:
            raise ConfigError(f"aspect ratios: expected positive width/height ratios, got {self.aspect_ratios}")
        if not 2 <= self.regions[0] <= self.regions[1] <= len(PALETTE) - self.ellipses[1]:
            raise ConfigError(f"regions: expected 2 <= low <= high <= {len(PALETTE) - self.ellipses[1]}, got {self.regions}")
        if not 0 <= self.ellipses[0] <= self.ellipses[1]:
            raise ConfigError(f"ellipses: expected 0 <= low <= high, got {self.ellipses}")
        if min(self.texture, self.colour_jitter, self.noise) < 0:
            raise ConfigError("texture / colour_jitter / noise: expected >= 0, got a negative value")

    def size(self, index: int) -> tuple[int, int]:
        """(height, width) of image ``index``: the aspect ratios in turn, sides rounded to the multiple."""
        m = self.multiple
        short = max(m, round(self.image_size / m) * m)
        ratio = self.aspect_ratios[index % len(self.aspect_ratios)]
        long = max(m, round(short * max(ratio, 1 / ratio) / m) * m)
        return (short, long) if ratio >= 1 else (long, short)


@dataclass
class GroundTruthImage:
    """One decoded sample: the image (H, W, 3) uint8, its region ids (H, W) and its edge mask (H, W) bool."""

    key: str
    image: np.ndarray
    regions: np.ndarray
    edges: np.ndarray


def render_regions(rng: np.random.Generator, height: int, width: int, spec: GroundTruthSpec) -> np.ndarray:
    """Region ids (H, W) uint8: Voronoi cells of random seeds, then ellipses on top (later ones cover earlier)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    n = int(rng.integers(spec.regions[0], spec.regions[1] + 1))
    seeds = rng.uniform((0, 0), (height, width), size=(n, 2))
    dist = (ys[None] - seeds[:, 0, None, None]) ** 2 + (xs[None] - seeds[:, 1, None, None]) ** 2  # (n, H, W)
    regions = dist.argmin(0).astype(np.uint8)
    for label in range(n, n + int(rng.integers(spec.ellipses[0], spec.ellipses[1] + 1))):
        cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
        ry, rx = rng.uniform(0.12, 0.3, size=2) * min(height, width)
        angle = rng.uniform(0, math.pi)
        u = (xs - cx) * math.cos(angle) + (ys - cy) * math.sin(angle)
        v = -(xs - cx) * math.sin(angle) + (ys - cy) * math.cos(angle)
        regions[(u / rx) ** 2 + (v / ry) ** 2 <= 1.0] = label
    return regions


def paint(rng: np.random.Generator, regions: np.ndarray, spec: GroundTruthSpec) -> np.ndarray:
    """RGB uint8 (H, W, 3): each region's palette colour plus its own faint stripes, then pixel noise."""
    height, width = regions.shape
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    colours = rng.permutation(len(PALETTE))
    image = np.zeros((height, width, 3))
    for label in range(int(regions.max()) + 1):
        base = PALETTE[colours[label]] + rng.uniform(-spec.colour_jitter, spec.colour_jitter, 3)
        angle, period, phase = rng.uniform(0, math.pi), rng.uniform(4.0, 12.0), rng.uniform(0, 2 * math.pi)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        stripes = np.sin(2 * math.pi * (xs * math.cos(angle) + ys * math.sin(angle)) / period + phase)  # (H, W)
        inside = regions == label
        image[inside] = base + spec.texture * stripes[inside, None] * direction
    image += rng.normal(0.0, spec.noise, image.shape)
    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)


def edge_map(regions: np.ndarray) -> np.ndarray:
    """Bool (H, W): pixels with a right or lower neighbour in another region, and that neighbour."""
    edges = np.zeros(regions.shape, dtype=bool)
    across_x = regions[:, 1:] != regions[:, :-1]
    across_y = regions[1:] != regions[:-1]
    edges[:, 1:] |= across_x
    edges[:, :-1] |= across_x
    edges[1:] |= across_y
    edges[:-1] |= across_y
    return edges


def groundtruth_sample(key: str, rng: np.random.Generator, size: tuple[int, int], spec: GroundTruthSpec) -> dict:
    """One WebDataset sample: ``png`` image, ``seg.png`` region ids and ``edge.png`` mask, all lossless."""
    regions = render_regions(rng, *size, spec)
    image = paint(rng, regions, spec)
    edges = edge_map(regions).astype(np.uint8) * 255
    return {"__key__": key, "png": png_bytes(image), "seg.png": png_bytes(regions), "edge.png": png_bytes(edges)}


def write_groundtruth_shards(
    folder: str | os.PathLike,
    split: str,
    count: int,
    spec: GroundTruthSpec = GroundTruthSpec(),
    *,
    seed: int = 0,
    per_shard: int = 16,
    storage_options: dict | None = None,
) -> list[str]:
    """Writes ``<split>-000000.tar``... with ``count`` images of split ``train`` or ``test``; returns their paths.

    The two splits draw from different streams of the same seed, so they never share an image.
    """
    if split not in SPLITS:
        raise ConfigError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
    if count < 1 or per_shard < 1:
        raise ConfigError(f"{split} images: expected at least 1 image and 1 per shard, got {count} and {per_shard}")
    paths = []
    for s, start in enumerate(range(0, count, per_shard)):
        samples = []
        for i in range(start, min(start + per_shard, count)):
            rng = np.random.default_rng((seed, SPLITS.index(split), i))
            samples.append(groundtruth_sample(f"{split}{i:05d}", rng, spec.size(i), spec))
        paths.append(write_shard(join_path(folder, f"{split}-{s:06d}.tar"), samples, storage_options))
    return paths


def read_groundtruth(paths: Sequence[str], storage_options: dict | None = None) -> Iterator[GroundTruthImage]:
    """The samples of ground-truth shards at their native size, in order; a broken sample raises InputError."""
    for path in paths:
        for sample in iter_shard_samples(path, storage_options):
            if sample.get("__error__"):
                raise InputError(str(sample["__error__"]))
            missing = [ext for ext in ("png", "seg.png", "edge.png") if ext not in sample]
            if missing:
                raise InputError(f"sample {sample['__key__']} of {path}: expected png, seg.png and edge.png, got no {missing}")
            image = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))  # (H, W, 3)
            regions = np.asarray(Image.open(io.BytesIO(sample["seg.png"])))  # (H, W)
            edges = np.asarray(Image.open(io.BytesIO(sample["edge.png"]))) > 0  # (H, W)
            if regions.shape != image.shape[:2] or edges.shape != image.shape[:2]:
                raise InputError(f"sample {sample['__key__']} of {path}: expected masks of the image size, got "
                                 f"{regions.shape} and {edges.shape} for {image.shape[:2]}")
            yield GroundTruthImage(str(sample["__key__"]), image, regions, edges)
