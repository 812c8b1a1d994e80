"""Fits FeatUp's implicit upsampler to one image with the multi-view objective (pure PyTorch, no I/O).

As published (``train_implicit_upsampler.py``, ``configs/implicit_upsampler.yaml``): ``n_views``
jittered copies of the image are featurized once, in chunks, and kept on the device in a PCA space
(fitted on the first ``pca_views`` of them); then for ``steps`` NAdam steps the network's features
of the image, with their magnitude as an extra channel, are jittered like ``views_per_step`` randomly
drawn views, pooled by a learned downsampler and compared with those views' features. The result is
evaluated on any pixel grid and mapped back to the backbone's channels.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Callable, Iterator

import torch

from featup.downsamplers import build_downsampler
from featup.errors import ConfigError, InputError
from featup.implicit_objective import ImplicitLossTerms, ImplicitLossWeights, implicit_views_loss
from featup.jitter import JitterParams, apply_jitter, sample_jitter
from featup.losses import ScaleNet
from featup.pca import PCA, fit_pca
from featup.upsamplers.implicit import ImplicitUpsampler

Featurizer = Callable[[torch.Tensor], torch.Tensor]
Progress = Callable[[int, int], None]
DOWNSAMPLER_KINDS = ("attention", "blur", "simple")
PCA_MAX_PIXELS = 100_000  # the PCA is fitted on at most this many low-res pixels of the first views


@dataclass(frozen=True)
class ImplicitFitConfig:
    """Every knob of the per-image fit; defaults are the published ones (the ``vit``/``dino16`` setting)."""

    steps: int = 1200
    n_views: int = 3000  # jittered views featurized once per image (published n_images)
    views_per_step: int = 10  # views drawn (with replacement) for each optimiser step
    pca_dim: int | None = 128  # fit in this many PCA channels (None or >= the backbone's: all channels)
    pca_views: int = 50  # the first views the PCA is fitted on, all of them if fewer (published pca_batch)
    lr: float = 2e-3  # NAdam, torch's default rate as published
    max_pad: int = 30
    max_zoom: float = 1.8
    use_flips: bool = True
    n_freqs: int = 30
    hidden_dim: int = 128  # width of the network (published: the PCA dim, 128)
    color_feats: bool = True
    dropout: float = 0.2
    downsampler: str = "attention"
    kernel_size: int | None = None  # None: the backbone's stride (image size / feature size), windows on its grid
    blur_attn: bool = True
    scale_net: bool = True  # predicted per-pixel uncertainty of the targets (published outlier_detection)
    magnitude_weight: float = 0.001
    magnitude_tv_weight: float = 0.05
    blur_pin_weight: float = 0.1
    featurize_batch: int = 64  # views per backbone call while precomputing

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_field(f.name, getattr(self, f.name))

    @property
    def loss_weights(self) -> ImplicitLossWeights:
        return ImplicitLossWeights(self.magnitude_weight, self.magnitude_tv_weight, self.blur_pin_weight)


_POSITIVE_INTS = ("steps", "n_views", "views_per_step", "pca_views", "n_freqs", "hidden_dim", "featurize_batch")
_OPTIONAL_INTS = ("pca_dim", "kernel_size")
_BOOLS = ("use_flips", "color_feats", "blur_attn", "scale_net")
_WEIGHTS = ("magnitude_weight", "magnitude_tv_weight", "blur_pin_weight")


def _check_field(name: str, value: object) -> None:
    """Raises ConfigError "implicit <name>: expected X, got Y" for a bad value."""
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"implicit {name}: expected {expected}, got {value!r}")

    is_int = isinstance(value, int) and not isinstance(value, bool)
    is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
    if name in _POSITIVE_INTS and not (is_int and value >= 1):
        raise bad("a positive integer")
    if name in _OPTIONAL_INTS and value is not None and not (is_int and value >= 1):
        raise bad("None or a positive integer")
    if name in _BOOLS and not isinstance(value, bool):
        raise bad("True or False")
    if name in _WEIGHTS and not (is_num and value >= 0):
        raise bad("a number >= 0")
    if name == "lr" and not (is_num and value > 0):
        raise bad("a number > 0")
    if name == "max_pad" and not (is_int and value >= 0):
        raise bad("an integer >= 0")
    if name == "max_zoom" and not (is_num and value >= 1.0):
        raise bad("a number >= 1")
    if name == "dropout" and not (is_num and 0.0 <= value < 1.0):
        raise bad("a number in [0, 1)")
    if name == "downsampler" and value not in DOWNSAMPLER_KINDS:
        raise bad(f"one of {', '.join(DOWNSAMPLER_KINDS)}")


def fit_implicit(
    featurize: Featurizer,
    image: torch.Tensor,
    config: ImplicitFitConfig,
    *,
    generator: torch.Generator,
    output_size: tuple[int, int] | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """High-res features (1, C, H', W') float32 of a normalised image (1, 3, H, W), fitted with ``config``.

    ``featurize`` is the frozen backbone ((B, 3, H, W) -> (B, C, h, w)); H', W' is ``output_size`` or
    the image size. Runs on the image's device with grad enabled (also when called in inference mode);
    every random draw comes from ``generator``, so equal seeds give equal results on the CPU.
    ``progress(step, steps)`` is called after each optimiser step.
    """
    with _fitting(image, generator) as image:
        fit = _ImplicitFit(featurize, image, config, generator)
        for step in range(config.steps):
            fit.step()
            if progress is not None:
                progress(step + 1, config.steps)
        return fit.result(output_size)


@dataclass(frozen=True)
class FitTiming:
    """Measured cost of one fit on some device: seconds per featurized view and per optimiser step."""

    view_s: float
    step_s: float
    steps: int
    n_views: int
    device: str

    @property
    def per_image_s(self) -> float:
        """Estimated seconds to fit one image: its views, then its steps."""
        return self.n_views * self.view_s + self.steps * self.step_s


def time_fit(
    featurize: Featurizer,
    image: torch.Tensor,
    config: ImplicitFitConfig,
    *,
    generator: torch.Generator,
    measure_steps: int = 3,
) -> FitTiming:
    """Times one chunk of views and ``measure_steps`` steps (after a warm-up step) to estimate a full fit."""
    n_views = min(config.n_views, config.featurize_batch)
    quick = replace(config, n_views=n_views)
    with _fitting(image, generator) as image:
        start = _now(image.device)
        fit = _ImplicitFit(featurize, image, quick, generator)
        view_s = (_now(image.device) - start) / n_views
        fit.step()  # warm-up: first-call allocations
        start = _now(image.device)
        for _ in range(measure_steps):
            fit.step()
        step_s = (_now(image.device) - start) / measure_steps
    return FitTiming(view_s, step_s, config.steps, config.n_views, str(image.device))


class _ImplicitFit:
    """The state of one fit: precomputed views in PCA space, the network, downsampler, scale net and optimiser."""

    def __init__(self, featurize: Featurizer, image: torch.Tensor, config: ImplicitFitConfig, generator: torch.Generator) -> None:
        self.image, self.config, self.generator = image, config, generator
        self.views, self.targets, self.pca = _precompute_views(featurize, image, config, generator)  # (V, K, h, w)
        k, (h, w) = self.targets.shape[1], self.targets.shape[2:]
        kw = dict(device=image.device, dtype=torch.float32, generator=generator)
        self.upsampler = ImplicitUpsampler(
            k, n_freqs=config.n_freqs, hidden_dim=config.hidden_dim, color_feats=config.color_feats,
            dropout=config.dropout, **kw,
        )
        kernel = config.kernel_size or max(1, min(image.shape[2] // h, image.shape[3] // w))
        extra = dict(blur_attn=config.blur_attn, generator=generator) if config.downsampler == "attention" else {}
        self.downsampler = build_downsampler(
            config.downsampler, k + 1, kernel, (h, w), device=image.device, dtype=torch.float32, **extra
        )
        self.scale_net = ScaleNet(k, **kw) if config.scale_net else None
        modules = [m for m in (self.upsampler, self.downsampler, self.scale_net) if m is not None]
        self.optimizer = torch.optim.NAdam([p for m in modules for p in m.parameters()], lr=config.lr)

    def step(self) -> ImplicitLossTerms:
        """One optimiser step on ``views_per_step`` views drawn from the generator."""
        self.upsampler.train(), self.downsampler.train()
        c = self.config
        picks = torch.randint(len(self.views), (c.views_per_step,), generator=self.generator, device=self.generator.device)
        picks = picks.tolist()
        hr_feats = self.upsampler(self.image)  # (1, K, H, W)
        terms = implicit_views_loss(
            hr_feats, self.targets[picks], [self.views[i] for i in picks], self.downsampler,
            max_pad=c.max_pad, weights=c.loss_weights, scale_net=self.scale_net, generator=self.generator,
        )
        self.optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        self.optimizer.step()
        return terms

    @torch.no_grad()
    def result(self, output_size: tuple[int, int] | None) -> torch.Tensor:
        """The fitted features on the output grid, in the backbone's channels: (1, C, H', W') float32."""
        self.upsampler.eval()
        hr = self.upsampler(self.image, output_size)  # (1, K, H', W')
        return (self.pca.inverse_transform(hr) if self.pca is not None else hr).float().contiguous()


def _precompute_views(
    featurize: Featurizer, image: torch.Tensor, config: ImplicitFitConfig, generator: torch.Generator
) -> tuple[list[JitterParams], torch.Tensor, PCA | None]:
    """(jitter params, their low-res features (V, K, h, w) on the device, the PCA or None), featurized in chunks."""
    h, w = image.shape[2:]
    views = [
        sample_jitter(h, w, max_pad=config.max_pad, max_zoom=config.max_zoom, use_flips=config.use_flips, generator=generator)
        for _ in range(config.n_views)
    ]
    n_first = min(config.pca_views, config.n_views)
    first = _featurize_views(featurize, image, views[:n_first], config)  # (P, C, h, w)
    pca = None
    if config.pca_dim is not None and config.pca_dim < first.shape[1]:
        pca = fit_pca(first, config.pca_dim, max_samples=PCA_MAX_PIXELS, generator=generator)
    chunks = [_to_pca(first, pca)]
    for lo in range(n_first, config.n_views, config.featurize_batch):
        chunk = views[lo : lo + config.featurize_batch]
        chunks.append(_to_pca(_featurize_views(featurize, image, chunk, config), pca))
    return views, torch.cat(chunks), pca


def _featurize_views(featurize: Featurizer, image: torch.Tensor, views: list[JitterParams], config: ImplicitFitConfig) -> torch.Tensor:
    """Low-res float32 features of the jittered images, ``featurize_batch`` at a time: (V, C, h, w)."""
    out = []
    with torch.no_grad():
        for lo in range(0, len(views), config.featurize_batch):
            batch = torch.cat([apply_jitter(image, config.max_pad, v) for v in views[lo : lo + config.featurize_batch]])
            out.append(featurize(batch).float())  # (b, C, h, w)
    return torch.cat(out)


def _to_pca(feats: torch.Tensor, pca: PCA | None) -> torch.Tensor:
    return pca.transform(feats) if pca is not None else feats


@contextmanager
def _fitting(image: torch.Tensor, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Grad on, out of inference mode, the global RNG (dropout) seeded from ``generator`` and restored; yields the image.

    The image is copied out of inference mode (an inference tensor cannot take part in autograd).
    """
    if image.dim() != 4 or image.shape[0] != 1 or image.shape[1] != 3:
        raise InputError(f"image shape: expected (1, 3, H, W), got {tuple(image.shape)}")
    devices = [image.device] if image.device.type == "cuda" else []
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
    with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if devices:
            with torch.cuda.device(image.device):
                torch.cuda.manual_seed(seed)
        yield image.detach().clone().float()


def _now(device: torch.device) -> float:
    """Wall time, after the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()

