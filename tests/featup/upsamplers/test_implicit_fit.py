"""Fitting the implicit upsampler to one image: published defaults, validation, shapes, determinism, and quality."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from featup.errors import ConfigError
from featup.implicit_objective import ImplicitLossWeights, implicit_views_loss
from featup.jitter import sample_jitter
from featup.upsamplers.implicit_fit import ImplicitFitConfig, fit_implicit, time_fit

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py


TINY = ImplicitFitConfig(steps=4, n_views=6, views_per_step=3, pca_dim=4, pca_views=4, max_pad=4, n_freqs=6, hidden_dim=16)


def _teacher(channels: int = 8, stride: int = 8, seed: int = 0):
    """(per-pixel features, featurize): a smooth function of colour, area-pooled by ``stride`` (known ground truth)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(channels, 3, generator=g) * 2
    bias = torch.randn(channels, generator=g) * 0.5

    def per_pixel(x):
        return torch.tanh(torch.einsum("kc,bchw->bkhw", weight, x) + bias.view(1, -1, 1, 1))  # (B, K, H, W)

    return per_pixel, lambda x: F.avg_pool2d(per_pixel(x), stride)


def _regions_image(size: int = 32, seed: int = 1) -> torch.Tensor:
    """Piecewise-constant colour regions with sharp edges and a striped texture: (1, 3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    image = (torch.rand(3, 1, 1, generator=g) * 2 - 1).expand(3, size, size).clone()
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for _ in range(4):
        colour = torch.rand(3, 1, generator=g) * 2 - 1
        cy, cx, r = (torch.rand(3, generator=g) * torch.tensor([size, size, size / 3])).tolist()
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < (r + 3) ** 2
        image[:, mask] = colour.expand(3, int(mask.sum()))
    stripes = ((xx // 3) % 2 == 0) & (yy > size * 0.7)
    image[:, stripes] *= 0.3
    return image.unsqueeze(0)


def test_defaults_are_the_published_ones():
    c = ImplicitFitConfig()
    assert (c.steps, c.n_views, c.views_per_step, c.pca_dim, c.pca_views) == (1200, 3000, 10, 128, 50)
    assert (c.lr, c.max_pad, c.max_zoom, c.use_flips, c.n_freqs, c.hidden_dim) == (2e-3, 30, 1.8, True, 30, 128)
    assert (c.color_feats, c.dropout, c.downsampler, c.blur_attn, c.scale_net) == (True, 0.2, "attention", True, True)
    assert (c.magnitude_weight, c.magnitude_tv_weight, c.blur_pin_weight) == (0.001, 0.05, 0.1)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(steps=0), "implicit steps: expected a positive integer, got 0"),
        (dict(n_views=2.5), "implicit n_views: expected a positive integer, got 2.5"),
        (dict(pca_dim=0), "implicit pca_dim: expected None or a positive integer, got 0"),
        (dict(lr=0.0), "implicit lr: expected a number > 0, got 0.0"),
        (dict(max_zoom=0.5), "implicit max_zoom: expected a number >= 1, got 0.5"),
        (dict(dropout=1.0), "implicit dropout: expected a number in [0, 1), got 1.0"),
        (dict(downsampler="max"), "implicit downsampler: expected one of attention, blur, simple, got 'max'"),
        (dict(blur_pin_weight=-1), "implicit blur_pin_weight: expected a number >= 0, got -1"),
        (dict(use_flips="yes"), "implicit use_flips: expected True or False, got 'yes'"),
    ],
)
def test_bad_settings_are_refused_with_the_setting_named(changes, message):
    with pytest.raises(ConfigError) as info:
        ImplicitFitConfig(**changes)
    assert str(info.value) == message


def test_features_come_back_in_the_backbone_channels_at_the_image_or_output_size():
    _, featurize = _teacher(channels=8)
    image = _regions_image(32)
    hr = fit_implicit(featurize, image, TINY, generator=torch.Generator().manual_seed(0))
    assert hr.shape == (1, 8, 32, 32) and hr.dtype == torch.float32 and torch.isfinite(hr).all()
    wide = fit_implicit(featurize, image, TINY, generator=torch.Generator().manual_seed(0), output_size=(16, 48))
    assert wide.shape == (1, 8, 16, 48)


def test_same_seed_same_result_other_seed_other_result_and_global_rng_untouched():
    _, featurize = _teacher()
    image = _regions_image(32)
    state = torch.get_rng_state()
    a = fit_implicit(featurize, image, TINY, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)  # dropout draws from a forked, seeded global generator
    b = fit_implicit(featurize, image, TINY, generator=torch.Generator().manual_seed(3))
    c = fit_implicit(featurize, image, TINY, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_fits_inside_inference_mode_as_a_precompute_worker_calls_it():
    _, featurize = _teacher()
    with torch.inference_mode():
        image = _regions_image(32).clone()  # an inference tensor
        hr = fit_implicit(featurize, image, TINY, generator=torch.Generator().manual_seed(0))
    outside = fit_implicit(featurize, _regions_image(32), TINY, generator=torch.Generator().manual_seed(0))
    assert torch.equal(hr, outside)


def test_progress_is_reported_after_every_step():
    _, featurize = _teacher()
    calls = []
    fit_implicit(featurize, _regions_image(32), TINY, generator=torch.Generator().manual_seed(0), progress=lambda s, n: calls.append((s, n)))
    assert calls == [(s, TINY.steps) for s in range(1, TINY.steps + 1)]


def test_an_image_too_small_for_the_jitter_padding_is_refused():
    _, featurize = _teacher()
    with pytest.raises(ConfigError, match="max_pad: expected less than the size 16x16"):
        fit_implicit(featurize, _regions_image(16), ImplicitFitConfig(n_views=4, pca_views=4), generator=torch.Generator())


def test_fitting_beats_bilinear_against_the_true_high_res_features():
    per_pixel, featurize = _teacher(channels=8, stride=8)
    image = _regions_image(32)
    truth = per_pixel(image)  # (1, 8, 32, 32)
    bilinear = F.interpolate(featurize(image), size=(32, 32), mode="bilinear", align_corners=False)
    config = ImplicitFitConfig(steps=60, n_views=32, pca_views=32, max_pad=4)
    fitted = fit_implicit(featurize, image, config, generator=torch.Generator().manual_seed(0))

    def rel_err(x):
        return float((x - truth).norm() / truth.norm())

    assert rel_err(fitted) < 0.6 * rel_err(bilinear)


def test_time_fit_measures_views_and_steps():
    _, featurize = _teacher()
    timing = time_fit(featurize, _regions_image(32), TINY, generator=torch.Generator().manual_seed(0), measure_steps=2)
    assert timing.view_s > 0 and timing.step_s > 0 and timing.device == "cpu"
    assert timing.per_image_s == pytest.approx(TINY.n_views * timing.view_s + TINY.steps * timing.step_s)


def test_loss_terms_combine_with_their_weights_and_zero_weights_drop_terms():
    g = torch.Generator().manual_seed(0)
    from featup.downsamplers import AttentionDownsampler

    hr = torch.randn(1, 4, 32, 32, generator=g, requires_grad=True)
    views = [sample_jitter(32, 32, max_pad=4, max_zoom=1.5, generator=g) for _ in range(3)]
    targets = torch.randn(3, 4, 4, 4, generator=g)
    down = AttentionDownsampler(5, 8, (4, 4), generator=g).eval()
    weights = ImplicitLossWeights(magnitude=0.5, magnitude_tv=0.25, blur_pin=2.0)
    terms = implicit_views_loss(hr, targets, views, down, max_pad=4, weights=weights).as_floats()
    assert all(v > 0 for v in terms.values())
    expected = terms["reconstruction"] + 0.5 * terms["magnitude"] + 0.25 * terms["magnitude_tv"] + 2.0 * terms["blur_pin"]
    assert terms["total"] == pytest.approx(expected, rel=1e-5)
    none = implicit_views_loss(hr, targets, views, down, max_pad=4, weights=ImplicitLossWeights(0, 0, 0)).as_floats()
    assert none["total"] == pytest.approx(none["reconstruction"]) and none["magnitude"] == none["blur_pin"] == 0
    with pytest.raises(ConfigError, match="magnitude weight: expected a number >= 0, got -1"):
        ImplicitLossWeights(magnitude=-1)
