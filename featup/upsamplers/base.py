"""The upsampler registry and the input checks every upsampler shares.

Every upsampler maps low-resolution features (B, C, h, w) and the normalised guidance image
(B, 3, H, W) to features at ``output_size`` (default: the image size):
``forward(lr_feats, image, output_size=None) -> (B, C, H', W')``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from featup.errors import CheckpointError, ConfigError, InputError
from featup.registry import Registry

UPSAMPLERS: Registry[nn.Module] = Registry("upsampler")


@dataclass(frozen=True)
class ImageNorm:
    """The per-channel normalisation an upsampler's ``forward`` expects of its guidance image: ``(rgb01 - mean) / std``.

    Each upsampler class declares its own as ``image_norm`` (as its published code feeds it), so the pipeline can
    hand it the image so normalised whatever the backbone's normalisation is.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError(f"ImageNorm: expected 3 means and 3 stds, got {self.mean!r} and {self.std!r}")
        if min(self.std) <= 0:
            raise ConfigError(f"ImageNorm: expected positive stds, got {self.std!r}")

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, device=like.device, dtype=like.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=like.device, dtype=like.dtype).view(1, 3, 1, 1)
        return mean, std

    def normalize(self, rgb01: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> the normalised image."""
        mean, std = self._stats(rgb01)
        return (rgb01 - mean) / std

    def denormalize(self, image: torch.Tensor) -> torch.Tensor:
        """The normalised image -> (B, 3, H, W) RGB in [0, 1]."""
        mean, std = self._stats(image)
        return image * std + mean

    def convert(self, image: torch.Tensor, source: "ImageNorm") -> torch.Tensor:
        """``image`` normalised by ``source`` -> normalised by this one (unchanged when they are equal)."""
        return image if source == self else self.normalize(source.denormalize(image))


@dataclass(frozen=True)
class PublishedWeights:
    """A released checkpoint of an upsampler: where to get it and, for a per-backbone checkpoint, the backbone it was
    trained for (``backbone``: this project's name for the same network, else None; ``dim``: feature channels;
    ``patch``: the backbone's patch size). None everywhere: one checkpoint for any backbone."""

    url: str
    file_name: str
    backbone: str | None
    dim: int | None
    patch: int | None
    sha256: str | None = None


IMAGENET_NORM = ImageNorm((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
UNIT_NORM = ImageNorm((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # plain RGB in [0, 1]


def build_upsampler(name: str, dim: int, *, num_stages: int = 4, device=None, dtype=None, **kwargs) -> nn.Module:
    """Build the upsampler registered as ``name`` for ``dim``-channel features."""
    return UPSAMPLERS.get(name)(dim, num_stages=num_stages, device=device, dtype=dtype, **kwargs)


def state_shape(what: str, state: Mapping[str, torch.Tensor], key: str, ndim: int) -> torch.Size:
    """The shape of ``state[key]``, which a loader reads to size the model: CheckpointError (naming ``what``'s state
    dict and the key) when the key is missing or has another number of dims."""
    if key not in state:
        raise CheckpointError(f"{what} state dict: missing key {key!r} (needed to infer the model size)")
    if state[key].dim() != ndim:
        raise CheckpointError(f"{what} state dict: expected {key!r} with {ndim} dims, got shape {tuple(state[key].shape)}")
    return state[key].shape


def check_state_dict(what: str, expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                     may_lack: tuple[str, ...] = ()) -> None:
    """CheckpointError naming every missing, unexpected and misshaped key of ``state`` against the model's ``expected``
    state dict (keys ending in one of ``may_lack`` may be absent), before a strict ``load_state_dict``."""
    missing = sorted(k for k in set(expected) - set(state) if not k.endswith(may_lack or ("\0",)))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = [f"{label}: {', '.join(items)}"
                for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
                if items]
    if problems:
        raise CheckpointError(f"{what} state dict does not fit the model: " + "; ".join(problems))


def check_finite(name: str, x: torch.Tensor) -> None:
    """Raise InputError if ``x`` holds NaN or Inf (they would silently spread through every filter)."""
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise InputError(f"{name}: expected finite values, got {bad} NaN/Inf entries in a tensor of shape {tuple(x.shape)}")


def check_inputs(lr_feats: torch.Tensor, image: torch.Tensor, *, dim: int | None, guidance_dim: int = 3) -> None:
    """Validate the (features, guidance image) pair handed to an upsampler."""
    if lr_feats.dim() != 4:
        raise InputError(f"lr_feats: expected a 4-D (B, C, h, w) tensor, got shape {tuple(lr_feats.shape)}")
    if image.dim() != 4 or image.shape[1] != guidance_dim:
        raise InputError(f"image: expected a (B, {guidance_dim}, H, W) tensor, got shape {tuple(image.shape)}")
    if lr_feats.shape[0] != image.shape[0]:
        raise InputError(f"batch size: lr_feats has {lr_feats.shape[0]} items, image has {image.shape[0]}")
    if dim is not None and lr_feats.shape[1] != dim:
        raise InputError(f"lr_feats: expected {dim} channels (the upsampler's dim), got {lr_feats.shape[1]}")
    if min(lr_feats.shape[2:]) < 1 or min(image.shape[2:]) < 1:
        raise InputError(f"empty input: lr_feats {tuple(lr_feats.shape)}, image {tuple(image.shape)}")
    check_finite("lr_feats", lr_feats)
    check_finite("image", image)


def resolve_output_size(image: torch.Tensor, output_size: Sequence[int] | int | None) -> tuple[int, int]:
    """``output_size`` as an (H, W) pair of positive ints; the image size when None."""
    if output_size is None:
        return int(image.shape[2]), int(image.shape[3])
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    size = tuple(int(s) for s in output_size)
    if len(size) != 2 or min(size) < 1:
        raise InputError(f"output_size: expected two positive ints (H, W), got {output_size!r}")
    return size
