"""The ground-truth teacher: a user backbone whose coarse features are the area means of a known per-pixel field."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from featup.backbones import build_backbone
from featup.backbones.teacher import GroundTruthTeacher, teacher14, teacher16
from featup.errors import ConfigError

SPEC16 = "featup.backbones.teacher:teacher16"


def _digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode() + tensor.contiguous().numpy().tobytes())
    return h.hexdigest()


def test_loads_as_a_user_backbone_with_its_stride_and_dim():
    for spec, stride in ((SPEC16, 16), ("featup.backbones.teacher:teacher14", 14)):
        backbone = build_backbone(spec, "auto")
        assert (backbone.stride, backbone.dim, backbone.weights_id) == (stride, 32, f"callable:{spec}")
        image = torch.randn(2, 3, 4 * stride, 6 * stride, generator=torch.Generator().manual_seed(0))
        assert backbone(image).shape == (2, 32, 4, 6)


def test_output_is_the_area_mean_of_the_true_features():
    teacher = teacher16()
    image = torch.randn(1, 3, 48, 80, generator=torch.Generator().manual_seed(1))
    truth = teacher.true_features(image)  # (1, 32, 48, 80)
    assert truth.shape == (1, 32, 48, 80)
    cell = truth[0, :, 16:32, 32:48].mean(dim=(1, 2))  # the cell at row 1, column 2
    torch.testing.assert_close(teacher(image)[0, :, 1, 2], cell)
    torch.testing.assert_close(teacher(image), F.avg_pool2d(truth, 16))


def test_true_features_are_a_function_of_each_pixel_colour_alone():
    teacher = teacher14()
    image = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    shuffled = image.flatten(2)[:, :, torch.randperm(28 * 28, generator=torch.Generator().manual_seed(3))]
    torch.testing.assert_close(
        teacher.true_features(shuffled.view(1, 3, 28, 28)).flatten(2),
        teacher.true_features(image).flatten(2)[:, :, torch.randperm(28 * 28, generator=torch.Generator().manual_seed(3))],
    )


def test_weights_are_fixed_across_processes_and_leave_the_global_generator_alone():
    state = torch.get_rng_state()
    here = _digest(teacher16())
    assert torch.equal(torch.get_rng_state(), state)
    assert _digest(teacher16()) == here
    code = ("import hashlib, torch; from featup.backbones.teacher import teacher16; torch.manual_seed(123); m = teacher16(); "
            "h = hashlib.sha256(); [h.update(k.encode() + v.contiguous().numpy().tobytes()) "
            "for k, v in sorted(m.state_dict().items())]; print(h.hexdigest())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == here


def test_random_weights_and_weight_files_follow_the_user_module_conventions(tmp_path):
    fixed = build_backbone(SPEC16, "auto")
    random = build_backbone(SPEC16, "random")
    assert random.weights_id == "random" and _digest(random.model) != _digest(fixed.model)
    path = tmp_path / "teacher.pth"
    torch.save(random.model.state_dict(), path)
    loaded = build_backbone(SPEC16, str(path))
    assert loaded.weights_id.startswith("sha256:") and _digest(loaded.model) == _digest(random.model)


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="teacher stride: expected a positive int, got 0"):
        GroundTruthTeacher(0)
    with pytest.raises(ConfigError, match="teacher frequency: expected > 0, got -1"):
        GroundTruthTeacher(16, frequency=-1.0)
