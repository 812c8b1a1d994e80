"""ViT backbones: FeatUp "token" features of timm vision transformers.

The features are the last block's output after the final norm, with the prefix tokens (class, registers)
dropped and the patch tokens laid out as a (B, C, H / patch, W / patch) grid. Models are created with
``dynamic_img_size=True`` so position embeddings are interpolated to any multiple of the patch size.
"""

from __future__ import annotations

from torch import Tensor, nn

from featup.backbones.base import Backbone
from featup.backbones.registry import BACKBONES
from featup.backbones.timm_models import AUTO, RANDOM, create_timm_model, timm_norm, timm_stride
from featup.errors import ConfigError


class ViTBackbone(Backbone):
    """Patch-token grid of a timm ViT (anything with ``patch_embed`` and ``num_prefix_tokens``)."""

    def __init__(self, name: str, model: nn.Module, weights_id: str) -> None:
        mean, std = timm_norm(model)
        super().__init__(name, timm_stride(model), model.num_features, mean, std, weights_id)
        self.model = model
        self.num_prefix_tokens = int(model.num_prefix_tokens)

    def forward_features(self, images: Tensor) -> Tensor:
        b, _, h, w = images.shape
        gh, gw = h // self.stride, w // self.stride
        tokens = self.model.forward_features(images)  # (B, P + gh * gw, C), after the final norm
        patches = tokens[:, self.num_prefix_tokens:]  # (B, gh * gw, C)
        if patches.ndim != 3 or patches.shape[1] != gh * gw:
            raise ConfigError(
                f"tokens of backbone {self.name!r}: expected {self.num_prefix_tokens} + {gh}x{gw} tokens, "
                f"got shape {tuple(tokens.shape)}"
            )
        return patches.reshape(b, gh, gw, -1).permute(0, 3, 1, 2).contiguous()  # (B, C, gh, gw)


def is_token_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ViT-like timm model whose ``forward_features`` returns prefix + patch tokens."""
    return hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens")


def vit_backbone(name: str, model_name: str, weights: str) -> ViTBackbone:
    """A ViTBackbone named ``name`` around timm ViT ``model_name`` with ``weights``."""
    # A file overwrites every parameter (strict load), so timm's slow ViT initialisation is skipped.
    init = {} if weights in (AUTO, RANDOM) else {"weight_init": "skip"}
    model, weights_id = create_timm_model(model_name, weights, spec=name, dynamic_img_size=True, **init)
    return ViTBackbone(name, model, weights_id)


@BACKBONES.register("dino16")
def dino16(weights: str = "auto") -> ViTBackbone:
    """DINO ViT-S/16 (Caron et al. 2021): stride 16, 384 channels."""
    return vit_backbone("dino16", "vit_small_patch16_224.dino", weights)


@BACKBONES.register("dino8")
def dino8(weights: str = "auto") -> ViTBackbone:
    """DINO ViT-S/8: stride 8, 384 channels."""
    return vit_backbone("dino8", "vit_small_patch8_224.dino", weights)


@BACKBONES.register("dinov2")
def dinov2(weights: str = "auto") -> ViTBackbone:
    """DINOv2 ViT-S/14 (Oquab et al. 2023): stride 14, 384 channels."""
    return vit_backbone("dinov2", "vit_small_patch14_dinov2.lvd142m", weights)


@BACKBONES.register("clip")
def clip(weights: str = "auto") -> ViTBackbone:
    """OpenAI CLIP ViT-B/16 image tower (Radford et al. 2021): stride 16, 768 channels (before the projection)."""
    return vit_backbone("clip", "vit_base_patch16_clip_224.openai", weights)


@BACKBONES.register("vit")
def vit(weights: str = "auto") -> ViTBackbone:
    """Supervised ViT-S/16 (AugReg, ImageNet-21k then 1k): stride 16, 384 channels."""
    return vit_backbone("vit", "vit_small_patch16_224.augreg_in21k_ft_in1k", weights)
