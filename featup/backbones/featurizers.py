"""The published FeatUp featurizers' own layouts of the frozen backbone in a training checkpoint (``model.0.*``).

A FeatUp training checkpoint stores its featurizer module's state dict under ``model.0.``; each featurizer keeps
its network in ``self.model``, so the keys read ``model.0.model.<network's own keys>``:

==================  ==============================  ==============================================  ==================
featurizer          backbones here                  network under ``model.0.model.``                not the backbone
==================  ==============================  ==============================================  ==================
DINOFeaturizer      dino16, dino8, vit              DINO's VisionTransformer (timm's key names)     -
DINOv2Featurizer    dinov2                          the DINOv2 hub ViT (timm's key names)           ``mask_token``
CLIPFeaturizer      clip, clip-tokens               the whole OpenAI CLIP model (``visual.*``)      the text tower
MaskCLIPFeaturizer  maskclip                        the whole OpenAI CLIP model (``visual.*``)      the text tower
ResNetFeaturizer    resnet50                        torchvision's ResNet-50 (timm's key names)      ``fc.*``
==================  ==============================  ==============================================  ==================

``backbone_state`` takes the checkpoint's ``model.0.*`` part (prefix already removed), checks every key is
the network's, drops the parts that are not the image backbone and returns the network's state dict, which
timm's own converter (OpenAI CLIP, DINOv2) and a strict load then map onto the timm model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from featup.errors import CheckpointError

# OpenAI CLIP's text tower, saved with the image tower by the CLIP featurizers.
CLIP_TEXT = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection", "logit_scale")


@dataclass(frozen=True)
class FeaturizerLayout:
    """Where a published featurizer keeps its network (``inner``), what of it the image backbone does not use
    (``unused`` key prefixes) and the prefix all the rest must have (``within``, "" for any)."""

    featurizer: str
    inner: str = "model."
    unused: tuple[str, ...] = ()
    within: str = ""

    def backbone_state(self, state: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
        """The network's image-backbone entries of a checkpoint's ``model.0.*`` part; foreign keys are refused."""
        outside = sorted(k for k in state if not k.startswith(self.inner))
        network = {k[len(self.inner):]: v for k, v in state.items() if k.startswith(self.inner)}
        kept = {k: v for k, v in network.items() if not k.startswith(self.unused)}
        stray = outside + sorted(f"{self.inner}{k}" for k in kept if not k.startswith(self.within))
        if stray or not kept:
            raise CheckpointError(
                f"{source}: expected the backbone of a published {self.featurizer} under "
                f"model.0.{self.inner}{self.within}*, got {len(kept)} such entries and unexpected keys "
                f"{['model.0.' + k for k in stray[:5]]}"
            )
        return kept


DINO = FeaturizerLayout("DINOFeaturizer")
DINOV2 = FeaturizerLayout("DINOv2Featurizer", unused=("mask_token",))
CLIP = FeaturizerLayout("CLIPFeaturizer", unused=CLIP_TEXT, within="visual.")
MASKCLIP = FeaturizerLayout("MaskCLIPFeaturizer", unused=CLIP_TEXT, within="visual.")
RESNET = FeaturizerLayout("ResNetFeaturizer", unused=("fc.",))

# backbone name -> the published featurizer whose checkpoint layout its weights can be read from
FEATURIZER_LAYOUTS: dict[str, FeaturizerLayout] = {
    "dino16": DINO,
    "dino8": DINO,
    "vit": DINO,
    "dinov2": DINOV2,
    "clip": CLIP,
    "clip-tokens": CLIP,
    "maskclip": MASKCLIP,
    "resnet50": RESNET,
}
