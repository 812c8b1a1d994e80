"""featup.hub: published checkpoint names, download once with progress, the cache, offline use and refusals, load().

A real HTTP server on 127.0.0.1 (``http.server`` in a thread) serves checkpoints in the official layout; the
name resolution points at it through ``FEATUP_HUB_URL`` and the cache goes to a temporary ``TORCH_HOME``.
"""

from __future__ import annotations

import hashlib
import http.server
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from featup import hub
from featup.backbones import build_backbone
from featup.checkpoint import load_featup_checkpoint
from featup.errors import CheckpointError, ConfigError, WeightsUnavailableError
from featup.layers import ChannelNorm

README = "https://marhamilresearch4.blob.core.windows.net/feature-upsampling-public/pretrained/"
OFFLINE_BOUND_S = 15  # generous: the probe gives up after PROBE_TIMEOUT_S (3 s)


@dataclass
class HubServer:
    """What the server saw and how it misbehaves: ``faults[path]`` is "cut" (stops halfway through the body)."""

    root: Path
    url: str = ""
    requests: list[tuple[str, str]] = field(default_factory=list)
    faults: dict[str, str] = field(default_factory=dict)

    def gets(self) -> list[str]:
        return [path for method, path in self.requests if method == "GET"]


def _handler(server: HubServer):
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(server.root), **kwargs)

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def do_HEAD(self) -> None:
            server.requests.append(("HEAD", self.path))
            super().do_HEAD()

        def do_GET(self) -> None:
            server.requests.append(("GET", self.path))
            if server.faults.get(self.path) != "cut":
                return super().do_GET()
            data = (server.root / self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True

    return Handler


@pytest.fixture
def hub_server(tmp_path, monkeypatch):
    """A running server over ``<tmp>/served`` (norm files at the top, ``no_norm/`` below); the cache in ``<tmp>/torch``."""
    served = tmp_path / "served"
    (served / "no_norm").mkdir(parents=True)
    state = HubServer(served)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    monkeypatch.setenv("FEATUP_HUB_URL", state.url)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def serve(server: HubServer, name: str, content: dict) -> Path:
    """Put ``content`` where the server serves checkpoint ``name``; returns the served file."""
    ckpt = hub.parse(name)
    path = server.root / ("" if ckpt.use_norm else "no_norm") / ckpt.file_name
    torch.save(content, path)
    return path


def official(official_fixtures, *, use_norm: bool = True, seed: int = 0) -> dict:
    """The 64-channel official-layout fixture; the no-norm variant has no model.1.* and other JBU weights."""
    content = torch.load(official_fixtures / "jbu_c64_14x14_to_224x224.ckpt", weights_only=True)
    if not use_norm:
        gen = torch.Generator().manual_seed(seed)
        state = {k: v for k, v in content["state_dict"].items() if not k.startswith("model.1.")}
        content["state_dict"] = {
            k: v + 0.01 * torch.randn(v.shape, generator=gen) if k.startswith("upsampler.") else v for k, v in state.items()
        }
    return content


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cached_files(tmp_path: Path) -> list[Path]:
    root = tmp_path / "torch" / "hub" / "checkpoints" / "featup"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


# --- names ------------------------------------------------------------------------------------------------------


def test_names_resolve_to_the_published_urls(monkeypatch):
    monkeypatch.delenv("FEATUP_HUB_URL", raising=False)
    assert hub.parse("featup:dino16").url == README + "dino16_jbu_stack_cocostuff.ckpt"
    assert hub.parse("featup:dino16:no_norm").url == README + "no_norm/dino16_jbu_stack_cocostuff.ckpt"
    assert hub.parse("featup:maskclip:no_norm").url == README + "no_norm/maskclip_jbu_stack_cocostuff.ckpt"
    models = ["dino16", "dinov2", "clip", "vit", "resnet50"]
    assert hub.names() == [f"featup:{m}" for m in models] + [f"featup:{m}:no_norm" for m in models[:3] + ["maskclip"] + models[3:]]
    monkeypatch.setenv("FEATUP_HUB_URL", "http://mirror.example/featup")
    assert hub.parse("featup:clip:no_norm").url == "http://mirror.example/featup/no_norm/clip_jbu_stack_cocostuff.ckpt"


@pytest.mark.parametrize(
    "name, message",
    [
        ("featup:maskclip", "expected featup:maskclip:no_norm, got the LayerNorm variant"),
        ("featup:dino8", "expected one of featup:dino16"),
        ("featup:dino16:norm", "expected the suffix ':no_norm' or none, got ':norm'"),
        ("dino16", "expected 'featup:<model>"),
    ],
)
def test_bad_names_are_refused(name, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        hub.parse(name)


def test_a_name_implies_its_backbone_and_refuses_another():
    implied = {m: hub.implied_backbone(f"featup:{m}:no_norm") for m in hub.PUBLISHED}
    assert implied == {m: m for m in ["dino16", "dinov2", "clip", "maskclip", "vit", "resnet50"]}
    assert hub.implied_backbone("/ckpts/mine.ckpt") is None and hub.implied_backbone(None) is None
    assert hub.resolve_backbone(None, "featup:clip") == "clip"
    assert hub.resolve_backbone("clip", "featup:clip") == "clip"
    assert hub.resolve_backbone("dino16", "/ckpts/mine.ckpt") == "dino16"
    with pytest.raises(ConfigError) as info:
        hub.resolve_backbone("clip-tokens", "featup:clip")
    assert "--backbone clip-tokens" in str(info.value) and "expected clip" in str(info.value)


def test_cache_follows_torch_home(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    expected = tmp_path / "th" / "hub" / "checkpoints" / "featup"
    assert hub.parse("featup:vit").cache_path == expected / "norm" / "vit_jbu_stack_cocostuff.ckpt"
    assert hub.parse("featup:vit:no_norm").cache_path == expected / "no_norm" / "vit_jbu_stack_cocostuff.ckpt"


# --- download and cache -------------------------------------------------------------------------------------------


def test_downloads_once_with_progress_then_uses_the_cache(hub_server, official_fixtures, tmp_path, capsys):
    served = serve(hub_server, "featup:dino16", official(official_fixtures))
    model = load_featup_checkpoint("featup:dino16")
    err = capsys.readouterr().err
    assert "dino16_jbu_stack_cocostuff.ckpt" in err and "100%" in err  # tqdm's bar
    cached = hub.parse("featup:dino16").cache_path
    sidecar = cached.with_name(cached.name + ".sha256")
    assert cached_files(tmp_path) == [cached, sidecar] and cached.read_bytes() == served.read_bytes()
    assert sidecar.read_text() == f"{sha256(served)}  {cached.name}\n"  # sha256sum's format
    assert hub_server.gets() == ["/dino16_jbu_stack_cocostuff.ckpt"]
    assert model.sha256 == sha256(served) and model.source == "featup:dino16" and model.norm is not None

    before = len(hub_server.requests)
    again = load_featup_checkpoint("featup:dino16")
    assert len(hub_server.requests) == before  # not even a HEAD
    assert again.sha256 == model.sha256
    assert hub.resolve_checkpoint("featup:dino16") == str(cached)
    assert hub.resolve_checkpoint("/ckpts/mine.ckpt") == "/ckpts/mine.ckpt"


def test_norm_and_no_norm_are_kept_apart(hub_server, official_fixtures):
    norm_file = serve(hub_server, "featup:dino16", official(official_fixtures))
    plain_file = serve(hub_server, "featup:dino16:no_norm", official(official_fixtures, use_norm=False))
    with_norm = load_featup_checkpoint("featup:dino16", progress=False)
    without = load_featup_checkpoint("featup:dino16:no_norm", progress=False)
    assert isinstance(with_norm.norm, ChannelNorm) and without.norm is None
    assert (with_norm.sha256, without.sha256) == (sha256(norm_file), sha256(plain_file))
    assert hub.parse("featup:dino16").cache_path != hub.parse("featup:dino16:no_norm").cache_path
    served = torch.load(plain_file, weights_only=True)["state_dict"]["upsampler.fixup_proj.1.weight"]
    assert torch.equal(without.upsampler.fixup_proj[1].weight, served)
    assert not torch.equal(with_norm.upsampler.fixup_proj[1].weight, served)


def test_offline_uses_the_cache(hub_server, official_fixtures, closed_port_url, monkeypatch):
    serve(hub_server, "featup:resnet50:no_norm", official(official_fixtures, use_norm=False))
    first = load_featup_checkpoint("featup:resnet50:no_norm", progress=False)
    monkeypatch.setenv("FEATUP_HUB_URL", closed_port_url)  # the host is gone
    assert load_featup_checkpoint("featup:resnet50:no_norm").sha256 == first.sha256


@pytest.mark.parametrize("host", ["silent_server", "closed_port_url"])
def test_offline_without_cache_fails_fast_naming_url_and_path(request, monkeypatch, tmp_path, host):
    base = request.getfixturevalue(host)
    monkeypatch.setenv("FEATUP_HUB_URL", base)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        load_featup_checkpoint("featup:clip")
    assert time.monotonic() - start < OFFLINE_BOUND_S
    message = str(info.value)
    ckpt = hub.parse("featup:clip")
    assert ckpt.url in message and str(ckpt.cache_path) in message and "--checkpoint PATH" in message
    assert "\n" not in message and cached_files(tmp_path) == []


def test_a_cached_file_changed_on_disk_is_downloaded_again_online_and_refused_offline(
    hub_server, official_fixtures, closed_port_url, monkeypatch, tmp_path, capsys
):
    served = serve(hub_server, "featup:vit", official(official_fixtures))
    cached = hub.fetch("featup:vit", progress=False)
    good = cached.read_bytes()
    cached.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one bit flipped: still a file, no longer the download
    assert hub.fetch("featup:vit") == cached and cached.read_bytes() == served.read_bytes()
    assert hub_server.gets() == ["/vit_jbu_stack_cocostuff.ckpt"] * 2
    assert f"cached checkpoint {cached} no longer matches the sha256 recorded" in capsys.readouterr().err

    cached.write_bytes(b"changed")
    monkeypatch.setenv("FEATUP_HUB_URL", closed_port_url)  # offline
    with pytest.raises(CheckpointError) as info:
        load_featup_checkpoint("featup:vit", progress=False)
    message = str(info.value)
    assert message.startswith(f"cached checkpoint {cached} no longer matches the sha256 recorded at its download in {cached}.sha256")
    assert "cannot be reached" in message and f"delete {cached}" in message and "\n" not in message


def test_a_cached_file_without_a_sidecar_is_taken_and_recorded(hub_server, official_fixtures, tmp_path):
    """A file put in the cache by hand (as the offline error suggests) is used as it is; from then on it is checked."""
    content = official(official_fixtures)
    cached = hub.parse("featup:clip").cache_path
    cached.parent.mkdir(parents=True)
    torch.save(content, cached)
    assert load_featup_checkpoint("featup:clip", progress=False).sha256 == sha256(cached)
    assert hub_server.requests == [] and cached.with_name(cached.name + ".sha256").read_text().split()[0] == sha256(cached)


def test_a_cut_download_is_refused_and_not_cached(hub_server, official_fixtures, tmp_path):
    serve(hub_server, "featup:vit", official(official_fixtures))
    hub_server.faults["/vit_jbu_stack_cocostuff.ckpt"] = "cut"
    with pytest.raises(CheckpointError, match=r"truncated: expected \d+ bytes \(Content-Length\), got \d+"):
        load_featup_checkpoint("featup:vit", progress=False)
    assert cached_files(tmp_path) == []
    hub_server.faults.clear()  # a retry downloads it whole
    assert load_featup_checkpoint("featup:vit", progress=False).dim == 64


@pytest.mark.parametrize("damage", ["short file", "html page", "no state_dict"])
def test_a_damaged_file_is_refused_and_not_cached(hub_server, official_fixtures, tmp_path, damage):
    path = serve(hub_server, "featup:dinov2", official(official_fixtures))
    data = path.read_bytes()
    if damage == "short file":  # the server's copy itself is short: Content-Length agrees, torch.load does not
        path.write_bytes(data[: len(data) * 2 // 3])
    elif damage == "html page":
        path.write_bytes(b"<html><body>503 Service Unavailable</body></html>")
    else:
        torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="nothing was cached") as info:
        load_featup_checkpoint("featup:dinov2", progress=False)
    assert hub.parse("featup:dinov2").url in str(info.value)
    assert cached_files(tmp_path) == []


def test_a_missing_file_on_the_server_is_named(hub_server, tmp_path):
    with pytest.raises(WeightsUnavailableError, match=r"dino16_jbu_stack_cocostuff.ckpt is not there \(the server answered 404") as info:
        load_featup_checkpoint("featup:dino16", progress=False)
    assert str(hub.parse("featup:dino16").cache_path) in str(info.value) and "--checkpoint PATH" in str(info.value)
    assert cached_files(tmp_path) == []


# --- the whole model ----------------------------------------------------------------------------------------------


@pytest.fixture
def dino16_hub(hub_server, perturbed_backbone, featurizer_state, make_checkpoint):
    """featup:dino16 served as a full training checkpoint: DINO featurizer backbone, norm and a 384-channel JBU."""
    source = perturbed_backbone("dino16")
    content = make_checkpoint(384, backbone_state=featurizer_state(source))
    return source, serve(hub_server, "featup:dino16", content)


def test_load_builds_the_whole_model_from_one_checkpoint(dino16_hub, hub_server, one_torch_thread):
    source, served = dino16_hub
    model = hub.load("dino16", progress=False, backend="eager")
    assert hub_server.gets() == ["/dino16_jbu_stack_cocostuff.ckpt"]  # no backbone download besides
    backbone, norm = model.model
    assert backbone is model.backbone and isinstance(norm, ChannelNorm)
    assert backbone.weights_id == f"checkpoint:{sha256(served)}"
    assert not model.training and not any(p.requires_grad for p in backbone.parameters())
    image = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    trained = load_featup_checkpoint("featup:dino16", backend="eager")
    with torch.no_grad():
        out = model(image)
        expected = trained.upsampler(trained.norm(source(image)), image)
    assert out.shape == (1, 384, 32, 48)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    # the same backbone through build_backbone: "auto" takes the checkpoint's backbone when it has one
    again = build_backbone("dino16", "auto", checkpoint="featup:dino16")
    assert again.weights_id == backbone.weights_id
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), backbone.state_dict().values()))


def test_load_without_pretrained_downloads_nothing(closed_port_url, monkeypatch, tmp_path):
    monkeypatch.setenv("FEATUP_HUB_URL", closed_port_url)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    model = hub.load("resnet50", use_norm=False, pretrained=False, backend="eager")
    assert len(model.model) == 1 and model.backbone.weights_id == "random"
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2048, 32, 32)  # 16x the 2x2 grid, as published
    assert cached_files(tmp_path) == []
    with pytest.raises(ConfigError, match="featup:maskclip:no_norm"):
        hub.load("maskclip", pretrained=False)  # use_norm=True, as torch.hub's default: not published
