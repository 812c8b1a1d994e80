"""Tests for featup/downsamplers.py: shapes, reference poolings, non-square sizes, registry, gradients."""

import pytest
import torch
import torch.nn.functional as F

from featup.downsamplers import (
    DOWNSAMPLERS,
    AttentionDownsampler,
    BlurDownsampler,
    build_downsampler,
    gaussian_blur2d,
    window_stride,
)
from featup.errors import ConfigError, InputError


def _feats(b=2, c=5, h=16, w=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g, dtype=dtype)


def _zero_attention(down: AttentionDownsampler) -> None:
    with torch.no_grad():
        down.attention_net[1].weight.zero_()
        down.attention_net[1].bias.zero_()
        down.w.zero_()
        down.b.zero_()


def test_blur_uniform_kernel_equals_average_pooling_on_exact_stride():
    x = _feats(h=16, w=16)
    down = BlurDownsampler(4, 4)  # stride (16 - 4) // 3 = 4 = kernel size
    torch.testing.assert_close(down(x, None), F.avg_pool2d(x, 4))


def test_blur_non_square_final_size_matches_average_pooling():
    x = _feats(h=16, w=24)
    down = BlurDownsampler(4, (4, 6))
    out = down(x, None)
    assert out.shape == (2, 5, 4, 6)
    torch.testing.assert_close(out, F.avg_pool2d(x, 4))


def test_blur_kernel_is_abs_normalised_and_matches_strided_conv():
    x = _feats(b=1, c=3, h=14, w=20)
    down = BlurDownsampler(5, (4, 6))
    with torch.no_grad():
        down.kernel_params.copy_(torch.randn(5, 5, generator=torch.Generator().manual_seed(1)))
    kernel = down.get_kernel()
    assert (kernel >= 0).all()
    torch.testing.assert_close(kernel.sum(), torch.tensor(1.0))
    ref = F.conv2d(x.reshape(3, 1, 14, 20), kernel.view(1, 1, 5, 5), stride=(3, 3)).reshape(1, 3, 4, 6)
    torch.testing.assert_close(down(x), ref)


def test_window_stride_follows_published_formula_and_rejects_too_small_inputs():
    assert window_stride(224, 16, 14, "height") == 16
    assert window_stride(224, 29, 14, "height") == 15
    assert window_stride(224, 29, 16, "height") == 13
    with pytest.raises(InputError):
        window_stride(10, 12, 2, "height")
    with pytest.raises(InputError):
        window_stride(12, 10, 4, "width")  # only 3 one-pixel steps for 4 windows


def test_blur_crops_extra_windows_when_stride_does_not_divide():
    x = _feats(b=1, c=2, h=9, w=9)
    out = BlurDownsampler(4, 4)(x)  # stride (9-4)//3 = 1 would give 6 windows; keep the first 4
    assert out.shape == (1, 2, 4, 4)
    torch.testing.assert_close(out, F.avg_pool2d(x, 4, stride=1)[:, :, :4, :4])


def test_attention_zero_logits_equals_patch_average():
    x = _feats(c=5, h=16, w=16)
    down = AttentionDownsampler(5, 4, 4).eval()
    _zero_attention(down)
    torch.testing.assert_close(down(x, None), F.avg_pool2d(x, 4))


def test_attention_non_square_zero_logits_equals_patch_average():
    x = _feats(c=3, h=12, w=20)
    down = AttentionDownsampler(3, 4, (3, 5)).eval()
    _zero_attention(down)
    out = down(x, None)
    assert out.shape == (2, 3, 3, 5)
    torch.testing.assert_close(out, F.avg_pool2d(x, 4))


def test_attention_matches_per_window_softmax_reference():
    x = _feats(b=1, c=4, h=8, w=12)
    down = AttentionDownsampler(4, 4, (2, 3), generator=torch.Generator().manual_seed(3)).eval()
    out = down(x)
    lin = down.attention_net[1]
    for i in range(2):
        for j in range(3):
            win = x[0, :, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4].reshape(4, 16)  # (C, P) row-major
            logits = win.T @ lin.weight[0] + lin.bias
            attn = torch.softmax(logits * down.w.reshape(-1) + down.b.reshape(-1), dim=0)
            torch.testing.assert_close(out[0, :, i, j], win @ attn)


def test_attention_blur_attn_pools_blurred_features():
    x = _feats(c=3, h=16, w=16)
    down = AttentionDownsampler(3, 4, 4, blur_attn=True).eval()
    _zero_attention(down)
    torch.testing.assert_close(down(x), F.avg_pool2d(gaussian_blur2d(x), 4))


def test_gaussian_blur_keeps_constants_and_sums_to_one():
    x = torch.full((1, 2, 7, 9), 3.0)
    torch.testing.assert_close(gaussian_blur2d(x), x)
    delta = torch.zeros(1, 1, 11, 11)
    delta[0, 0, 5, 5] = 1.0
    blurred = gaussian_blur2d(delta)
    torch.testing.assert_close(blurred.sum(), torch.tensor(1.0))
    torch.testing.assert_close(blurred, blurred.flip(2).flip(3))


def test_attention_training_dropout_is_reproducible_from_generator():
    x = _feats(c=3, h=16, w=16)
    down = AttentionDownsampler(3, 4, 4, dropout=0.0).train()
    a = down(x, generator=torch.Generator().manual_seed(5))
    b = down(x, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)
    down.eval()
    torch.testing.assert_close(down(x), down(x))


def test_gradients_reach_parameters_and_input():
    for down in (BlurDownsampler(4, 4), AttentionDownsampler(5, 4, 4, blur_attn=True)):
        x = _feats().requires_grad_()
        down(x, None).square().sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        for name, p in down.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_float64_and_state_dict_keys():
    x = _feats(dtype=torch.float64)
    blur = BlurDownsampler(4, 4, dtype=torch.float64)
    attn = AttentionDownsampler(5, 4, 4, dtype=torch.float64)
    assert blur(x).dtype == attn(x).dtype == torch.float64
    assert set(blur.state_dict()) == {"kernel_params"}
    assert set(attn.state_dict()) == {"attention_net.1.weight", "attention_net.1.bias", "w", "b"}


def test_generator_init_is_reproducible():
    a = AttentionDownsampler(5, 4, 4, generator=torch.Generator().manual_seed(0))
    b = AttentionDownsampler(5, 4, 4, generator=torch.Generator().manual_seed(0))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(va, vb)


def test_registry_and_build():
    assert {"simple", "blur", "attention"} <= set(DOWNSAMPLERS.names())
    assert isinstance(build_downsampler("simple", 7, 4, 4), BlurDownsampler)
    assert isinstance(build_downsampler("blur", 7, 4, (4, 5)), BlurDownsampler)
    attn = build_downsampler("attention", 7, 4, 4, blur_attn=True)
    assert isinstance(attn, AttentionDownsampler) and attn.blur_attn and attn.in_dim == 7
    with pytest.raises(ConfigError):
        build_downsampler("nope", 7, 4, 4)


def test_invalid_config_and_inputs_raise():
    with pytest.raises(ConfigError):
        BlurDownsampler(4, (4, 0))
    with pytest.raises(ConfigError):
        BlurDownsampler(0, 4)
    with pytest.raises(InputError):
        AttentionDownsampler(5, 4, 4)(_feats(c=6))
    with pytest.raises(InputError):
        BlurDownsampler(4, 4)(torch.zeros(5, 16, 16))
