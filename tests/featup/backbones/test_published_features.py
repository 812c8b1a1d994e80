"""Parity of the named backbones with the published FeatUp featurizers, on random weights in the featurizers' layouts.

Each reference below re-implements a published featurizer's forward pass from its code (github.com/mhamilton723/
FeatUp, featup/featurizers/*.py) on the state dict the featurizer would hold; the backbone under test is built
from that same state dict as it sits in a training checkpoint (``weights="checkpoint"``). Each family is
checked at the training size, 224 x 224, and at a larger, non-square size.

Position embeddings at the larger size: the DINO, DINOv2 and MaskCLIP featurizers resize them bicubically by
the scale factor (g + 0.1) / M without antialiasing, which differs from timm's exact-size antialiased resize;
the backbones reproduce the published resize, and each test also shows that timm's own forward would differ.
For DINOv2 (a 37 x 37 table) the resize, and so the difference, happens already at 224. The published CLIP
featurizer calls a CLIP fork that is not public: ``clip`` is specified as timm's ``forward_features`` (timm's
resize) and its reference is OpenAI's CLIP ViT code with that resize, equal at 224 where no resize happens.
The published DINO ViT also crops odd patch grids by one row and column, which fails in its own reshape; the
backbones accept any grid instead.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from featup.backbones import build_backbone
from featup.checkpoint import FeatUpUpsampler
from featup.upsamplers.jbu import JBUStack

SIZES = {"train": (224, 224), "larger": None}  # larger: a non-square grid, set per stride below
LARGER_GRID = (20, 26)
ATOL = 2e-4


def image_size(which: str, stride: int) -> tuple[int, int]:
    return SIZES[which] if SIZES[which] else (LARGER_GRID[0] * stride, LARGER_GRID[1] * stride)


def images(size: tuple[int, int], seed: int = 3) -> Tensor:
    return torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(seed))


def as_checkpoint(state: dict[str, Tensor], dim: int) -> FeatUpUpsampler:
    """The featurizer's state dict as a loaded training checkpoint holds it (``model.0.`` already removed)."""
    return FeatUpUpsampler(JBUStack(dim), backbone_state=state, source="test.ckpt", sha256="ab" * 32)


def from_checkpoint(name: str, state: dict[str, Tensor], dim: int):
    backbone = build_backbone(name, "checkpoint", checkpoint=as_checkpoint(state, dim))
    assert backbone.weights_id == "checkpoint:" + "ab" * 32
    return backbone


# --- the published featurizers' math ---------------------------------------------------------------------------


def dino_interpolate_pos_encoding(pos_embed: Tensor, npatch: int, w: int, h: int, patch: int) -> Tensor:
    """DINO's / DINOv2's ``interpolate_pos_encoding`` (``w``, ``h``: the image's dims 2 and 3, as they name them)."""
    n = pos_embed.shape[1] - 1
    if npatch == n and w == h:
        return pos_embed
    class_pos, patch_pos = pos_embed[:, 0], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch + 0.1, h // patch + 0.1
    patch_pos = F.interpolate(
        patch_pos.reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)),
        mode="bicubic",
    )
    assert int(w0) == patch_pos.shape[-2] and int(h0) == patch_pos.shape[-1]
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((class_pos.unsqueeze(0), patch_pos), dim=1)


def published_vit(sd: dict[str, Tensor], img: Tensor, *, patch: int, heads: int, layer_scale: bool) -> Tensor:
    """DINOFeaturizer / DINOv2Featurizer "token" features: prepare_tokens, the blocks, the norm, cls dropped."""
    sd = {k[len("model."):]: v.float() for k, v in sd.items()}
    _, _, w, h = img.shape
    x = F.conv2d(img, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    b, c, fh, fw = x.shape
    x = torch.cat((sd["cls_token"].expand(b, -1, -1), x.flatten(2).transpose(1, 2)), dim=1)
    x = x + dino_interpolate_pos_encoding(sd["pos_embed"], x.shape[1] - 1, w, h, patch)
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        p = lambda name: sd[f"blocks.{i}.{name}"]  # noqa: E731
        y = F.layer_norm(x, (c,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        n = y.shape[1]
        qkv = F.linear(y, p("attn.qkv.weight"), p("attn.qkv.bias")).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
        y = F.linear((attn @ v).transpose(1, 2).reshape(b, n, c), p("attn.proj.weight"), p("attn.proj.bias"))
        x = x + (y * p("ls1.gamma") if layer_scale else y)
        y = F.layer_norm(x, (c,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"), p("mlp.fc2.bias"))
        x = x + (y * p("ls2.gamma") if layer_scale else y)
    x = F.layer_norm(x, (c,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return x[:, 1:, :].reshape(b, fh, fw, -1).permute(0, 3, 1, 2)


def maskclip_interpolate_positional_embedding(pos: Tensor, x: Tensor, patch: int, w: int, h: int) -> Tensor:
    """MaskCLIP's ``interpolate_positional_embedding`` (featup/featurizers/maskclip/interpolate.py)."""
    num_patches, num_og = x.shape[1] - 1, pos.shape[0] - 1
    if num_patches == num_og and w == h:
        return pos
    dim, per_ax = x.shape[-1], int(math.sqrt(num_og))
    w0, h0 = w // patch + 0.1, h // patch + 0.1
    interp = F.interpolate(
        pos[1:].reshape(1, per_ax, per_ax, dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / per_ax, h0 / per_ax), mode="bicubic", align_corners=False, recompute_scale_factor=False,
    )
    return torch.cat([pos[:1], interp.permute(0, 2, 3, 1).reshape(-1, dim)], dim=0)


def timm_resize_positional_embedding(pos: Tensor, x: Tensor, patch: int, w: int, h: int) -> Tensor:
    """The resize the ``clip`` specification takes from timm: exact size, bicubic, antialiased."""
    from timm.layers import resample_abs_pos_embed

    m = int(math.sqrt(pos.shape[0] - 1))
    return resample_abs_pos_embed(pos[None], (w // patch, h // patch), (m, m), num_prefix_tokens=1)[0]


class ResidualAttentionBlock(nn.Module):
    """OpenAI CLIP's block (as in featup/featurizers/maskclip/model.py): MHA and a QuickGELU MLP, LND layout."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, width * 4)), ("c_proj", nn.Linear(width * 4, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        h = self.mlp.c_fc(self.ln_2(x))
        return x + self.mlp.c_proj(h * torch.sigmoid(1.702 * h))

    def forward_v(self, x: Tensor) -> Tensor:
        """MaskCLIP: the value projection of ln_1(x), then the output projection; nothing else."""
        c = self.attn.embed_dim
        v = F.linear(self.ln_1(x), self.attn.in_proj_weight[-c:], self.attn.in_proj_bias[-c:])
        return F.linear(v, self.attn.out_proj.weight, self.attn.out_proj.bias)


def published_clip(sd: dict[str, Tensor], img: Tensor, *, dense: bool, resize) -> Tensor:
    """OpenAI CLIP's VisionTransformer on ``model.visual.*``: ``dense`` = MaskCLIP's ``patch_output`` path,
    else FeatUp's CLIP features (every token through ln_post and the projection, class token dropped)."""
    v = {k[len("model.visual."):]: t.float() for k, t in sd.items() if k.startswith("model.visual.")}
    width, patch = v["conv1.weight"].shape[0], v["conv1.weight"].shape[-1]
    layers = len({k.split(".")[2] for k in v if k.startswith("transformer.resblocks.")})
    blocks = [ResidualAttentionBlock(width, width // 64) for _ in range(layers)]
    for i, block in enumerate(blocks):
        prefix = f"transformer.resblocks.{i}."
        block.load_state_dict({k[len(prefix):]: t for k, t in v.items() if k.startswith(prefix)}, strict=True)
    _, _, w, h = img.shape
    x = F.conv2d(img, v["conv1.weight"], stride=patch)
    b, c, fh, fw = x.shape
    x = x.reshape(b, c, -1).permute(0, 2, 1)
    x = torch.cat([v["class_embedding"] + torch.zeros(b, 1, c), x], dim=1)
    x = x + resize(v["positional_embedding"], x, patch, w, h)
    x = F.layer_norm(x, (c,), v["ln_pre.weight"], v["ln_pre.bias"]).permute(1, 0, 2)  # NLD -> LND
    with torch.no_grad():
        if dense:
            for block in blocks[:-1]:
                x = block(x)
            x = blocks[-1].forward_v(x).permute(1, 0, 2)[:, 1:, :]
        else:
            for block in blocks:
                x = block(x)
            x = x.permute(1, 0, 2)
        x = F.layer_norm(x, (c,), v["ln_post.weight"], v["ln_post.bias"]) @ v["proj"]
    x = x if dense else x[:, 1:, :]
    return x.reshape(b, fh, fw, -1).permute(0, 3, 1, 2)


# --- the tests -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["train", "larger"])
@pytest.mark.parametrize("name", ["dino16", "vit", "dinov2"])
def test_dino_family_matches_the_published_featurizer(perturbed_backbone, featurizer_state, one_torch_thread, name, which):
    """DINOFeaturizer (dino16; vit is the same class with timm's supervised weights) and DINOv2Featurizer."""
    source = perturbed_backbone(name)
    state = featurizer_state(source)
    backbone = from_checkpoint(name, state, 384)
    img = images(image_size(which, backbone.stride))
    reference = published_vit(state, img, patch=backbone.stride, heads=6, layer_scale=name == "dinov2")
    with torch.no_grad():
        ours = backbone(img)
        timm_features = backbone.model.forward_features(img)[:, 1:]
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=1e-4)
    timm_grid = timm_features.reshape(reference.shape[0], *reference.shape[2:], -1).permute(0, 3, 1, 2)
    resized = which == "larger" or name == "dinov2"
    assert (timm_grid - reference).abs().max() > 1e-2 if resized else torch.allclose(timm_grid, reference, atol=ATOL)


@pytest.mark.parametrize("which", ["train", "larger"])
def test_clip_is_openai_clip_tokens_through_the_projection(perturbed_backbone, featurizer_state, one_torch_thread, which):
    source = perturbed_backbone("clip")
    state = featurizer_state(source)
    backbone = from_checkpoint("clip", state, 512)
    img = images(image_size(which, 16))
    reference = published_clip(state, img, dense=False, resize=timm_resize_positional_embedding)
    with torch.no_grad():
        ours = backbone(img)
    assert ours.shape[1] == 512
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("which", ["train", "larger"])
def test_maskclip_matches_the_published_featurizer(perturbed_backbone, featurizer_state, one_torch_thread, which):
    source = perturbed_backbone("maskclip")
    state = featurizer_state(source)
    backbone = from_checkpoint("maskclip", state, 512)
    img = images(image_size(which, 16))
    reference = published_clip(state, img, dense=True, resize=maskclip_interpolate_positional_embedding)
    with torch.no_grad():
        ours = backbone(img)
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=1e-4)
    if which == "larger":  # the published resize is not timm's: with timm's, the features move
        timm_resized = published_clip(state, img, dense=True, resize=timm_resize_positional_embedding)
        assert (timm_resized - reference).abs().max() > 1e-2


def test_clip_tokens_are_the_768_channels_before_the_projection(perturbed_backbone, featurizer_state, one_torch_thread):
    source = perturbed_backbone("clip")
    backbone = from_checkpoint("clip-tokens", featurizer_state(source), 768)
    img = images((224, 224))
    with torch.no_grad():
        tokens = backbone(img)  # (1, 768, 14, 14)
        projected = source(img)  # (1, 512, 14, 14)
    assert tokens.shape == (1, 768, 14, 14) and backbone.mean != source.mean  # CLIP's own normalisation
    head = source.model.head.weight  # (512, 768)
    torch.testing.assert_close(torch.einsum("kc,bchw->bkhw", head, tokens), projected, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("which", ["train", "larger"])
def test_resnet50_matches_the_published_featurizer(perturbed_backbone, featurizer_state, one_torch_thread, which):
    """ResNetFeaturizer: torchvision's ResNet-50 (FeatUp's copy adds only relevance hooks), layer4 output."""
    source = perturbed_backbone("resnet50")
    state = featurizer_state(source)
    backbone = from_checkpoint("resnet50", state, 2048)
    net = torchvision.models.resnet50(weights=None)
    net.load_state_dict({k[len("model."):]: v for k, v in state.items()}, strict=True)
    net.eval()
    img = images(image_size(which, 32))
    with torch.no_grad():
        x = net.maxpool(net.relu(net.bn1(net.conv1(img))))
        reference = net.layer4(net.layer3(net.layer2(net.layer1(x))))
        ours = backbone(img)
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=1e-4)


def test_clip_backbones_use_openai_quickgelu(random_backbone):
    """OpenAI CLIP uses QuickGELU; timm's vit_base_patch16_clip_224 uses GELU, so its quickgelu twin is used."""
    for name in ("clip", "clip-tokens", "maskclip"):
        model = random_backbone(name).model
        assert model.pretrained_cfg["hf_hub_id"] == "timm/vit_base_patch16_clip_224.openai"
        assert isinstance(model.blocks[0].mlp.act, timm.layers.QuickGELU)
