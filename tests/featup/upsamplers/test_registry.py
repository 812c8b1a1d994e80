"""Contract tests run on every registered upsampler: shapes, batches, state dicts, reduced precision."""

from __future__ import annotations

import pytest
import torch

from featup.errors import ConfigError
from featup.upsamplers import UPSAMPLERS, build_upsampler

NAMES = UPSAMPLERS.names()
SIZES = [(4, 4, 64, 64), (3, 5, 48, 80), (3, 5, 45, 77)]  # square, non-square, odd output size


def _build(name: str, dim: int = 6) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_upsampler(name, dim, num_stages=4).eval()


def test_registry_lists_the_baselines():
    assert {"jbu", "bilinear"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("h,w,out_h,out_w", SIZES)
@pytest.mark.parametrize("batch", [1, 3])
def test_output_shape(name, h, w, out_h, out_w, batch):
    upsampler = _build(name)
    lr_feats, image = torch.randn(batch, 6, h, w), torch.randn(batch, 3, out_h, out_w)
    with torch.inference_mode():
        out = upsampler(lr_feats, image)
    assert out.shape == (batch, 6, out_h, out_w)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_explicit_output_size(name):
    upsampler = _build(name)
    with torch.inference_mode():
        out = upsampler(torch.randn(1, 6, 4, 4), torch.randn(1, 3, 64, 64), output_size=(32, 40))
    assert out.shape == (1, 6, 32, 40)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    upsampler, copy = _build(name), build_upsampler(name, 6).eval()
    copy.load_state_dict(upsampler.state_dict(), strict=True)
    lr_feats, image = torch.randn(2, 6, 3, 4), torch.randn(2, 3, 48, 64)
    with torch.inference_mode():
        torch.testing.assert_close(copy(lr_feats, image), upsampler(lr_feats, image))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_path(name, dtype):
    upsampler = _build(name)
    lr_feats, image = torch.randn(1, 6, 3, 4), torch.randn(1, 3, 48, 64)
    with torch.inference_mode():
        want = upsampler(lr_feats, image)
        got = upsampler(lr_feats.to(dtype), image.to(dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)


def test_unknown_upsampler_lists_known_ones():
    with pytest.raises(ConfigError, match="unknown upsampler 'bicubic'; expected one of bilinear, jbu"):
        build_upsampler("bicubic", 6)
