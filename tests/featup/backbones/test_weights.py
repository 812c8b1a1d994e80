"""Weight loading: round trips, published checkpoint layouts (FeatUp, DINO, DINOv2, OpenAI CLIP), URLs, errors, hub."""

from __future__ import annotations

import argparse
import hashlib
import time

import fsspec
import huggingface_hub
import pytest
import timm
import torch
from safetensors.torch import save_file

from featup.backbones import BACKBONES, build_backbone, load_state_dict_file
from featup.errors import CheckpointError, WeightsUnavailableError


def sha256_id(path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same_features(a, b, make_images) -> None:
    images = make_images(a, 2, 2, 3, seed=1)
    torch.testing.assert_close(a(images), b(images), rtol=0, atol=0)


@pytest.mark.parametrize("name", BACKBONES.names())
def test_state_dict_round_trip(random_backbone, make_images, tmp_path, name):
    reference = random_backbone(name)
    path = tmp_path / f"{name}.pth"
    torch.save(reference.model.state_dict(), path)
    loaded = build_backbone(name, str(path))
    assert loaded.weights_id == sha256_id(path)
    assert_same_features(reference, loaded, make_images)


def test_safetensors_round_trip(random_backbone, make_images, tmp_path):
    reference = random_backbone("dino16")
    path = tmp_path / "dino16.safetensors"
    save_file({k: v.contiguous() for k, v in reference.model.state_dict().items()}, str(path))
    loaded = build_backbone("dino16", str(path))
    assert loaded.weights_id == sha256_id(path)
    assert_same_features(reference, loaded, make_images)


def test_memory_url_round_trip(random_backbone, make_images):
    reference = random_backbone("dino16")
    fs = fsspec.filesystem("memory")
    with fs.open("/featup-backbone-test/dino16.pth", "wb") as f:
        torch.save(reference.model.state_dict(), f)
    try:
        loaded = build_backbone("dino16", "memory://featup-backbone-test/dino16.pth")
        data = fs.cat("/featup-backbone-test/dino16.pth")
    finally:
        fs.rm("/featup-backbone-test", recursive=True)
    assert loaded.weights_id == "sha256:" + hashlib.sha256(data).hexdigest()
    assert_same_features(reference, loaded, make_images)


def test_load_state_dict_file_from_file_url(tmp_path):
    state = {"a.weight": torch.randn(2, 3), "b": torch.arange(4)}
    path = tmp_path / "plain.pt"
    torch.save({"state_dict": state, "epoch": 3}, path)
    loaded = load_state_dict_file(path.as_uri())
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize("prefix", ["model.0.model.", "model.0."])
@pytest.mark.parametrize("name", ["dino16", "resnet50"])
def test_featup_checkpoint_layout(random_backbone, make_images, tmp_path, name, prefix):
    """Official FeatUp checkpoints keep the backbone under model.0. next to the norm and the upsampler."""
    reference = random_backbone(name)
    backbone_state = dict(reference.model.state_dict())
    if name == "resnet50":  # FeatUp's ResNet keeps its ImageNet classifier
        backbone_state |= {"fc.weight": torch.randn(1000, 2048), "fc.bias": torch.randn(1000)}
    state = {prefix + k: v for k, v in backbone_state.items()}
    state |= {"model.1.norm.weight": torch.ones(reference.dim), "upsampler.up1.fixup_proj.1.weight": torch.ones(3)}
    path = tmp_path / "featup.ckpt"
    torch.save({"state_dict": state, "epoch": 7, "global_step": 100}, path)
    assert_same_features(reference, build_backbone(name, str(path)), make_images)


def test_dino_original_full_checkpoint(random_backbone, make_images, tmp_path):
    """facebookresearch/dino full checkpoints: teacher/student with backbone. and head. keys, plus args."""
    reference = random_backbone("dino16")
    teacher = {f"backbone.{k}": v for k, v in reference.model.state_dict().items()}
    teacher["head.mlp.0.weight"] = torch.randn(2048, 384)
    student = {f"module.{k}": torch.zeros_like(v) for k, v in teacher.items()}
    path = tmp_path / "dino_full_checkpoint.pth"
    args = argparse.Namespace(arch="vit_small", patch_size=16)
    torch.save({"student": student, "teacher": teacher, "epoch": 100, "args": args}, path)
    assert_same_features(reference, build_backbone("dino16", str(path)), make_images)


def test_dinov2_original_layout(random_backbone, make_images, tmp_path):
    """facebookresearch/dinov2 state dicts carry a mask_token that timm's filter removes."""
    reference = random_backbone("dinov2")
    state = dict(reference.model.state_dict()) | {"mask_token": torch.zeros(1, 384)}
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    assert_same_features(reference, build_backbone("dinov2", str(path)), make_images)


@pytest.mark.parametrize("name", ["clip", "clip-tokens"])
def test_openai_clip_layout(random_backbone, openai_clip_state, make_images, tmp_path, name):
    """OpenAI's ViT-B-16 file: visual.* next to the text tower; ``clip`` keeps the projection, clip-tokens drops it."""
    reference = random_backbone(name)
    timm_state = reference.model.state_dict()
    state = openai_clip_state(timm_state)
    # timm's head.weight and head.bias are OpenAI's visual.proj; clip-tokens has no head, so proj is extra
    expected = len(timm_state) - 1 if name == "clip" else len(timm_state) + 1
    assert len([k for k in state if k.startswith("visual.")]) == expected
    path = tmp_path / "ViT-B-16-state-dict.pt"
    torch.save(state, path)
    assert_same_features(reference, build_backbone(name, str(path)), make_images)


def test_wrong_keys_raise_checkpoint_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.layer.0.weight": torch.zeros(3), "decoder.bias": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError) as info:
        build_backbone("dino16", str(path))
    message = str(info.value)
    assert str(path) in message and "dino16" in message
    assert "unexpected keys [decoder.bias, encoder.layer.0.weight]" in message
    assert "missing keys [blocks.0." in message and "more)]" in message


def test_wrong_shapes_raise_checkpoint_error(make_images, tmp_path):
    tiny = build_backbone("timm:vit_tiny_patch16_224", "random")  # 192 channels where dino16 has 384
    path = tmp_path / "tiny.pth"
    torch.save(tiny.model.state_dict(), path)
    with pytest.raises(CheckpointError, match="size mismatch"):
        build_backbone("dino16", str(path))


def test_undecodable_file_raises_checkpoint_error(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        build_backbone("dino16", str(path))


def test_missing_file_raises_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="absent.pth"):
        build_backbone("resnet50", str(tmp_path / "absent.pth"))


def test_pickled_code_is_refused(tmp_path):
    """weights_only loading: a checkpoint holding an arbitrary object is rejected, not executed."""
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "hook": print}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_state_dict_file(str(path))


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 with an empty cache; huggingface_hub reads its constants at import, so patch them too."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.mark.parametrize(
    "name, timm_name", [("dino16", "vit_small_patch16_224.dino"), ("resnet50", "resnet50.tv_in1k")]
)
def test_auto_weights_offline_fail_fast(offline_hub, name, timm_name):
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        build_backbone(name, "auto")
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert timm_name in message and "--weights PATH" in message


def test_random_and_file_weights_never_touch_the_hub(offline_hub, random_backbone, tmp_path):
    backbone = build_backbone("timm:resnet18", "random")
    path = tmp_path / "resnet18.pth"
    torch.save(backbone.model.state_dict(), path)
    assert build_backbone("timm:resnet18", str(path)).weights_id == sha256_id(path)


def fill_hub_cache(cache, repo_id: str, state: dict[str, torch.Tensor]) -> None:
    """Store ``state`` as the cached ``model.safetensors`` of hub repo ``repo_id``, in huggingface_hub's layout."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))


@pytest.mark.parametrize(
    "name, timm_name, classifier",
    [("vit", "vit_small_patch16_224.augreg_in21k_ft_in1k", "head"), ("resnet50", "resnet50.tv_in1k", "fc")],
)
def test_auto_weights_from_the_hub_cache(offline_hub, tmp_path, name, timm_name, classifier):
    """weights="auto" loads timm's published weights (here a pre-filled offline cache), classifier removed."""
    full = timm.create_model(timm_name, pretrained=False)  # with its ImageNet classifier, as published
    fill_hub_cache(tmp_path / "hub", f"timm/{timm_name}", full.state_dict())
    backbone = build_backbone(name, "auto")
    assert backbone.weights_id == f"pretrained:{timm_name}"
    loaded = backbone.model.state_dict()
    assert not any(k.startswith(f"{classifier}.") for k in loaded)
    assert all(torch.equal(v, full.state_dict()[k]) for k, v in loaded.items())
