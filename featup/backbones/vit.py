"""ViT backbones: FeatUp "token" features of timm vision transformers.

The features are the last block's output after the final norm, with the prefix tokens (class, registers)
dropped and the patch tokens laid out as a (B, C, H / patch, W / patch) grid. Models are created with
``dynamic_img_size=True`` so position embeddings are resampled to any multiple of the patch size: by timm,
or, for the backbones of the published FeatUp featurizers, as those featurizers do (``pos_embed.py``).

The named backbones are FeatUp's featurizers, fed ImageNet-normalised images as FeatUp trains them
(``mean``/``std``); which published checkpoint (``featup:<model>``, see ``featup.hub``) fits which:

============  ===============================================  =======  =========================
backbone      features                                         dim      published JBU
============  ===============================================  =======  =========================
dino16        DINO ViT-S/16 tokens                             384      featup:dino16[:no_norm]
dinov2        DINOv2 ViT-S/14 tokens                           384      featup:dinov2[:no_norm]
vit           supervised ViT-S/16 tokens                       384      featup:vit[:no_norm]
clip          CLIP ViT-B/16 tokens through CLIP's projection   512      featup:clip[:no_norm]
maskclip      MaskCLIP value features, projected               512      featup:maskclip:no_norm
clip-tokens   CLIP ViT-B/16 tokens before the projection       768      none (train your own)
dino8         DINO ViT-S/8 tokens                              384      none
============  ===============================================  =======  =========================
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featup.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone
from featup.backbones.pos_embed import resample_published
from featup.backbones.registry import BACKBONES
from featup.backbones.timm_models import AUTO, RANDOM, create_timm_model, timm_norm, timm_stride
from featup.errors import ConfigError

# (pos_embed (1, P + M*M, C), (gh, gw), P) -> (1, P + gh*gw, C)
Resample = Callable[[Tensor, tuple[int, int], int], Tensor]
CLIP_TIMM = "vit_base_patch16_clip_quickgelu_224.openai"  # OpenAI's weights with OpenAI's QuickGELU
IMAGENET = (IMAGENET_MEAN, IMAGENET_STD)


class ViTBackbone(Backbone):
    """Patch-token grid of a timm ViT (anything with ``patch_embed`` and ``num_prefix_tokens``).

    ``resample``: how position embeddings follow the image size (None: timm's own ``forward_features``).
    ``project``: pass the tokens through the model's ``head`` (CLIP's projection). ``norm``: the (mean, std)
    the images must have, timm's pretrained config when None.
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        weights_id: str,
        *,
        resample: Resample | None = None,
        project: bool = False,
        norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    ) -> None:
        mean, std = norm or timm_norm(model)
        dim = model.head.out_features if project else model.num_features
        super().__init__(name, timm_stride(model), dim, mean, std, weights_id)
        self.model = model
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.resample = resample
        self.project = project
        if resample is not None and (getattr(model, "no_embed_class", True) or model.pos_embed is None):
            raise ConfigError(f"backbone {name!r}: expected a ViT whose position table covers its class token")

    def forward_features(self, images: Tensor) -> Tensor:
        b, _, h, w = images.shape
        gh, gw = h // self.stride, w // self.stride
        tokens = self.tokens(images)  # (B, P + gh * gw, C), after the final norm
        if self.project:
            tokens = self.model.head(tokens)  # (B, P + gh * gw, dim)
        patches = tokens[:, self.num_prefix_tokens:]  # (B, gh * gw, dim)
        if patches.ndim != 3 or patches.shape[1] != gh * gw:
            raise ConfigError(
                f"tokens of backbone {self.name!r}: expected {self.num_prefix_tokens} + {gh}x{gw} tokens, "
                f"got shape {tuple(tokens.shape)}"
            )
        return patches.reshape(b, gh, gw, -1).permute(0, 3, 1, 2).contiguous()  # (B, dim, gh, gw)

    def tokens(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, P + gh * gw, C): every token after the last block and the final norm."""
        if self.resample is None:
            return self.model.forward_features(images)
        return self.model.norm(self.model.blocks(self.embed(images)))

    def embed(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, P + gh * gw, C): patch embedding, prefix tokens, resampled positions, pre-norm."""
        m = self.model
        x = m.patch_embed(images)  # (B, gh, gw, C): dynamic_img_size models embed to NHWC
        b, gh, gw, c = x.shape
        prefix = [t.expand(b, -1, -1) for t in (m.cls_token, m.reg_token) if t is not None]
        x = torch.cat(prefix + [x.reshape(b, gh * gw, c)], dim=1)  # (B, P + gh * gw, C)
        x = x + self.resample(m.pos_embed, (gh, gw), self.num_prefix_tokens)
        return m.norm_pre(m.patch_drop(m.pos_drop(x)))


class MaskCLIPBackbone(ViTBackbone):
    """MaskCLIP dense features: the last block's value path (attention's value and output projections only,
    no query-key attention, no residual, no MLP), then the final norm and CLIP's projection."""

    def tokens(self, images: Tensor) -> Tensor:
        *blocks, last = self.model.blocks
        x = self.embed(images)  # (B, P + N, C)
        for block in blocks:
            x = block(x)
        qkv = last.attn.qkv
        c = x.shape[-1]
        bias = qkv.bias[2 * c:] if qkv.bias is not None else None
        values = F.linear(last.norm1(x), qkv.weight[2 * c:], bias)  # (B, P + N, C)
        return self.model.norm(last.attn.proj(values))  # (B, P + N, C)


def is_token_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ViT-like timm model whose ``forward_features`` returns prefix + patch tokens."""
    return hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens")


def vit_backbone(
    name: str, model_name: str, weights, *, cls: type[ViTBackbone] = ViTBackbone, keep_head: bool = False, **options
) -> ViTBackbone:
    """A ``cls`` named ``name`` around timm ViT ``model_name`` with ``weights``; ``options`` go to ``cls``."""
    # A file overwrites every parameter (strict load), so timm's slow ViT initialisation is skipped.
    init = {} if weights in (AUTO, RANDOM) else {"weight_init": "skip"}
    model, weights_id = create_timm_model(
        model_name, weights, spec=name, keep_head=keep_head, dynamic_img_size=True, **init
    )
    return cls(name, model, weights_id, **options)


@BACKBONES.register("dino16")
def dino16(weights="auto") -> ViTBackbone:
    """DINO ViT-S/16 (Caron et al. 2021): stride 16, 384 channels."""
    return vit_backbone("dino16", "vit_small_patch16_224.dino", weights, resample=resample_published, norm=IMAGENET)


@BACKBONES.register("dino8")
def dino8(weights="auto") -> ViTBackbone:
    """DINO ViT-S/8: stride 8, 384 channels."""
    return vit_backbone("dino8", "vit_small_patch8_224.dino", weights, resample=resample_published, norm=IMAGENET)


@BACKBONES.register("dinov2")
def dinov2(weights="auto") -> ViTBackbone:
    """DINOv2 ViT-S/14 (Oquab et al. 2023): stride 14, 384 channels."""
    return vit_backbone(
        "dinov2", "vit_small_patch14_dinov2.lvd142m", weights, resample=resample_published, norm=IMAGENET
    )


@BACKBONES.register("vit")
def vit(weights="auto") -> ViTBackbone:
    """Supervised ViT-S/16 (AugReg, ImageNet-21k then 1k): stride 16, 384 channels, ImageNet-normalised input as FeatUp's."""
    return vit_backbone(
        "vit", "vit_small_patch16_224.augreg_in21k_ft_in1k", weights, resample=resample_published, norm=IMAGENET
    )


@BACKBONES.register("clip")
def clip(weights="auto") -> ViTBackbone:
    """FeatUp's CLIP ViT-B/16 features: all tokens through the final norm and CLIP's projection; stride 16, 512 channels.

    As the published CLIP featurizer, whose JBUs (``featup:clip``) were trained on ImageNet-normalised images.
    """
    return vit_backbone("clip", CLIP_TIMM, weights, keep_head=True, project=True, norm=IMAGENET)


@BACKBONES.register("clip-tokens")
def clip_tokens(weights="auto") -> ViTBackbone:
    """OpenAI CLIP ViT-B/16 tokens before the projection: stride 16, 768 channels, CLIP's own normalisation."""
    return vit_backbone("clip-tokens", CLIP_TIMM, weights)


@BACKBONES.register("maskclip")
def maskclip(weights="auto") -> MaskCLIPBackbone:
    """MaskCLIP (Zhou et al. 2022) dense features of CLIP ViT-B/16: stride 16, 512 channels (``featup:maskclip:no_norm``)."""
    return vit_backbone(
        "maskclip", CLIP_TIMM, weights, cls=MaskCLIPBackbone, keep_head=True, resample=resample_published,
        project=True, norm=IMAGENET,
    )
