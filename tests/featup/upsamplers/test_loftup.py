"""LoftUp against the published code's outputs, its checkpoint handling, chunking and input rules."""

from __future__ import annotations

import pytest
import torch

from featup.errors import CheckpointError, ConfigError, InputError
from featup.upsamplers.base import IMAGENET_NORM, build_upsampler
from featup.upsamplers.loftup import (
    PUBLISHED,
    LoftUp,
    from_state_dict,
    linspace_f32,
    log_spaced_freqs,
    minmax_scale,
    state_dict_from_checkpoint,
)
from tests.conftest import shared_fixture_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIXTURES = shared_fixture_dir("loftup")
CASES = sorted(p.name.removesuffix(".io.pt") for p in FIXTURES.glob("*.io.pt"))


@pytest.fixture(scope="module")
def released_state() -> dict[str, torch.Tensor]:
    return state_dict_from_checkpoint(torch.load(FIXTURES / "weights.pth", weights_only=True))


@pytest.fixture(scope="module")
def released(released_state) -> LoftUp:
    return from_state_dict(released_state)


def _small(**kwargs) -> LoftUp:
    torch.manual_seed(0)
    return LoftUp(8, n_freqs=6, **kwargs).eval()


def _pair(b=2, c=8, h=3, w=4, height=13, width=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g), torch.randn(b, 3, height, width, generator=g)


def test_fixture_cases_exist():
    assert len(CASES) == 3


@pytest.mark.parametrize("case", CASES)
def test_matches_published_outputs(released, case):
    io = torch.load(FIXTURES / f"{case}.io.pt", weights_only=True)
    b, c, h, w = io["lr_feats"].shape
    with torch.no_grad():
        out = released(io["lr_feats"], io["image"])
        tokens = released.tokens(io["lr_feats"])  # (B, h*w, C + 20)
    assert out.shape == io["output"].shape and tuple(out.shape[2:]) == tuple(io["output_size"].tolist())
    assert (out - io["output"]).abs().max().item() <= 1e-4
    # the sinusoid inputs are bit-identical to the published ones
    assert torch.equal(minmax_scale(io["image"]), io["image_minmax"])
    assert torch.equal(tokens[..., c:].transpose(1, 2).reshape(b, 20, h, w), io["lr_pe"])
    torch.testing.assert_close(tokens[..., :c].transpose(1, 2).reshape(b, c, h, w), io["lr_feats_normed"])


@pytest.mark.parametrize("start,end", [(-1.0, 1.0), (-2.0, 10.0)])
def test_linspace_f32_is_torch_float32_linspace(start, end):
    for steps in range(1, 301):
        assert torch.equal(linspace_f32(start, end, steps), torch.linspace(start, end, steps)), steps
    for n in (5, 20):
        assert torch.equal(log_spaced_freqs(n), torch.exp(torch.linspace(-2, 10, n)))


def test_released_layout_is_renamed(released_state):
    assert len(released_state) == 54
    assert released_state["image_encoding.biases"].shape == (2, 5, 20)
    assert released_state["layers.1.attn.in_proj_weight"].shape == (1212, 404)
    assert released_state["head_proj.weight"].shape == (384, 404, 1, 1)
    assert state_dict_from_checkpoint(released_state) == released_state  # module layout passes through


@pytest.mark.parametrize("raw", [[1, 2], {"state_dict": {}}, {"weight": torch.zeros(1)}, {"a": 1}])
def test_wrong_layout_raises(raw):
    with pytest.raises(CheckpointError, match="LoftUp checkpoint"):
        state_dict_from_checkpoint(raw)


def test_renamed_key_raises_naming_it(released_state):
    state = dict(released_state)
    state["head_proj.weights"] = state.pop("head_proj.weight")
    with pytest.raises(CheckpointError, match=r"missing keys: head_proj\.weight.*unexpected keys: head_proj\.weights"):
        from_state_dict(state)


def test_wrong_shape_raises_naming_it(released_state):
    state = dict(released_state)
    state["layers.0.ff_in.weight"] = torch.zeros(383, 404)
    with pytest.raises(CheckpointError, match=r"wrong shapes: layers\.0\.ff_in\.weight"):
        from_state_dict(state)
    with pytest.raises(CheckpointError, match="lr_norm.weight"):
        from_state_dict({k: v for k, v in released_state.items() if k != "lr_norm.weight"})


def test_hyper_parameters_are_inferred():
    model = _small(color_feats=False, num_layers=1)
    loaded = from_state_dict(model.state_dict())
    assert (loaded.dim, loaded.color_feats, len(loaded.layers), loaded.image_encoding.n_freqs) == (8, False, 1, 6)
    assert from_state_dict(model.state_dict(), dtype=torch.float64).head_proj.weight.dtype == torch.float64
    lr_feats, image = _pair()
    with torch.no_grad():
        assert torch.equal(loaded(lr_feats, image), model(lr_feats, image))


def test_chunked_equals_unchunked():
    model = _small()
    lr_feats, image = _pair()
    with torch.no_grad():
        whole = model(lr_feats, image)
        for queries, band in ((5, 30), (7, 70), (1000, 1)):  # 1-row and 3-row bands, odd query chunks
            model.max_query_pixels, model.max_band_pixels = queries, band
            torch.testing.assert_close(model(lr_feats, image), whole, atol=1e-5, rtol=0)


def test_output_size_and_dtype():
    model = _small()
    lr_feats, image = _pair(b=1)
    with torch.no_grad():
        assert model(lr_feats, image).shape == (1, 8, 13, 11)
        assert model(lr_feats, image, (9, 17)).shape == (1, 8, 9, 17)
        assert model(lr_feats, image, 6).shape == (1, 8, 6, 6)
        out64 = LoftUp(8, n_freqs=6, dtype=torch.float64).eval()(lr_feats.double(), image.double())
    assert out64.dtype == torch.float64 and out64.shape == (1, 8, 13, 11)
    assert LoftUp.image_norm == IMAGENET_NORM


def test_bad_inputs_raise():
    model = _small()
    lr_feats, image = _pair(b=1)
    with pytest.raises(InputError):
        model(lr_feats[:, :5], image)  # wrong channel count
    with pytest.raises(InputError):
        model(lr_feats, image[:, :2])
    with pytest.raises(InputError):
        model(lr_feats, image, (0, 4))
    with pytest.raises(ConfigError):
        LoftUp(9, num_heads=4)  # 9 + 20 channels do not split into 4 heads


def test_registered_factory():
    model = build_upsampler("loftup", 8, num_stages=3, n_freqs=4)
    assert isinstance(model, LoftUp) and model.dim == 8 and model.image_encoding.n_freqs == 4


def test_published_table():
    assert set(PUBLISHED) == {"dinov2s", "dinov2s_reg", "dinov2b", "dinov2b_reg", "clip", "siglip", "siglip2"}
    for name, weights in PUBLISHED.items():
        assert weights.url == f"https://huggingface.co/haiwen/loftup-{name}/resolve/main/pytorch_model.bin"
        assert weights.file_name == "pytorch_model.bin" and weights.patch in (14, 16)
    assert (PUBLISHED["dinov2s"].backbone, PUBLISHED["dinov2s"].dim) == ("dinov2", 384)
    assert (PUBLISHED["clip"].backbone, PUBLISHED["clip"].dim) == ("clip", 512)
