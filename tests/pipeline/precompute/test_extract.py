"""FeatureExtractor: seeded models, output geometry, storage dtypes, and a PCA projection applied before upsampling."""

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import precompute as helpers

from featup.errors import ConfigError  # noqa: E402
from featup.pca import fit_pca  # noqa: E402
from pipeline.precompute.extract import FeatureExtractor, Projection  # noqa: E402


@pytest.fixture(autouse=True)
def tiny_module(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(helpers.write_tiny_module(tmp_path / "mods")))


def _images(n=3, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _extractor(**overrides):
    return FeatureExtractor(helpers.tiny_config(["unused.tar"], "unused.zarr", **overrides))


def _projection(extractor, k=4):
    return Projection.from_pca(fit_pca(extractor.lowres(_images(4, seed=1)), k))


@pytest.mark.parametrize("upsampler", ["jbu", "bilinear"])
def test_projection_before_upsampling_equals_projecting_the_upsampled_features(upsampler):
    full = _extractor(upsampler=upsampler)
    projection = _projection(full)
    projected = FeatureExtractor(replace(full.config, channels=4), projection=projection)
    x = _images()
    out, reduced = full(x), projected(x)
    w, b = torch.from_numpy(projection.weight), torch.from_numpy(projection.bias)
    for name in ("features", "lowres"):
        expected = torch.einsum("kc,bchw->bkhw", w, torch.from_numpy(out[name])) + b.view(1, -1, 1, 1)
        np.testing.assert_allclose(reduced[name], expected.numpy(), rtol=1e-4, atol=1e-4)
    assert reduced["features"].shape == (3, 4, 32, 32) and reduced["lowres"].shape == (3, 4, 4, 4)


def test_a_projection_must_match_channels_and_dim():
    projection = _projection(_extractor(), k=4)
    with pytest.raises(ConfigError, match=r"projection: expected a \(channels, dim\) = \(5, 16\) matrix, got \(4, 16\)"):
        FeatureExtractor(helpers.tiny_config(["unused.tar"], "unused.zarr", channels=5), projection=projection)


def test_projection_round_trips_through_store_attributes_exactly():
    projection = _projection(_extractor())
    again = Projection.from_attrs(projection.to_attrs())
    np.testing.assert_array_equal(again.weight, projection.weight)
    np.testing.assert_array_equal(again.bias, projection.bias)


def test_random_weights_are_the_same_in_every_extractor_and_follow_the_seed():
    x = _images()
    a, b, other = _extractor(), _extractor(), _extractor(seed=1)
    np.testing.assert_array_equal(a(x)["features"], b(x)["features"])
    assert not np.array_equal(a(x)["features"], other(x)["features"])


@pytest.mark.parametrize(
    "overrides, size", [({}, (32, 32)), ({"scale": 2}, (8, 8)), ({"output_size": 20}, (20, 20)), ({"scale": 16}, (64, 64))]
)
def test_output_size_follows_scale_or_output_size(overrides, size):
    extractor = _extractor(**overrides)
    assert extractor.output_size == size and extractor.lowres_size == (4, 4)
    assert extractor(_images(1))["features"].shape == (1, 16, *size)
    assert extractor.array_shapes()["features"] == ((16, *size), "float32")


@pytest.mark.parametrize("overrides, stages", [({}, 3), ({"scale": 2}, 1), ({"scale": 16}, 4), ({"output_size": 20}, 2)])
def test_a_fresh_jbu_gets_the_2x_stages_closest_to_the_output_size(overrides, stages):
    assert _extractor(**overrides).upsampler.num_stages == stages  # from the 4x4 low-res grid of the tiny backbone


def test_features_are_rounded_to_the_dtype_and_stored_in_the_storage_dtype():
    x = _images(1)
    full = _extractor(dtype="float32")(x)["features"]
    half = _extractor(dtype="float16")(x)["features"]
    bf16 = _extractor(dtype="bfloat16")(x)["features"]
    assert full.dtype == np.float32 and half.dtype == np.float16 and bf16.dtype == np.float32
    np.testing.assert_array_equal(half, full.astype(np.float16))
    np.testing.assert_array_equal(bf16, torch.from_numpy(full).to(torch.bfloat16).float().numpy())


def test_an_image_size_off_the_stride_grid_is_refused():
    with pytest.raises(ConfigError, match="--image-size: expected a multiple of the stride 8 of backbone .*, got 36"):
        _extractor(image_size=36)
