"""Safe reading of weight files (local paths or fsspec URLs) and strict loading of them into a module.

Files are read with ``torch.load(weights_only=True)`` (.pth/.pt/.bin) or safetensors, never unpickled freely.
A checkpoint may wrap its state dict (Lightning ``state_dict``, ``model``, DINO ``teacher``, ``module``) and
prefix its keys (official FeatUp ``model.0.``, DDP ``module.``, ``model.``, DINO ``backbone.``); both are undone
here, so every layout ends up keyed like the target module before the strict load.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import fsspec
import torch
from torch import Tensor, nn

from featup.errors import CheckpointError

WRAPPER_KEYS = ("state_dict", "model", "teacher", "module")
# Applied in this order; "model.0." is the backbone inside an official FeatUp checkpoint.
KEY_PREFIXES = ("model.0.", "module.", "model.", "backbone.")
_SHOWN_KEYS = 5
# Plain-data classes some published checkpoints pickle next to the weights (DINO saves its ``args``).
_SAFE_GLOBALS = [argparse.Namespace]


@dataclass(frozen=True)
class StateDictWeights:
    """Weights already in memory (a FeatUp checkpoint's backbone), the file they came from and their weights_id."""

    state_dict: Mapping[str, Tensor] = field(repr=False)
    source: str
    weights_id: str


def read_weights_bytes(path_or_url: str | os.PathLike, **storage_options) -> bytes:
    """The raw bytes of a local file or fsspec URL (``file://``, ``s3://``, ``memory://``, ...)."""
    try:
        with fsspec.open(os.fspath(path_or_url), "rb", **storage_options) as f:
            return f.read()
    except (OSError, ValueError, ImportError) as err:
        raise CheckpointError(f"weights file {os.fspath(path_or_url)!r}: cannot read it ({err})") from err


def parse_state_dict(data: bytes, source: str) -> dict[str, Tensor]:
    """Decode file bytes (safetensors by extension, else torch.load with weights_only) into a flat state dict."""
    is_safetensors = source.split("?")[0].lower().endswith(".safetensors")
    try:
        if is_safetensors:
            from safetensors.torch import load as load_safetensors

            obj = load_safetensors(data)
        else:
            with torch.serialization.safe_globals(_SAFE_GLOBALS):
                obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and safetensors all raise their own error types
        how = "safetensors" if is_safetensors else "torch.load(weights_only=True)"
        raise CheckpointError(
            f"weights file {source!r}: cannot decode it with {how} ({type(err).__name__}: {err}); "
            "save a plain state dict with torch.save(model.state_dict(), path) or safetensors"
        ) from err
    return unwrap_state_dict(obj, source)


def unwrap_state_dict(obj: object, source: str) -> dict[str, Tensor]:
    """Descend through ``state_dict``/``model``/``teacher``/``module`` wrappers to a dict of tensors."""
    while isinstance(obj, Mapping) and not all(isinstance(v, Tensor) for v in obj.values()):
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            keys = ", ".join(sorted(map(str, obj))[:10])
            raise CheckpointError(
                f"weights file {source!r}: expected a state dict of tensors or one under "
                f"{'/'.join(WRAPPER_KEYS)}, got a dict with keys [{keys}]"
            )
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"weights file {source!r}: expected a state dict, got {type(obj).__name__}")
    return {str(k): v for k, v in obj.items()}


def load_state_dict_file(path_or_url: str, **storage_options) -> dict[str, Tensor]:
    """Read a state dict safely from a .pth/.pt/.bin/.safetensors file or fsspec URL, unwrapping containers."""
    source = os.fspath(path_or_url)
    return parse_state_dict(read_weights_bytes(source, **storage_options), source)


def load_weights_file(path_or_url: str, **storage_options) -> tuple[dict[str, Tensor], str]:
    """The state dict of a weight file and its provenance id ``sha256:<hex of the file bytes>``."""
    source = os.fspath(path_or_url)
    data = read_weights_bytes(source, **storage_options)
    return parse_state_dict(data, source), "sha256:" + hashlib.sha256(data).hexdigest()


def strip_key_prefixes(state_dict: Mapping[str, Tensor], model_keys: Iterable[str]) -> dict[str, Tensor]:
    """Keep and unprefix the keys under each wrapper prefix the target module itself does not use.

    Keys outside the prefix are dropped: they belong to the rest of the wrapping model (a FeatUp
    upsampler, a DINO projection head).
    """
    model_keys = list(model_keys)
    out = dict(state_dict)
    for prefix in KEY_PREFIXES:
        inside = any(k.startswith(prefix) for k in out)
        if inside and not any(k.startswith(prefix) for k in model_keys):
            out = {k[len(prefix):]: v for k, v in out.items() if k.startswith(prefix)}
    return out


def _shown(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys) - _SHOWN_KEYS} more)" if len(keys) > _SHOWN_KEYS else ""
    return "[" + ", ".join(keys[:_SHOWN_KEYS]) + more + "]"


def load_strict(module: nn.Module, state_dict: Mapping[str, Tensor], source: str, target: str) -> None:
    """``module.load_state_dict(strict=True)``; a mismatch raises CheckpointError naming keys, file and target."""
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        expected = set(module.state_dict())
        missing = {k for k in expected - set(state_dict) if not k.endswith("num_batches_tracked")}
        unexpected = set(state_dict) - expected
        detail = f"missing keys {_shown(missing)}, unexpected keys {_shown(unexpected)}"
        if not missing and not unexpected:
            lines = [line.strip() for line in str(err).strip().splitlines()[1:]]  # shape mismatches
            detail = "; ".join(lines[:_SHOWN_KEYS]) or str(err)
        raise CheckpointError(f"weights file {source!r} does not fit {target}: {detail}") from err
