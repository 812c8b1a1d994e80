"""``--upsampler implicit`` in precompute: config, per-image fits in the extractor, progress, dry-run estimate, a whole
run (in process: the fits, not Ray, are the subject)."""

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import corpus
from tests.helpers import precompute as helpers

from featup.errors import ConfigError  # noqa: E402
from featup.upsamplers.implicit_fit import ImplicitFitConfig  # noqa: E402
from pipeline.precompute.config import PrecomputeConfig  # noqa: E402
from pipeline.precompute.extract import FeatureExtractor, Projection  # noqa: E402
from pipeline.runtime.progress import format_progress
from pipeline.precompute.driver import run_precompute  # noqa: E402

FIT = ImplicitFitConfig(steps=5, n_views=8, pca_views=8, max_pad=4, n_freqs=8, hidden_dim=32)


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_modules):
    """Two shards of three samples (the tiny backbone module importable here)."""
    root = tmp_path_factory.mktemp("implicit")
    shards = corpus.make_good_shards(root / "in", n_shards=2, per_shard=3)
    return {"root": root, "shards": shards}


def _config(env, name: str, **overrides):
    settings = dict(upsampler="implicit", implicit=FIT, batch_size=2)
    settings.update(overrides)
    return helpers.tiny_config(env["shards"], env["root"] / name, **settings)


def test_config_fills_in_the_published_fit_and_keys_the_store_on_it():
    base = dict(inputs=("a.tar",), output="o.zarr", backbone="dino16")
    config = PrecomputeConfig(**base, upsampler="implicit")
    assert config.implicit == ImplicitFitConfig()
    assert config.store_fingerprint()["implicit"]["steps"] == 1200
    from_json = PrecomputeConfig(**base, upsampler="implicit", implicit=json.loads(json.dumps(config.store_fingerprint()["implicit"])))
    assert from_json.implicit == config.implicit  # a store's attributes give back the same config
    assert PrecomputeConfig(**base).implicit is None
    with pytest.raises(ConfigError, match="--implicit-\\*: expected --upsampler implicit .*got --upsampler jbu"):
        PrecomputeConfig(**base, implicit=FIT)
    with pytest.raises(ConfigError, match="implicit steps: expected a positive integer, got 0"):
        PrecomputeConfig(**base, upsampler="implicit", implicit={"steps": 0})


def test_extractor_fits_each_image_on_its_own_in_inference_mode(env, one_torch_thread):
    config = _config(env, "unused.zarr", save_lowres=True)
    extractor = FeatureExtractor(config)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 32, 32, generator=g)
    out = extractor(images)  # the extractor runs in inference mode; the fit turns grad on inside
    assert out["features"].shape == (2, 16, 32, 32) and out["lowres"].shape == (2, 16, 4, 4)
    swapped = extractor(images.flip(0))
    np.testing.assert_array_equal(out["features"][0], swapped["features"][1])  # a row does not depend on its batch
    assert not np.allclose(out["features"][0], out["features"][1])


def test_channels_projection_is_applied_to_the_fitted_features(env, one_torch_thread):
    rng = np.random.default_rng(0)
    projection = Projection(rng.standard_normal((4, 16)).astype(np.float32), rng.standard_normal(4).astype(np.float32))
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    full = FeatureExtractor(_config(env, "unused.zarr"))(images)["features"]  # (1, 16, 32, 32)
    projected = FeatureExtractor(_config(env, "unused.zarr", channels=4), projection=projection)(images)["features"]
    expected = np.einsum("kc,bchw->bkhw", projection.weight, full) + projection.bias.reshape(1, -1, 1, 1)
    assert projected.shape == (1, 4, 32, 32)
    np.testing.assert_allclose(projected, expected, rtol=1e-4, atol=1e-4)


def test_progress_counts_the_steps_of_the_image_being_fitted(env, one_torch_thread):
    extractor = FeatureExtractor(_config(env, "unused.zarr"))
    seen = []
    backbone_forward = extractor.backbone.forward

    def watched(x):  # the backbone runs at the start of each fit (its views) and once per call
        seen.append(extractor.image_progress)
        return backbone_forward(x)

    extractor.backbone.forward = watched
    extractor(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
    assert seen[0] == 0.0 and 1.0 in seen  # the second image's fit starts with the first one done (5/5 steps)
    assert extractor.image_progress == 0.0  # reset once the batch is done
    line = format_progress(2.4, 6, 0, 2, 0, elapsed=12.0)
    assert line.startswith("precompute:  40%|") and "| 2.4/6 img" in line
    assert "5.00s/img" in line


def test_dry_run_estimates_the_time_per_image_and_in_total(env):
    out = io.StringIO()
    assert run_precompute(_config(env, "dry.zarr", dry_run=True), out=out, err=io.StringIO()) == 0
    text = out.getvalue()
    assert "implicit upsampler: SLOW, one network fitted per image (5 steps, 8 jittered views" in text
    assert "ms per view" in text and "ms per step" in text and "per image" in text
    assert "estimated time for 6 images on 1 such actor(s)" in text
    assert not (env["root"] / "dry.zarr").exists()


def test_a_whole_run_matches_plain_worker_calls(env):
    reference = _config(env, "reference.zarr")
    helpers.reference_store(reference)
    config = _config(env, "run.zarr", in_process=True)
    out, err = io.StringIO(), io.StringIO()
    assert run_precompute(config, out=out, err=err, json_output=True) == 0
    assert "--upsampler implicit fits one network per image (5 steps, 8 views): slow by nature" in err.getvalue()
    report = json.loads(out.getvalue())
    assert report["samples"]["ok"] == 6 and report["shards"]["computed"] == 2 and report["actors"]["mode"] == "in-process"
    helpers.assert_same_store(reference.output, config.output)
