"""The published FeatUp JBU checkpoints by name (``featup:<model>``, ``featup:<model>:no_norm``), downloaded once and cached.

This is the one module of ``featup/`` that goes to the network, as timm keeps its hub code in one place:
names resolve to the published URLs (the table of the FeatUp README), files are downloaded with a progress
bar to ``$TORCH_HOME/hub/checkpoints/featup/<norm|no_norm>/<model>_jbu_stack_cocostuff.ckpt`` (written
under a temporary name, checked, then renamed) and used from there without any request afterwards.
Offline is detected within a few seconds (``PROBE_TIMEOUT_S``). ``load`` builds the whole model as
``torch.hub.load("mhamilton723/FeatUp", <model>, use_norm=...)`` does.

``load_upsampler(kind, checkpoint)`` loads any upsampler with trained weights: ``jbu`` from these checkpoints,
FeatUp's successors (``anyup``, ``jafar``, ``loftup``, ``naf``) from theirs (``featup.upsampler_hub``);
``for_backbone`` readies one for a backbone (checked against the backbone it was trained for, guidance image
converted to the normalisation it expects).

The published README names the models and their JBUs' training backbones:

=========  ==========  =========  ======================================================
model      norm        no_norm    backbone here (implied by the name)
=========  ==========  =========  ======================================================
dino16     yes         yes        ``dino16`` (DINO ViT-S/16, 384 channels)
dinov2     yes         yes        ``dinov2`` (DINOv2 ViT-S/14, 384 channels)
clip       yes         yes        ``clip`` (CLIP ViT-B/16 projected tokens, 512 channels)
maskclip   no          yes        ``maskclip`` (MaskCLIP value features, 512 channels)
vit        yes         yes        ``vit`` (supervised ViT-S/16, 384 channels)
resnet50   yes         yes        ``resnet50`` (ResNet-50 layer4, 2048 channels)
=========  ==========  =========  ======================================================
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from featup import upsampler_hub
from featup.errors import CheckpointError, ConfigError
from featup.published import (  # noqa: F401  (the names API, re-exported: featup.hub.parse, fetch, ...)
    DEFAULT_HUB_URL,
    FILE_NAME,
    HUB_URL_ENV,
    HubCheckpoint,
    NO_NORM,
    PUBLISHED,
    PREFIX,
    PROBE_TIMEOUT_S,
    PublishedModel,
    READ_TIMEOUT_S,
    cache_dir,
    check_checkpoint_file,
    download,
    fetch,
    implied_backbone,
    is_hub_name,
    names,
    parse,
    resolve_backbone,
    resolve_checkpoint,
    unreachable,
)


class UpsampledBackbone(nn.Module):
    """A backbone, its optional channel norm (``model``) and a JBU (``upsampler``), as the published hub model."""

    def __init__(self, model: nn.Module, upsampler: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.upsampler = upsampler

    @property
    def backbone(self) -> nn.Module:
        return self.model[0]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised image -> (B, dim, 16h, 16w): the (h, w) grid's features upsampled 2^stages times,
        as the published model (the image size for stride-16 backbones, half of it for ResNet-50's stride 32)."""
        feats = self.model(image)  # (B, dim, h, w)
        scale = self.upsampler.scale
        return self.upsampler(feats, image, (feats.shape[2] * scale, feats.shape[3] * scale))


def load(
    name: str,
    use_norm: bool = True,
    pretrained: bool = True,
    device: torch.device | str | None = None,
    *,
    progress: bool = True,
    backend: str = "auto",
) -> UpsampledBackbone:
    """``torch.hub.load("mhamilton723/FeatUp", name, use_norm=...)``: backbone, channel norm and JBU in eval mode.

    ``name`` is a published model (``dino16``, ...; a ``featup:`` name is accepted too). With ``pretrained`` the
    whole model comes from the one checkpoint (its ``model.0.*`` backbone, ``model.1.*`` norm and JBU); without
    it every weight is random and nothing is downloaded. ``backend``: the JBU kernel ("auto", "eager", "compiled").
    """
    # Imported here: featup.checkpoint and featup.backbones import this module.
    from featup.backbones import build_backbone
    from featup.checkpoint import load_featup_checkpoint
    from featup.layers import ChannelNorm
    from featup.upsamplers.jbu import JBUStack

    ckpt = parse(name) if is_hub_name(name) else HubCheckpoint(name, use_norm)
    if pretrained:
        trained = load_featup_checkpoint(ckpt.name, device=device, backend=backend, progress=progress)
        backbone = build_backbone(ckpt.backbone, "checkpoint", checkpoint=trained, device=device)
        norm, upsampler = trained.norm, trained.upsampler
    else:
        backbone = build_backbone(ckpt.backbone, "random", device=device)
        norm = ChannelNorm(backbone.dim, device=device) if ckpt.use_norm else None
        upsampler = JBUStack(backbone.dim, backend=backend, device=device)
    if ckpt.use_norm and norm is None:
        raise CheckpointError(f"checkpoint {ckpt.name}: expected its LayerNorm (model.1.norm.*), got none")
    model = nn.Sequential(backbone, norm) if norm is not None else nn.Sequential(backbone)
    return UpsampledBackbone(model, upsampler).to(device).eval()


DEFAULT_JBU = "featup:dinov2"  # load_upsampler("jbu"): the DINOv2 ViT-S/14 JBU, as the successors' defaults


def load_upsampler(
    kind: str,
    checkpoint: str | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    backend: str = "auto",
    **storage_options: Any,
) -> nn.Module:
    """Upsampler ``kind`` with trained weights, in eval mode.

    ``checkpoint``: a published name (``featup:<model>[:no_norm]`` for ``jbu``; ``anyup``, ``anyup:multi_backbone``,
    ``jafar:<backbone>``, ``loftup:<backbone>``, ``uplift:<backbone>``, ``naf``, see ``featup.upsampler_hub.names()``), a path or an fsspec
    URL; None: the kind's default published weights (``featup:dinov2`` for jbu; ``bilinear`` has none). Published
    names are downloaded once and cached. The module's ``source`` and ``sha256`` say where its weights came from;
    ``forward(lr_feats, image, output_size=None)`` takes the image normalised as its ``image_norm`` says
    (``for_backbone`` converts a backbone's images). ``backend``: the JBU kernel.
    """
    if kind == "bilinear":
        if checkpoint is not None:
            raise ConfigError(f"--checkpoint {checkpoint}: expected none with --upsampler bilinear (it has no weights)")
        from featup.upsamplers.bilinear import BilinearUpsampler

        return BilinearUpsampler().to(device).eval()
    if kind == "jbu":
        from featup.checkpoint import load_featup_checkpoint

        upsampler_hub.resolve(kind, checkpoint, None)  # a successor's name is refused, naming its kind
        spec = checkpoint if checkpoint is not None else DEFAULT_JBU
        return load_featup_checkpoint(spec, device=device, dtype=dtype, backend=backend, progress=progress, **storage_options)
    if kind not in upsampler_hub.KINDS:
        known = ", ".join(["jbu", "bilinear", *upsampler_hub.KINDS])
        raise ConfigError(f"upsampler kind: expected one of {known}, got {kind!r}")
    return upsampler_hub.load(kind, checkpoint, device=device, dtype=dtype, progress=progress, **storage_options)


class GuidedUpsampler(nn.Module):
    """A successor upsampler fed a backbone's features and images: the image is converted from the backbone's
    normalisation to the upsampler's ``image_norm`` (in float32), inputs are cast to the upsampler's dtype and the
    output to the features' dtype, and a kind whose published forward mixes the images of a batch (LoftUp's colour
    scaling) runs one image at a time, so every output depends on its own image only."""

    def __init__(self, upsampler: nn.Module, backbone_norm: Any, *, per_image: bool = False) -> None:
        super().__init__()
        self.upsampler = upsampler
        self.backbone_norm = backbone_norm
        self.per_image = per_image
        self.sha256 = getattr(upsampler, "sha256", None)
        self.source = getattr(upsampler, "source", None)

    @property
    def image_norm(self) -> Any:
        return self.upsampler.image_norm

    def forward(self, lr_feats: torch.Tensor, image: torch.Tensor, output_size: Sequence[int] | int | None = None) -> torch.Tensor:
        """(B, C, h, w) features and (B, 3, H, W) image normalised for the backbone -> (B, C, H', W')."""
        param = next(self.upsampler.parameters(), None)
        dtype = param.dtype if param is not None else lr_feats.dtype
        guide = self.image_norm.convert(image.float(), self.backbone_norm).to(dtype)  # (B, 3, H, W)
        feats = lr_feats.to(dtype)
        if self.per_image and feats.shape[0] > 1:
            parts = [self.upsampler(feats[i : i + 1], guide[i : i + 1], output_size) for i in range(feats.shape[0])]
            return torch.cat(parts).to(lr_feats.dtype)
        return self.upsampler(feats, guide, output_size).to(lr_feats.dtype)


def successor_kind(upsampler: nn.Module) -> upsampler_hub.Kind | None:
    """The successor kind an upsampler module belongs to (None for jbu, bilinear and others)."""
    return upsampler_hub.module_kind(upsampler)


def for_backbone(upsampler: nn.Module, backbone: nn.Module) -> nn.Module:
    """``upsampler`` ready for ``backbone`` (a featup Backbone: ``name``, ``dim``, ``stride``, ``mean``, ``std``).

    A successor is checked against the backbone it was trained for (a per-backbone checkpoint fixes the channels
    and the patch size; a mismatch is a ConfigError naming both) and wrapped in a GuidedUpsampler. Others (jbu,
    bilinear) are returned as they are: FeatUp's JBU guides with the backbone's own image.
    """
    from featup.upsamplers.base import ImageNorm

    kind = successor_kind(upsampler)
    if kind is None:
        return upsampler
    check_backbone(upsampler, kind, backbone)
    if kind.patch_attr is not None and getattr(upsampler, "trained_for", None) is None:  # weights from a path or URL
        setattr(upsampler, kind.patch_attr, backbone.stride)
    norm = ImageNorm(tuple(backbone.mean), tuple(backbone.std))
    return GuidedUpsampler(upsampler, norm, per_image=kind.per_image)


def check_backbone(upsampler: nn.Module, kind: upsampler_hub.Kind, backbone: nn.Module) -> None:
    """ConfigError when a per-backbone checkpoint does not fit ``backbone``'s channels or stride (both named)."""
    source = getattr(upsampler, "source", None) or f"the {kind.name} model"
    got = f"backbone {backbone.name} with {backbone.dim} channels and stride {backbone.stride}"
    trained = getattr(upsampler, "trained_for", None)
    if trained is not None and trained.dim is not None and (trained.dim, trained.patch) != (backbone.dim, backbone.stride):
        on = f", {trained.backbone}" if trained.backbone else ""
        raise ConfigError(
            f"checkpoint {source}: expected a backbone with {trained.dim} channels and stride {trained.patch} "
            f"(the one it was trained for{on}), got {got}"
        )
    dim = getattr(upsampler, kind.feature_dim) if kind.feature_dim is not None else None
    if dim is not None and dim != backbone.dim:
        raise ConfigError(f"checkpoint {source}: expected a backbone with {dim} channels (its {kind.name} model's), got {got}")
