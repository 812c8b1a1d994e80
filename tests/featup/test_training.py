"""JBU training parts: sizes for any stride, official checkpoint layout, clipping of the first steps, one step lowers the objective."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from featup.checkpoint import load_featup_checkpoint, split_state_dict
from featup.errors import CheckpointError, ConfigError
from featup.objective import MultiViewConfig
from featup.training import (
    JBUTrainingModel,
    TrainingSettings,
    evaluate_objective,
    make_optimizer,
    num_stages_for,
    training_step,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py


SMALL = TrainingSettings(objective=MultiViewConfig(n_jitters=2, max_pad=4, max_zoom=1.5, projection_dim=4))


def _featurizer(stride: int, dim: int = 6, seed: int = 0):
    """A frozen stride-``stride`` backbone: a fixed per-pixel field, area-pooled."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(dim, 3, 1, 1, generator=g)

    def featurize(image: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(torch.tanh(F.conv2d(image, weight)), stride)  # (B, dim, H/s, W/s)

    return featurize


def _model(stride: int = 8, size: int = 32, settings: TrainingSettings = SMALL, seed: int = 0) -> JBUTrainingModel:
    return JBUTrainingModel(6, stride, size, settings, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("lowres", "output", "stages"), [(14, 224, 4), (16, 224, 4), (28, 224, 3), (7, 224, 5), (4, 32, 3)])
def test_stages_follow_from_stride_and_size(lowres, output, stages):
    assert num_stages_for(lowres, output) == stages


@pytest.mark.parametrize(("stride", "size"), [(14, 56), (8, 32), (16, 64)])
def test_a_step_runs_for_stride_14_8_and_16_and_updates_every_trainable_part(stride, size):
    model = _model(stride, size)
    assert model.num_stages == num_stages_for(size // stride, size)
    before = {k: v.clone() for k, v in model.official_state_dict().items()}
    optimizer = make_optimizer(model, SMALL)
    image = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    terms = training_step(model, optimizer, _featurizer(stride), image, SMALL, step=50, generator=torch.Generator().manual_seed(2))
    assert set(terms) == {"total", "reconstruction", "crf", "tv"}
    assert all(torch.isfinite(torch.tensor(v)) for v in terms.values())
    after = model.official_state_dict()
    changed = {k.split(".")[0] for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"upsampler", "downsampler", "scale_net"}  # the channel norm (model.1) is frozen


def test_optimizer_is_nadam_over_trainable_parts_only():
    model = _model()
    optimizer = make_optimizer(model, SMALL)
    assert isinstance(optimizer, torch.optim.NAdam) and optimizer.defaults["lr"] == SMALL.lr
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for name, p in model.named_parameters() if not name.startswith("norm.")}


def _sgd_update_norm(step: int) -> float:
    """Size of one plain-SGD (lr 1) update, i.e. of the gradient after training_step's clipping."""
    model = _model()
    before = torch.cat([p.detach().flatten().clone() for p in model.trainable_parameters()])
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=1.0)
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    training_step(model, optimizer, _featurizer(8), image, SMALL, step=step, generator=torch.Generator().manual_seed(2))
    after = torch.cat([p.detach().flatten() for p in model.trainable_parameters()])
    return float((after - before).norm())


def test_gradient_norm_is_clipped_for_the_first_steps_only():
    assert SMALL.clip_steps == 10 and SMALL.clip_norm == 1e-4  # the published values
    assert _sgd_update_norm(0) == pytest.approx(1e-4, rel=1e-3)
    assert _sgd_update_norm(9) == pytest.approx(1e-4, rel=1e-3)
    assert _sgd_update_norm(10) > 1e-2


def test_training_steps_lower_the_objective_on_fixed_held_out_views():
    settings = TrainingSettings(objective=SMALL.objective, lr=1e-2, clip_steps=0)
    model, featurize = _model(settings=settings), _featurizer(8)
    held_out = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(99))
    before = evaluate_objective(model, featurize, held_out, seed=7)
    assert evaluate_objective(model, featurize, held_out, seed=7) == before  # fixed views: repeatable
    optimizer, g = make_optimizer(model, settings), torch.Generator().manual_seed(3)
    for step in range(25):
        image = torch.randn(2, 3, 32, 32, generator=g)
        training_step(model, optimizer, featurize, image, settings, step=step, generator=g)
    after = evaluate_objective(model, featurize, held_out, seed=7)
    assert after["total"] < before["total"] - 0.05


def test_official_layout_loads_in_load_featup_checkpoint_and_upsamples_like_the_model(tmp_path):
    model = _model(stride=8, size=32)
    state = model.official_state_dict()
    parts = split_state_dict(state)
    assert parts["upsampler"] and parts["norm"] and not parts["backbone"]
    assert sorted({k.split(".")[0] for k in parts["skipped"]}) == ["downsampler", "scale_net"]
    path = tmp_path / "jbu.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"backbone": "x"}, "featup_training": {"step": 1}}, path)
    loaded = load_featup_checkpoint(str(path), backend="eager")
    assert loaded.upsampler.num_stages == model.num_stages and loaded.hyper_parameters == {"backbone": "x"}
    lr = torch.randn(1, 6, 4, 4, generator=torch.Generator().manual_seed(5))
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    model.eval()
    with torch.no_grad():
        expected = model.upsampler(model.normalize(lr), image)
        torch.testing.assert_close(loaded(lr, image), expected, rtol=1e-5, atol=1e-6)


def test_official_state_dict_round_trips_strictly():
    source, target = _model(seed=1), _model(seed=2)
    target.load_official_state_dict(source.official_state_dict())
    for key, value in source.official_state_dict().items():
        torch.testing.assert_close(target.official_state_dict()[key], value, rtol=0, atol=0)
    state = source.official_state_dict()
    with pytest.raises(CheckpointError, match="other.weight"):
        target.load_official_state_dict({**state, "other.weight": torch.zeros(1)})
    state.pop("scale_net.net.bias")
    with pytest.raises(CheckpointError, match="scale_net"):
        target.load_official_state_dict(state)


def test_without_uncertainty_or_norm_the_layout_has_neither():
    settings = TrainingSettings(objective=SMALL.objective, predicted_uncertainty=False, channel_norm=False, downsampler="simple")
    keys = _model(settings=settings).official_state_dict()
    assert not any(k.startswith(("scale_net.", "model.1.")) for k in keys)
    assert "downsampler.kernel_params" in keys
    buf = io.BytesIO()
    torch.save(keys, buf)
    assert torch.load(io.BytesIO(buf.getvalue()), weights_only=True).keys() == keys.keys()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0.0}, "--lr: expected a positive learning rate, got 0.0"),
        ({"clip_steps": -1}, "--clip-steps: expected an integer >= 0, got -1"),
        ({"downsampler": "pool"}, "--downsampler: expected one of attention, simple, blur, got 'pool'"),
        ({"kernel_backend": "cuda"}, "--kernel-backend: expected one of"),
        ({"key_dim": 0}, "--key-dim: expected a positive integer, got 0"),
    ],
)
def test_settings_are_validated(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        TrainingSettings(**kwargs)


def test_image_size_must_fit_the_stride_and_the_padding():
    with pytest.raises(ConfigError, match="--image-size: expected a positive multiple of the backbone stride 14, got 50"):
        _model(stride=14, size=50)
    with pytest.raises(ConfigError, match="--max-pad: expected less than the image size 16, got 20"):
        JBUTrainingModel(6, 8, 16, TrainingSettings())
