"""``FeatureExtractor``: a backbone and an upsampler loaded once on a device, mapping image batches to stored arrays."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from featup.devices import resolve_device
from featup.errors import ConfigError
from pipeline.precompute.config import SUCCESSORS, PrecomputeConfig
from pipeline.precompute.implicit import PerImageImplicit
from pipeline.runtime.models import build_seeded_backbone, seeded_global_generator

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Projection:
    """A channel map ``y = weight @ x + bias`` applied to features before upsampling (the ``--channels`` PCA)."""

    weight: np.ndarray  # (K, C) float32
    bias: np.ndarray  # (K,) float32

    @classmethod
    def from_pca(cls, pca: Any) -> Projection:
        """The centred PCA transform ``components @ (x - mean)`` as a weight and a bias."""
        components = pca.components.detach().float().cpu()  # (K, C)
        bias = -(components @ pca.mean.detach().float().cpu())  # (K,)
        return cls(components.numpy().copy(), bias.numpy().copy())

    @property
    def channels(self) -> int:
        return int(self.weight.shape[0])

    def to_attrs(self) -> dict[str, Any]:
        """JSON-ready form for the store's attributes (float32 values round-trip exactly through JSON)."""
        return {"weight": self.weight.tolist(), "bias": self.bias.tolist()}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> Projection:
        return cls(np.asarray(attrs["weight"], dtype=np.float32), np.asarray(attrs["bias"], dtype=np.float32))


def compute_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Models run in ``dtype`` on CUDA and in float32 on CPU (half precision on CPU is slow and no cheaper)."""
    return TORCH_DTYPES[dtype] if device.type == "cuda" else torch.float32


class FeatureExtractor:
    """Backbone + upsampler of a config on one device; ``__call__`` maps (B, 3, S, S) images to numpy arrays."""

    def __init__(self, config: PrecomputeConfig, *, projection: Projection | None = None, device: str | None = None) -> None:
        self.config = config
        self.device = resolve_device(device or config.device)
        self.dtype = compute_dtype(config.dtype, self.device)
        trained = load_checkpoint_for(config)  # first: a published checkpoint may also carry the backbone's weights
        backbone = build_seeded_backbone(config.backbone, config.weights, config.seed, checkpoint=trained)
        self.backbone = backbone.to(device=self.device, dtype=self.dtype).eval()
        if config.image_size % self.backbone.stride:
            raise ConfigError(
                f"--image-size: expected a multiple of the stride {self.backbone.stride} of backbone "
                f"{config.backbone!r}, got {config.image_size}"
            )
        if config.upsampler == "implicit":  # no upsampler to load: a network is fitted to each image
            self.upsampler = PerImageImplicit(self.backbone, config.implicit, config.seed)
        elif config.upsampler in SUCCESSORS:  # published weights; the guidance image converted to their normalisation
            self.upsampler = load_successor_for(config, self.backbone, self.device, self.dtype)
        else:
            stages = max(1, round(math.log2(self.output_size[0] / self.lowres_size[0])))
            upsampler = build_upsampler_for(config, self.backbone.dim, num_stages=stages, trained=trained)
            self.upsampler = upsampler.to(device=self.device, dtype=self.dtype).eval()
        if projection is not None and projection.weight.shape != (config.channels, self.backbone.dim):
            expected = (config.channels, self.backbone.dim)
            raise ConfigError(f"projection: expected a (channels, dim) = {expected} matrix, got {projection.weight.shape}")
        self.projection = projection
        self._weight, self._bias = _projection_tensors(projection, self.device, self.dtype)

    @property
    def stride(self) -> int:
        return self.backbone.stride

    @property
    def lowres_size(self) -> tuple[int, int]:
        """(h, w) of the backbone's features for an image_size x image_size image."""
        side = self.config.image_size // self.stride
        return side, side

    @property
    def output_size(self) -> tuple[int, int]:
        """(H, W) of the stored features: ``--output-size``, ``--scale`` times the low-res size, or the image size."""
        c = self.config
        if c.output_size is not None:
            return c.output_size, c.output_size
        if c.scale is not None:
            h, w = self.lowres_size
            return h * c.scale, w * c.scale
        return c.image_size, c.image_size

    @property
    def channels(self) -> int:
        """Channels of the stored features: ``--channels`` K (once its projection is fitted), else the backbone's dim."""
        return self.config.channels or self.backbone.dim

    def array_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Per-row shape and numpy dtype of each array ``__call__`` returns (codes, scale and offset when quantized)."""
        if self.config.compact:  # the upsampler's input only (the features are upsampled where they are read)
            return {"lowres": ((self.channels, *self.lowres_size), self.config.storage_dtype)}
        maps = {"features": (self.channels, *self.output_size)}
        if self.config.save_lowres:
            maps["lowres"] = (self.channels, *self.lowres_size)
        if self.config.quantize is None:
            return {name: (shape, self.config.storage_dtype) for name, shape in maps.items()}
        shapes = {}
        for name, shape in maps.items():
            shapes[name] = (shape, "uint8")
            shapes[f"{name}_scale"] = shapes[f"{name}_offset"] = ((self.channels,), "float32")
        return shapes

    def provenance(self) -> dict[str, Any]:
        """Which weights, upsampler and checkpoint produced the features (for the store's attributes)."""
        return {
            "backbone_weights": self.backbone.weights_id,
            "backbone_stride": self.stride,
            "backbone_dim": self.backbone.dim,
            "backbone_mean": list(self.backbone.mean),  # how the stored images were normalised for the backbone
            "backbone_std": list(self.backbone.std),
            "checkpoint_sha256": getattr(self.upsampler, "sha256", None),
            "compute_dtype": str(self.dtype).removeprefix("torch."),
            **self._guidance_provenance(),
        }

    def _guidance_provenance(self) -> dict[str, Any]:
        """A successor's guidance-image normalisation (the backbone's images are converted to it)."""
        norm = getattr(self.upsampler, "image_norm", None) if self.config.upsampler in SUCCESSORS else None
        return {} if norm is None else {"guidance_mean": list(norm.mean), "guidance_std": list(norm.std)}

    def check_sizes(self) -> None:
        """Run a successor once on zeros of the job's shapes, so that a size it cannot take (NAF's window rule,
        AnyUp's 2x2 minimum) is one clear error before the job starts rather than an error row per sample."""
        if self.config.upsampler not in SUCCESSORS:
            return
        size = self.config.image_size
        lr = torch.zeros(1, self.backbone.dim, *self.lowres_size, device=self.device, dtype=self.dtype)
        image = torch.zeros(1, 3, size, size, device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            self.upsampler(lr, image, self.output_size)

    @torch.inference_mode()
    def lowres(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, C, h, w) float32 features as the upsampler takes them (after a checkpoint's norm)."""
        feats = self.backbone(images.to(self.device, non_blocking=True))  # (B, C, h, w)
        normalize = getattr(self.upsampler, "normalize", None)
        return (normalize(feats) if normalize is not None else feats).float()

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """(B, 3, S, S) normalised images -> {"features": (B, K, H, W)[, "lowres": (B, K, h, w)]} in the storage dtype;
        compact: {"lowres": (B, K, h, w)}, the upsampler's input (``pipeline.precompute.compact``)."""
        x = images.to(self.device, non_blocking=True)  # (B, 3, S, S)
        lr = self.backbone(x)  # (B, C, h, w)
        if self.config.compact:
            from pipeline.precompute.compact import compact_input

            return self._to_storage("lowres", compact_input(self, lr))
        out = {"features": self._upsample(lr, x)}  # (B, K, H, W)
        if self.config.save_lowres:
            out["lowres"] = self._project_lowres(lr)  # (B, K, h, w)
        stored: dict[str, np.ndarray] = {}
        for name, value in out.items():
            stored.update(self._to_storage(name, value))
        return stored

    @property
    def image_progress(self) -> float:
        """Images of the running call done so far, fractional (implicit fits only; 0 otherwise)."""
        return getattr(self.upsampler, "progress", 0.0)

    def _upsample(self, lr: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # implicit: fitted under grad inside, whatever the caller's mode; successors: their own dtype (the wrapper)
        if self.config.upsampler == "implicit" or self.config.upsampler in SUCCESSORS:
            hr = self.upsampler(lr, x, self.output_size).to(self.dtype)  # (B, C, H, W); a PCA maps the output
            return hr if self._weight is None else self._apply_projection(hr)
        if self._weight is None:
            return self.upsampler(lr, x, self.output_size)
        if self.config.upsampler == "bilinear":  # a channel map commutes exactly with bilinear resizing
            return F.interpolate(self._apply_projection(lr), size=self.output_size, mode="bilinear", align_corners=False)
        return self.upsampler(lr, x, self.output_size, projection=self._weight, projection_bias=self._bias)

    def _project_lowres(self, lr: torch.Tensor) -> torch.Tensor:
        if self._weight is None:
            return lr
        normalize = getattr(self.upsampler, "normalize", None)
        return self._apply_projection(normalize(lr) if normalize is not None else lr)

    def _apply_projection(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.einsum("kc,bchw->bkhw", self._weight, feats) + self._bias.view(1, -1, 1, 1)  # (B, K, h, w)

    def _to_storage(self, name: str, x: torch.Tensor) -> dict[str, np.ndarray]:
        """Round to the configured dtype (as a GPU run would), then to what is stored, on the model's device.

        The lossy steps run here, where the features are: int8 codes with their per-channel scale and offset
        (``--quantize int8``), or float16 with ``--keep-bits`` mantissa bits; only the stored bytes go to the CPU.
        """
        from pipeline.store.quantize import quantize_int8, round_mantissa, round_mantissa_torch

        x = x.to(TORCH_DTYPES[self.config.dtype])
        if self.config.quantize is not None:
            codes, scale, offset = quantize_int8(x.float().contiguous())  # (B, C, H, W) uint8, (B, C), (B, C)
            return {name: codes.cpu().numpy(), f"{name}_scale": scale.cpu().numpy(), f"{name}_offset": offset.cpu().numpy()}
        # One pass to the storage dtype and to NCHW order (the JBU returns channels-last): torch does this
        # about 2x faster than the transposing copy zarr would make of a strided numpy array.
        x = x.to(TORCH_DTYPES[self.config.storage_dtype], memory_format=torch.contiguous_format)
        if self.config.keep_bits is None:
            return {name: x.cpu().numpy()}
        if x.device.type == "cpu":  # numpy's rounding is the faster one on a CPU
            return {name: round_mantissa(x.numpy(), self.config.keep_bits)}
        return {name: round_mantissa_torch(x, self.config.keep_bits).cpu().numpy()}


def load_checkpoint_for(config: PrecomputeConfig) -> nn.Module | None:
    """The trained JBU of ``--checkpoint`` (path, URL or ``featup:`` name, read once), or None without one (or for
    a successor, whose checkpoint ``load_successor_for`` reads)."""
    from featup.checkpoint import load_featup_checkpoint

    if config.checkpoint_location is None or config.upsampler in SUCCESSORS:
        return None
    location = config.checkpoint_location
    return load_featup_checkpoint(location.url, backend=config.kernel_backend, **location.options)


def build_upsampler_for(config: PrecomputeConfig, dim: int, num_stages: int = 4, trained: nn.Module | None = None) -> nn.Module:
    """The trained JBU of ``--checkpoint``, or a fresh ``jbu``/``bilinear`` upsampler initialised from ``config.seed``.

    A fresh JBU gets the ``num_stages`` 2x steps closest to the output size (4 for stride 16 at the image size).
    """
    from featup.upsamplers import build_upsampler

    if config.checkpoint is not None:
        upsampler = trained if trained is not None else load_checkpoint_for(config)
        if upsampler.dim != dim:
            raise ConfigError(
                f"--checkpoint {config.checkpoint}: expected {dim} channels (backbone {config.backbone}), got {upsampler.dim}"
            )
        trained_for = upsampler.hyper_parameters.get("backbone")  # recorded by featup train-jbu
        if trained_for is not None and trained_for != config.backbone:
            raise ConfigError(f"--checkpoint {config.checkpoint}: expected a JBU trained for backbone {config.backbone!r}, "
                              f"got one trained for {trained_for!r}")
        return upsampler
    extra = {"backend": config.kernel_backend} if config.upsampler == "jbu" else {}
    with seeded_global_generator(config.seed):  # construction draws a default init before the seeded reset
        upsampler = build_upsampler(config.upsampler, dim, num_stages=num_stages, **extra)
    reset = getattr(upsampler, "reset_parameters", None)
    if reset is not None:
        reset(torch.Generator().manual_seed(config.seed))
    return upsampler


def load_successor_for(config: PrecomputeConfig, backbone: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The successor of ``--upsampler`` with ``--checkpoint``'s weights (published name, path or URL) for ``backbone``:
    checked against the backbone it was trained for and fed the image in its own normalisation (``featup.hub``).

    It runs in the job's compute dtype, except a kind that needs float32 (LoftUp's sine encoding).
    """
    from featup import hub

    location = config.checkpoint_location
    upsampler = hub.load_upsampler(config.upsampler, location.url, progress=False, **location.options)
    guided = hub.for_backbone(upsampler, backbone)
    run_dtype = torch.float32 if SUCCESSORS[config.upsampler].full_precision else dtype
    return guided.to(device=device, dtype=run_dtype).eval()


def _projection_tensors(projection: Projection | None, device: torch.device, dtype: torch.dtype):
    if projection is None:
        return None, None
    weight = torch.from_numpy(projection.weight).to(device=device, dtype=dtype)  # (K, C)
    bias = torch.from_numpy(projection.bias).to(device=device, dtype=dtype)  # (K,)
    return weight, bias
