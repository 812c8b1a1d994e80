"""The trainable parts of JBU training and one optimisation step, as published (``train_jbu_upsampler.py``); no I/O.

``JBUTrainingModel`` holds the JBU stack, the learned downsampler and the uncertainty head (``ScaleNet``) built
for a backbone's channels and stride and the training image size, plus the frozen channel norm the published
training puts after the backbone. Its ``forward`` is the multi-view objective, so a DistributedDataParallel
wrapper averages gradients across workers. ``official_state_dict`` gives the official checkpoint layout
(``upsampler.*``, ``downsampler.*``, ``scale_net.*``, ``model.1.norm.*``) that ``load_featup_checkpoint`` reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from featup.downsamplers import DOWNSAMPLERS, build_downsampler
from featup.errors import CheckpointError, ConfigError
from featup.layers import ChannelNorm
from featup.losses import SampledCRFLoss, ScaleNet
from featup.objective import Featurizer, LossTerms, MultiViewConfig, multiview_loss
from featup.ops.compiled import BACKENDS
from featup.upsamplers.jbu import JBUStack


# Extra constructor options of each downsampler kind, as the published training builds them.
_DOWNSAMPLER_OPTIONS: dict[str, Callable[[torch.Generator | None], dict[str, Any]]] = {
    "attention": lambda generator: {"blur_attn": True, "generator": generator},
    "simple": lambda generator: {},
    "blur": lambda generator: {},
}


@dataclass(frozen=True)
class TrainingSettings:
    """How the JBU is trained; the defaults are the published ones (NAdam 1e-3, norm clipping at 1e-4 for 10 steps)."""

    objective: MultiViewConfig = field(default_factory=MultiViewConfig)
    lr: float = 1e-3
    clip_steps: int = 10  # the published training clips the gradient norm for its first 10 steps only
    clip_norm: float = 1e-4
    downsampler: str = "attention"
    predicted_uncertainty: bool = True
    channel_norm: bool = True  # LayerNorm over the backbone's channels (not trained), as published
    key_dim: int = 32
    kernel_backend: str = "eager"

    def __post_init__(self) -> None:
        if not isinstance(self.objective, MultiViewConfig):
            raise ConfigError(f"objective: expected a MultiViewConfig, got {type(self.objective).__name__}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr: expected a positive learning rate, got {self.lr!r}")
        if isinstance(self.clip_steps, bool) or not isinstance(self.clip_steps, int) or self.clip_steps < 0:
            raise ConfigError(f"--clip-steps: expected an integer >= 0, got {self.clip_steps!r}")
        if not (isinstance(self.clip_norm, (int, float)) and self.clip_norm > 0):
            raise ConfigError(f"--clip-norm: expected a positive gradient norm, got {self.clip_norm!r}")
        if self.downsampler not in _DOWNSAMPLER_OPTIONS or self.downsampler not in DOWNSAMPLERS:
            raise ConfigError(f"--downsampler: expected one of {', '.join(_DOWNSAMPLER_OPTIONS)}, got {self.downsampler!r}")
        if isinstance(self.key_dim, bool) or not isinstance(self.key_dim, int) or self.key_dim < 1:
            raise ConfigError(f"--key-dim: expected a positive integer, got {self.key_dim!r}")
        if self.kernel_backend not in BACKENDS:
            raise ConfigError(f"--kernel-backend: expected one of {', '.join(BACKENDS)}, got {self.kernel_backend!r}")


def num_stages_for(lowres: int, output: int) -> int:
    """2x stages whose output is closest to ``output`` from ``lowres`` (4 for 14 -> 224, 4 for stride 14, 3 for 8)."""
    return max(1, round(math.log2(output / lowres)))


class JBUTrainingModel(nn.Module):
    """The JBU stack, downsampler, ScaleNet and frozen channel norm for ``dim``-channel, stride-``stride`` features."""

    def __init__(
        self,
        dim: int,
        stride: int,
        image_size: int,
        settings: TrainingSettings,
        *,
        num_stages: int | None = None,
        device=None,
        dtype=None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if image_size % stride or image_size < stride:
            raise ConfigError(f"--image-size: expected a positive multiple of the backbone stride {stride}, got {image_size}")
        lowres = image_size // stride
        if settings.objective.max_pad >= image_size:
            raise ConfigError(f"--max-pad: expected less than the image size {image_size}, got {settings.objective.max_pad}")
        self.settings = settings
        self.stride, self.image_size = stride, image_size
        stages = num_stages if num_stages is not None else num_stages_for(lowres, image_size)
        if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
            raise ConfigError(f"--stages: expected a positive integer, got {stages!r}")
        factory = {"device": device, "dtype": dtype}
        self.upsampler = JBUStack(dim, stages, key_dim=settings.key_dim, backend=settings.kernel_backend, **factory)
        self.upsampler.reset_parameters(generator)
        options = _DOWNSAMPLER_OPTIONS[settings.downsampler](generator)
        # The published downsampler pools kernel_size = stride pixels into each of the (h, w) low-res cells.
        self.downsampler = build_downsampler(settings.downsampler, dim, stride, (lowres, lowres), **options, **factory)
        self.scale_net = ScaleNet(dim, generator=generator, **factory) if settings.predicted_uncertainty else None
        self.norm = ChannelNorm(dim, **factory).requires_grad_(False) if settings.channel_norm else None
        self.crf = SampledCRFLoss()

    @property
    def num_stages(self) -> int:
        return self.upsampler.num_stages

    def normalize(self, lr_feats: torch.Tensor) -> torch.Tensor:
        """The frozen channel norm applied to raw backbone features (identity without one)."""
        return lr_feats if self.norm is None else self.norm(lr_feats)

    def forward(self, featurize: Featurizer, image: torch.Tensor, *, generator: torch.Generator) -> LossTerms:
        """The multi-view objective on normalised images (B, 3, S, S); ``featurize`` is the frozen backbone."""
        return multiview_loss(
            lambda x: self.normalize(featurize(x)),
            lambda lr, img: self.upsampler(lr, img),
            self.downsampler,
            image,
            self.settings.objective,
            generator=generator,
            scale_net=self.scale_net,
            crf=self.crf,
        )

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates: upsampler, downsampler and ScaleNet (never the norm)."""
        return [p for p in self.parameters() if p.requires_grad]

    def parts(self) -> dict[str, nn.Module]:
        """The saved modules under their official checkpoint prefixes (the channel norm only when there is one)."""
        parts = {"upsampler.": self.upsampler, "downsampler.": self.downsampler, "scale_net.": self.scale_net, "model.1.": self.norm}
        return {prefix: module for prefix, module in parts.items() if module is not None}

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """Detached CPU copies of every saved tensor in the official checkpoint layout."""
        return {
            prefix + key: value.detach().cpu().clone()
            for prefix, module in self.parts().items()
            for key, value in module.state_dict().items()
        }

    def load_official_state_dict(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load what ``official_state_dict`` wrote, each part strictly; anything left over is an error."""
        parts = self.parts()
        unknown = [key for key in state if not key.startswith(tuple(parts))]
        if unknown:
            raise CheckpointError(f"{source}: expected entries under {', '.join(parts)}, got {unknown[:5]}")
        for prefix, module in parts.items():
            own = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
            try:
                module.load_state_dict(own, strict=True)
            except RuntimeError as exc:
                raise CheckpointError(f"{source}: does not fit the {prefix.rstrip('.')} of this training run: {exc}") from None


def make_optimizer(model: JBUTrainingModel, settings: TrainingSettings) -> torch.optim.Optimizer:
    """NAdam over the trainable parameters at ``settings.lr``, as published."""
    return torch.optim.NAdam(model.trainable_parameters(), lr=settings.lr)


def training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    featurize: Featurizer,
    image: torch.Tensor,
    settings: TrainingSettings,
    *,
    step: int,
    generator: torch.Generator,
) -> dict[str, float]:
    """One step (``model`` may be DDP-wrapped): objective, backward, norm clipping while ``step < clip_steps``, update."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    terms: LossTerms = model(featurize, image, generator=generator)
    terms.total.backward()
    if step < settings.clip_steps:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], settings.clip_norm)
    optimizer.step()
    return terms.as_floats()


@torch.no_grad()
def evaluate_objective(
    model: JBUTrainingModel, featurize: Featurizer, image: torch.Tensor, *, seed: int
) -> dict[str, float]:
    """The objective in eval mode (no dropout) on fixed views drawn from ``seed``: comparable across training."""
    was_training = model.training
    model.eval()
    try:
        return model(featurize, image, generator=torch.Generator().manual_seed(seed)).as_floats()
    finally:
        model.train(was_training)
