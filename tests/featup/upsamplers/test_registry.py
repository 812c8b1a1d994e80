"""Contract tests run on every registered upsampler: shapes, batches, state dicts, reduced precision, image norm."""

from __future__ import annotations

import pytest
import torch

from featup.errors import ConfigError
from featup.upsamplers import UPSAMPLERS, ImageNorm, build_upsampler

NAMES = UPSAMPLERS.names()
DIM = 8  # NAF splits the channels over its 4 attention heads
# Square, non-square, odd output size. Low-res maps of at least 9 x 9: NAF's 9 x 9 neighbourhood (dilated by the
# output / low-res ratio) must fit inside the map, as in its published code.
SIZES = [(9, 9, 36, 36), (9, 11, 27, 37)]  # integer and non-integer ratios


def _build(name: str, dim: int = DIM) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_upsampler(name, dim, num_stages=3).eval()


def _inputs(batch: int, h: int, w: int, out_h: int, out_w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, DIM, h, w, generator=g), torch.randn(batch, 3, out_h, out_w, generator=g)


def test_registry_lists_the_baselines_and_the_successors():
    assert {"jbu", "bilinear", "anyup", "jafar", "loftup", "naf", "uplift"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_declares_the_image_normalisation_its_forward_expects(name):
    assert isinstance(type(_build(name)).image_norm, ImageNorm)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("h,w,out_h,out_w", SIZES)
@pytest.mark.parametrize("batch", [1, 2])
def test_output_shape(name, h, w, out_h, out_w, batch):
    upsampler = _build(name)
    lr_feats, image = _inputs(batch, h, w, out_h, out_w)
    with torch.inference_mode():
        out = upsampler(lr_feats, image, output_size=(out_h, out_w))
    assert out.shape == (batch, DIM, out_h, out_w)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_explicit_output_size_other_than_the_image(name):
    upsampler = _build(name)
    lr_feats, image = _inputs(1, 9, 9, 36, 36)
    with torch.inference_mode():
        out = upsampler(lr_feats, image, output_size=(27, 45))
    assert out.shape == (1, DIM, 27, 45)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    upsampler, copy = _build(name), build_upsampler(name, DIM, num_stages=3).eval()
    copy.load_state_dict(upsampler.state_dict(), strict=True)
    lr_feats, image = _inputs(2, 9, 10, 18, 20)
    with torch.inference_mode():
        torch.testing.assert_close(copy(lr_feats, image, output_size=(18, 20)), upsampler(lr_feats, image, output_size=(18, 20)))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_path(name, dtype):
    upsampler = _build(name)
    lr_feats, image = (x.to(dtype) for x in _inputs(1, 9, 10, 18, 20))
    with torch.inference_mode():  # against float32 on the same (rounded) inputs: the path's precision, not the inputs'
        want = upsampler(lr_feats.float(), image.float(), output_size=(18, 20))
        got = upsampler(lr_feats, image, output_size=(18, 20))
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)


def test_unknown_upsampler_lists_known_ones():
    with pytest.raises(ConfigError, match="unknown upsampler 'bicubic'; expected one of anyup, bilinear, jafar, jbu"):
        build_upsampler("bicubic", 6)
