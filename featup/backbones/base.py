"""The ``Backbone`` interface: a frozen feature extractor with a stride, a channel count and its input normalisation."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from featup.errors import ConfigError, InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Backbone(nn.Module):
    """Maps (B, 3, H, W) normalised images to (B, dim, H // stride, W // stride) features.

    Subclasses implement ``forward_features``; ``forward`` validates the images and the features around it.
    ``mean``/``std`` are the per-channel normalisation the images must already have; ``weights_id`` records
    where the weights came from ("random", "pretrained:<timm name>", "sha256:<hex>", ...).
    """

    def __init__(
        self,
        name: str,
        stride: int,
        dim: int,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        weights_id: str = "random",
    ) -> None:
        super().__init__()
        self.name = name
        self.stride = int(stride)
        self.dim = int(dim)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.weights_id = weights_id

    def forward_features(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, dim, H // stride, W // stride); the images are already validated."""
        raise NotImplementedError

    def forward(self, images: Tensor) -> Tensor:
        """Features of ``images`` after checking their shape, size and values; images are cast to the weights' dtype."""
        self.check_images(images)
        param = next(self.parameters(), None)
        if param is not None and images.dtype != param.dtype:
            images = images.to(param.dtype)
        features = self.forward_features(images)  # (B, dim, h, w)
        self._check_features(features, images)
        return features

    def check_images(self, images: Tensor) -> None:
        """Raise InputError unless ``images`` is a finite float (B, 3, H, W) batch with H, W multiples of the stride."""
        what = f"images for backbone {self.name!r}"
        if not isinstance(images, Tensor):
            raise InputError(f"{what}: expected a torch.Tensor, got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1] != 3 or images.numel() == 0:
            raise InputError(f"{what}: expected a non-empty shape (B, 3, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise InputError(f"{what}: expected a floating-point tensor of normalised images, got {images.dtype}")
        h, w = images.shape[-2:]
        if h % self.stride or w % self.stride:
            raise InputError(
                f"image size {h}x{w} is not a multiple of the stride {self.stride} of backbone {self.name!r}"
            )
        if not torch.isfinite(images).all():
            raise InputError(f"{what}: expected finite values, got NaN or Inf")

    def _check_features(self, features: Tensor, images: Tensor) -> None:
        """Raise ConfigError when the wrapped model does not give the (B, dim, H/s, W/s) map it declares."""
        b, _, h, w = images.shape
        expected = (b, self.dim, h // self.stride, w // self.stride)
        if not isinstance(features, Tensor) or tuple(features.shape) != expected:
            got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ConfigError(
                f"features of backbone {self.name!r}: expected shape {expected} (dim {self.dim}, "
                f"stride {self.stride}), got {got}"
            )

    def extra_repr(self) -> str:
        return f"name={self.name!r}, stride={self.stride}, dim={self.dim}, weights_id={self.weights_id!r}"
