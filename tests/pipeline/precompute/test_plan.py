"""The job plan: row layout from the scanned shards, array specs, the --channels PCA and the dry-run text."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import corpus
from tests.helpers import precompute as helpers

from pipeline.precompute.plan import estimate_bytes, fit_projection, format_plan, make_plan  # noqa: E402
from pipeline.store.features import FeatureStore  # noqa: E402


@pytest.fixture(autouse=True)
def tiny_module(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(helpers.write_tiny_module(tmp_path / "mods")))


def test_rows_are_laid_out_by_prefix_sums_in_input_order(tmp_path):
    rng = np.random.default_rng(0)
    sizes = [2, 0, 3, 1]
    samples = [[corpus.good_sample(f"k{i}-{j}", rng) for j in range(n)] for i, n in enumerate(sizes)]
    paths = [corpus.write_shard(tmp_path / f"s{i}.tar", shard) for i, shard in enumerate(samples)]
    plan = make_plan(helpers.tiny_config(paths, tmp_path / "out.zarr"))
    assert [s.url for s in plan.shards] == paths and [s.num_samples for s in plan.shards] == sizes
    assert plan.offsets == [0, 2, 2, 5] and plan.num_rows == 6
    assert plan.attrs["num_rows"] == 6 and plan.attrs["num_shards"] == 4


def test_arrays_have_shapes_dtypes_and_xarray_compatible_dimension_names(tmp_path):
    shards = corpus.make_good_shards(tmp_path / "in", n_shards=1, per_shard=2)
    plan = make_plan(helpers.tiny_config(shards, tmp_path / "out.zarr", labels=("seg.png",), save_image=True, dtype="float16"))
    specs = {s.name: (s.shape_per_row, s.dtype, s.dims) for s in plan.arrays}
    assert specs == {
        "features": ((16, 32, 32), "float16", ("channel", "y", "x")),
        "lowres": ((16, 4, 4), "float16", ("channel", "lowres_y", "lowres_x")),
        "image": ((32, 32, 3), "uint8", ("image_y", "image_x", "rgb")),
        "seg.png": ((32, 32), "uint8", ("image_y", "image_x")),
    }


def test_channels_store_the_pca_and_project_the_features_of_the_full_run(tmp_path):
    shards = corpus.make_good_shards(tmp_path / "in", n_shards=2, per_shard=3)
    full = helpers.tiny_config(shards, tmp_path / "full.zarr")
    reduced = helpers.tiny_config(shards, tmp_path / "pca.zarr", channels=4)
    helpers.reference_store(full)
    helpers.reference_store(reduced)
    stored = FeatureStore.open(reduced.output, mode="r").attrs["pca"]
    weight, bias = torch.tensor(stored["weight"]), torch.tensor(stored["bias"])  # (4, 16), (4,)
    assert weight.shape == (4, 16)
    torch.testing.assert_close(weight @ weight.T, torch.eye(4), atol=1e-5, rtol=0)  # orthonormal PCA components
    arrays_full, _ = helpers.read_store(full.output)
    arrays_pca, _ = helpers.read_store(reduced.output)
    for name in ("features", "lowres"):
        expected = torch.einsum("kc,bchw->bkhw", weight, torch.from_numpy(arrays_full[name])) + bias.view(1, -1, 1, 1)
        np.testing.assert_allclose(arrays_pca[name], expected.numpy(), rtol=1e-4, atol=1e-4)
    again = fit_projection(make_plan(reduced))  # the fit is reproducible
    np.testing.assert_array_equal(again.weight, np.asarray(stored["weight"], dtype=np.float32))


def test_dry_run_text_lists_arrays_and_bytes_and_an_existing_stores_commits(tmp_path):
    shards = corpus.make_good_shards(tmp_path / "in", n_shards=2, per_shard=3)
    config = helpers.tiny_config(shards, tmp_path / "out.zarr")
    plan = make_plan(config)
    estimate = estimate_bytes(plan)
    raw = {name: value[0] for name, value in estimate.items()}
    assert raw == {"features": 6 * 16 * 32 * 32 * 4, "lowres": 6 * 16 * 4 * 4 * 4}
    assert all(0 < ratio <= 1.01 for _, ratio in estimate.values())
    text = format_plan(plan, estimate, committed={0})
    assert "inputs: 2 shards, 6 samples" in text and "1 shards committed, 1 to compute" in text
    total = sum(r * ratio for r, ratio in estimate.values())
    assert f"({int(total)} bytes)" in text
