"""timm models for backbones: pretrained through the hub, random, or loaded from a weight file of any known layout.

File layouts are mapped onto the timm model by timm's own ``checkpoint_filter_fn`` of the model's module
(it converts original DINO/DINOv2 and OpenAI CLIP checkpoints), after the wrapper prefixes are stripped.
Backbones never keep a classifier (``num_classes=0``), so classifier weights in a file are dropped.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

import timm
from torch import Tensor, nn

from featup.backbones.base import IMAGENET_MEAN, IMAGENET_STD
from featup.backbones.weights import load_strict, load_weights_file, strip_key_prefixes
from featup.errors import CheckpointError, ConfigError, WeightsUnavailableError

AUTO = "auto"
RANDOM = "random"


def create_timm_model(model_name: str, weights: str, *, spec: str, **kwargs) -> tuple[nn.Module, str]:
    """A classifier-free timm model with weights per ``weights`` ("auto", "random" or a file) and its weights_id.

    A ``TypeError`` from an unsupported keyword (``dynamic_img_size``) propagates, so callers can retry without it.
    """
    if not timm.is_model(model_name):
        raise ConfigError(
            f"timm model of backbone {spec!r}: expected a name from timm.list_models(), got {model_name!r}"
        )
    if weights == AUTO:
        return _create_pretrained(model_name, spec, **kwargs), f"pretrained:{model_name}"
    try:
        model = timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as err:  # e.g. an unknown pretrained tag
        raise ConfigError(f"timm model {model_name!r} of backbone {spec!r}: {err}") from err
    if weights == RANDOM:
        return model, RANDOM
    state_dict, weights_id = load_weights_file(weights)
    load_timm_state_dict(model, state_dict, source=weights, target=f"backbone {spec!r} (timm model {model_name!r})")
    return model, weights_id


def _create_pretrained(model_name: str, spec: str, **kwargs) -> nn.Module:
    """``timm.create_model(pretrained=True)``; any failure to fetch the weights becomes WeightsUnavailableError."""
    try:
        return timm.create_model(model_name, pretrained=True, num_classes=0, **kwargs)
    except TypeError:
        raise
    except Exception as err:  # hub, HTTP, offline-mode and missing-file errors have no common base class
        raise WeightsUnavailableError(
            f"pretrained weights of backbone {spec!r} (timm model {model_name!r}) are unavailable: "
            f"{type(err).__name__}: {err}. Fetch them where there is network (they go to the Hugging Face cache), "
            f"or pass a local state dict file with --weights PATH (weights=PATH; .pth/.pt/.bin/.safetensors "
            f"or an fsspec URL)"
        ) from err


def load_timm_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], source: str, target: str) -> None:
    """Map a state dict of any supported layout onto ``model`` and load it strictly."""
    state_dict = strip_key_prefixes(state_dict, model.state_dict().keys())
    if "class_embedding" in state_dict:  # OpenAI CLIP visual weights saved without their "visual." prefix
        state_dict = {f"visual.{k}": v for k, v in state_dict.items()}
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state_dict = filter_fn(dict(state_dict), model)
        except Exception as err:  # timm's converters assume their layout and fail in arbitrary ways otherwise
            raise CheckpointError(f"weights file {source!r}: timm cannot convert it for {target} ({err})") from err
    load_strict(model, _drop_classifier(state_dict, model), source, target)


def _drop_classifier(state_dict: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Remove classifier weights (timm's ``classifier`` entries, e.g. ``head``/``fc``) that ``model`` lacks."""
    heads = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    own = set(model.state_dict())
    return {
        k: v for k, v in state_dict.items() if k in own or not any(k.startswith(f"{h}.") for h in heads)
    }


def timm_stride(model: nn.Module) -> int:
    """Total stride of the model's last feature map, from timm's ``feature_info`` (or the patch size)."""
    info = getattr(model, "feature_info", None)
    if info:
        last = info[-1] if isinstance(info, list) else info.info[-1]
        return int(last["reduction"])
    return int(model.patch_embed.patch_size[0])


def timm_norm(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) the model's pretrained weights expect, ImageNet's when timm does not say."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
