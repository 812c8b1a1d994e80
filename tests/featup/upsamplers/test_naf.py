"""NAF against the published code's outputs, its plain-PyTorch neighbourhood attention against a direct
transcription of NATTEN's rule, strict checkpoint loading, chunking and the input rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from featup.errors import CheckpointError, ConfigError, InputError
from featup.upsamplers.base import IMAGENET_NORM, UPSAMPLERS
from featup.upsamplers.naf import (
    NAF,
    PUBLISHED,
    from_state_dict,
    guidance_size,
    natten_neighbours,
    neighbourhood_attention,
    state_dict_from_checkpoint,
)
from tests.conftest import shared_fixture_dir

FIXTURES = shared_fixture_dir("naf")
CASES = sorted(path.name.removesuffix(".io.pt") for path in FIXTURES.glob("*.io.pt"))


@pytest.fixture(scope="module")
def released_layout() -> dict:
    return torch.load(FIXTURES / "weights.pth", weights_only=True)


@pytest.fixture(scope="module")
def model(released_layout) -> NAF:
    return from_state_dict(state_dict_from_checkpoint(released_layout)).eval()


def _random_pair(b=1, c=8, h=9, w=11, size=(40, 52), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lr_feats = torch.randn(b, c, h, w, generator=g, dtype=dtype)
    return lr_feats, torch.randn(b, 3, *size, generator=g, dtype=dtype)


def test_fixture_cases_exist():
    assert len(CASES) >= 4


@pytest.mark.parametrize("case", CASES)
def test_matches_published_outputs(case, model, one_torch_thread):
    io = torch.load(FIXTURES / f"{case}.io.pt", weights_only=True)
    with torch.no_grad():
        out = model(io["lr_feats"], io["image"], tuple(io["output_size"].tolist()))
    assert out.shape == io["output"].shape and out.dtype == torch.float32
    assert (out - io["output"]).abs().max().item() <= 1e-4


def test_guidance_downscaling_rule():
    io = torch.load(FIXTURES / "c16_9x11_to_40x52.io.pt", weights_only=True)
    size = guidance_size(tuple(io["image"].shape[2:]), tuple(io["output_size"].tolist()))
    assert size == (160, 160)  # both output sides bound both image sides
    resized = F.interpolate(io["image"], size=size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(resized, io["encoder_input"], atol=1e-6, rtol=0)
    assert guidance_size((224, 224), (56, 56)) == (224, 224)


@pytest.mark.parametrize("length,dilation", [(40, 4), (52, 4), (23, 2), (20, 1), (56, 4), (9, 1), (27, 3)])
def test_neighbours_follow_natten_border_rule(length, dilation):
    """The fixture README's formula: s = max(ip - 4, 0) + [ip + 4 >= Lg] (Lg - ip - 5)."""
    got = natten_neighbours(length, 9, dilation)
    for i in range(length):
        g, ip = i % dilation, i // dilation
        group_len = -(-(length - g) // dilation)
        start = max(ip - 4, 0) + (group_len - ip - 5 if ip + 4 >= group_len else 0)
        assert got[i].tolist() == [(start + t) * dilation + g for t in range(9)]


def _reference_attention(q, k, v, heads, kernel):
    """The published path, literally: nearest-exact upsampled keys/values, 81 gathered neighbours, softmax."""
    (b, _, height, width), (h, w) = q.shape, k.shape[2:]
    rows = natten_neighbours(height, kernel, height // h)[:, :, None, None]  # (H, k, 1, 1)
    cols = natten_neighbours(width, kernel, width // w)[None, None]  # (1, 1, W, k)
    k_up = F.interpolate(k, size=(height, width), mode="nearest-exact")[:, :, rows, cols]  # (B, Dq, H, k, W, k)
    v_up = F.interpolate(v, size=(height, width), mode="nearest-exact")[:, :, rows, cols]
    k_up = k_up.unflatten(1, (heads, -1)).permute(0, 1, 3, 5, 4, 6, 2).flatten(4, 5)  # (B, n, H, W, k*k, D)
    v_up = v_up.unflatten(1, (heads, -1)).permute(0, 1, 3, 5, 4, 6, 2).flatten(4, 5)
    q = q.unflatten(1, (heads, -1)).permute(0, 1, 3, 4, 2)  # (B, n, H, W, D)
    logits = torch.einsum("bnhwd,bnhwkd->bnhwk", q, k_up) * q.shape[-1] ** -0.5
    out = torch.einsum("bnhwk,bnhwkd->bnhwd", logits.softmax(-1), v_up)  # (B, n, H, W, Dv)
    return out.permute(0, 1, 4, 2, 3).reshape(b, -1, height, width)


@pytest.mark.parametrize("low,out", [((9, 11), (40, 52)), ((10, 12), (23, 20)), ((9, 9), (9, 27)), ((9, 9), (45, 27))])
def test_tiled_attention_matches_gathered_reference(low, out, one_torch_thread):
    g = torch.Generator().manual_seed(1)
    q = 3 * torch.randn(2, 16, *out, generator=g, dtype=torch.float64)
    k = 3 * torch.randn(2, 16, *low, generator=g, dtype=torch.float64)
    v = torch.randn(2, 8, *low, generator=g, dtype=torch.float64)
    want = _reference_attention(q, k, v, heads=4, kernel=9)
    for pixels in (1, 300, 10**9):
        got = neighbourhood_attention(q, k, v, 4, 9, max_query_pixels=pixels)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_chunked_output_equals_unchunked(one_torch_thread):
    model = UPSAMPLERS.get("naf")(8).eval()
    lr_feats, image = _random_pair(b=2)
    with torch.no_grad():
        whole = model(lr_feats, image)
        for pixels in (1, 500):
            model.max_query_pixels = pixels
            assert (model(lr_feats, image) - whole).abs().max().item() <= 1e-5


def test_output_size_and_dtype_rules(one_torch_thread):
    model = NAF(dtype=torch.float64).eval()
    lr_feats, image = _random_pair(c=12, dtype=torch.float64)
    with torch.no_grad():
        assert model(lr_feats, image).shape == (1, 12, 40, 52)  # default: the image size
        assert model(lr_feats, image, 36).shape == (1, 12, 36, 36)
        out = model(lr_feats.float(), image, (27, 33))
    assert out.shape == (1, 12, 27, 33) and out.dtype == torch.float32  # the features' dtype
    assert NAF.image_norm == IMAGENET_NORM


def test_float64_model_matches_float32(model, one_torch_thread):
    lr_feats, image = _random_pair(seed=3)
    double = from_state_dict({k: v.double() for k, v in model.state_dict().items()}, dtype=torch.float64).eval()
    with torch.no_grad():
        torch.testing.assert_close(double(lr_feats.double(), image.double()).float(), model(lr_feats, image), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "lr_shape,image_shape,size",
    [
        ((1, 6, 9, 11), (1, 3, 40, 52), None),  # channels not divisible by the 4 heads
        ((1, 8, 8, 8), (1, 3, 56, 56), None),  # 9 * (56 // 8) > 56, NATTEN refuses it too
        ((1, 8, 9, 11), (1, 3, 40, 52), (8, 52)),  # output smaller than the low-res map
        ((2, 8, 9, 11), (1, 3, 40, 52), None),  # batch mismatch
        ((1, 8, 9, 11), (1, 1, 40, 52), None),  # not RGB
    ],
)
def test_bad_inputs_raise_input_error(lr_shape, image_shape, size):
    with pytest.raises(InputError):
        NAF()(torch.randn(lr_shape), torch.randn(image_shape), size)


def test_renamed_key_raises_checkpoint_error(released_layout):
    state = dict(released_layout)
    state["image_encoder.encoder.1.norm1.gain"] = state.pop("image_encoder.encoder.1.norm1.weight")
    with pytest.raises(CheckpointError, match=r"image_encoder\.encoder\.1\.norm1\.weight"):
        from_state_dict(state)


def test_wrong_shape_raises_checkpoint_error(released_layout):
    state = dict(released_layout)
    state["image_encoder.sem_encoder.2.conv1.weight"] = torch.zeros(128, 128, 1, 1)
    with pytest.raises(CheckpointError, match=r"image_encoder\.sem_encoder\.2\.conv1\.weight"):
        from_state_dict(state)


@pytest.mark.parametrize("raw", [[1, 2], {"model": {}}, {"image_encoder.rope.periods": [1.0]}])
def test_unexpected_layout_raises_checkpoint_error(raw):
    with pytest.raises(CheckpointError, match="expected"):
        state_dict_from_checkpoint(raw)


def test_hyper_parameters_are_read_from_the_checkpoint(released_layout):
    model = from_state_dict(released_layout)
    assert model.image_encoder.rope.periods.tolist() == released_layout["image_encoder.rope.periods"].tolist()
    small = NAF(dim=64, heads_rope=2, img_layers=1)
    rebuilt = from_state_dict(small.state_dict())
    assert rebuilt.image_encoder.encoder[0].out_channels == 32 and len(rebuilt.image_encoder.encoder) == 2
    assert rebuilt.image_encoder.rope.num_heads == 2


def test_registry_and_published_table():
    assert isinstance(UPSAMPLERS.get("naf")(384, num_stages=2), NAF)
    with pytest.raises(ConfigError):
        UPSAMPLERS.get("naf")(6)
    entry = PUBLISHED["default"]
    assert entry.url.endswith("/naf_release.pth") and entry.file_name == "naf_release.pth"
    assert entry.backbone is None and entry.dim is None and entry.patch is None
