"""FeatUp's implicit upsampler: a per-image MLP over Fourier features of pixel coordinates and colour.

It is fitted to one image (with the multi-view loss) and can then be evaluated on any pixel grid,
which is what makes its features "at any resolution". Layout as published
(``train_implicit_upsampler.get_implicit_upsampler``): MinMaxScaler -> Fourier features with
learned phases -> ChannelNorm -> Dropout2d -> 1x1 conv -> ReLU -> Dropout2d -> ChannelNorm -> 1x1
conv -> ReLU -> 1x1 conv. ``net.<i>`` indices match the published ``nn.Sequential`` so its
state-dict keys map one to one (``1.biases`` -> ``net.1.biases``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from featup.errors import InputError
from featup.layers import ChannelNorm, MinMaxScaler
from featup.upsamplers.jbu import _conv1x1


class FourierFeatures(nn.Module):
    """sin/cos of (y, x[, r, g, b]) times ``n_freqs`` log-spaced frequencies exp(-2)..exp(10), plus learned phases.

    Output channels: sin block (n_freqs * n_inputs), cos block (same), then the colour itself if used.
    Coordinates span [-1, 1] on each axis at any resolution, so grids of different sizes agree.
    """

    def __init__(
        self,
        n_freqs: int,
        color_feats: bool = True,
        *,
        device=None,
        dtype=None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.n_freqs = n_freqs
        self.color_feats = color_feats
        self.n_inputs = 5 if color_feats else 2
        # Published layout (2, n_inputs, n_freqs); forward reads each half as (n_freqs, n_inputs), as published.
        self.biases = nn.Parameter(torch.empty(2, self.n_inputs, n_freqs, device=device, dtype=dtype))
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Standard-normal phases."""
        draw_on = generator.device if generator is not None else self.biases.device
        noise = torch.randn(self.biases.shape, generator=generator, device=draw_on, dtype=self.biases.dtype)
        self.biases.copy_(noise.to(self.biases.device))

    @property
    def out_dim(self) -> int:
        return 2 * self.n_freqs * self.n_inputs + (3 if self.color_feats else 0)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, out_dim, H, W)."""
        b, _, h, w = image.shape
        kw = dict(device=image.device, dtype=image.dtype)
        grid = torch.meshgrid(torch.linspace(-1, 1, h, **kw), torch.linspace(-1, 1, w, **kw), indexing="ij")
        coords = torch.stack(grid).expand(b, 2, h, w)  # (B, 2, H, W)
        x = torch.cat([coords, image], dim=1) if self.color_feats else coords  # (B, I, H, W)
        freqs = torch.exp(torch.linspace(-2, 10, self.n_freqs, **kw)).view(1, self.n_freqs, 1, 1, 1)
        x = x.unsqueeze(1) * freqs  # (B, F, I, H, W)
        phases = self.biases.to(image.dtype).reshape(2, 1, self.n_freqs, self.n_inputs, 1, 1)
        sin = torch.sin(x + phases[0]).reshape(b, -1, h, w)  # (B, F*I, H, W)
        cos = torch.cos(x + phases[1]).reshape(b, -1, h, w)
        parts = [sin, cos, image] if self.color_feats else [sin, cos]
        return torch.cat(parts, dim=1)


class PointwiseConv(nn.Conv2d):
    """A 1x1 ``nn.Conv2d`` (same parameters and state-dict keys) evaluated as a matmul: several times faster on
    the CPU than the convolution kernels, forward and backward, and exact float32 on GPUs (no TF32)."""

    def __init__(self, in_channels: int, out_channels: int, **kw) -> None:
        super().__init__(in_channels, out_channels, 1, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _conv1x1(x, self.weight, self.bias)  # (B, out, H, W)


class ImplicitUpsampler(nn.Module):
    """Per-image implicit network image -> (B, dim, H', W') features; published defaults (n_freqs 30, width 128)."""

    def __init__(
        self,
        dim: int,
        *,
        n_freqs: int = 30,
        hidden_dim: int = 128,
        color_feats: bool = True,
        dropout: float = 0.2,
        device=None,
        dtype=None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        fk = dict(device=device, dtype=dtype)
        fourier = FourierFeatures(n_freqs, color_feats, generator=generator, **fk)
        start = fourier.out_dim
        self.net = nn.Sequential(
            MinMaxScaler(),
            fourier,
            ChannelNorm(start, **fk),
            nn.Dropout2d(dropout),
            PointwiseConv(start, hidden_dim, **fk),
            nn.ReLU(),
            nn.Dropout2d(dropout),
            ChannelNorm(hidden_dim, **fk),
            PointwiseConv(hidden_dim, hidden_dim, **fk),
            nn.ReLU(),
            PointwiseConv(hidden_dim, dim, **fk),
        )
        if generator is not None:
            self._init_convs(generator)

    @torch.no_grad()
    def _init_convs(self, generator: torch.Generator) -> None:
        """Torch's default 1x1 conv init (kaiming uniform, a=sqrt(5); bias bound 1/sqrt(fan_in)) from ``generator``."""
        for conv in (m for m in self.net if isinstance(m, nn.Conv2d)):
            bound = 1.0 / math.sqrt(conv.in_channels)  # kaiming uniform with a=sqrt(5) has this bound too
            for param in (conv.weight, conv.bias):
                u = torch.rand(param.shape, generator=generator, device=generator.device, dtype=param.dtype)
                param.copy_(u.to(param.device) * (2 * bound) - bound)

    def forward(self, image: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Features on the pixel grid of ``image`` resized to ``output_size`` (default: the image's own size)."""
        if image.dim() != 4 or image.shape[1] != 3:
            raise InputError(f"image shape: expected (B, 3, H, W), got {tuple(image.shape)}")
        if output_size is not None:
            image = _resize_guidance(image, output_size)
        return self.net(image)  # (B, dim, H', W')


def _resize_guidance(image: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, 3, H, W) to ``output_size``, antialiased when an axis shrinks; no-op at equal size."""
    size = tuple(output_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise InputError(f"output_size: expected (h, w) positive ints, got {output_size!r}")
    h, w = image.shape[2:]
    if size == (h, w):
        return image
    shrink = size[0] < h or size[1] < w
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=shrink)
