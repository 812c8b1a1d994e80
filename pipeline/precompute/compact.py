"""The writing side of ``featup precompute --compact``: what each row keeps, and the upsampler stored once per store.

A row keeps the upsampler's input (``compact_input``) and the uint8 guidance image; the driver writes the module that
turns them into the features (``stored_upsampler``) into ``_featup/upsampler/`` when it creates the store, and checks
it on every resume (``ensure_upsampler``). With ``--channels K`` the PCA commutes with the JBU's spatial stages but not
with its 1x1 fix-up, which mixes channels at low resolution first: the row keeps ``P (I + 0.1 W) x`` and the stored
JBU has K channels, a zero fix-up and the whole bias (``P 0.1 b + p``), which is what the full store's JBU computes.
A successor (anyup, jafar, loftup, naf, uplift) is stored as its bare module with its own guidance normalisation; the
config refuses ``--channels`` with it (``PrecomputeConfig``: no successor commutes with a projection).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from featup.errors import ConfigError
from featup.upsamplers.base import ImageNorm
from featup.upsamplers.window import jbu_mixed_input
from pipeline.store.compact import (FEATURES_NOTE, UPSAMPLER_NODE, UpsamplerRecord, constructor_settings, constructor_stages,
                                    read_upsampler, sha256, state_bytes, write_upsampler)


def inner_upsampler(extractor: Any) -> nn.Module:
    """The module that upsamples the stored input: a checkpoint's upsampler without its channel norm, a successor
    without the wrapper that converts the backbone's images to its normalisation."""
    from featup.checkpoint import FeatUpUpsampler
    from featup.hub import GuidedUpsampler

    up = extractor.upsampler
    return up.upsampler if isinstance(up, (FeatUpUpsampler, GuidedUpsampler)) else up


def guidance_norms(extractor: Any, module: nn.Module) -> tuple[ImageNorm, ImageNorm | None]:
    """How the stored upsampler's guidance is normalised, and the backbone's normalisation when the pipeline converts
    the backbone's images to it: a successor's own ``image_norm`` (converted unless equal, as ``GuidedUpsampler``
    does), else the backbone's (the JBU guides with the backbone's image)."""
    from featup.upsampler_hub import module_kind

    backbone = ImageNorm(tuple(extractor.backbone.mean), tuple(extractor.backbone.std))
    if module_kind(module) is None:
        return backbone, None
    return module.image_norm, None if module.image_norm == backbone else backbone


def compact_input(extractor: Any, lr: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) backbone features -> (B, K, h, w): what a compact row keeps (after the channel norm; projected after
    the JBU's fix-up, or before bilinear resizing, with ``--channels``), computed by the full path's own operations."""
    normalize = getattr(extractor.upsampler, "normalize", None)
    x = normalize(lr) if normalize is not None else lr
    weight = extractor._weight
    if weight is None:
        return x
    if extractor.config.upsampler == "jbu":
        mixed, _ = jbu_mixed_input(inner_upsampler(extractor), x)
        return torch.einsum("kc,bchw->bkhw", weight.to(mixed.dtype), mixed)  # as JBUStack's projection
    return extractor._apply_projection(x)  # bilinear: the full path projects, then resizes


def stored_upsampler(extractor: Any, projection: Any) -> tuple[UpsamplerRecord, bytes]:
    """The record and parameters of the module that upsamples ``compact_input`` (the driver's CPU extractor)."""
    config, kind = extractor.config, extractor.config.upsampler
    if projection is not None and kind not in ("jbu", "bilinear"):  # PrecomputeConfig refuses it first
        raise ConfigError(f"--channels: expected --upsampler jbu or bilinear with --compact, got --upsampler {kind}")
    module = inner_upsampler(extractor)
    if projection is not None:
        module = _fold_projection(module, projection) if kind == "jbu" else _linear_module(kind, projection.channels)
    state = state_bytes(module)
    provenance = extractor.provenance()
    norm, backbone_norm = guidance_norms(extractor, module)
    record = UpsamplerRecord(
        kind=kind, dim=int(projection.channels if projection is not None else extractor.backbone.dim),
        num_stages=constructor_stages(module), settings=constructor_settings(kind, module),
        sha256=sha256(state), nbytes=len(state),
        guidance_mean=tuple(norm.mean), guidance_std=tuple(norm.std),
        lowres_size=tuple(extractor.lowres_size), image_size=(config.image_size, config.image_size),
        output_size=tuple(extractor.output_size),
        source={"checkpoint": config.checkpoint, "checkpoint_sha256": provenance["checkpoint_sha256"],
                "channel_norm_applied": getattr(extractor.upsampler, "normalize", None) is not None,
                "projection_folded": projection is not None},
        backbone_mean=None if backbone_norm is None else tuple(backbone_norm.mean),
        backbone_std=None if backbone_norm is None else tuple(backbone_norm.std),
    )
    return record, state


def compact_attrs(record: UpsamplerRecord) -> dict[str, Any]:
    """Provenance attributes of a compact store: its upsampler's sha256 and where its record is."""
    return {"upsampler_sha256": record.sha256, "upsampler_record": f"_featup/{UPSAMPLER_NODE}/"}


def compact_notes() -> dict[str, str]:
    """Top-level attributes of a compact store for plain Zarr and xarray users: ``features`` is not stored, and how to
    get it."""
    return {"features": FEATURES_NOTE}


def ensure_upsampler(store: Any, expected: tuple[UpsamplerRecord, bytes]) -> None:
    """On a resume: the stored upsampler, checked, is this run's (written now if the creating run stopped before)."""
    record, state = expected
    if store.attrs.get("upsampler_sha256") != record.sha256:
        raise ConfigError(f"store {store.url}: expected this run's upsampler (sha256 {record.sha256}) to resume it, got a store "
                          f"made with upsampler {store.attrs.get('upsampler_sha256')}; rerun with the store's settings or "
                          "pass --overwrite to start over")
    if read_upsampler(store) is None:  # refuses an altered one; absent: the first run died before writing it
        write_upsampler(store, record, state)


def _fold_projection(stack: nn.Module, projection: Any) -> nn.Module:
    """The K-channel JBU that maps ``P (I + 0.1 W) x`` to what ``stack`` gives with ``projection=P, projection_bias=p``:
    the same stages, a zero fix-up and the bias ``P (0.1 b) + p`` (stored divided by the 0.1 the stack applies)."""
    from featup.upsamplers.jbu import JBUStack

    first = stack.stages[0]
    folded = JBUStack(projection.channels, stack.num_stages, key_dim=first.range_proj[0].out_channels, radius=first.radius,
                      guidance_dim=stack.guidance_dim, backend=stack.backend)
    state = {k: v.detach().float() for k, v in stack.state_dict().items() if not k.startswith("fixup_proj.")}
    weight, bias = torch.from_numpy(projection.weight), torch.from_numpy(projection.bias)
    total = weight @ (0.1 * stack.fixup_proj[1].bias.detach().float()) + bias  # (K,)
    state["fixup_proj.1.weight"] = torch.zeros(projection.channels, projection.channels, 1, 1)
    state["fixup_proj.1.bias"] = total / 0.1
    folded.load_state_dict(state, strict=True)
    return folded.eval()


def _linear_module(kind: str, channels: int) -> nn.Module:
    from featup.upsamplers import build_upsampler

    return build_upsampler(kind, channels)
