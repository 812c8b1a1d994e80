"""``build_backbone``: one entry point for registered names, ``timm:<model>`` and ``<package.module>:<callable>``.

Weights: ``auto`` (pretrained), ``random``, a file path / fsspec URL, or ``checkpoint``: the frozen backbone a
published FeatUp training checkpoint carries under ``model.0.*`` (see ``featurizers.py``), so one download
gives the whole model. ``auto`` takes that backbone too when the ``checkpoint`` given has one.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Callable

import torch

from featup.backbones.base import Backbone
from featup.backbones.cnn import CNNBackbone
from featup.backbones.custom import module_backbone
from featup.backbones.featurizers import FEATURIZER_LAYOUTS
from featup.backbones.registry import BACKBONES
from featup.backbones.timm_models import AUTO, create_timm_model
from featup.backbones.vit import ViTBackbone, is_token_model
from featup.backbones.weights import StateDictWeights
from featup.checkpoint import FeatUpUpsampler, load_featup_checkpoint
from featup.errors import CheckpointError, ConfigError

TIMM_PREFIX = "timm:"
CHECKPOINT = "checkpoint"


def build_backbone(
    name: str,
    weights: str = "auto",
    *,
    checkpoint: str | FeatUpUpsampler | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Backbone:
    """Build backbone ``name`` with ``weights``, frozen, in eval mode.

    ``weights``: "auto", "random", "checkpoint" or a file path/URL. ``checkpoint`` (a path, URL, ``featup:``
    name or a loaded checkpoint) supplies the backbone for "checkpoint", and for "auto" when it has one
    (weights_id ``checkpoint:<sha256>``). Only "auto" without such a checkpoint touches the network (timm / the
    Hugging Face hub), and a ``featup:`` name not yet cached.
    """
    if not isinstance(weights, (str, os.PathLike)) or not os.fspath(weights):
        raise ConfigError(
            f"weights of backbone {name!r}: expected 'auto', 'random', 'checkpoint' or a file path/URL, got {weights!r}"
        )
    weights = os.fspath(weights)
    factory = _factory(name)
    backbone = factory(_checkpoint_weights(name, weights, checkpoint) or weights)
    backbone.to(device=device, dtype=dtype)
    backbone.eval().requires_grad_(False)
    return backbone


def _checkpoint_weights(
    name: str, weights: str, checkpoint: str | FeatUpUpsampler | None
) -> StateDictWeights | None:
    """The checkpoint's backbone for weights "checkpoint" (required) or "auto" (when present); None otherwise."""
    if weights not in (CHECKPOINT, AUTO):
        return None
    if checkpoint is None:
        if weights == CHECKPOINT:
            raise ConfigError(f"weights 'checkpoint' of backbone {name!r}: expected a checkpoint to take them from, got none")
        return None
    layout = FEATURIZER_LAYOUTS.get(name)
    if layout is None:
        if weights == AUTO:
            return None
        raise ConfigError(
            f"weights 'checkpoint' of backbone {name!r}: expected a backbone of a published FeatUp featurizer "
            f"({', '.join(FEATURIZER_LAYOUTS)}), got {name!r}"
        )
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = load_featup_checkpoint(os.fspath(checkpoint))
    if not checkpoint.backbone_state:
        if weights == AUTO:
            return None
        raise CheckpointError(
            f"checkpoint {checkpoint.source}: expected backbone weights (model.0.*) for --weights checkpoint, "
            f"got none; use --weights auto or --weights PATH"
        )
    source = str(checkpoint.source)
    state = layout.backbone_state(checkpoint.backbone_state, f"checkpoint {source}")
    return StateDictWeights(state, source=source, weights_id=f"checkpoint:{checkpoint.sha256}")


def timm_backbone(spec: str, weights: str) -> Backbone:
    """Any timm model: ViT-like ones give their patch-token grid, others their last feature map."""
    model_name = spec[len(TIMM_PREFIX):]
    try:
        model, weights_id = create_timm_model(model_name, weights, spec=spec, dynamic_img_size=True)
    except TypeError as err:  # the model has no dynamic_img_size (CNNs): build it without
        if "dynamic_img_size" not in str(err):
            raise
        model, weights_id = create_timm_model(model_name, weights, spec=spec)
    backbone_cls = ViTBackbone if is_token_model(model) else CNNBackbone
    return backbone_cls(spec, model, weights_id)


def _factory(name: str) -> Callable[[str], Backbone]:
    """The factory ``weights -> Backbone`` for a registered name, a ``timm:`` spec or a user callable spec."""
    if not isinstance(name, str):
        raise ConfigError(f"backbone name: expected a string, got {type(name).__name__}")
    if name.startswith(TIMM_PREFIX):
        return partial(timm_backbone, name)
    if ":" in name:
        return partial(module_backbone, name)
    if name not in BACKBONES:
        raise ConfigError(
            f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES.names())}, "
            f"'timm:<timm model name>' or '<package.module>:<callable>'"
        )
    return BACKBONES.get(name)
