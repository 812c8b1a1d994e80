"""Device names as users write them (``auto``, ``cpu``, ``cuda``, ``cuda:N``) resolved to checked torch devices."""

from __future__ import annotations

from typing import TYPE_CHECKING

from featup.errors import ConfigError

if TYPE_CHECKING:
    import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cpu``/``cuda``/``cuda:N`` as given, checked to exist."""
    import torch  # imported here so that ``featup --help`` does not pay for it

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: expected auto, cpu or cuda[:N], got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: expected an available device, got {name!r} but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device: expected auto, cpu or cuda[:N], got {name!r}")
    return device
