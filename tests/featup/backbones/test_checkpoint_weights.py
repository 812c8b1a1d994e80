"""weights="checkpoint": the backbone a FeatUp training checkpoint carries under model.0.*, in its featurizer's layout."""

from __future__ import annotations

import hashlib

import pytest
import torch

from featup.backbones import FEATURIZER_LAYOUTS, build_backbone
from featup.checkpoint import FeatUpUpsampler, load_featup_checkpoint
from featup.upsamplers.jbu import JBUStack
from featup.errors import CheckpointError, ConfigError


def save(tmp_path, content: dict, name: str = "featup.ckpt"):
    path = tmp_path / name
    torch.save(content, path)
    return path


def in_memory(backbone_state: dict, dim: int = 512) -> FeatUpUpsampler:
    """A loaded checkpoint without the file (ViT-B CLIP weights are 350 MB to write and read back)."""
    return FeatUpUpsampler(JBUStack(dim), backbone_state=backbone_state, source="clip.ckpt", sha256="cd" * 32)


def assert_same_weights(a, b) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


def test_every_published_featurizer_has_a_layout():
    assert set(FEATURIZER_LAYOUTS) == {"dino16", "dino8", "vit", "dinov2", "clip", "clip-tokens", "maskclip", "resnet50"}


@pytest.mark.parametrize("name", ["dinov2", "resnet50"])
def test_checkpoint_file_gives_the_backbone(perturbed_backbone, featurizer_state, make_checkpoint, tmp_path, name):
    source = perturbed_backbone(name)
    path = save(tmp_path, make_checkpoint(source.dim, backbone_state=featurizer_state(source)))
    backbone = build_backbone(name, "checkpoint", checkpoint=str(path))
    assert backbone.weights_id == "checkpoint:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert_same_weights(backbone, source)


def test_auto_prefers_the_checkpoint_backbone(perturbed_backbone, featurizer_state, make_checkpoint, tmp_path):
    """No hub request is made: the suite runs with HF_HUB_OFFLINE=1 and an empty cache would refuse it."""
    source = perturbed_backbone("resnet50")
    loaded = load_featup_checkpoint(str(save(tmp_path, make_checkpoint(2048, backbone_state=featurizer_state(source)))))
    backbone = build_backbone("resnet50", "auto", checkpoint=loaded)
    assert backbone.weights_id == f"checkpoint:{loaded.sha256}"
    assert_same_weights(backbone, source)


def test_half_precision_featurizer_weights_load_into_float32(perturbed_backbone, featurizer_state):
    """The CLIP featurizers run OpenAI's model in float16 on GPUs, so their checkpoints may hold float16 tensors."""
    source = perturbed_backbone("maskclip")
    half = {k: v.half() if v.is_floating_point() else v for k, v in featurizer_state(source).items()}
    backbone = build_backbone("maskclip", "checkpoint", checkpoint=in_memory(half))
    assert all(p.dtype == torch.float32 for p in backbone.parameters())
    expected = backbone.model.state_dict()["blocks.3.attn.qkv.weight"]
    torch.testing.assert_close(expected, source.model.state_dict()["blocks.3.attn.qkv.weight"].half().float(), rtol=0, atol=0)


def test_checkpoint_weights_need_a_checkpoint_with_a_backbone(official_fixtures):
    with pytest.raises(ConfigError, match="expected a checkpoint to take them from, got none"):
        build_backbone("dino16", "checkpoint")
    no_backbone = str(official_fixtures / "jbu_c64_14x14_to_224x224.ckpt")
    with pytest.raises(CheckpointError, match=r"expected backbone weights \(model.0.\*\).*--weights auto"):
        build_backbone("dino16", "checkpoint", checkpoint=no_backbone)


def test_backbones_without_a_published_featurizer_are_refused(make_checkpoint, tmp_path):
    path = save(tmp_path, make_checkpoint(512, backbone_state={"model.conv.weight": torch.zeros(1)}))
    with pytest.raises(ConfigError, match="expected a backbone of a published FeatUp featurizer.*got 'timm:resnet18'"):
        build_backbone("timm:resnet18", "checkpoint", checkpoint=str(path))


def test_a_foreign_layout_is_refused_with_its_keys(random_backbone, featurizer_state):
    """A CLIP featurizer's checkpoint is not a DINO backbone, and an unknown key is never dropped silently."""
    clip_state = featurizer_state(random_backbone("clip"))
    with pytest.raises(CheckpointError, match="clip.ckpt' does not fit backbone 'dino16'"):
        build_backbone("dino16", "checkpoint", checkpoint=in_memory(clip_state))
    stray = clip_state | {"model.extra_head.weight": torch.zeros(2), "other.bias": torch.zeros(2)}
    with pytest.raises(CheckpointError) as info:
        build_backbone("clip", "checkpoint", checkpoint=in_memory(stray))
    message = str(info.value)
    assert "CLIPFeaturizer" in message and "model.0.model.extra_head.weight" in message and "model.0.other.bias" in message
