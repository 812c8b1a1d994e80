"""JAFAR against the published code's outputs, its strict checkpoint loading, chunking and input rules."""

from __future__ import annotations

import pytest
import torch

from featup.errors import CheckpointError, ConfigError, InputError
from featup.upsamplers.base import IMAGENET_NORM, UPSAMPLERS
from featup.upsamplers.jafar import (
    JAFAR,
    PUBLISHED,
    from_state_dict,
    state_dict_from_checkpoint,
)
from tests.conftest import shared_fixture_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIXTURES = shared_fixture_dir("jafar")
CASES = sorted(p.name.removesuffix(".io.pt") for p in FIXTURES.glob("*.io.pt"))


@pytest.fixture(scope="module")
def released_state() -> dict[str, torch.Tensor]:
    return state_dict_from_checkpoint(torch.load(FIXTURES / "weights.pth", weights_only=True))


@pytest.fixture(scope="module")
def released(released_state) -> JAFAR:
    return from_state_dict(released_state).eval()


def _tiny(seed: int = 0, **kwargs) -> JAFAR:
    """A small JAFAR whose every tensor is random (norm weights and biases included)."""
    model = JAFAR(qk_dim=16, v_dim=6, num_heads=2, **kwargs).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _pair(b=1, c=6, h=3, w=4, size=(20, 26), seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g).to(dtype), torch.randn(b, 3, *size, generator=g).to(dtype)


def test_fixture_cases_present():
    assert len(CASES) == 4


@pytest.mark.parametrize("case", CASES)
def test_matches_published_outputs(released, case):
    io = torch.load(FIXTURES / f"{case}.io.pt", weights_only=True)
    size = tuple(io["output_size"].tolist())
    with torch.no_grad():
        out = released(io["lr_feats"], io["image"], size)
    assert out.shape == io["output"].shape
    assert (out - io["output"]).abs().max().item() <= 1e-4


def test_matches_published_attention(released):
    io = torch.load(FIXTURES / f"{CASES[0]}.io.pt", weights_only=True)
    size = tuple(io["output_size"].tolist())
    with torch.no_grad():
        encoded = released.encode_image(io["image"])
        attn = released.attention_weights(released.queries(encoded, size), released.keys(encoded, io["lr_feats"]))
    torch.testing.assert_close(attn, io["attn"], atol=1e-5, rtol=0)


def test_inferred_sizes(released):
    assert (released.input_dim, released.qk_dim, released.v_dim, released.num_heads) == (3, 128, 384, 4)
    assert released.image_norm == IMAGENET_NORM


def test_checkpoint_layout_errors(released_state):
    assert state_dict_from_checkpoint({"jafar": released_state, "epoch": 3}).keys() == released_state.keys()
    assert state_dict_from_checkpoint(released_state).keys() == released_state.keys()  # bare state dict
    with pytest.raises(CheckpointError, match="'jafar'"):
        state_dict_from_checkpoint({"model": released_state})
    with pytest.raises(CheckpointError, match="dict"):
        state_dict_from_checkpoint([1, 2])


@pytest.mark.parametrize("key", ["cross_decode.cross_attn.attention.out_proj.bias", "key_features_encoder.0.weight"])
def test_renamed_key_is_named(released_state, key):
    state = dict(released_state)
    state[key + "_renamed"] = state.pop(key)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        from_state_dict(state)


def test_wrong_shape_is_named(released_state):
    state = dict(released_state)
    state["rope.freqs"] = torch.zeros(2, 64)
    with pytest.raises(CheckpointError, match=r"wrong shapes: rope\.freqs \(2, 64\) \(expected \(2, 128\)\)"):
        from_state_dict(state)


def test_chunked_equals_unchunked():
    model = _tiny()
    lr_feats, image = _pair(b=2)
    with torch.no_grad():
        whole = model(lr_feats, image, (17, 23))
        model.max_query_pixels = 7  # 7-pixel query chunks, one-row RoPE bands
        chunked = model(lr_feats, image, (17, 23))
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)


def test_gradients_flow_through_chunks():
    model = _tiny(max_query_pixels=5).train()
    lr_feats, image = _pair()
    lr_feats.requires_grad_(True)
    model(lr_feats, image, (6, 7)).square().sum().backward()
    assert lr_feats.grad is not None and torch.isfinite(lr_feats.grad).all()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("image_encoder"))


def test_output_size_rules():
    model = _tiny()
    lr_feats, image = _pair(size=(10, 12))
    with torch.no_grad():
        assert model(lr_feats, image).shape == (1, 6, 10, 12)  # default: the image size
        assert model(lr_feats, image, 9).shape == (1, 6, 9, 9)
        assert model(lr_feats, image, (5, 30)).shape == (1, 6, 5, 30)
    with pytest.raises(InputError):
        model(lr_feats, image, (0, 4))


def test_bad_inputs():
    model = _tiny()
    lr_feats, image = _pair()
    with pytest.raises(InputError, match="channels"):
        model(lr_feats[:, :5], image)
    with pytest.raises(InputError):
        model(lr_feats, image[:, :2])
    with pytest.raises(ConfigError):
        JAFAR(qk_dim=12)


def test_float64_construction():
    model = _tiny(dtype=torch.float64)
    lr_feats, image = _pair(dtype=torch.float64)
    with torch.no_grad():
        out = model(lr_feats, image, (8, 8))
    assert out.dtype == torch.float64


def test_registered_factory():
    model = UPSAMPLERS.get("jafar")(768, num_stages=3)
    assert isinstance(model, JAFAR) and model.v_dim == 768 and model.qk_dim == 128


def test_published_table():
    assert len(PUBLISHED) == 14
    for name, weights in PUBLISHED.items():
        assert weights.url.startswith("https://github.com/PaulCouairon/JAFAR/releases/download/Weights/")
        assert weights.url.endswith("/" + weights.file_name)
        assert weights.dim in (384, 768, 1024, 1280) and weights.patch in (14, 16), name
    assert PUBLISHED["dinov2_vits14"].backbone == "dinov2" and PUBLISHED["dinov2_vits14"].dim == 384
