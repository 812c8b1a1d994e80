"""featup.upsampler_hub and featup.hub.load_upsampler: the successors' published names, download once with progress,
the cache and its sha256 sidecar, offline use and refusals, strict loading, the backbone a checkpoint was trained for,
and the guidance image converted to the upsampler's normalisation (``for_backbone``).

A real HTTP server on 127.0.0.1 serves small random checkpoints in the published layout; ``FEATUP_<KIND>_URL`` points
each kind at it and the cache goes to a temporary ``TORCH_HOME``.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from featup import hub
from featup import upsampler_hub as uh
from featup.errors import CheckpointError, ConfigError, WeightsUnavailableError
from featup.upsamplers.base import IMAGENET_NORM, ImageNorm
from featup.upsamplers.jbu import JBUStack
from jobs.models import resolve_names
from tests.conftest import shared_fixture_dir
from tests.helpers import successors

OFFLINE_BOUND_S = 15  # generous: the probe gives up after featup.published.PROBE_TIMEOUT_S (3 s)


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A file server every kind's base URL points at; the cache in ``<tmp>/torch``."""
    root = tmp_path / "served"
    root.mkdir()
    with successors.file_server(root) as server:
        for kind in uh.KINDS.values():
            monkeypatch.setenv(kind.env_var, server.url)
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
        yield server


def serve(server: successors.FileServer, name: str, content: object) -> Path:
    """Put ``content`` (saved with torch.save) where the server serves published checkpoint ``name``."""
    ref = uh.parse(name)
    path = server.root / ref.entry.url[len(uh.published_base(uh.kind_of(ref.kind))) :]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(content, path)
    return path


def cached_files(tmp_path: Path) -> list[Path]:
    root = tmp_path / "torch" / "hub" / "checkpoints"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- names --------------------------------------------------------------------------------------------------------


def test_names_resolve_to_the_published_urls_a_mirror_and_the_cache(monkeypatch, tmp_path):
    for kind in uh.KINDS.values():
        monkeypatch.delenv(kind.env_var, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert uh.parse("anyup").url == "https://github.com/wimmerth/anyup/releases/download/checkpoint/anyup_paper.pth"
    assert uh.parse("anyup:multi_backbone").url.endswith("/checkpoint_v2/anyup_multi_backbone.pth")
    assert uh.parse("naf").url == "https://github.com/valeoai/NAF/releases/download/model/naf_release.pth"
    assert uh.parse("jafar:dinov2_vits14").url.endswith("/JAFAR/releases/download/Weights/vit_small_patch14_dinov2.lvd142m.pth")
    assert uh.parse("loftup:clip").url == "https://huggingface.co/haiwen/loftup-clip/resolve/main/pytorch_model.bin"
    checkpoints = tmp_path / "th" / "hub" / "checkpoints"
    assert uh.parse("loftup:clip").cache_path == checkpoints / "loftup" / "clip" / "pytorch_model.bin"
    assert uh.parse("anyup").cache_path == checkpoints / "anyup" / "default" / "anyup_paper.pth"
    monkeypatch.setenv("FEATUP_LOFTUP_URL", "http://mirror.example/hf/")
    assert uh.parse("loftup:clip").url == "http://mirror.example/hf/loftup-clip/resolve/main/pytorch_model.bin"
    names = uh.names()
    assert names[:2] == ["anyup", "anyup:multi_backbone"] and "naf" in names
    assert {"jafar:dinov2_vits14", "jafar:radio_v2.5-b", "loftup:dinov2s", "loftup:siglip2", "uplift:dinov2_vits14",
            "uplift:dinov3_vits16plus"} <= set(names)
    assert uh.parse("uplift:dinov2_vits14").url.endswith("/uplift_dinov2-s14/resolve/main/uplift_dinov2-s14.safetensors")
    assert uh.is_name("jafar:dinov3_vits16") and not uh.is_name("./naf") and not uh.is_name("featup:dino16")


@pytest.mark.parametrize("name, message", [
    ("jafar", "expected jafar:<backbone>, one of jafar:vit_b16"),
    ("naf:large", "expected one of naf"),
    ("loftup:dinov3", "expected one of loftup:dinov2s"),
])
def test_bad_names_are_refused_listing_the_good_ones(name, message):
    with pytest.raises(ConfigError, match=message):
        uh.parse(name)


@pytest.mark.parametrize("upsampler, checkpoint, backbone, expected", [
    (None, "anyup:multi_backbone", None, ("anyup", "anyup:multi_backbone")),  # a name implies its kind
    ("naf", None, "clip", ("naf", "naf")),  # any backbone: the default weights
    ("jafar", None, "dinov2", ("jafar", "jafar:dinov2_vits14")),  # per backbone: the backbone's weights
    ("loftup", None, "clip", ("loftup", "loftup:clip")),
    ("jafar", None, None, ("jafar", "jafar:dinov2_vits14")),  # no backbone: the default (it implies dinov2)
    ("loftup", "/w/mine.bin", "dino16", ("loftup", "/w/mine.bin")),
    (None, "featup:dino16", None, (None, "featup:dino16")),  # FeatUp's own pass through
    ("bilinear", None, "dino16", ("bilinear", None)),
])
def test_the_upsampler_and_checkpoint_a_command_runs(upsampler, checkpoint, backbone, expected):
    assert uh.resolve(upsampler, checkpoint, backbone) == expected


@pytest.mark.parametrize("upsampler, checkpoint, backbone, message", [
    ("jafar", None, "clip-tokens", "expected a --checkpoint for backbone 'clip-tokens'"),
    ("anyup", "featup:dino16", None, "expected anyup weights .* got a FeatUp JBU name"),
    ("anyup", "jafar:dinov2_vits14", None, "expected anyup weights .* got a jafar name"),
    ("jbu", "naf", None, "expected a checkpoint of --upsampler jbu .* got a naf name"),
])
def test_a_checkpoint_of_another_kind_or_backbone_is_refused(upsampler, checkpoint, backbone, message):
    with pytest.raises(ConfigError, match=message):
        uh.resolve(upsampler, checkpoint, backbone)


def test_a_per_backbone_name_implies_its_backbone_and_any_backbone_names_do_not():
    assert {n: uh.implied_backbone(n) for n in ("jafar:dinov2_vits14", "loftup:clip", "jafar:dinov3_vits16", "anyup", "naf")} == {
        "jafar:dinov2_vits14": "dinov2", "loftup:clip": "clip", "jafar:dinov3_vits16": None, "anyup": None, "naf": None}
    args = argparse.Namespace(upsampler=None, checkpoint="loftup:dinov2s", backbone=None)
    resolve_names(args)
    assert (args.upsampler, args.checkpoint, args.backbone) == ("loftup", "loftup:dinov2s", "dinov2")
    with pytest.raises(ConfigError, match="--backbone: expected a backbone name"):
        resolve_names(argparse.Namespace(upsampler=None, checkpoint="anyup", backbone=None))  # AnyUp fits any backbone


# --- download, cache, sidecar -------------------------------------------------------------------------------------


def test_downloaded_once_with_progress_and_a_sidecar_then_used_from_the_cache(served, tmp_path, capsys):
    source = successors.small_successor("naf")
    file = serve(served, "naf", source.state_dict())
    model = hub.load_upsampler("naf")  # no checkpoint: the kind's default published weights
    err = capsys.readouterr().err
    assert "naf_release.pth" in err and "100%" in err  # tqdm's bar
    cached = uh.parse("naf").cache_path
    assert cached_files(tmp_path) == [cached, cached.with_name("naf_release.pth.sha256")]
    assert cached.read_bytes() == file.read_bytes()
    assert cached.with_name("naf_release.pth.sha256").read_text() == f"{sha256(file)}  naf_release.pth\n"  # sha256sum -c
    assert served.gets() == ["/naf_release.pth"]
    assert (model.source, model.sha256, model.trained_for, model.training) == ("naf", sha256(file), uh.parse("naf").entry, False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))

    before = len(served.requests)
    assert hub.load_upsampler("naf", "naf").sha256 == model.sha256
    assert len(served.requests) == before  # not even a HEAD


def test_a_cached_file_that_no_longer_matches_its_sidecar_is_fetched_again_online_and_refused_offline(
        served, tmp_path, closed_port_url, monkeypatch):
    file = serve(served, "anyup", successors.small_successor("anyup").state_dict())
    hub.load_upsampler("anyup", progress=False)
    cached = uh.parse("anyup").cache_path
    cached.write_bytes(cached.read_bytes()[:-8] + b"\0" * 8)  # bit rot
    assert hub.load_upsampler("anyup", progress=False).sha256 == sha256(file)
    assert served.gets() == ["/checkpoint/anyup_paper.pth"] * 2 and cached.read_bytes() == file.read_bytes()

    cached.write_bytes(b"damaged")
    monkeypatch.setenv("FEATUP_ANYUP_URL", closed_port_url)  # the host is gone
    start = time.monotonic()
    with pytest.raises(CheckpointError) as info:
        hub.load_upsampler("anyup")
    assert time.monotonic() - start < OFFLINE_BOUND_S
    message = str(info.value)
    assert str(cached) in message and "anyup_paper.pth.sha256" in message and "cannot be reached" in message
    assert "\n" not in message


def test_offline_without_cache_fails_fast_naming_url_and_path(closed_port_url, monkeypatch, tmp_path):
    monkeypatch.setenv("FEATUP_JAFAR_URL", closed_port_url)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        hub.load_upsampler("jafar", "jafar:dinov2_vits14")
    assert time.monotonic() - start < OFFLINE_BOUND_S
    ref, message = uh.parse("jafar:dinov2_vits14"), str(info.value)
    assert ref.url in message and str(ref.cache_path) in message and "--checkpoint PATH" in message
    assert "\n" not in message and cached_files(tmp_path) == []


def test_a_download_that_is_not_a_checkpoint_of_its_kind_is_refused_and_not_cached(served, tmp_path):
    serve(served, "loftup:dinov2s", successors.small_successor("naf").state_dict())  # a NAF file at LoftUp's URL
    with pytest.raises(CheckpointError, match="is not a usable loftup checkpoint .*; nothing was cached"):
        hub.load_upsampler("loftup", "loftup:dinov2s", progress=False)
    assert cached_files(tmp_path) == []


# --- strict loading -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", successors.KINDS)
def test_a_renamed_key_is_refused_naming_it_and_the_file(kind, tmp_path):
    state = successors.small_successor(kind).state_dict()
    last = [key for key in state if key.endswith(".bias")][-1]  # a key no size is read from
    state[last + "_renamed"] = state.pop(last)
    path = tmp_path / f"{kind}.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        hub.load_upsampler(kind, str(path))
    message = str(info.value)
    assert str(path) in message and f"{last}_renamed" in message and "missing" in message and "unexpected" in message


def test_wrong_channel_counts_are_refused(tmp_path):
    state = successors.small_successor("jafar", dim=16).state_dict()
    state["cross_decode.cross_attn.norm_v.weight"] = torch.ones(24)  # a tensor of another channel count
    torch.save({"jafar": state}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"bad.pth.*cross_decode.cross_attn.norm_v.weight"):
        hub.load_upsampler("jafar", str(tmp_path / "bad.pth"))
    successors.save_successor("jafar", tmp_path / "c16.pth", dim=16)
    model = hub.load_upsampler("jafar", str(tmp_path / "c16.pth"))
    dinov2 = SimpleNamespace(name="dinov2", dim=384, stride=14, mean=IMAGENET_NORM.mean, std=IMAGENET_NORM.std)
    with pytest.raises(ConfigError, match="expected a backbone with 16 channels .* got backbone dinov2 with 384 channels"):
        hub.for_backbone(model, dinov2)


def test_a_pickle_holding_other_objects_is_refused_unopened(tmp_path):
    state = successors.small_successor("jafar").state_dict()
    torch.save({"jafar": state, "cfg": argparse.Namespace(lr=1e-4)}, tmp_path / "release.pth")  # as JAFAR's train.py
    with pytest.raises(CheckpointError, match=r"release.pth: holds Python objects besides tensors \(argparse.Namespace\)"):
        hub.load_upsampler("jafar", str(tmp_path / "release.pth"))


def test_safetensors_files_are_read_as_such():
    data = (shared_fixture_dir("uplift") / "weights.safetensors").read_bytes()
    state = uh.load_weights_bytes(data, "weights.safetensors")
    assert len(state) == 72 and state["attender.conv1.weight"].shape == (17, 64, 1, 1)


def test_a_per_backbone_checkpoint_refuses_another_backbones_stride_naming_both(served):
    serve(served, "jafar:dinov2_vits14", {"jafar": successors.small_successor("jafar", dim=384).state_dict()})
    model = hub.load_upsampler("jafar", "jafar:dinov2_vits14", progress=False)
    dino16 = SimpleNamespace(name="dino16", dim=384, stride=16, mean=IMAGENET_NORM.mean, std=IMAGENET_NORM.std)
    with pytest.raises(ConfigError) as info:
        hub.for_backbone(model, dino16)
    assert ("expected a backbone with 384 channels and stride 14 (the one it was trained for, dinov2), "
            "got backbone dino16 with 384 channels and stride 16") in str(info.value)
    assert isinstance(hub.for_backbone(model, SimpleNamespace(**{**vars(dino16), "name": "dinov2", "stride": 14})),
                      hub.GuidedUpsampler)


# --- guidance -----------------------------------------------------------------------------------------------------


def test_for_backbone_hands_each_upsampler_the_image_in_its_own_normalisation(one_torch_thread):
    clip_norm = ImageNorm((0.481, 0.458, 0.408), (0.269, 0.261, 0.276))
    backbone = SimpleNamespace(name="clip-tokens", dim=16, stride=8, mean=clip_norm.mean, std=clip_norm.std)
    gen = torch.Generator().manual_seed(0)
    rgb, lr = torch.rand(2, 3, 32, 32, generator=gen), torch.randn(2, 16, 4, 4, generator=gen)
    anyup = successors.small_successor("anyup")
    with torch.no_grad():
        got = hub.for_backbone(anyup, backbone)(lr, clip_norm.normalize(rgb))
        expected = anyup(lr, IMAGENET_NORM.normalize(rgb))  # AnyUp's published input
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    loftup = successors.small_successor("loftup")  # its colour min-max runs over the batch: one image at a time
    image = IMAGENET_NORM.convert(clip_norm.normalize(rgb), clip_norm)  # the same float32 rounding: LoftUp's sines
    with torch.no_grad():  # reach ~2e4 rad, where an ulp of the image moves the output by ~1e-3
        got = hub.for_backbone(loftup, backbone)(lr, clip_norm.normalize(rgb))
        alone = torch.cat([loftup(lr[i : i + 1], image[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)
    jbu = JBUStack(16, backend="eager")
    assert hub.for_backbone(jbu, backbone) is jbu  # FeatUp's JBU guides with the backbone's own image
