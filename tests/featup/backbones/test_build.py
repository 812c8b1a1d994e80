"""build_backbone and Backbone.forward: shapes, agreement with timm's own feature APIs, input errors, dtypes."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from featup.backbones import BACKBONES, Backbone, build_backbone
from featup.backbones.cnn import CNNBackbone
from featup.backbones.vit import ViTBackbone
from featup.errors import ConfigError, InputError

NAMES = BACKBONES.names()
# (batch, rows, cols) in units of the stride: square, non-square, batch > 1
GRIDS = [(1, 2, 2), (1, 2, 3), (2, 3, 2)]
EXPECTED = {  # name: (stride, dim) from the spec
    "dino16": (16, 384),
    "dino8": (8, 384),
    "dinov2": (14, 384),
    "clip": (16, 512),
    "clip-tokens": (16, 768),
    "maskclip": (16, 512),
    "vit": (16, 384),
    "resnet50": (32, 2048),
}


def test_registry_holds_the_published_backbones():
    assert set(NAMES) == set(EXPECTED)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: "x".join(map(str, g)))
def test_output_shape_follows_stride_and_dim(random_backbone, make_images, name, grid):
    backbone = random_backbone(name)
    batch, rows, cols = grid
    out = backbone(make_images(backbone, batch, rows, cols))
    assert (backbone.stride, backbone.dim) == EXPECTED[name]
    assert out.shape == (batch, backbone.dim, rows, cols)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_built_backbone_is_frozen_and_described(random_backbone, name):
    backbone = random_backbone(name)
    assert isinstance(backbone, Backbone) and backbone.name == name
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
    assert backbone.weights_id == "random"
    assert len(backbone.mean) == 3 and len(backbone.std) == 3
    assert all(isinstance(v, float) for v in backbone.mean + backbone.std)


def test_vit_features_match_timm_last_layer_tokens(random_backbone, make_images):
    """Token features of a backbone on timm's resize = timm's last-block output after the final norm, prefix tokens
    dropped, as a grid (the backbones of published featurizers: test_published_features.py)."""
    backbone = random_backbone("clip-tokens")
    images = make_images(backbone, 2, 2, 3)
    reference = backbone.model.get_intermediate_layers(images, n=1, reshape=True, norm=True)[0]
    torch.testing.assert_close(backbone(images), reference)


def test_clip_features_are_the_projected_timm_tokens(random_backbone, make_images):
    """``clip``: timm's forward_features, then its head (CLIP's projection), prefix token dropped."""
    backbone = random_backbone("clip")
    images = make_images(backbone, 1, 2, 3)
    tokens = backbone.model.head(backbone.model.forward_features(images))[:, 1:]  # (1, 6, 512)
    reference = tokens.reshape(1, 2, 3, 512).permute(0, 3, 1, 2)
    torch.testing.assert_close(backbone(images), reference)


def test_resnet50_features_are_the_last_stage(random_backbone, make_images):
    backbone = random_backbone("resnet50")
    images = make_images(backbone, 1, 2, 3)
    m = backbone.model
    x = m.maxpool(m.act1(m.bn1(m.conv1(images))))
    reference = m.layer4(m.layer3(m.layer2(m.layer1(x))))
    torch.testing.assert_close(backbone(images), reference)


@pytest.mark.parametrize(
    "spec, cls, stride, dim",
    [("timm:resnet18", CNNBackbone, 32, 512), ("timm:vit_tiny_patch16_224", ViTBackbone, 16, 192)],
)
def test_any_timm_model(make_images, spec, cls, stride, dim):
    backbone = build_backbone(spec, "random")
    assert isinstance(backbone, cls) and (backbone.stride, backbone.dim) == (stride, dim)
    assert backbone.weights_id == "random" and backbone.name == spec
    out = backbone(make_images(backbone, 2, 2, 3))
    assert out.shape == (2, dim, 2, 3)


def test_timm_vit_with_registers_drops_all_prefix_tokens(make_images):
    backbone = build_backbone("timm:vit_small_patch14_reg4_dinov2", "random")
    assert backbone.model.num_prefix_tokens == 5
    images = make_images(backbone, 1, 2, 3)
    reference = backbone.model.get_intermediate_layers(images, n=1, reshape=True, norm=True)[0]
    torch.testing.assert_close(backbone(images), reference)


def test_unknown_name_lists_known_names():
    with pytest.raises(ConfigError) as info:
        build_backbone("dino99", "random")
    assert "dino99" in str(info.value)
    assert all(name in str(info.value) for name in NAMES)


def test_unknown_timm_model_is_a_config_error():
    with pytest.raises(ConfigError, match="not_a_timm_model"):
        build_backbone("timm:not_a_timm_model", "random")


@pytest.mark.parametrize("name", NAMES)
def test_size_not_multiple_of_stride(random_backbone, name):
    backbone = random_backbone(name)
    s = backbone.stride
    message = f"image size {2 * s + 1}x{2 * s} is not a multiple of the stride {s} of backbone '{name}'"
    with pytest.raises(InputError, match=re.escape(message)):
        backbone(torch.zeros(1, 3, 2 * s + 1, 2 * s))


def test_size_error_message_from_the_spec(random_backbone):
    message = "image size 225x224 is not a multiple of the stride 16 of backbone 'dino16'"
    with pytest.raises(InputError, match=re.escape(message)):
        random_backbone("dino16")(torch.zeros(1, 3, 225, 224))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input(random_backbone, bad):
    images = torch.zeros(1, 3, 32, 32)
    images[0, 1, 5, 7] = bad
    with pytest.raises(InputError, match="finite"):
        random_backbone("dino16")(images)


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 1, 32, 32), (1, 4, 32, 32), (0, 3, 32, 32)])
def test_wrong_image_shape(random_backbone, shape):
    with pytest.raises(InputError, match=re.escape(str(shape))):
        random_backbone("dino16")(torch.zeros(shape))


def test_integer_images_are_refused(random_backbone):
    """Unnormalised uint8 pixels would give meaningless features, so they are an error, not a silent cast."""
    with pytest.raises(InputError, match="uint8"):
        random_backbone("dino16")(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_non_tensor_input(random_backbone):
    with pytest.raises(InputError, match="ndarray|list"):
        random_backbone("dino16")([[0.0]])


@pytest.mark.parametrize("weights", ["", None, 3])
def test_bad_weights_argument(weights):
    with pytest.raises(ConfigError, match="weights"):
        build_backbone("dino16", weights)


@pytest.mark.parametrize(
    "name, dtype", [("dino16", torch.bfloat16), ("dino16", torch.float16), ("resnet50", torch.bfloat16)]
)
def test_low_precision_matches_float32(random_backbone, make_images, tmp_path, name, dtype):
    """Low-precision features follow the float32 ones of the same weights (cosine similarity per location)."""
    reference = random_backbone(name)
    path = tmp_path / "weights.pth"
    torch.save(reference.model.state_dict(), path)
    backbone = build_backbone(name, str(path), dtype=dtype, device="cpu")
    images = make_images(backbone, 1, 1, 2)
    out = backbone(images)  # float32 images are cast to the weights' dtype
    assert out.dtype == dtype and out.shape == reference(images).shape
    similarity = F.cosine_similarity(out.float(), reference(images), dim=1)
    assert similarity.min() > 0.98
