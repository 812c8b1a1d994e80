"""UPLiFT against the published code's outputs, its checkpoint loading, banding and output-size rules."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from featup.errors import CheckpointError, InputError
from featup.upsamplers.base import IMAGENET_NORM, UPSAMPLERS
from featup.upsamplers.uplift import (
    PUBLISHED,
    UPLiFT,
    build_uplift,
    from_state_dict,
    resize_antialias,
    state_dict_from_checkpoint,
    steps_to_reach,
)
from tests.conftest import shared_fixture_dir

FIXTURES = shared_fixture_dir("uplift")
CASES = sorted(p.name for p in FIXTURES.glob("*.io.pt"))


@pytest.fixture(scope="module")
def released_state() -> dict[str, torch.Tensor]:
    return state_dict_from_checkpoint(load_file(FIXTURES / "weights.safetensors"))


@pytest.fixture(scope="module")
def model(released_state) -> UPLiFT:
    return from_state_dict(released_state)


def _outsize(io: dict) -> tuple[int, int] | int | None:
    if "outsize" not in io:
        return None
    size = io["outsize"]
    return int(size) if size.dim() == 0 else tuple(size.tolist())


def test_fixture_cases_found():
    assert len(CASES) == 5


@pytest.mark.parametrize("case", CASES)
def test_matches_published_outputs(case, model, one_torch_thread):
    io = torch.load(FIXTURES / case, weights_only=True)
    model.num_steps = int(io["iters"])
    with torch.no_grad():
        out = model(io["lr_feats"], io["image"], _outsize(io))
        steps = model.upsample_steps(io["lr_feats"], io["image"], 2) if "step1" in io else []
    assert out.shape == io["output"].shape == (io["lr_feats"].shape[0], 384, *io["output_size"].tolist())
    assert (out - io["output"]).abs().max() <= 1e-4
    for k, step in enumerate(steps, start=1):
        want = io[f"step{k}"] if f"step{k}" in io else io["output"]  # the 2-step case's step 2 is its output
        assert (step - want).abs().max() <= 1e-4


def test_released_layout_hyper_parameters(model, released_state):
    assert (model.dim, model.patch_size, model.encoder.channels) == (384, 14, (16, 32, 64, 128, 128))
    assert sum(p.numel() for p in model.parameters()) == 789_521
    assert not model.training
    wrapped = {"state_dict": {f"module.{k}": v for k, v in released_state.items()}}
    assert state_dict_from_checkpoint(wrapped).keys() == released_state.keys()
    no_counters = {k: v for k, v in released_state.items() if not k.endswith("num_batches_tracked")}
    from_state_dict(no_counters)  # the BatchNorm counters are optional, as in torch


def test_renamed_key_is_named(released_state):
    state = dict(released_state)
    state["attender.conv2.weight"] = state.pop("attender.conv1.weight")
    with pytest.raises(CheckpointError, match=r"missing keys: attender\.conv1\.weight.*attender\.conv2\.weight"):
        from_state_dict(state)


def test_wrong_shape_is_named(released_state):
    state = dict(released_state)
    state["attender.conv1.bias"] = torch.zeros(16)
    with pytest.raises(CheckpointError, match=r"wrong shapes: attender.conv1.bias \(16,\) \(expected \(17,\)\)"):
        from_state_dict(state)


@pytest.mark.parametrize(
    "raw, message",
    [([1, 2], "expected a mapping"), ({"w": 1.0}, "expected tensors"), ({"w": torch.zeros(1)}, "expected 'encoder")],
)
def test_bad_checkpoint_layout(raw, message):
    with pytest.raises(CheckpointError, match=message):
        state_dict_from_checkpoint(raw)


def test_channels_inferred_from_state():
    small = UPLiFT(12, 16, encoder_channels=(4, 8, 8), hidden_channels=20)
    loaded = from_state_dict(small.state_dict(), patch_size=16)
    assert (loaded.dim, loaded.encoder.channels, loaded.patch_size) == (12, (4, 8, 8), 16)
    assert loaded.attender.conv1.in_channels == 20


def _random(dim: int = 6, **kwargs) -> UPLiFT:
    torch.manual_seed(0)
    return build_uplift(dim, **kwargs).eval()


@pytest.mark.parametrize(
    "lr_size, image_size, steps, output_size, budget",
    [((2, 3), (14, 21), 2, None, 2), ((2, 3), (14, 21), 2, (7, 10), 2), ((3, 4), (21, 28), 3, 20, 96)],
)
def test_banded_equals_one_band(lr_size, image_size, steps, output_size, budget, one_torch_thread):
    model = _random(num_stages=steps)  # budget 2: one-row bands and, before the final resize, channel chunks
    lr_feats, image = torch.randn(2, 6, *lr_size), torch.randn(2, 3, *image_size)
    with torch.no_grad():
        model.max_query_pixels = 1 << 30
        whole = model(lr_feats, image, output_size)
        model.max_query_pixels = budget
        banded = model(lr_feats, image, output_size)
    torch.testing.assert_close(banded, whole, atol=1e-5, rtol=0)


def test_resize_is_torch_antialiased_bilinear():
    x = torch.randn(2, 3, 64, 80)
    want = torch.nn.functional.interpolate(x, size=(45, 77), mode="bilinear", antialias=True)
    torch.testing.assert_close(resize_antialias(x, (45, 77), rows=4), want, atol=1e-5, rtol=0)
    assert resize_antialias(x, (64, 80), rows=4) is x


def test_output_size_rules(one_torch_thread):
    assert steps_to_reach((4, 4), (56, 56)) == 4 and steps_to_reach((3, 5), (6, 11)) == 2
    assert steps_to_reach((4, 4), (4, 4)) == 0
    model = _random(num_stages=2)
    lr_feats, image = torch.randn(1, 6, 3, 5), torch.randn(1, 3, 42, 70)
    with torch.no_grad():
        assert model(lr_feats, image).shape == (1, 6, 12, 20)  # lr size x 2**num_steps, not the image size
        assert model(lr_feats, image, (42, 70)).shape == (1, 6, 42, 70)
        assert model(lr_feats, image, 42).shape == (1, 6, 42, 70)  # an int sets the shorter side
        assert model(lr_feats.transpose(2, 3), image, 10).shape == (1, 6, 16, 10)
        torch.testing.assert_close(model(lr_feats, image, (3, 5)), lr_feats)  # no step needed


def test_dtypes(one_torch_thread):
    model = _random(num_stages=1)
    lr_feats, image = torch.randn(1, 6, 3, 4), torch.randn(1, 3, 42, 56)
    with torch.no_grad():
        want = model(lr_feats, image)
        assert model(lr_feats.half(), image.half()).dtype == torch.float16
        wide = build_uplift(6, num_stages=1, dtype=torch.float64).eval()
        wide.load_state_dict(model.state_dict())
        got = wide(lr_feats.double(), image.double())
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.float(), want, atol=1e-5, rtol=1e-5)


def test_bad_inputs(one_torch_thread):
    model = _random()
    with pytest.raises(InputError):
        model(torch.randn(1, 5, 3, 4), torch.randn(1, 3, 42, 56))  # wrong channel count
    with pytest.raises(InputError):
        model(torch.randn(1, 6, 3, 4), torch.randn(1, 3, 42, 56), (0, 10))


def test_registered_and_published():
    assert UPSAMPLERS.get("uplift") is build_uplift
    assert UPLiFT.image_norm == IMAGENET_NORM
    assert PUBLISHED["dinov2_vits14"].backbone == "dinov2"
    assert {(w.dim, w.patch) for w in PUBLISHED.values()} == {(384, 14), (384, 16)}
    assert all(w.url.endswith("/resolve/main/" + w.file_name) for w in PUBLISHED.values())
