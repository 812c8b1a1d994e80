"""The multi-view objective: finite terms, determinism under a generator, and that optimising it lowers it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from featup.downsamplers import AttentionDownsampler
from featup.errors import ConfigError
from featup.losses import ScaleNet
from featup.objective import MultiViewConfig, multiview_loss
from featup.upsamplers.jbu import JBUStack

CONFIG = MultiViewConfig(n_jitters=2, max_pad=4, max_zoom=1.5, projection_dim=4, crf_weight=0.001, tv_weight=0.01)


def _setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.nn.Conv2d(3, 6, 1)
    with torch.no_grad():
        teacher.weight.copy_(torch.randn(teacher.weight.shape, generator=g))
        teacher.bias.zero_()

    def featurize(image):  # a known per-pixel field, area-pooled by the stride 8
        return F.avg_pool2d(torch.tanh(teacher(image)), 8)

    upsampler = JBUStack(6, 3, backend="eager")
    upsampler.reset_parameters(g)
    downsampler = AttentionDownsampler(6, 8, (4, 4), generator=g)
    scale_net = ScaleNet(6, generator=g)
    image = torch.randn(2, 3, 32, 32, generator=g)
    return featurize, upsampler, downsampler, scale_net, image


def test_terms_are_finite_and_total_combines_them():
    featurize, upsampler, downsampler, scale_net, image = _setup()
    terms = multiview_loss(featurize, upsampler, downsampler, image, CONFIG, generator=torch.Generator().manual_seed(1), scale_net=scale_net)
    values = terms.as_floats()
    assert all(torch.isfinite(torch.tensor(v)) for v in values.values())
    assert values["crf"] != 0 and values["tv"] > 0
    expected = values["reconstruction"] + CONFIG.crf_weight * values["crf"] + CONFIG.tv_weight * values["tv"]
    assert values["total"] == pytest.approx(expected, rel=1e-5)


def test_same_generator_seed_gives_the_same_loss():
    featurize, upsampler, downsampler, scale_net, image = _setup()
    upsampler.eval(), downsampler.eval()
    a = multiview_loss(featurize, upsampler, downsampler, image, CONFIG, generator=torch.Generator().manual_seed(3), scale_net=scale_net)
    b = multiview_loss(featurize, upsampler, downsampler, image, CONFIG, generator=torch.Generator().manual_seed(3), scale_net=scale_net)
    c = multiview_loss(featurize, upsampler, downsampler, image, CONFIG, generator=torch.Generator().manual_seed(4), scale_net=scale_net)
    assert a.as_floats() == b.as_floats()
    assert a.as_floats() != c.as_floats()


def test_optimising_the_objective_lowers_it():
    featurize, upsampler, downsampler, scale_net, image = _setup()
    modules = [upsampler, downsampler, scale_net]
    params = [p for m in modules for p in m.parameters()]
    optimizer = torch.optim.NAdam(params, lr=1e-2)

    def evaluate() -> float:
        for m in modules:
            m.eval()
        with torch.no_grad():
            terms = multiview_loss(featurize, upsampler, downsampler, image, CONFIG, generator=torch.Generator().manual_seed(0), scale_net=scale_net)
        for m in modules:
            m.train()
        return float(terms.total)

    before = evaluate()
    for step in range(30):
        optimizer.zero_grad()
        terms = multiview_loss(featurize, upsampler, downsampler, image, CONFIG, generator=torch.Generator().manual_seed(100 + step), scale_net=scale_net)
        terms.total.backward()
        optimizer.step()
    assert evaluate() < before - 0.05


def test_config_is_validated():
    with pytest.raises(ConfigError, match="n_jitters: expected >= 1, got 0"):
        MultiViewConfig(n_jitters=0)
    with pytest.raises(ConfigError, match="projection_dim"):
        MultiViewConfig(projection_dim=0)
