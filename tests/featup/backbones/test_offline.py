"""weights="auto" without network fails within seconds, not after the Hugging Face client's retries (~51 s).

The suite sets HF_HUB_OFFLINE=1 (tests/conftest.py); these tests take it away and point the hub endpoint at
127.0.0.1: a server that accepts connections and never answers, or a port where nothing listens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import pytest
import timm
from safetensors.torch import save_file

from featup.backbones import build_backbone
from featup.errors import WeightsUnavailableError

BOUND_S = 15  # generous: the probe gives up after featup.hub.PROBE_TIMEOUT_S (3 s)
REPO_ROOT = Path(__file__).resolve().parents[3]

CHILD = """
import json, sys, time
from featup.backbones import build_backbone
from featup.errors import WeightsUnavailableError
start = time.monotonic()
try:
    build_backbone("dino16", "auto")
    outcome = "built"
except WeightsUnavailableError as err:
    outcome = str(err)
print(json.dumps({"seconds": time.monotonic() - start, "outcome": outcome}))
"""


def test_auto_weights_fail_fast_without_hf_offline_mode(silent_server, tmp_path):
    """In a fresh process without HF_HUB_OFFLINE, against an endpoint that never answers: the time of
    build_backbone alone, measured there (importing torch and timm is not what is timed)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env |= {"HF_ENDPOINT": silent_server, "HF_HOME": str(tmp_path / "hf"),
            "TORCH_HOME": str(tmp_path / "torch"), "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["seconds"] < BOUND_S, result
    assert "vit_small_patch16_224.dino" in result["outcome"] and "cannot be reached" in result["outcome"]
    assert "--weights PATH" in result["outcome"]


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path, silent_server):
    """Hub not in offline mode, its endpoint a black hole, its cache empty under tmp_path/hub."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", silent_server)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_unreachable_hub_uses_its_cache(unreachable_hub):
    """Weights fetched earlier are used from the hub cache without waiting on the network."""
    full = timm.create_model("resnet50.tv_in1k", pretrained=False)
    repo = unreachable_hub / "models--timm--resnet50.tv_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(repo / "snapshots" / ("0" * 40) / "model.safetensors"))
    start = time.monotonic()
    backbone = build_backbone("resnet50", "auto")
    assert time.monotonic() - start < BOUND_S
    assert backbone.weights_id == "pretrained:resnet50.tv_in1k"
    reference = full.state_dict()
    assert all(v.equal(reference[k]) for k, v in backbone.model.state_dict().items())


def test_unreachable_hub_without_cache_is_refused(unreachable_hub, closed_port_url, monkeypatch):
    """As in the subprocess test, with a port where nothing listens (refused at once) instead of a black hole."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", closed_port_url)
    with pytest.raises(WeightsUnavailableError, match="are not cached and .* cannot be reached"):
        build_backbone("resnet50", "auto")
