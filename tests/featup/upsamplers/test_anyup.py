"""AnyUp: parity with the published code's outputs, strict checkpoint loading, tiling, shapes and dtypes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from featup.errors import CheckpointError, InputError
from featup.upsamplers.anyup import PUBLISHED, AnyUp, build_anyup, from_state_dict, state_dict_from_checkpoint
from featup.upsamplers.base import IMAGENET_NORM, UPSAMPLERS
from tests.conftest import shared_fixture_dir

FIXTURES = shared_fixture_dir("anyup")
CASES = sorted(path.name.removesuffix(".io.pt") for path in FIXTURES.glob("*.io.pt"))


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def released_state() -> dict[str, torch.Tensor]:
    return state_dict_from_checkpoint(_load(FIXTURES / "weights.pth"))


@pytest.fixture(scope="module")
def released(released_state) -> AnyUp:
    return from_state_dict(released_state).eval()


def _small_model(**kwargs) -> AnyUp:
    torch.manual_seed(0)
    return AnyUp(qk_dim=32, num_heads=4, **kwargs).eval()


def test_fixture_cases_present():
    assert len(CASES) >= 4


@pytest.mark.parametrize("case", CASES)
def test_parity_with_published_outputs(case, released, one_torch_thread):
    io = _load(FIXTURES / f"{case}.io.pt")
    lr_feats, image, size = io["lr_feats"], io["image"], tuple(io["output_size"].tolist())
    with torch.inference_mode():  # the default output size is the image size
        out = released(lr_feats, image, None if size == tuple(image.shape[2:]) else size)
    assert out.shape == io["output"].shape and out.dtype == torch.float32
    assert (out - io["output"]).abs().max().item() <= 1e-4


def test_key_stages_match_published(released, one_torch_thread):
    io = _load(FIXTURES / "c384_b2_8x8_to_56x56.io.pt")
    with torch.inference_mode():
        unified = released.key_features_encoder(F.normalize(io["lr_feats"], dim=1))
        keys = released.aggregation(torch.cat([io["key_image"], io["key_feats"]], dim=1))
    assert (unified - io["key_feats"]).abs().max().item() <= 1e-5
    assert (keys - io["key"]).abs().max().item() <= 1e-4


def test_strict_loading_names_renamed_key(released_state):
    state = dict(released_state)
    state["rope.frequencies"] = state.pop("rope.freqs")
    with pytest.raises(CheckpointError, match=r"missing keys: rope\.freqs.*unexpected keys: rope\.frequencies"):
        from_state_dict(state)


def test_strict_loading_names_wrong_shape(released_state):
    state = dict(released_state)
    state["cross_decode.conv2d.weight"] = torch.zeros(128, 128, 1, 1)
    with pytest.raises(CheckpointError, match=r"wrong shapes: cross_decode\.conv2d\.weight"):
        from_state_dict(state)


def test_checkpoint_layout_errors(released_state):
    with pytest.raises(CheckpointError, match="plain state dict"):
        state_dict_from_checkpoint([1, 2])
    with pytest.raises(CheckpointError, match="other entries.*epoch"):
        state_dict_from_checkpoint({**released_state, "epoch": 3})
    state = dict(released_state)
    del state["image_encoder.0.weight"]
    with pytest.raises(CheckpointError, match=r"image_encoder\.0\.weight"):
        from_state_dict(state)


def test_float64_load_matches_float32(released, released_state, one_torch_thread):
    model = from_state_dict(released_state, dtype=torch.float64).eval()
    assert model.rope.freqs.dtype == torch.float64
    lr_feats, image = torch.randn(1, 20, 5, 6), torch.randn(1, 3, 30, 36)
    with torch.inference_mode():
        out = model(lr_feats.double(), image.double(), (17, 25))
        want = released(lr_feats, image, (17, 25))
    assert out.dtype == torch.float64
    assert (out - want.double()).abs().max().item() <= 1e-4


@pytest.mark.parametrize("out_size", [(23, 31), (40, 16)])
def test_tiled_equals_untiled(out_size, one_torch_thread):
    tiled, whole = _small_model(max_query_pixels=7), _small_model(max_query_pixels=None)
    lr_feats, image = torch.randn(2, 5, 6, 7), torch.randn(2, 3, 30, 36)
    with torch.inference_mode():
        a, b = tiled(lr_feats, image, out_size), whole(lr_feats, image, out_size)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_output_shapes_and_dtypes(one_torch_thread):
    model = _small_model()
    lr_feats, image = torch.randn(1, 3, 4, 5), torch.randn(1, 3, 24, 20)
    with torch.inference_mode():
        assert model(lr_feats, image).shape == (1, 3, 24, 20)
        assert model(lr_feats, image, 12).shape == (1, 3, 12, 12)
        assert model(lr_feats, image, (50, 9)).shape == (1, 3, 50, 9)
        half = model(lr_feats.bfloat16(), image.bfloat16())
    assert half.dtype == torch.bfloat16


def test_bad_inputs_raise_input_error():
    model = _small_model()
    with pytest.raises(InputError, match="image"):
        model(torch.randn(1, 3, 4, 4), torch.randn(1, 4, 16, 16))
    with pytest.raises(InputError, match="batch size"):
        model(torch.randn(2, 3, 4, 4), torch.randn(1, 3, 16, 16))
    with pytest.raises(InputError, match="2x2"):
        model(torch.randn(1, 3, 1, 4), torch.randn(1, 3, 16, 16))
    with pytest.raises(InputError, match="output_size"):
        model(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 16, 16), (0, 4))


def test_registry_and_published_table():
    model = UPSAMPLERS.get("anyup")(384, num_stages=4, dtype=torch.float64)
    assert isinstance(model, AnyUp) and model.image_norm == IMAGENET_NORM
    assert model.rope.freqs.dtype == torch.float64
    assert set(build_anyup(7).state_dict()) == set(model.state_dict())
    assert set(PUBLISHED) == {"default", "multi_backbone"}
    assert all(w.url.endswith(w.file_name) and w.dim is None for w in PUBLISHED.values())
