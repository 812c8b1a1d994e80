"""Loading FeatUp JBU checkpoints (official ``<backbone>_jbu_stack_cocostuff.ckpt`` and this project's own).

An official training checkpoint's ``state_dict`` holds, by prefix:

=================  ===============================================  ===========================
prefix             what                                             at inference
=================  ===============================================  ===========================
``upsampler.``     the JBU stack (``up1``..``upN``, ``fixup_proj``)  loaded, strict
``model.1.norm.``  channel LayerNorm of the "with norm" checkpoints  loaded, strict, if present
``model.0.``       the frozen backbone                              kept as ``backbone_state``
``scale_net.``     uncertainty head used only by the training loss  skipped
``downsampler.``   learned downsampler used only in training        skipped
=================  ===============================================  ===========================

Any other key is an error: a checkpoint we do not understand is refused, not half-loaded.
Besides paths and fsspec URLs, ``load_featup_checkpoint`` takes the published names ``featup:<model>`` and
``featup:<model>:no_norm`` (see ``featup.hub``), fetched once into the torch hub cache.
"""

from __future__ import annotations

import hashlib
import io
import re
from typing import Any, Sequence

import fsspec
import torch
from torch import nn

from featup import published as hub
from featup.errors import CheckpointError, InputError
from featup.layers import ChannelNorm
from featup.upsamplers.jbu import JBUStack

UPSAMPLER_PREFIX = "upsampler."
NORM_PREFIX = "model.1."
BACKBONE_PREFIX = "model.0."
TRAINING_ONLY_PREFIXES = ("scale_net.", "downsampler.")


def read_checkpoint(path_or_url: str, **storage_options: Any) -> tuple[dict, str]:
    """Read a checkpoint file (local path or fsspec URL) without unpickling code -> (content, sha256)."""
    try:
        with fsspec.open(path_or_url, "rb", **storage_options) as f:
            data = f.read()
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path_or_url}: cannot be read ({exc})") from exc
    try:
        content = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (not a zip / torch file), EOFError
        raise CheckpointError(f"checkpoint {path_or_url}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    return content, hashlib.sha256(data).hexdigest()


def split_state_dict(state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, dict[str, torch.Tensor]]:
    """Sort a FeatUp training state dict into ``upsampler``, ``norm``, ``backbone`` and ``skipped`` parts."""
    parts: dict[str, dict[str, torch.Tensor]] = {"upsampler": {}, "norm": {}, "backbone": {}, "skipped": {}}
    unknown = []
    for key, value in state_dict.items():
        if key.startswith(UPSAMPLER_PREFIX):
            parts["upsampler"][key[len(UPSAMPLER_PREFIX) :]] = value
        elif key.startswith(NORM_PREFIX):
            parts["norm"][key[len(NORM_PREFIX) :]] = value
        elif key.startswith(BACKBONE_PREFIX):
            parts["backbone"][key[len(BACKBONE_PREFIX) :]] = value
        elif key.startswith(TRAINING_ONLY_PREFIXES):
            parts["skipped"][key] = value
        else:
            unknown.append(key)
    if unknown or not parts["upsampler"]:
        raise CheckpointError(
            f"{source}: not a FeatUp JBU checkpoint: expected 'upsampler.*' entries "
            f"(plus optional model.0.*, model.1.norm.*, scale_net.*, downsampler.*), "
            f"got {len(parts['upsampler'])} upsampler entries and unexpected keys {unknown[:5]}"
        )
    return parts


def jbu_from_state_dict(state: dict[str, torch.Tensor], source: str = "checkpoint", **kwargs: Any) -> JBUStack:
    """Build a JBU stack shaped like ``state`` (dim, stages, key dim, radius) and load it strictly."""
    try:
        dim = state["fixup_proj.1.weight"].shape[0]
        key_dim = state["up1.range_proj.0.weight"].shape[0]
        guidance_dim = state["up1.range_proj.0.weight"].shape[1]
        taps = state["up1.fixup_proj.3.weight"].shape[0]
    except KeyError as exc:
        raise CheckpointError(f"{source}: JBU stack entry {exc.args[0]!r} is missing") from None
    stages = sorted({int(m.group(1)) for k in state if (m := re.match(r"up(\d+)\.", k))})
    if stages != list(range(1, len(stages) + 1)):
        raise CheckpointError(f"{source}: JBU stages must be up1..upN, got {['up%d' % s for s in stages]}")
    radius = (int(round(taps**0.5)) - 1) // 2
    stack = JBUStack(dim, len(stages), key_dim=key_dim, radius=radius, guidance_dim=guidance_dim, **kwargs)
    _load_strict(stack, state, source)
    return stack


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: does not fit {type(module).__name__}: {exc}") from None


class FeatUpUpsampler(nn.Module):
    """A checkpoint's upsampler with its channel norm: raw backbone features + image -> upsampled features."""

    def __init__(
        self,
        upsampler: JBUStack,
        norm: ChannelNorm | None = None,
        *,
        backbone_state: dict[str, torch.Tensor] | None = None,
        hyper_parameters: dict[str, Any] | None = None,
        source: str = "checkpoint",
        sha256: str | None = None,
    ) -> None:
        super().__init__()
        self.upsampler = upsampler
        self.norm = norm
        self.backbone_state = backbone_state or {}
        self.hyper_parameters = dict(hyper_parameters or {})
        self.source = source
        self.sha256 = sha256

    @property
    def dim(self) -> int:
        return self.upsampler.dim

    def normalize(self, lr_feats: torch.Tensor) -> torch.Tensor:
        """Apply the checkpoint's channel norm (identity for checkpoints without one)."""
        if lr_feats.dim() != 4 or lr_feats.shape[1] != self.dim:
            raise InputError(
                f"lr_feats: checkpoint {self.source} expects {self.dim}-channel features (B, {self.dim}, h, w), "
                f"got shape {tuple(lr_feats.shape)}"
            )
        return lr_feats if self.norm is None else self.norm(lr_feats)

    def forward_stages(self, lr_feats: torch.Tensor, image: torch.Tensor) -> list[torch.Tensor]:
        """Every 2x stage's output (see ``JBUStack.forward_stages``)."""
        return self.upsampler.forward_stages(self.normalize(lr_feats), image)

    def forward(self, lr_feats: torch.Tensor, image: torch.Tensor, output_size: Sequence[int] | None = None, **kwargs: Any) -> torch.Tensor:
        """(B, C, h, w) raw backbone features + (B, 3, H, W) normalised image -> (B, C, H', W')."""
        return self.upsampler(self.normalize(lr_feats), image, output_size, **kwargs)


def load_featup_checkpoint(
    path_or_url: str,
    *,
    device=None,
    dtype=None,
    backend: str = "auto",
    progress: bool = True,
    **storage_options: Any,
) -> FeatUpUpsampler:
    """Load a FeatUp JBU checkpoint (path, fsspec URL or ``featup:<model>[:no_norm]``) into an eval-mode ``FeatUpUpsampler``.

    A ``featup:`` name is fetched through ``featup.hub`` (cached; ``progress`` shows the download); ``sha256``
    is that of the file's bytes whichever way it came, and ``source`` is the name as given.
    """
    local = hub.resolve_checkpoint(path_or_url, progress=progress)
    content, sha256 = read_checkpoint(local, **storage_options)
    if not isinstance(content, dict) or not isinstance(content.get("state_dict"), dict):
        raise CheckpointError(
            f"checkpoint {path_or_url}: not a FeatUp checkpoint: expected a dict with a 'state_dict' dict, "
            f"got {type(content).__name__} with keys {list(content)[:5] if isinstance(content, dict) else '-'}"
        )
    source = f"checkpoint {path_or_url}"
    parts = split_state_dict(content["state_dict"], source)
    upsampler = jbu_from_state_dict(parts["upsampler"], source, backend=backend)
    norm = None
    if parts["norm"]:
        norm = ChannelNorm(upsampler.dim)
        _load_strict(norm, parts["norm"], source)
    model = FeatUpUpsampler(
        upsampler,
        norm,
        backbone_state=parts["backbone"],
        hyper_parameters=content.get("hyper_parameters"),
        source=path_or_url,
        sha256=sha256,
    )
    return model.to(device=device, dtype=dtype).eval()
