"""The fast JBU stack against the plain transcription of the published math, and its algebraic shortcuts."""

from __future__ import annotations

import pytest
import torch

from featup.errors import ConfigError, InputError
from featup.upsamplers.jbu import JBUStack, row_bands, resolve_method
from featup.upsamplers.reference import random_jbu_stack, reference_stack


def _pair(b=1, c=8, h=5, w=7, scale=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g), torch.randn(b, 3, h * scale, w * scale, generator=g)


SHAPES = [(1, 6, 6), (2, 5, 7), (1, 3, 9)]


@pytest.mark.parametrize("method", ["composed", "upsample"])
# Every shape on the eager kernels; the compiled kernels on one (their sizes are dynamic: one compile serves all).
@pytest.mark.parametrize("backend,b,h,w", [("eager", *s) for s in SHAPES] + [("compiled", *SHAPES[1])])
def test_fast_stack_matches_published_math(backend, method, b, h, w):
    stack = random_jbu_stack(8)
    stack.backend, stack.method = backend, method
    with torch.inference_mode():  # as a job runs it (an inference tensor is its own compiled variant)
        lr_feats, image = _pair(b, 8, h, w)
        reference = reference_stack(stack, lr_feats, image)
        stages = stack.forward_stages(lr_feats, image)
        out = stack(lr_feats, image)
    for got, want in zip(stages, reference[:-1]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, reference[-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_stages", [1, 2, 3, 5])
def test_any_number_of_stages(num_stages):
    stack = random_jbu_stack(4, num_stages)
    lr_feats, image = _pair(1, 4, 3, 4, scale=2**num_stages)
    with torch.no_grad():
        out = stack(lr_feats, image)
        want = reference_stack(stack, lr_feats, image)[-1]
    assert out.shape == (1, 4, 3 * 2**num_stages, 4 * 2**num_stages)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["composed", "upsample"])
def test_banded_output_equals_unbanded(method):
    stack = random_jbu_stack(6, method=method)
    lr_feats, image = _pair(2, 6, 4, 5)
    with torch.no_grad():
        whole = stack(lr_feats, image)
        for band_pixels in (700, 1500, 333):  # bands of a few rows at the last stages
            stack.max_band_pixels = band_pixels
            torch.testing.assert_close(stack(lr_feats, image), whole, atol=1e-6, rtol=0)


@pytest.mark.parametrize("height,band_rows", [(64, 10), (64, 5), (14, 3), (8, 1), (6, 100), (128, 21)])
def test_bands_are_even_and_cover_every_row(height, band_rows):
    bands = row_bands(height, band_rows, radius=3)
    assert bands[0].start == 0 and bands[-1].stop == height
    assert all(a.stop == b.start for a, b in zip(bands[:-1], bands[1:]))
    assert all(band.start % 2 == 0 and band.stop - band.start >= 3 for band in bands)
    assert max(band.stop - band.start for band in bands) <= max(band_rows, 4) + 2


def test_composed_and_upsample_methods_agree_and_auto_is_composed_on_cpu():
    lr_feats, image = _pair(1, 8, 4, 6)
    stacks = {method: random_jbu_stack(8, method=method) for method in ("auto", "composed", "upsample")}
    with torch.no_grad():
        outs = {method: stack(lr_feats, image) for method, stack in stacks.items()}
    torch.testing.assert_close(outs["composed"], outs["upsample"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["auto"], outs["composed"], atol=0, rtol=0)
    assert resolve_method("auto", torch.device("cpu")) == "composed"
    assert resolve_method("auto", torch.device("meta")) == "upsample"


def test_projection_before_upsampling_equals_projection_after():
    stack = random_jbu_stack(8)
    lr_feats, image = _pair(1, 8, 4, 4)
    g = torch.Generator().manual_seed(5)
    projection, offset = torch.randn(3, 8, generator=g), torch.randn(3, generator=g)
    with torch.no_grad():
        full = stack(lr_feats, image)
        after = torch.einsum("kc,bchw->bkhw", projection, full) + offset.view(1, 3, 1, 1)
        before = stack(lr_feats, image, projection=projection, projection_bias=offset)
    assert before.shape == (1, 3, 64, 64)
    torch.testing.assert_close(before, after, atol=1e-5, rtol=1e-5)


def test_output_size_that_is_not_a_power_of_two_multiple_is_resized():
    stack = random_jbu_stack(4)
    lr_feats, image = _pair(1, 4, 14, 14, scale=16)
    with torch.no_grad():
        out = stack(lr_feats, image[:, :, :210, :210], output_size=(210, 200))
    assert out.shape == (1, 4, 210, 200)


def test_reduced_precision_is_close_to_float32():
    stack = random_jbu_stack(8)
    lr_feats, image = _pair(1, 8, 4, 6)
    with torch.no_grad():
        want = stack(lr_feats, image)
        for dtype, tol in [(torch.float16, 1e-2), (torch.bfloat16, 6e-2)]:
            got = stack(lr_feats.to(dtype), image.to(dtype))
            assert got.dtype == dtype
            torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


@pytest.mark.timeout(900)  # compiled: a cold inductor cache builds the forward and backward kernels (minutes on 2 cores)
@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize("method", ["composed", "upsample"])
def test_gradients_match_autograd_of_published_math(backend, method):
    stack = random_jbu_stack(4, 2, method=method).train()
    stack.backend = backend
    for module in stack.modules():  # dropout off: compare the deterministic math
        if isinstance(module, torch.nn.Dropout2d):
            module.p = 0.0
    lr_feats, image = _pair(2, 4, 3, 5, scale=4)  # a batch of 2: the training variant the kernel tests compile too
    lr_feats.requires_grad_(True)
    params = [lr_feats, *stack.parameters()]
    fast = torch.autograd.grad(stack(lr_feats, image).square().sum(), params)
    slow = torch.autograd.grad(reference_stack(stack, lr_feats, image)[-1].square().sum(), params)
    for got, want in zip(fast, slow):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_state_dict_uses_published_names_and_round_trips():
    stack = random_jbu_stack(8)
    keys = set(stack.state_dict())
    assert {"up1.range_temp", "up4.sigma_spatial", "up2.range_proj.3.weight", "up3.fixup_proj.0.weight", "fixup_proj.1.bias"} <= keys
    copy = JBUStack(8)
    copy.load_state_dict(stack.state_dict(), strict=True)
    lr_feats, image = _pair(1, 8, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(copy.eval()(lr_feats, image), stack(lr_feats, image))


def test_bad_inputs_are_named():
    stack = random_jbu_stack(8)
    lr_feats, image = _pair(1, 8, 3, 3)
    with pytest.raises(InputError, match="expected 8 channels .*got 5"):
        stack(lr_feats[:, :5], image)
    with pytest.raises(InputError, match="NaN/Inf"):
        stack(lr_feats.clone().index_fill_(3, torch.tensor([1]), float("nan")), image)
    with pytest.raises(InputError, match="NaN/Inf"):
        stack(lr_feats, image.clone().fill_(float("inf")))
    with pytest.raises(InputError, match=r"image: expected a \(B, 3, H, W\)"):
        stack(lr_feats, image[:, :2])
    with pytest.raises(InputError, match="batch size"):
        stack(lr_feats.expand(2, -1, -1, -1), image)
    with pytest.raises(ConfigError, match="num_stages: expected >= 1, got 0"):
        JBUStack(8, 0)
    with pytest.raises(ConfigError, match="JBU method: expected one of"):
        JBUStack(8, method="bicubic-magic")
    with pytest.raises(InputError, match="too small for radius 3"):
        stack.up1(lr_feats[:, :, :1, :1], image[:, :, :2, :2])
