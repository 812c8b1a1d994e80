"""``--upsampler implicit`` in a precompute job: a fresh implicit network fitted to each image of a batch (slow by nature)."""

from __future__ import annotations

import torch
from torch import nn

from featup.upsamplers.implicit_fit import ImplicitFitConfig, fit_implicit


class PerImageImplicit:
    """Takes the place of an upsampler: ``(lr, images, output_size) -> (B, C, H, W)`` float32, one fit per image.

    Each image is fitted with a generator seeded with ``seed`` alone, so a row's features do not depend on
    its batch, shard or actor. ``progress`` counts the images of the current call done, with the current
    image's fraction of steps (the worker reports it to the progress bar).
    """

    def __init__(self, backbone: nn.Module, config: ImplicitFitConfig, seed: int) -> None:
        self.backbone, self.config, self.seed = backbone, config, seed
        self.progress = 0.0

    def with_config(self, config: ImplicitFitConfig) -> PerImageImplicit:
        """The same backbone and seed with other fit settings (the plan's quick measurements)."""
        return PerImageImplicit(self.backbone, config, self.seed)

    def featurize(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen backbone in its own dtype, float32 out: (B, 3, H, W) -> (B, C, h, w)."""
        param = next(self.backbone.parameters(), None)
        return self.backbone(images.to(param.dtype) if param is not None else images).float()

    def __call__(self, lr_feats: torch.Tensor, images: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
        """Fits each image in turn; ``lr_feats`` is not needed (the fit featurizes its own jittered views)."""
        out = []
        try:
            for i in range(images.shape[0]):
                def progress(step: int, steps: int, done: int = i) -> None:
                    self.progress = done + step / steps

                generator = torch.Generator().manual_seed(self.seed)
                image = images[i : i + 1].float()  # (1, 3, S, S)
                out.append(fit_implicit(self.featurize, image, self.config, generator=generator,
                                        output_size=output_size, progress=progress))
        finally:
            self.progress = 0.0
        return torch.cat(out)  # (B, C, H, W)
