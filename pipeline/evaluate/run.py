"""One run of the ground-truth benchmark: generate the data, train the JBU, fit the implicit upsampler, score, write.

The steps are plain functions over an ``EvalConfig``; ``run_evaluation`` chains them and returns the
``EvalReport`` (``pipeline.evaluate.scoring`` has the metrics and the files, ``pipeline.evaluate.figure`` the PNG).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import TextIO

import torch
import torch.nn.functional as F

from pipeline.evaluate.scoring import (
    EvalConfig, EvalReport, Method, Scored, held_out_views, log, near_edges, reconstruction_error, score, summarise,
    write_report,
)
from pipeline.evaluate.groundtruth import GroundTruthImage, GroundTruthSpec, read_groundtruth, write_groundtruth_shards


def groundtruth_spec(config: EvalConfig) -> GroundTruthSpec:
    """The image generator's settings: shorter side ``config.short_side``, sides multiples of the teacher stride."""
    return GroundTruthSpec(image_size=config.short_side, multiple=config.teacher_stride)


def make_data(config: EvalConfig) -> tuple[list[str], list[str]]:
    """Writes the train and held-out shards under ``<out>/data`` and returns their paths."""
    folder, spec = os.path.join(config.out, "data"), groundtruth_spec(config)
    train = write_groundtruth_shards(folder, "train", config.train_images, spec, seed=config.seed)
    test = write_groundtruth_shards(folder, "test", config.test_images, spec, seed=config.seed)
    return train, test


def train_config(config: EvalConfig, train_shards: list[str]):
    """The ``train-jbu`` settings: published objective, no channel norm (outputs in the teacher's channels)."""
    from pipeline.train.loop import TrainConfig

    return TrainConfig(
        inputs=tuple(train_shards), backbone=config.teacher, weights="auto", output=os.path.join(config.out, "jbu.ckpt"),
        steps=config.jbu_steps, batch_size=config.batch_size, image_size=config.short_side, lr=config.jbu_lr,
        n_jitters=config.n_jitters, max_pad=config.max_pad, crf_weight=config.crf_weight, channel_norm=False,
        checkpoint_every=config.jbu_steps, log_every=max(1, config.jbu_steps // 20), seed=config.seed,
        device=config.device, overwrite=True, decode_threads=1,
    )


def implicit_config(config: EvalConfig):
    """The per-image implicit fit: published objective and network, fewer steps and views as configured."""
    from featup.upsamplers.implicit_fit import ImplicitFitConfig

    views = config.implicit_views
    return ImplicitFitConfig(steps=config.implicit_steps, n_views=views, views_per_step=config.implicit_views_per_step,
                             pca_views=min(50, views), lr=config.implicit_lr, max_pad=config.max_pad)


def build_methods(config: EvalConfig, backbone: torch.nn.Module, checkpoint: str, device: torch.device,
                  extra: dict[str, Method] | None = None) -> dict[str, Method]:
    """Each method as ``(image, lr_feats, index) -> (1, C, H, W)``: bilinear, the trained JBU, the per-image implicit fit,
    then ``extra`` (``config.upsampler``'s method, built here when not given)."""
    from featup.checkpoint import load_featup_checkpoint
    from featup.upsamplers.implicit_fit import fit_implicit

    jbu = load_featup_checkpoint(checkpoint, device=device, backend="eager")
    fit = implicit_config(config)

    def bilinear(image: torch.Tensor, lr_feats: torch.Tensor, index: int) -> torch.Tensor:
        return F.interpolate(lr_feats, size=image.shape[2:], mode="bilinear", align_corners=False)

    def trained_jbu(image: torch.Tensor, lr_feats: torch.Tensor, index: int) -> torch.Tensor:
        return jbu(lr_feats, image)

    def implicit(image: torch.Tensor, lr_feats: torch.Tensor, index: int) -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(config.seed * 1_000_003 + index)
        return fit_implicit(backbone, image, fit, generator=gen)

    methods = {"bilinear": bilinear, "jbu": trained_jbu, "implicit": implicit}
    if extra is None and config.upsampler is not None:
        extra = {config.upsampler: successor_method(config, backbone, device)}
    return methods | (extra or {})


def successor_method(config: EvalConfig, backbone: torch.nn.Module, device: torch.device) -> Method:
    """``config.upsampler`` with ``config.checkpoint`` (published name, path or URL) as a method, fed the teacher's
    image in its own normalisation; tried once on a square image of the shorter side, so that weights that do not
    fit the teacher or sizes it cannot take are refused before the JBU is trained."""
    from featup import hub

    upsampler = hub.for_backbone(hub.load_upsampler(config.upsampler, config.checkpoint, device=device), backbone)
    side, cells = config.short_side, config.short_side // config.teacher_stride
    with torch.no_grad():
        upsampler(torch.zeros(1, backbone.dim, cells, cells, device=device), torch.zeros(1, 3, side, side, device=device))

    def successor(image: torch.Tensor, lr_feats: torch.Tensor, index: int) -> torch.Tensor:
        return upsampler(lr_feats, image)

    return successor


def to_input(sample: GroundTruthImage, backbone: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """The image normalised for the teacher: (1, 3, H, W) float32 at its native size."""
    from pipeline.sources.images import normalize

    rgb = torch.from_numpy(sample.image.copy()).permute(2, 0, 1).float().div_(255.0)  # (3, H, W)
    return normalize(rgb, backbone.mean, backbone.std)[None].to(device)


def score_images(config: EvalConfig, test_shards: list[str], backbone, methods: dict[str, Method], device: torch.device,
                 err: TextIO | None) -> tuple[list[dict], list[Scored]]:
    """Every method on every held-out image: per-image rows and the first ``figure_images`` images' features."""
    rows, kept = [], []
    for index, sample in enumerate(read_groundtruth(test_shards)):
        image = to_input(sample, backbone, device)
        with torch.no_grad():
            lr_feats = backbone(image)  # (1, C, h, w)
            truth = backbone.model.true_features(image)  # (1, C, H, W)
        edge = near_edges(torch.from_numpy(sample.edges).to(device), config.edge_radius)
        views = held_out_views(*image.shape[2:], config.eval_views, config.max_pad, config.seed * 7919 + index)
        outputs = {"truth": truth}
        for name, method in methods.items():
            with torch.no_grad():
                outputs[name] = method(image, lr_feats, index).float()
        for name, hr in outputs.items():
            recon = reconstruction_error(hr, image, backbone, config.teacher_stride, views, config.max_pad)
            rows.append({"key": sample.key, "size": list(image.shape[2:]), "method": name,
                         **score(hr, truth, edge), "recon": recon})
        log(err, f"{sample.key} {tuple(image.shape[2:])}: " + ", ".join(
            f"{r['method']} {r['rel']:.3f}" for r in rows[-len(outputs):]))
        if len(kept) < config.figure_images:
            kept.append(Scored(sample, truth.cpu(), {k: v.cpu() for k, v in outputs.items() if k != "truth"}, edge.cpu()))
    return rows, kept


def run_evaluation(config: EvalConfig, *, err: TextIO | None = None, figure: bool = True) -> EvalReport:
    """Generate, train, fit and score as ``config`` says; writes results.json/.md and figure.png under ``config.out``."""
    saved = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)  # oversubscribed CPUs slow eager training many times over
    try:
        return _run(config, err, figure)
    finally:
        torch.set_num_threads(saved)


def _run(config: EvalConfig, err: TextIO | None, figure: bool) -> EvalReport:
    """The steps of ``run_evaluation``."""
    from featup.devices import resolve_device
    from pipeline.train.loop import train_jbu

    from featup.backbones import build_backbone

    device, timings = resolve_device(config.device), {}
    backbone = build_backbone(config.teacher, "auto", device=device)
    extra = {config.upsampler: successor_method(config, backbone, device)} if config.upsampler else {}  # fails early
    start = time.monotonic()
    train_shards, test_shards = make_data(config)
    timings["data_s"] = time.monotonic() - start
    log(err, f"training the JBU for {config.jbu_steps} steps on {config.train_images} images")
    trained = train_jbu(train_config(config, train_shards), err=err)
    timings["jbu_train_s"] = trained.wall_s
    methods = build_methods(config, backbone, trained.checkpoint, device, extra)
    start = time.monotonic()
    rows, kept = score_images(config, test_shards, backbone, methods, device, err)
    timings["score_s"] = time.monotonic() - start
    report = EvalReport(asdict(config), rows, summarise(rows, ("truth", *config.methods)), trained.losses, timings)
    png = None
    if figure:
        from pipeline.evaluate.figure import render_figure

        png = render_figure(kept, report)
    write_report(report, config.out, png)
    return report
