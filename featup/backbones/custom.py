"""User backbones named ``<package.module>:<callable>``, a callable returning an nn.Module with ``stride`` and ``dim``.

``mean``/``std`` attributes are optional (default ImageNet). ``weights="auto"`` keeps the weights the callable
gave the module, ``"random"`` re-initialises every submodule that has ``reset_parameters``, and a file is
loaded strictly after the usual wrapper prefixes are stripped.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Callable

from torch import Tensor, nn

from featup.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone
from featup.backbones.timm_models import AUTO, RANDOM
from featup.backbones.weights import load_strict, load_weights_file, strip_key_prefixes
from featup.errors import ConfigError


class ModuleBackbone(Backbone):
    """A user's module as a backbone; its ``stride``, ``dim`` and optional ``mean``/``std`` are validated."""

    def __init__(self, name: str, module: nn.Module, weights_id: str) -> None:
        stride, dim = _positive_int(module, "stride", name), _positive_int(module, "dim", name)
        mean = _triple(module, "mean", IMAGENET_MEAN, name)
        std = _triple(module, "std", IMAGENET_STD, name)
        super().__init__(name, stride, dim, mean, std, weights_id)
        self.model = module

    def forward_features(self, images: Tensor) -> Tensor:
        return self.model(images)  # (B, dim, H / stride, W / stride)


def module_backbone(spec: str, weights: str) -> ModuleBackbone:
    """Import ``package.module``, call ``callable()`` and wrap the module it returns with ``weights``."""
    module = _load_callable(spec)()
    if not isinstance(module, nn.Module):
        got = type(module).__name__
        raise ConfigError(f"backbone {spec!r}: expected the callable to return an nn.Module, got {got}")
    weights_id = f"callable:{spec}"
    if weights == RANDOM:
        _reset_parameters(module)
        weights_id = RANDOM
    elif weights != AUTO:
        state_dict, weights_id = load_weights_file(weights)
        state_dict = strip_key_prefixes(state_dict, module.state_dict().keys())
        load_strict(module, state_dict, source=weights, target=f"backbone {spec!r}")
    return ModuleBackbone(spec, module, weights_id)


def _load_callable(spec: str) -> Callable[[], object]:
    """The callable named by ``package.module:attr.path``, or a ConfigError saying what is wrong."""
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise ConfigError(f"backbone {spec!r}: expected '<package.module>:<callable>', got {spec!r}")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"backbone {spec!r}: cannot import module {module_name!r} ({err})") from err
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise ConfigError(f"backbone {spec!r}: expected {module_name!r} to define {attr_path!r}, got no {attr!r}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise ConfigError(f"backbone {spec!r}: expected {attr_path!r} to be callable, got {type(obj).__name__}")
    return obj


def _positive_int(module: nn.Module, attr: str, spec: str) -> int:
    """``module.<attr>`` as a positive int, or a ConfigError naming the spec."""
    if not hasattr(module, attr):
        raise ConfigError(f"backbone {spec!r}: expected the module to have a {attr!r} attribute, got none")
    value = getattr(module, attr)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{attr} of backbone {spec!r}: expected a positive int, got {value!r}")
    return value


def _triple(module: nn.Module, attr: str, default: tuple[float, ...], spec: str) -> tuple[float, ...]:
    """``module.<attr>`` as three floats (``default`` when absent), or a ConfigError naming the spec."""
    value = getattr(module, attr, default)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
        raise ConfigError(f"{attr} of backbone {spec!r}: expected 3 floats (one per RGB channel), got {value!r}")
    try:
        return tuple(float(v) for v in value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{attr} of backbone {spec!r}: expected 3 floats, got {value!r}") from err


def _reset_parameters(module: nn.Module) -> None:
    """Re-initialise every submodule that knows how (``reset_parameters``), with torch's default init."""
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()
