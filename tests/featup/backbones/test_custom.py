"""User backbones given as ``<package.module>:<callable>``: a tiny module written to tmp_path and imported."""

from __future__ import annotations

import sys

import pytest
import torch

from featup.backbones import build_backbone
from featup.backbones.base import IMAGENET_MEAN, IMAGENET_STD
from featup.errors import ConfigError

MODULE = "featup_test_user_backbone"
SOURCE = '''
from torch import nn


class Patchify(nn.Module):
    """A 4x4 patch projection: stride 4, 5 channels."""

    stride = 4
    dim = 5

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 5, kernel_size=4, stride=4)

    def forward(self, x):
        return self.proj(x)


def patchify():
    return Patchify()


def zeros():
    module = Patchify()
    nn.init.zeros_(module.proj.weight)
    nn.init.zeros_(module.proj.bias)
    return module


def with_norm():
    module = Patchify()
    module.mean, module.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    return module


def no_stride():
    module = nn.Sequential(nn.Conv2d(3, 5, 4, 4))
    module.dim = 5
    return module


def bad_mean():
    module = Patchify()
    module.mean = (0.5, 0.5)
    return module


def not_a_module():
    return 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Write the helper module into tmp_path and make it importable for this test only."""
    (tmp_path / f"{MODULE}.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    yield MODULE
    sys.modules.pop(MODULE, None)


def test_user_module_backbone(user_module):
    backbone = build_backbone(f"{user_module}:patchify", "auto")
    assert (backbone.stride, backbone.dim) == (4, 5)
    assert (backbone.mean, backbone.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert backbone.weights_id == f"callable:{user_module}:patchify"
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
    images = torch.randn(2, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    out = backbone(images)
    assert out.shape == (2, 5, 2, 3)
    torch.testing.assert_close(out, backbone.model.proj(images))


def test_user_module_mean_std(user_module):
    backbone = build_backbone(f"{user_module}:with_norm", "auto")
    assert (backbone.mean, backbone.std) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def test_user_module_random_reinitialises(user_module):
    images = torch.ones(1, 3, 4, 4)
    assert build_backbone(f"{user_module}:zeros", "auto")(images).abs().max() == 0
    backbone = build_backbone(f"{user_module}:zeros", "random")
    assert backbone.weights_id == "random"
    assert backbone(images).abs().max() > 0


def test_user_module_weights_file(user_module, tmp_path):
    reference = build_backbone(f"{user_module}:patchify", "auto")
    path = tmp_path / "user.pth"
    torch.save({"model": {f"module.{k}": v for k, v in reference.model.state_dict().items()}}, path)
    loaded = build_backbone(f"{user_module}:zeros", str(path))
    assert loaded.weights_id.startswith("sha256:")
    images = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(loaded(images), reference(images), rtol=0, atol=0)


@pytest.mark.parametrize(
    "attr, match",
    [("no_stride", "'stride'"), ("bad_mean", "mean"), ("not_a_module", "nn.Module"), ("missing", "'missing'")],
)
def test_invalid_user_module_names_the_spec(user_module, attr, match):
    spec = f"{user_module}:{attr}"
    with pytest.raises(ConfigError, match=match) as info:
        build_backbone(spec, "auto")
    assert spec in str(info.value)


def test_unimportable_module():
    with pytest.raises(ConfigError, match="no_such_package_xyz"):
        build_backbone("no_such_package_xyz.mod:fn", "auto")
