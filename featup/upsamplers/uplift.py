"""UPLiFT: an image encoder run once and a weight-shared 2x decoder applied step after step.

Paper: Walmer et al., "UPLiFT: Universal Pixel-dense Lightweight Feature Transforms" (arXiv 2601.17950);
code: github.com/mwalmer-umd/UPLiFT (MIT licence), matched at commit 85f09ee. Written from its facts,
not copied.

* The ImageNet-normalised image is resized by 16/14 when the backbone's patch is 14 (16 pixels per
  token) and a 5-block conv encoder (3x3 conv, BatchNorm, ReLU, 1x1 conv, channel-padded residual)
  runs once at that resolution.
* Each 2x step maps ``x`` (B, C, h, w) to (B, C, 2h, 2w): ``cat[x, deep]`` -> double-conv block ->
  2x2 transposed conv plus an align-corners bilinear residual -> ``cat[., skip]`` -> double-conv block
  = a 64-channel guide (``deep``/``skip``: the last two encoder outputs, nearest-resampled to (h, w) /
  (2h, 2w)). The local attender turns the guide into softmax weights over 17 fixed low-res offsets
  (``OFFSETS``, replication-padded) of each output pixel's parent: a convex combination of inputs.
* The output size follows from the design, ``lr size * 2**steps``: ``num_steps`` steps (default 4)
  when ``output_size`` is None; otherwise the fewest steps reaching ``output_size`` in both sides, then
  the published antialiased bilinear resize (an int sets the shorter side, as in torchvision).

Same as published: parameter names (the released safetensors load strictly), every layer's math, the
resampling rules. Outputs match the published code to ~1e-6.
Different: argument order ``(lr_feats, image)``; 4 default steps (the published class says 1, its hub
docs and examples 4); only the shared-encoder, BatchNorm, 17-offset design of the released DINO
checkpoints (no SD-VAE variant with noise channels and refiner, no GPU "fast" mode); every stage runs
in row bands with exact halos (``max_query_pixels``) and the last step's combine-and-resize a few
channels at a time, so memory grows with the output size only; the final resize applies the same
antialiased filter as two small matrices. Training mode runs one band (BatchNorm batch statistics).
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from featup.errors import CheckpointError, ConfigError
from featup.upsamplers.base import (
    IMAGENET_NORM, PublishedWeights, UPSAMPLERS, check_inputs, check_state_dict, resolve_output_size,
)

# (dy, dx) low-res offsets of the 17-neighbour attender, in the order of its weight channels.
OFFSETS: tuple[tuple[int, int], ...] = (
    (-2, -2), (-2, 0), (-2, 2),
    (-1, -1), (-1, 0), (-1, 1),
    (0, -2), (0, -1), (0, 0), (0, 1), (0, 2),
    (1, -1), (1, 0), (1, 1),
    (2, -2), (2, 0), (2, 2),
)  # fmt: skip
_PAD = 2  # replication padding of the value map: the largest offset
ENCODER_CHANNELS = (16, 32, 64, 128, 128)


_HUB = "https://huggingface.co/UPLiFT-upsampler"
PUBLISHED: dict[str, PublishedWeights] = {
    "dinov2_vits14": PublishedWeights(
        f"{_HUB}/uplift_dinov2-s14/resolve/main/uplift_dinov2-s14.safetensors",
        "uplift_dinov2-s14.safetensors", backbone="dinov2", dim=384, patch=14,
    ),
    "dinov3_vits16plus": PublishedWeights(
        f"{_HUB}/uplift_dinov3-splus16/resolve/main/uplift_dinov3-splus16.safetensors",
        "uplift_dinov3-splus16.safetensors", backbone=None, dim=384, patch=16,
    ),
}  # fmt: skip


def _add_residual(skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x + skip`` with ``skip``'s channels truncated or zero-padded to ``x``'s."""
    c, s = x.shape[1], skip.shape[1]
    if s >= c:
        return x + skip[:, :c]
    return x + F.pad(skip, (0, 0, 0, 0, 0, c - s))


class ConvBlock(nn.Module):
    """``convs`` x [3x3 conv (no bias), BatchNorm, ReLU], then a 1x1 conv; plus the input as residual.

    ``convs=1`` is the published ``SingleConv`` (encoder), ``convs=2`` its ``DoubleConv`` (decoder).
    """

    def __init__(self, in_channels: int, out_channels: int, convs: int, *, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        layers: list[nn.Module] = []
        for i in range(convs):
            cin = in_channels if i == 0 else out_channels
            layers += [
                nn.Conv2d(cin, out_channels, 3, padding=1, bias=False, **factory),
                nn.BatchNorm2d(out_channels, **factory),
                nn.ReLU(),
            ]
        layers.append(nn.Conv2d(out_channels, out_channels, 1, **factory))
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _add_residual(x, self.conv(x))


class BlockGroup(nn.Module):
    """A one-block group (the published layout keeps blocks under ``blocks.<i>``)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.Sequential(block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class UpStep(nn.Module):
    """2x upsampling: a 2x2 stride-2 transposed conv plus an align-corners bilinear residual."""

    def __init__(self, channels: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(channels, channels, 2, stride=2, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.up(x)  # (B, C, 2h, 2w)
        return _add_residual(F.interpolate(x, size=up.shape[-2:], mode="bilinear", align_corners=True), up)


class Encoder(nn.Module):
    """The image encoder: one single-conv block per entry of ``channels``, all at input resolution."""

    def __init__(self, channels: Sequence[int] = ENCODER_CHANNELS, *, device=None, dtype=None) -> None:
        super().__init__()
        self.channels = tuple(channels)
        for i, out in enumerate(self.channels):
            cin = 3 if i == 0 else self.channels[i - 1]
            self.add_module(f"block_{i}", BlockGroup(ConvBlock(cin, out, 1, device=device, dtype=dtype)))

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> every block's output, (B, channels[i], H, W)."""
        feats, x = [], image
        for i in range(len(self.channels)):
            x = getattr(self, f"block_{i}")(x)
            feats.append(x)
        return feats


class Decoder(nn.Module):
    """One 2x step's decoder: low-res block, 2x up, high-res block; its output is the attender's guide."""

    def __init__(self, dim: int, enc_channels: Sequence[int], hidden: int = 64, *, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.block_0 = BlockGroup(ConvBlock(dim + enc_channels[-1], hidden, 2, **factory))
        self.up_1 = UpStep(hidden, **factory)
        self.block_1 = BlockGroup(ConvBlock(hidden + enc_channels[-2], hidden, 2, **factory))

    def low_res(self, x: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w), (B, E, h, w) -> (B, hidden, h, w)."""
        return self.block_0(torch.cat([x, deep], dim=1))

    def high_res(self, up: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """(B, hidden, 2h, 2w), (B, E', 2h, 2w) -> the guide (B, hidden, 2h, 2w)."""
        return self.block_1(torch.cat([up, skip], dim=1))


class LocalAttender(nn.Module):
    """Softmax weights over ``OFFSETS`` from the guide, and the weighted sum of the offset low-res values."""

    def __init__(self, guide_channels: int = 64, *, device=None, dtype=None) -> None:
        super().__init__()
        if guide_channels < len(OFFSETS):
            raise ConfigError(f"LocalAttender: expected a guide of >= {len(OFFSETS)} channels, got {guide_channels}")
        self.conv1 = nn.Conv2d(guide_channels, len(OFFSETS), 1, device=device, dtype=dtype)

    def weights(self, guide: torch.Tensor) -> torch.Tensor:
        """(B, G, 2R, 2W) guide -> (B, 17, 2R, 2W) convex weights (the guide's first channels are a residual)."""
        return torch.softmax(_add_residual(guide, self.conv1(guide)), dim=1)

    @staticmethod
    def combine(weights: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """(B, 17, 2R, 2W) weights, (B, C, R + 4, W + 4) padded values -> (B, C, 2R, 2W)."""
        b, d, h2, w2 = weights.shape
        rows, cols = h2 // 2, w2 // 2
        w6 = weights.view(b, d, rows, 2, cols, 2)
        out = value.new_zeros(b, value.shape[1], rows, 2, cols, 2)
        for i, (dy, dx) in enumerate(OFFSETS):
            shifted = value[:, :, _PAD + dy : _PAD + dy + rows, _PAD + dx : _PAD + dx + cols]  # (B, C, R, W)
            out.addcmul_(shifted[:, :, :, None, :, None], w6[:, i, None])
        return out.view(b, -1, h2, w2)


def _bands(total: int, rows: int) -> Iterator[tuple[int, int]]:
    """``[start, stop)`` row ranges of at most ``rows`` rows covering ``total``."""
    for start in range(0, total, rows):
        yield start, min(start + rows, total)


def _banded(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], halo: int, rows: int) -> torch.Tensor:
    """``fn(*inputs)`` for a row-local ``fn`` (``halo`` rows of context each side), computed in bands."""
    total = inputs[0].shape[2]
    if rows >= total:
        return fn(*inputs)
    parts = []
    for r0, r1 in _bands(total, rows):
        lo, hi = max(0, r0 - halo), min(total, r1 + halo)
        parts.append(fn(*(t[:, :, lo:hi] for t in inputs))[:, :, r0 - lo : r1 - lo])
    return torch.cat(parts, dim=2)


def _nearest_index(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """Source index of each of ``n_out`` positions under PyTorch's legacy ``nearest`` resize from ``n_in``."""
    src = torch.arange(n_in, dtype=torch.float32, device=device).view(1, 1, n_in, 1)
    return F.interpolate(src, size=(n_out, 1), mode="nearest").view(n_out).long()


def _antialias_matrix(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    """(n_out, n_in) matrix of the antialiased bilinear resize ``n_in -> n_out`` along one axis."""
    eye = torch.eye(n_in, dtype=like.dtype, device=like.device).view(1, 1, n_in, n_in)
    return F.interpolate(eye, size=(n_out, n_in), mode="bilinear", align_corners=False, antialias=True)[0, 0]


def resize_antialias(x: torch.Tensor, size: tuple[int, int], rows: int) -> torch.Tensor:
    """Antialiased bilinear resize of (B, C, H, W) to ``size`` (torchvision's default), ``rows`` output rows at a time."""
    (h, w), (out_h, out_w) = x.shape[-2:], size
    if (h, w) == (out_h, out_w):
        return x
    along_h = _antialias_matrix(h, out_h, x) if out_h != h else None
    along_w = _antialias_matrix(w, out_w, x).T if out_w != w else None  # (W, W')
    out = x.new_empty(*x.shape[:2], out_h, out_w)  # (B, C, H', W')
    for o0, o1 in _bands(out_h, rows):
        if along_h is None:
            band = x[:, :, o0:o1]
        else:
            taps = along_h[o0:o1].abs().sum(0).nonzero().view(-1)
            lo, hi = int(taps[0]), int(taps[-1]) + 1
            band = torch.matmul(along_h[o0:o1, lo:hi], x[:, :, lo:hi])  # (B, C, rows, W)
        out[:, :, o0:o1] = band if along_w is None else torch.matmul(band, along_w)
    return out


def design_output_size(lr_size: tuple[int, int], output_size: Sequence[int] | int) -> tuple[int, int]:
    """An explicit ``output_size`` as (H', W'): an int sets the shorter side, keeping the low-res aspect ratio."""
    if not isinstance(output_size, int):
        return tuple(output_size)
    h, w = lr_size
    if h <= w:
        return output_size, int(output_size * w / h)
    return int(output_size * h / w), output_size


def steps_to_reach(lr_size: tuple[int, int], size: tuple[int, int]) -> int:
    """The fewest 2x steps after which the low-res map is at least ``size`` in both sides."""
    steps = 0
    while lr_size[0] << steps < size[0] or lr_size[1] << steps < size[1]:
        steps += 1
    return steps


class UPLiFT(nn.Module):
    """UPLiFT for ``dim``-channel features of a ViT with ``patch_size`` pixels per token.

    ``max_query_pixels`` bounds the pixels (batch included) each banded stage works on at once; the
    banded result equals the one-band result (exact halos). ``num_steps`` is the default number of 2x steps.
    """

    image_norm = IMAGENET_NORM

    def __init__(
        self,
        dim: int = 384,
        patch_size: int = 14,
        num_steps: int = 4,
        *,
        encoder_channels: Sequence[int] = ENCODER_CHANNELS,
        hidden_channels: int = 64,
        max_query_pixels: int = 1 << 16,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if dim < 1 or patch_size < 1 or num_steps < 0 or max_query_pixels < 1 or len(encoder_channels) < 2:
            raise ConfigError(
                "UPLiFT: expected dim, patch_size, max_query_pixels >= 1, num_steps >= 0 and >= 2 encoder blocks, "
                f"got {dim}, {patch_size}, {max_query_pixels}, {num_steps} and {tuple(encoder_channels)}"
            )
        self.dim, self.patch_size, self.num_steps = dim, patch_size, num_steps
        self.max_query_pixels = max_query_pixels
        factory = {"device": device, "dtype": dtype}
        self.encoder = Encoder(encoder_channels, **factory)
        self.decoder = Decoder(dim, self.encoder.channels, hidden_channels, **factory)
        self.attender = LocalAttender(hidden_channels, **factory)

    def forward(
        self, lr_feats: torch.Tensor, image: torch.Tensor, output_size: Sequence[int] | int | None = None
    ) -> torch.Tensor:
        """(B, C, h, w) features, (B, 3, H, W) ImageNet-normalised image -> (B, C, H', W').

        (H', W') is ``(h, w) * 2**num_steps`` when ``output_size`` is None; otherwise the fewest steps
        reaching ``output_size`` run and the result is resized to it (an int sets the shorter side).
        Computed in the parameters' dtype; the output has ``lr_feats``' dtype.
        """
        check_inputs(lr_feats, image, dim=self.dim)
        lr_size = (int(lr_feats.shape[2]), int(lr_feats.shape[3]))
        if output_size is None:
            steps, size = self.num_steps, (lr_size[0] << self.num_steps, lr_size[1] << self.num_steps)
        else:
            size = resolve_output_size(image, design_output_size(lr_size, output_size))
            steps = steps_to_reach(lr_size, size)
        out = lr_feats.to(self.attender.conv1.weight.dtype)  # (B, C, h, w) when no step runs
        for out in self.iter_steps(lr_feats, image, steps, final_size=size):
            pass
        out = resize_antialias(out, size, self._rows(out.shape[0], size[1]))  # (B, C, H', W'), no-op after a step
        return out.to(lr_feats.dtype)

    def upsample_steps(self, lr_feats: torch.Tensor, image: torch.Tensor, steps: int | None = None) -> list[torch.Tensor]:
        """The output of every 2x step, (B, C, h * 2**k, w * 2**k) for k = 1..steps (default ``num_steps``)."""
        check_inputs(lr_feats, image, dim=self.dim)
        return [x.to(lr_feats.dtype) for x in self.iter_steps(lr_feats, image, self.num_steps if steps is None else steps)]

    def iter_steps(
        self, lr_feats: torch.Tensor, image: torch.Tensor, steps: int, final_size: tuple[int, int] | None = None
    ) -> Iterator[torch.Tensor]:
        """Yield each step's output in the parameters' dtype; the encoder runs once, before the first.

        With ``final_size``, the last step's output comes resized to it (a few channels at a time, so the
        unresized map is never held whole).
        """
        if steps < 1:
            return
        dtype = self.attender.conv1.weight.dtype
        x = lr_feats.to(dtype)  # (B, C, h, w)
        sizes = [(x.shape[2] << k, x.shape[3] << k) for k in range(steps + 1)]
        deep, skip = self.encode(self.encoder_input(image.to(dtype)), sizes[:-1], sizes[1:])
        for k in range(steps):
            weights = self.step_weights(x, deep.pop(0), skip.pop(0))  # (B, 17, 2h, 2w); the taps are freed
            x = self.combine(weights, x, final_size if k == steps - 1 else None)  # (B, C, 2h, 2w) or final_size
            yield x

    def encoder_input(self, image: torch.Tensor) -> torch.Tensor:
        """The image the encoder sees: 16 pixels per token (a patch-14 image is resized by 16/14)."""
        if self.patch_size != 14:
            return image
        h, w = image.shape[2] * 16 // 14, image.shape[3] * 16 // 14
        return F.interpolate(image, size=(h, w), mode="bilinear", align_corners=False, antialias=True)

    def encode(
        self, enc_image: torch.Tensor, deep_sizes: Sequence[tuple[int, int]], skip_sizes: Sequence[tuple[int, int]]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Run the encoder in bands and keep only its last (``deep``) and second-to-last (``skip``) outputs,
        nearest-resampled to each of the given sizes."""
        b, _, enc_h, enc_w = enc_image.shape
        levels = len(self.encoder.channels)
        targets = [(levels - 1, s) for s in deep_sizes] + [(levels - 2, s) for s in skip_sizes]
        device = enc_image.device
        outs = [enc_image.new_empty(b, self.encoder.channels[lvl], *s) for lvl, s in targets]
        row_idx = [_nearest_index(enc_h, s[0], device) for _, s in targets]
        col_idx = [_nearest_index(enc_w, s[1], device) for _, s in targets]
        halo = levels  # one 3x3 conv per encoder block
        for e0, e1 in _bands(enc_h, self._rows(b, enc_w)):
            lo, hi = max(0, e0 - halo), min(enc_h, e1 + halo)
            feats = self.encoder(enc_image[:, :, lo:hi])
            for out, (lvl, _), rows, cols in zip(outs, targets, row_idx, col_idx):
                hit = ((rows >= e0) & (rows < e1)).nonzero().view(-1)
                if hit.numel():
                    r0, r1 = int(hit[0]), int(hit[-1]) + 1
                    out[:, :, r0:r1] = feats[lvl].index_select(2, rows[r0:r1] - lo).index_select(3, cols)
        return outs[: len(deep_sizes)], outs[len(deep_sizes) :]

    def step_weights(self, x: torch.Tensor, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """A 2x step's attender weights: (B, C, h, w), taps (B, E, h, w), (B, E', 2h, 2w) -> (B, 17, 2h, 2w)."""
        b, _, h, w = x.shape
        low = _banded(self.decoder.low_res, [x, deep], halo=2, rows=self._rows(b, w))  # (B, hidden, h, w)
        up = self.decoder.up_1(low)  # (B, hidden, 2h, 2w)
        return _banded(self._guided_weights, [up, skip], halo=2, rows=self._rows(b, 2 * w))  # two 3x3 convs

    def _guided_weights(self, up: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.attender.weights(self.decoder.high_res(up, skip))

    def combine(self, weights: torch.Tensor, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Weights (B, 17, 2h, 2w), values (B, C, h, w) -> (B, C, 2h, 2w), or resized to ``size`` if given."""
        b, c, h, w = x.shape
        if size is None or tuple(size) == (2 * h, 2 * w):
            return self._combine_rows(weights, x)
        out = x.new_empty(b, c, *size)  # (B, C, H', W')
        chunk = max(1, self.max_query_pixels * 256 // (b * 4 * h * w)) if not self.training else c
        for c0 in range(0, c, chunk):
            full = self._combine_rows(weights, x[:, c0 : c0 + chunk])  # (B, chunk, 2h, 2w)
            out[:, c0 : c0 + chunk] = resize_antialias(full, size, self._rows(b, size[1]))
        return out

    def _combine_rows(self, weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        out = x.new_empty(b, c, 2 * h, 2 * w)
        for r0, r1 in _bands(h, self._rows(b, 4 * w)):
            out[:, :, 2 * r0 : 2 * r1] = self.attender.combine(weights[:, :, 2 * r0 : 2 * r1], _padded_rows(x, r0, r1))
        return out

    def _rows(self, batch: int, pixels_per_row: int) -> int:
        """Rows per band under the ``max_query_pixels`` budget; everything at once in training mode."""
        if self.training:
            return 1 << 62
        return max(1, self.max_query_pixels // max(1, batch * pixels_per_row))


def _padded_rows(x: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0 - 2 .. r1 + 2`` of (B, C, h, w), replication-padded by 2 on every side: (B, C, R + 4, w + 4)."""
    rows = torch.arange(r0 - _PAD, r1 + _PAD, device=x.device).clamp_(0, x.shape[2] - 1)
    return F.pad(x.index_select(2, rows), (_PAD, _PAD, 0, 0), mode="replicate")


_WRAPPER_KEYS = ("state_dict", "model", "uplift")
_PREFIXES = ("module.", "model.", "uplift.")


def state_dict_from_checkpoint(raw: object) -> dict[str, torch.Tensor]:
    """The module's state dict from a released checkpoint: a flat mapping of ``UPLiFT.state_dict()``
    (the ``.safetensors`` files). A training checkpoint wrapping it under ``state_dict``/``model``/``uplift``,
    or with keys prefixed ``module.``/``model.``/``uplift.``, is unwrapped too."""
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"UPLiFT checkpoint: expected a mapping of names to tensors, got {type(raw).__name__}")
    for key in _WRAPPER_KEYS:
        if isinstance(raw.get(key), Mapping):
            raw = raw[key]
            break
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"UPLiFT checkpoint: expected tensors, got {type(value).__name__} under {key!r}")
        for prefix in _PREFIXES:
            if str(key).startswith(prefix):
                key = key[len(prefix) :]
                break
        state[str(key)] = value
    if not any(k.startswith("encoder.") for k in state) or not any(k.startswith("decoder.") for k in state):
        raise CheckpointError(
            "UPLiFT checkpoint: expected 'encoder.*', 'decoder.*' and 'attender.*' keys, "
            f"found {sorted(state)[:6]}{' ...' if len(state) > 6 else ''}"
        )
    return state


def _require(state: Mapping[str, torch.Tensor], key: str, ndim: int) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"UPLiFT state dict: missing key {key!r}")
    if state[key].dim() != ndim:
        raise CheckpointError(f"UPLiFT state dict: expected a {ndim}-D {key!r}, got shape {tuple(state[key].shape)}")
    return state[key]


def from_state_dict(
    state: Mapping[str, torch.Tensor], *, patch_size: int = 14, device=None, dtype=None, **kwargs
) -> UPLiFT:
    """An ``UPLiFT`` shaped after ``state`` (feature, encoder and decoder channels), loaded strictly.

    The patch size is not recorded in the weights: pass the one in ``PUBLISHED`` (14 for DINOv2, 16 for
    DINOv3). ``kwargs`` (``num_steps``, ``max_query_pixels``) go to the constructor.
    """
    channels = []
    while f"encoder.block_{len(channels)}.blocks.0.conv.0.weight" in state:
        channels.append(int(_require(state, f"encoder.block_{len(channels)}.blocks.0.conv.0.weight", 4).shape[0]))
    if len(channels) < 2:
        raise CheckpointError(f"UPLiFT state dict: expected >= 2 encoder blocks ('encoder.block_<i>.*'), found {len(channels)}")
    first = _require(state, "decoder.block_0.blocks.0.conv.0.weight", 4)
    dim, hidden = int(first.shape[1]) - channels[-1], int(first.shape[0])
    if dim < 1:
        raise CheckpointError(f"UPLiFT state dict: 'decoder.block_0.blocks.0.conv.0.weight' {tuple(first.shape)} has no feature inputs")
    model = UPLiFT(dim, patch_size, encoder_channels=channels, hidden_channels=hidden, device=device, dtype=dtype, **kwargs)
    check_state_dict("UPLiFT", model.state_dict(), state, may_lack=("num_batches_tracked",))
    try:
        model.load_state_dict(dict(state), strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"UPLiFT state dict does not fit the model: {err}") from err
    return model.eval()


@UPSAMPLERS.register("uplift")
def build_uplift(dim: int, *, num_stages: int = 4, device=None, dtype=None, **kwargs) -> UPLiFT:
    """Randomly initialised UPLiFT for ``dim``-channel features; ``num_stages`` is its number of 2x steps."""
    return UPLiFT(dim, num_steps=num_stages, device=device, dtype=dtype, **kwargs)
