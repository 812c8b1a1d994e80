"""The ground-truth quality benchmark: bilinear, trained JBU and fitted implicit upsampler against known features.

Data: ``pipeline.evaluate.groundtruth`` images (train and held-out splits) and the teacher of
``featup.backbones.teacher``, whose coarse features are the area means of a known per-pixel field.
The JBU is trained on the train split with ``train_jbu`` (no channel norm, so its output lives in
the teacher's channel space, like the truth); the implicit upsampler is fitted to each held-out
image with ``fit_implicit``. Every method is scored on the held-out images at their native size:

* relative L2 error ``||F^ - F|| / ||F||`` per image (mean over images), and the same restricted to
  pixels within ``edge_radius`` of a region edge ("edge") and to the others ("flat");
* mean per-pixel cosine similarity to the truth, overall, near edges and in flat regions;
* the multi-view reconstruction error on held-out jitters: ``||pool(t(F^)) - f(t(x))||^2 / ||f(t(x))||^2``
  averaged over ``eval_views`` jitters t drawn from a fixed seed (the same for every method). ``pool``
  is the fixed ``stride`` x ``stride`` area mean -- the teacher's own pooling, so no method's learned
  downsampler is involved and the comparison is fair. The truth itself is scored too: its
  reconstruction error is the floor left by the jitter's resampling.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, TextIO

import numpy as np
import torch
import torch.nn.functional as F
from fsspec.implementations.local import LocalFileSystem

from featup.errors import ConfigError
from featup.jitter import apply_jitter, sample_jitter
from pipeline.evaluate.groundtruth import GroundTruthImage
from pipeline.runtime.storage import put_atomic

TEACHERS = {16: "featup.backbones.teacher:teacher16", 14: "featup.backbones.teacher:teacher14"}
METHODS = ("bilinear", "jbu", "implicit")
JBU_TARGET = 0.75  # the trained JBU's mean relative error must be at most this fraction of bilinear's
METRICS = ("rel", "rel_edge", "rel_flat", "cos", "cos_edge", "cos_flat", "recon")
Method = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # (image, lr_feats, index) -> hr (1, C, H, W)


@dataclass(frozen=True)
class EvalConfig:
    """Every setting of one ``featup evaluate`` run; validated at construction."""

    out: str
    teacher_stride: int = 16
    train_images: int = 64
    test_images: int = 6
    image_size: int = 64
    jbu_steps: int = 300
    jbu_lr: float = 3e-3
    batch_size: int = 4
    n_jitters: int = 3
    crf_weight: float = 0.001
    implicit_steps: int = 300
    implicit_views: int = 128
    implicit_views_per_step: int = 5
    implicit_lr: float = 2e-3
    eval_views: int = 8
    max_pad: int = 16
    edge_radius: int = 3
    figure_images: int = 3
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None  # torch CPU threads during the run (None: leave torch's setting)
    upsampler: str | None = None  # a successor (anyup, jafar, loftup, naf, uplift) scored besides the three methods
    checkpoint: str | None = None  # its weights: a published name, a path or a URL (None: its default published ones)

    def __post_init__(self) -> None:
        if not isinstance(self.out, str) or not self.out:
            raise ConfigError(f"--out: expected a folder path, got {self.out!r}")
        if self.teacher_stride not in TEACHERS:
            raise ConfigError(f"--teacher-stride: expected one of {', '.join(map(str, TEACHERS))}, got {self.teacher_stride!r}")
        for name in ("train_images", "test_images", "jbu_steps", "batch_size", "n_jitters", "implicit_steps",
                     "implicit_views", "implicit_views_per_step", "eval_views"):
            _check_int(name, getattr(self, name), 1)
        for name in ("max_pad", "edge_radius", "figure_images", "seed"):
            _check_int(name, getattr(self, name), 0)
        if self.threads is not None:
            _check_int("threads", self.threads, 1)
        if self.image_size < 2 * self.teacher_stride:
            raise ConfigError(f"--image-size: expected at least twice the stride ({2 * self.teacher_stride}), got {self.image_size!r}")
        if self.max_pad >= self.short_side:
            raise ConfigError(f"--max-pad: expected less than the image side {self.short_side}, got {self.max_pad}")
        for name in ("jbu_lr", "implicit_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"--{name.replace('_', '-')}: expected a number > 0, got {value!r}")
        _check_upsampler(self.upsampler, self.checkpoint)
        if isinstance(self.crf_weight, bool) or not isinstance(self.crf_weight, (int, float)) or self.crf_weight < 0:
            raise ConfigError(f"--crf-weight: expected a number >= 0, got {self.crf_weight!r}")

    @property
    def methods(self) -> tuple[str, ...]:
        """The scored methods: bilinear, jbu, implicit and the ``upsampler`` when one is given."""
        return METHODS + ((self.upsampler,) if self.upsampler else ())

    @property
    def teacher(self) -> str:
        return TEACHERS[self.teacher_stride]

    @property
    def short_side(self) -> int:
        """The shorter image side: ``image_size`` rounded to a multiple of the stride (training crops are this square)."""
        return max(self.teacher_stride, round(self.image_size / self.teacher_stride) * self.teacher_stride)


def _check_upsampler(upsampler: str | None, checkpoint: str | None) -> None:
    from featup.upsampler_hub import KINDS

    if upsampler is not None and upsampler not in KINDS:
        raise ConfigError(f"--upsampler: expected one of {', '.join(KINDS)} (scored besides {', '.join(METHODS)}), got {upsampler!r}")
    if checkpoint is not None and upsampler is None:
        raise ConfigError(f"--checkpoint {checkpoint}: expected --upsampler KIND with it, got none")


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"--{name.replace('_', '-')}: expected an integer >= {low}, got {value!r}")


@dataclass
class EvalReport:
    """Per-image and mean scores of every method, the JBU training log and whether the targets were met."""

    config: dict[str, Any]
    per_image: list[dict[str, Any]]  # {"key", "size", "method", metric: value...}
    means: dict[str, dict[str, float]]  # method -> metric -> mean over the held-out images
    jbu_losses: list[dict[str, float]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def ratio(self, method: str, metric: str = "rel") -> float:
        """``method``'s mean ``metric`` over bilinear's."""
        return self.means[method][metric] / self.means["bilinear"][metric]

    def target_failures(self) -> list[str]:
        """What the targets (JBU rel <= 0.75 x bilinear, implicit rel < JBU) missed; empty when both are met."""
        failures = []
        if self.ratio("jbu") > JBU_TARGET:
            failures.append(f"JBU relative error {self.means['jbu']['rel']:.4f} is {self.ratio('jbu'):.3f} x bilinear's "
                            f"{self.means['bilinear']['rel']:.4f}; expected at most {JBU_TARGET}")
        if self.means["implicit"]["rel"] >= self.means["jbu"]["rel"]:
            failures.append(f"implicit relative error {self.means['implicit']['rel']:.4f}: expected below "
                            f"the JBU's {self.means['jbu']['rel']:.4f}")
        return failures


def near_edges(edges: torch.Tensor, radius: int) -> torch.Tensor:
    """Bool (H, W): pixels within ``radius`` (Chebyshev distance) of an edge pixel of the bool (H, W) ``edges``."""
    grown = F.max_pool2d(edges.float()[None, None], 2 * radius + 1, stride=1, padding=radius)
    return grown[0, 0] > 0


def _masked_relative(pred: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> float:
    """``||pred - truth|| / ||truth||`` over the pixels of ``mask`` (H, W); NaN for an empty mask."""
    if not bool(mask.any()):
        return math.nan
    err = (pred - truth).square().sum(1)[0][mask].sum()  # over channels, then the masked pixels
    return float(err.sqrt() / truth.square().sum(1)[0][mask].sum().sqrt().clamp_min(1e-12))


def score(pred: torch.Tensor, truth: torch.Tensor, near_edge: torch.Tensor) -> dict[str, float]:
    """Relative L2 error and mean cosine similarity of (1, C, H, W) ``pred`` to ``truth``: all, near edges, flat."""
    cos = F.cosine_similarity(pred.float(), truth.float(), dim=1, eps=1e-8)[0]  # (H, W)
    everywhere = torch.ones_like(near_edge)
    scores = {}
    for suffix, mask in (("", everywhere), ("_edge", near_edge), ("_flat", ~near_edge)):
        scores[f"rel{suffix}"] = _masked_relative(pred.float(), truth.float(), mask)
        scores[f"cos{suffix}"] = float(cos[mask].mean()) if bool(mask.any()) else math.nan
    return scores


def held_out_views(height: int, width: int, count: int, max_pad: int, seed: int) -> list:
    """``count`` jitters of an (height, width) image from a generator seeded with ``seed``, for every method alike."""
    gen = torch.Generator().manual_seed(seed)
    return [sample_jitter(height, width, max_pad=max_pad, max_zoom=2.0, generator=gen) for _ in range(count)]


@torch.no_grad()
def reconstruction_error(hr: torch.Tensor, image: torch.Tensor, featurize: Callable, stride: int, views: list, max_pad: int) -> float:
    """Mean over ``views`` of ``||avgpool_stride(t(hr)) - featurize(t(image))||^2 / ||featurize(t(image))||^2``."""
    total = 0.0
    for view in views:
        target = featurize(apply_jitter(image, max_pad, view))  # (1, C, h, w)
        pooled = F.avg_pool2d(apply_jitter(hr, max_pad, view), stride)  # (1, C, h, w)
        total += float((pooled - target).square().sum() / target.square().sum().clamp_min(1e-12))
    return total / len(views)


def summarise(per_image: list[dict[str, Any]], methods: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Mean of every metric per method over the images (NaNs, from images without edges, left out)."""
    means = {}
    for method in methods:
        rows = [r for r in per_image if r["method"] == method]
        means[method] = {m: _mean([r[m] for r in rows if not math.isnan(r[m])]) for m in METRICS}
    return means


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def markdown_table(report: EvalReport) -> str:
    """The results as a markdown table: one row per method, its means and its relative error over bilinear's."""
    header = ("| method | rel. L2 error | vs bilinear | near edges | flat | cosine | cos. near edges | cos. flat "
              "| reconstruction (held-out jitters) |")
    lines = [header, "| --- " * 9 + "|"]
    for method, m in report.means.items():
        lines.append(f"| {method} | {m['rel']:.4f} | {report.ratio(method):.3f} | {m['rel_edge']:.4f} | {m['rel_flat']:.4f} "
                     f"| {m['cos']:.4f} | {m['cos_edge']:.4f} | {m['cos_flat']:.4f} | {m['recon']:.5f} |")
    return "\n".join(lines) + "\n"


def write_report(report: EvalReport, out: str, figure_png: bytes | None) -> dict[str, str]:
    """``results.json``, ``results.md`` and ``figure.png`` in ``out`` (each written to a temp name, then renamed)."""
    os.makedirs(out, exist_ok=True)
    paths = {"json": os.path.join(out, "results.json"), "table": os.path.join(out, "results.md")}
    payload = asdict(report) | {"ratios_to_bilinear": {m: report.ratio(m) for m in report.means},
                                "target_failures": report.target_failures()}
    fs = LocalFileSystem()
    put_atomic(fs, paths["json"], json.dumps(payload, indent=2, allow_nan=True).encode())
    put_atomic(fs, paths["table"], markdown_table(report).encode())
    if figure_png is not None:
        paths["figure"] = os.path.join(out, "figure.png")
        put_atomic(fs, paths["figure"], figure_png)
    return paths


def log(err: TextIO | None, text: str) -> None:
    """One progress line on ``err`` (stderr by default)."""
    (err or sys.stderr).write(f"evaluate: {text}\n")
    (err or sys.stderr).flush()


@dataclass
class Scored:
    """One held-out image with its truth and every method's features (kept for the figure)."""

    sample: GroundTruthImage
    truth: torch.Tensor  # (1, C, H, W)
    outputs: dict[str, torch.Tensor]  # method -> (1, C, H, W)
    near_edge: torch.Tensor  # (H, W) bool
