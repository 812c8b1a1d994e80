"""timm models for backbones: pretrained through the hub, random, or loaded from a weight file of any known layout.

File layouts are mapped onto the timm model by timm's own ``checkpoint_filter_fn`` of the model's module
(it converts original DINO/DINOv2 and OpenAI CLIP checkpoints), after the wrapper prefixes are stripped.
Backbones keep no classifier (``num_classes=0``; CLIP's projection head is kept where asked), so classifier
weights in a file are dropped.

Pretrained weights come through the Hugging Face hub. Unless the hub is in offline mode (``HF_HUB_OFFLINE``),
its endpoint is probed first with a short timeout: when it does not answer, the weights are taken from the
hub cache or refused at once, instead of after the hub client's retries (about a minute).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

import huggingface_hub
import timm
import torch
from torch import Tensor, nn

from featup import published as hub
from featup.backbones.base import IMAGENET_MEAN, IMAGENET_STD
from featup.backbones.weights import StateDictWeights, load_strict, load_weights_file, strip_key_prefixes
from featup.errors import CheckpointError, ConfigError, WeightsUnavailableError

AUTO = "auto"
RANDOM = "random"


def create_timm_model(
    model_name: str, weights: str | StateDictWeights, *, spec: str, keep_head: bool = False, **kwargs
) -> tuple[nn.Module, str]:
    """A timm model with weights per ``weights`` ("auto", "random", a file, or weights in memory) and its weights_id.

    The classifier is removed unless ``keep_head`` (then the model keeps its pretrained config's head, e.g.
    CLIP's projection). A ``TypeError`` from an unsupported keyword (``dynamic_img_size``) propagates, so
    callers can retry without it.
    """
    if not timm.is_model(model_name):
        raise ConfigError(
            f"timm model of backbone {spec!r}: expected a name from timm.list_models(), got {model_name!r}"
        )
    if not keep_head:
        kwargs["num_classes"] = 0
    if weights == AUTO:
        return _create_pretrained(model_name, spec, **kwargs), f"pretrained:{model_name}"
    try:
        model = timm.create_model(model_name, pretrained=False, **kwargs)
    except RuntimeError as err:  # e.g. an unknown pretrained tag
        raise ConfigError(f"timm model {model_name!r} of backbone {spec!r}: {err}") from err
    if weights == RANDOM:
        return model, RANDOM
    target = f"backbone {spec!r} (timm model {model_name!r})"
    if isinstance(weights, StateDictWeights):
        load_timm_state_dict(model, weights.state_dict, source=weights.source, target=target)
        return model, weights.weights_id
    state_dict, weights_id = load_weights_file(weights)
    load_timm_state_dict(model, state_dict, source=weights, target=target)
    return model, weights_id


def _create_pretrained(model_name: str, spec: str, **kwargs) -> nn.Module:
    """``timm.create_model(pretrained=True)``; any failure to fetch the weights becomes WeightsUnavailableError."""
    kwargs |= _offline_source(model_name, spec)
    try:
        return timm.create_model(model_name, pretrained=True, **kwargs)
    except TypeError:
        raise
    except Exception as err:  # hub, HTTP, offline-mode and missing-file errors have no common base class
        raise WeightsUnavailableError(
            f"pretrained weights of backbone {spec!r} (timm model {model_name!r}) are unavailable: "
            f"{type(err).__name__}: {err}. {_WHERE_TO_GET}"
        ) from err


_WHERE_TO_GET = (
    "Fetch them where there is network (they go to the Hugging Face cache), or pass a local state dict file "
    "with --weights PATH (weights=PATH; .pth/.pt/.bin/.safetensors or an fsspec URL)"
)


def _offline_source(model_name: str, spec: str) -> dict:
    """Extra create_model arguments when the weights' host does not answer: their cached file, or a fast refusal.

    Nothing (timm fetches as usual) when the hub is in offline mode (it then reads its cache without any
    request) or when the host answers a HEAD request within ``hub.PROBE_TIMEOUT_S``.
    """
    cfg = timm.models.get_pretrained_cfg(model_name)
    repo_id = (cfg.hf_hub_id or "").partition("@")[0] if cfg is not None else ""
    url = f"{huggingface_hub.constants.ENDPOINT}/{repo_id}" if repo_id else (cfg.url if cfg is not None else "")
    if (repo_id and huggingface_hub.constants.HF_HUB_OFFLINE) or not url:
        return {}
    reason = hub.unreachable(url)
    if reason is None:
        return {}
    cached = _cached_file(repo_id, cfg)
    if cached is None:
        raise WeightsUnavailableError(
            f"pretrained weights of backbone {spec!r} (timm model {model_name!r}) are not cached and "
            f"{url} cannot be reached ({reason}). {_WHERE_TO_GET}"
        )
    return {"pretrained_cfg_overlay": {"file": cached}}


def _cached_file(repo_id: str, cfg) -> str | None:
    """The weights file timm would fetch, if a previous fetch left it in the hub (or torch hub) cache."""
    if not repo_id:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
        return str(path) if path.is_file() else None
    filenames = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else []
    for filename in filenames + ["model.safetensors", "pytorch_model.bin"]:
        found = huggingface_hub.try_to_load_from_cache(repo_id, filename)
        if isinstance(found, str):
            return found
    return None


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
