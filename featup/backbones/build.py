"""``build_backbone``: one entry point for registered names, ``timm:<model>`` and ``<package.module>:<callable>``."""

from __future__ import annotations

import os
from functools import partial
from typing import Callable

import torch

from featup.backbones.base import Backbone
from featup.backbones.cnn import CNNBackbone
from featup.backbones.custom import module_backbone
from featup.backbones.registry import BACKBONES
from featup.backbones.timm_models import create_timm_model
from featup.backbones.vit import ViTBackbone, is_token_model
from featup.errors import ConfigError

TIMM_PREFIX = "timm:"


def build_backbone(
    name: str,
    weights: str = "auto",
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Backbone:
    """Build backbone ``name`` with ``weights`` ("auto", "random", or a file path / fsspec URL), frozen, in eval mode.

    Only ``weights="auto"`` touches the network (timm / the Hugging Face hub).
    """
    if not isinstance(weights, (str, os.PathLike)) or not os.fspath(weights):
        raise ConfigError(
            f"weights of backbone {name!r}: expected 'auto', 'random' or a file path/URL, got {weights!r}"
        )
    backbone = _factory(name)(os.fspath(weights))
    backbone.to(device=device, dtype=dtype)
    backbone.eval().requires_grad_(False)
    return backbone


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
