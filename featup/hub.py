"""The published FeatUp JBU checkpoints by name (``featup:<model>``, ``featup:<model>:no_norm``), downloaded once and cached.

This is the one module of ``featup/`` that goes to the network, as timm keeps its hub code in one place:
names resolve to the published URLs (the table of the FeatUp README), files are downloaded with a progress
bar to ``$TORCH_HOME/hub/checkpoints/featup/<norm|no_norm>/<model>_jbu_stack_cocostuff.ckpt`` (written
under a temporary name, checked, then renamed) and used from there without any request afterwards.
Offline is detected within a few seconds (``PROBE_TIMEOUT_S``). ``load`` builds the whole model as
``torch.hub.load("mhamilton723/FeatUp", <model>, use_norm=...)`` does.

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

import torch
from torch import nn

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
