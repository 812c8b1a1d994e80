"""Compact stores: per sample the upsampler's input features and guidance image; the upsampler itself, once, in the store.

A store written by ``featup precompute --compact`` holds, instead of ``features``::

    lowres   (N, K, h, w)  what the stored upsampler takes: the backbone's features after the checkpoint's channel norm
                           (with ``--channels K``: projected after the JBU's 1x1 fix-up, which is folded into them)
    image    (N, S, S, 3)  uint8, the guidance image as the upsampler received it, before normalisation (the JBU's in
                           the backbone's normalisation, a successor's in its own: the record says which)
    _featup/upsampler/upsampler.json        the record: kind, constructor settings, sizes, guidance normalisation,
                                            and the sha256 of the parameters
    _featup/upsampler/state.safetensors     the upsampler's parameters (safetensors: nothing is unpickled)

and the root attributes ``compact: true``, ``upsampler_sha256`` and ``features`` (a note for plain Zarr users). The
reader upsamples ``features`` where they are read, from the low-res window a crop needs and only the channels asked
for (``featup.upsamplers.window``), with the stored upsampler only: its bytes are checked against the sha256 of the
record and of the attributes, and a store whose upsampler was altered is refused by name. FeatUp's successors
(anyup, jafar, loftup, naf, uplift) are stored the same way; their kinds declare that they read the whole low-res map
and every channel, so a crop or a channel subset of theirs costs a whole-map upsampling (``featup.upsampler_hub.Kind``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from featup.errors import ConfigError, InputError
from featup.upsamplers.window import CropPlan, needs_all_channels, upsample_window, window_steps

UPSAMPLER_NODE = "upsampler"  # the side node (an empty Zarr array under _featup/) whose prefix holds the two files
RECORD_FILE, STATE_FILE = "upsampler.json", "state.safetensors"
RECORD_FORMAT = 1
FEATURES_NOTE = ("not stored: this is a compact store (lowres + image + the upsampler in _featup/upsampler/). "
                 "pipeline.store.reader.open_features(url)[i]['features'] upsamples them where they are read; "
                 "`featup materialize URL --output FULL` writes a store that holds them as a plain Zarr array")
KERNEL_BACKEND = "auto"  # JBU kernels of the reader: torch.compile'd where it works (falls back to eager), as precompute


@dataclass(frozen=True)
class UpsamplerRecord:
    """How to rebuild a compact store's upsampler: ``build_upsampler(kind, dim, num_stages=..., **settings)`` loaded
    strictly with the parameters whose sha256 is ``sha256``, and what it is fed."""

    kind: str
    dim: int
    num_stages: int
    settings: dict[str, Any]  # further constructor keywords (the JBU's key_dim, radius, guidance_dim; SETTINGS)
    sha256: str  # of the state file's bytes
    nbytes: int
    guidance_mean: tuple[float, float, float]  # the guidance is (image / 255 - mean) / std, as the model received it:
    # the backbone's normalisation for the JBU, a successor's own (its ``image_norm``) for the others
    guidance_std: tuple[float, float, float]
    lowres_size: tuple[int, int]
    image_size: tuple[int, int]
    output_size: tuple[int, int]
    source: dict[str, Any] = field(default_factory=dict)  # provenance: checkpoint and its sha256, a folded projection
    # A successor guided in another normalisation than the backbone's gets the backbone's image converted to its own
    # (``featup.hub.GuidedUpsampler``): the backbone's, applied first by the same operations (None: no conversion).
    backbone_mean: tuple[float, float, float] | None = None
    backbone_std: tuple[float, float, float] | None = None
    input_array: str = "lowres"
    guidance_array: str = "image"
    format: int = RECORD_FORMAT

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> UpsamplerRecord:
        """The record in ``data``; anything else is an InputError naming ``where``."""
        try:
            raw = json.loads(data)
            if raw.get("format") != RECORD_FORMAT:
                raise ValueError(f"record format {raw.get('format')!r}, this version reads {RECORD_FORMAT}")
            tuples = ("guidance_mean", "guidance_std", "lowres_size", "image_size", "output_size", "backbone_mean",
                      "backbone_std")
            return cls(**{k: tuple(v) if k in tuples and v is not None else v for k, v in raw.items()})
        except (ValueError, TypeError, AttributeError) as e:
            raise InputError(f"{where}: expected a compact store's upsampler record, got {e}") from None


def constructor_settings(kind: str, module: nn.Module) -> dict[str, Any]:
    """The constructor keywords that rebuild ``module`` of ``kind`` (beyond dim and num_stages); a kind without an
    entry in SETTINGS cannot be stored (a ConfigError saying so)."""
    if kind not in SETTINGS:
        raise ConfigError(f"--compact: expected an upsampler whose constructor settings are known ({', '.join(SETTINGS)}), "
                          f"got {kind!r}")
    return SETTINGS[kind](module)


def _jbu_settings(stack: nn.Module) -> dict[str, Any]:
    first = stack.stages[0]
    return {"key_dim": int(first.range_proj[0].out_channels), "radius": int(first.radius), "guidance_dim": int(stack.guidance_dim)}


def _anyup_settings(m: nn.Module) -> dict[str, Any]:
    return {"input_dim": int(m.input_dim), "qk_dim": int(m.qk_dim), "kernel_size": int(m.image_encoder[0].kernel_size[0]),
            "kernel_size_lfu": int(m.key_features_encoder[0].kernel_size), "window_ratio": float(m.cross_decode.window_ratio),
            "num_heads": int(m.cross_decode.cross_attn.num_heads), "lfu_dim": int(m.lfu_dim)}


def _jafar_settings(m: nn.Module) -> dict[str, Any]:  # v_dim is the record's dim
    return {"input_dim": int(m.input_dim), "qk_dim": int(m.qk_dim), "kernel_size": int(m.image_encoder[0].kernel_size[0]),
            "num_heads": int(m.num_heads)}


def _loftup_settings(m: nn.Module) -> dict[str, Any]:
    return {"color_feats": bool(m.color_feats), "n_freqs": int(m.image_encoding.n_freqs),
            "num_heads": int(m.layers[0].attn.num_heads), "num_layers": len(m.layers)}


def _naf_settings(m: nn.Module) -> dict[str, Any]:
    """NAF's own ``dim`` is its guidance width; ``rope_base`` only initialises the ``periods`` buffer, which is loaded."""
    encoder = m.image_encoder
    return {"guidance_dim": 2 * int(encoder.encoder[0].out_channels), "heads_attn": int(m.heads_attn),
            "heads_rope": int(encoder.rope.num_heads), "kernel_size": int(m.kernel_size),
            "rope_rescale": encoder.rope.rescale, "img_layers": len(encoder.encoder) - 1}


def _uplift_settings(m: nn.Module) -> dict[str, Any]:  # its default 2x steps are the record's num_stages
    return {"patch_size": int(m.patch_size), "encoder_channels": [int(c) for c in m.encoder.channels],
            "hidden_channels": int(m.decoder.block_0.blocks[0].conv[0].out_channels)}


# kind -> the settings of a built module; each upsampler stored in compact stores needs an entry (and a test). Memory
# knobs (``max_query_pixels``, bands) are left at their defaults: they change how a result is computed, never the result.
SETTINGS: dict[str, Callable[[nn.Module], dict[str, Any]]] = {
    "jbu": _jbu_settings, "bilinear": lambda module: {}, "anyup": _anyup_settings, "jafar": _jafar_settings,
    "loftup": _loftup_settings, "naf": _naf_settings, "uplift": _uplift_settings,
}
RUNTIME_OPTIONS: dict[str, Callable[[str], dict[str, Any]]] = {"jbu": lambda backend: {"backend": backend}}


def constructor_stages(module: nn.Module) -> int:
    """The ``num_stages`` that rebuilds ``module``: the JBU's 2x stages, UPLiFT's default 2x steps, else 1 (ignored)."""
    for name in ("num_stages", "num_steps"):
        if hasattr(module, name):
            return int(getattr(module, name))
    return 1


def state_bytes(module: nn.Module) -> bytes:
    """The module's parameters and buffers as safetensors bytes (deterministic: the same values give the same bytes)."""
    from safetensors.torch import save

    return save({name: value.detach().to("cpu").contiguous() for name, value in module.state_dict().items()})


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_module(record: UpsamplerRecord, state: bytes, backend: str = KERNEL_BACKEND) -> nn.Module:
    """The recorded upsampler on the CPU in float32, eval mode, its parameters loaded strictly from ``state``."""
    from safetensors.torch import load

    from featup.upsamplers import build_upsampler

    options = RUNTIME_OPTIONS[record.kind](backend) if record.kind in RUNTIME_OPTIONS else {}
    module = build_upsampler(record.kind, record.dim, num_stages=record.num_stages, **record.settings, **options)
    try:
        module.load_state_dict(load(state), strict=True)
    except RuntimeError as e:
        raise InputError(f"compact store upsampler: expected parameters that fit {record.kind}, got {e}") from None
    return module.float().eval()


def is_compact(attrs: dict) -> bool:
    """Whether a store's attributes say it is compact (its features are upsampled on read)."""
    return bool(attrs.get("compact"))


def write_upsampler(store: Any, record: UpsamplerRecord, state: bytes) -> None:
    """Writes the state file, then the record that names its sha256 (each one atomic write)."""
    store.write_side_file(f"{UPSAMPLER_NODE}/{STATE_FILE}", state)
    store.write_side_file(f"{UPSAMPLER_NODE}/{RECORD_FILE}", record.to_bytes())


def read_upsampler(store: Any) -> tuple[UpsamplerRecord, bytes] | None:
    """The record and state of a compact store's upsampler (None when the record is not written yet), after checking the
    state's bytes against the sha256 of the record and of the store's attributes: an altered upsampler is refused."""
    where = f"{store.url.rstrip('/')}/_featup/{UPSAMPLER_NODE}"
    data = store.read_side_file(f"{UPSAMPLER_NODE}/{RECORD_FILE}")
    if data is None:
        return None
    record = UpsamplerRecord.from_bytes(data, f"{where}/{RECORD_FILE}")
    state = store.read_side_file(f"{UPSAMPLER_NODE}/{STATE_FILE}")
    expected = store.attrs.get("upsampler_sha256")
    got = None if state is None else sha256(state)
    if got is None or got != record.sha256 or got != expected:
        raise InputError(f"store {store.url}: expected the stored upsampler {where}/{STATE_FILE} to have sha256 {expected} "
                         f"(the store's attributes) and {record.sha256} (its record), got {got or 'no file'}: the stored "
                         "upsampler was altered or lost, so its features cannot be trusted; recompute the store")
    return record, state


class StoredUpsampler(nn.Module):
    """A compact store's upsampler for one selection of channels and crop size: ``up(lowres, image, origin=None)``.

    ``lowres`` (B, C', h', w') float: the low-res windows as ``torch_dataset(upsample=False)`` yields them (every
    channel when ``input_channels`` is None); ``image`` (B, 3, H', W') uint8 (normalised here) or an already normalised
    float image over the same windows; ``origin`` (B, 2): each crop's top-left corner in feature pixels (None: whole
    maps). Returns (B, K, *crop) features in the module's dtype.
    """

    def __init__(self, record: UpsamplerRecord, inner: nn.Module, plan: CropPlan, channels: Sequence[int] | None) -> None:
        super().__init__()
        self.record, self.inner, self.plan = record, inner, plan
        self.channels = None if channels is None else tuple(int(c) for c in channels)
        self.register_buffer("mean", torch.tensor(record.guidance_mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(record.guidance_std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.converts = record.backbone_mean is not None
        backbone = (record.backbone_mean, record.backbone_std) if self.converts else (record.guidance_mean, record.guidance_std)
        self.register_buffer("backbone_mean", torch.tensor(backbone[0], dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("backbone_std", torch.tensor(backbone[1], dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def input_channels(self) -> tuple[int, ...] | None:
        """The low-res channels the module takes: None for every channel, else those selected."""
        return input_channels(self.inner, self.channels)

    def guidance(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 RGB -> normalised float32, the same operations as the pipeline's preprocessing (``/ 255``, ``- mean``,
        ``/ std``), then, for a successor guided in another normalisation, as ``ImageNorm.convert`` (``* std + mean``,
        ``- mean'``, ``/ std'``): bit for bit what precompute fed it. A float image is taken as already normalised."""
        if image.dtype != torch.uint8:
            return image
        x = (image.float().div_(255.0) - self.backbone_mean) / self.backbone_std  # (B, 3, H, W) as for the backbone
        if not self.converts:
            return x
        return (x * self.backbone_std + self.backbone_mean - self.mean) / self.std

    def forward(self, lowres: torch.Tensor, image: torch.Tensor, origin: torch.Tensor | Sequence | None = None) -> torch.Tensor:
        dtype = next(self.inner.parameters(), self.mean).dtype
        origins = None if origin is None else [tuple(int(v) for v in o) for o in torch.as_tensor(origin).view(-1, 2).tolist()]
        guide = self.guidance(image.to(self.mean.device)).to(dtype)
        return upsample_window(self.inner, lowres.to(self.mean.device, dtype), guide, self.plan, origins, self.channels)


def input_channels(inner: nn.Module, channels: Sequence[int] | None) -> tuple[int, ...] | None:
    """The low-res channels ``inner`` needs for output ``channels``: None (every one) when it mixes them."""
    return None if channels is None or needs_all_channels(inner) else tuple(int(c) for c in channels)


class CompactSource:
    """The reading side of a compact store: its verified upsampler, and the windows a crop of ``features`` reads."""

    def __init__(self, record: UpsamplerRecord, state: bytes, channels: int, backend: str = KERNEL_BACKEND) -> None:
        self.record, self.state, self.channels, self.backend = record, state, channels, backend
        self._inner: nn.Module | None = None  # built once per process (__getstate__ drops it)
        self._plans: dict[tuple[int, int] | None, CropPlan] = {}
        self._modules: dict[tuple, StoredUpsampler] = {}

    @classmethod
    def open(cls, store: Any, channels: int, backend: str = KERNEL_BACKEND) -> CompactSource:
        found = read_upsampler(store)
        if found is None:
            raise InputError(f"store {store.url}: expected a compact store with its upsampler in _featup/{UPSAMPLER_NODE}/, "
                             "got none (the job that created it stopped before writing it: rerun it to resume)")
        if found[0].dim != channels:
            raise InputError(f"store {store.url}: expected a stored upsampler of the low-res features' {channels} channels, "
                             f"got one of {found[0].dim}")
        return cls(*found, channels, backend)

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.record.output_size)

    def upsampler(self, channels: Sequence[int] | None = None, crop: tuple[int, int] | None = None, *,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> StoredUpsampler:
        """A new module (its own copy of the parameters) on ``device`` in ``dtype``, or in float32 for a kind computed
        in float32 whatever the job's dtype (LoftUp's sine encoding), as precompute runs it."""
        from featup.upsampler_hub import KINDS

        inner = build_module(self.record, self.state, self.backend)
        kind = KINDS.get(self.record.kind)
        run_dtype = torch.float32 if kind is not None and kind.full_precision else dtype
        return StoredUpsampler(self.record, inner, self.plan(crop), channels).to(device=device, dtype=run_dtype)

    def plan(self, crop: tuple[int, int] | None) -> CropPlan:
        """The crop plan of crops of ``crop`` (None: whole maps)."""
        if crop not in self._plans:
            r = self.record
            steps = window_steps(self._module(), r.lowres_size, r.image_size, r.output_size)
            self._plans[crop] = CropPlan.build(steps, r.lowres_size, r.output_size, crop)
        return self._plans[crop]

    def _module(self) -> nn.Module:
        if self._inner is None:
            self._inner = build_module(self.record, self.state, self.backend)
        return self._inner

    def inputs(self, read: Callable[[str, tuple[int, int, int, int], tuple[int, ...] | None], np.ndarray],
               box: tuple[int, int, int, int] | None, channels: Sequence[int] | None) -> dict[str, torch.Tensor]:
        """The low-res and guidance windows a crop at ``box`` (top, left, height, width in feature pixels; None: whole
        maps) needs, read with ``read(array, (top, left, height, width), channels)``: {"lowres", "image", "origin"}."""
        crop = None if box is None else (box[2], box[3])
        origin = (0, 0) if box is None else (box[0], box[1])
        top, left, height, width = self.plan(crop).lowres_box(origin)
        r = self.record
        fy, fx = r.image_size[0] // r.lowres_size[0], r.image_size[1] // r.lowres_size[1]
        lowres = read(r.input_array, (top, left, height, width), input_channels(self._module(), channels))  # (C', h', w')
        image = read(r.guidance_array, (top * fy, left * fx, height * fy, width * fx), None)  # (H', W', 3)
        return {"lowres": torch.from_numpy(lowres.astype(np.float32, copy=False)),
                "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                "origin": torch.tensor(origin, dtype=torch.int64)}

    def features(self, inputs: dict[str, Any], box: tuple[int, int, int, int] | None, channels: Sequence[int] | None) -> torch.Tensor:
        """(K, h, w) float32 features of one sample from its ``inputs`` windows, on the CPU."""
        crop = None if box is None else (box[2], box[3])
        key = (crop, None if channels is None else tuple(channels))
        if key not in self._modules:
            self._modules[key] = StoredUpsampler(self.record, self._module(), self.plan(crop), channels)
        with torch.inference_mode():
            return self._modules[key](inputs["lowres"][None], inputs["image"][None], inputs["origin"][None])[0]

    def image_crop(self, inputs: dict[str, Any], box: tuple[int, int, int, int] | None,
                   image_box: tuple[int, int, int, int] | None) -> torch.Tensor:
        """The image over ``image_box`` (the crop at the image's resolution), cut from the guidance window already read."""
        window = inputs["image"]  # (3, H', W'), the guidance over the low-res window of the crop at ``box``
        if image_box is None:
            return window
        r = self.record
        top, left, _, _ = self.plan(None if box is None else (box[2], box[3])).lowres_box(tuple(inputs["origin"].tolist()))
        y0 = image_box[0] - top * (r.image_size[0] // r.lowres_size[0])
        x0 = image_box[1] - left * (r.image_size[1] // r.lowres_size[1])
        return window[:, y0 : y0 + image_box[2], x0 : x0 + image_box[3]]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_inner": None, "_plans": {}, "_modules": {}}
