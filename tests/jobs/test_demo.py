"""``featup demo``: shards from scikit-image's photos, a precompute run on local Ray, the report and a PNG of features."""

import json

import numpy as np
from PIL import Image

from jobs.cli import main
from jobs.demo import VARIANTS, write_demo_shards
from jobs.sample_images import sample_image_paths
from pipeline.sources.shards import scan_shard
from pipeline.store.features import FeatureStore


def test_demo_shards_hold_every_variant_of_every_photo(tmp_path):
    photos = sample_image_paths()
    paths = write_demo_shards(photos, tmp_path, 3)
    keys = [key for i, path in enumerate(paths) for key in scan_shard(path, i).keys]
    assert sorted(keys) == sorted(f"{p.stem}-{v}" for p in photos for v in VARIANTS)


def test_demo_runs_offline_and_draws_the_features(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--image-size", "32", "--shards", "2", "--actors", "1", "--panels", "2", "--kernel-backend", "eager", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    total = len(sample_image_paths()) * len(VARIANTS)
    assert report["status"] == "complete" and report["samples"]["ok"] == total
    store = FeatureStore.open(str(out / "features.zarr"), mode="r")
    assert store.array("features").shape == (total, 192, 32, 32) and store.attrs["backbone_weights"] == "random"
    png = np.asarray(Image.open(out / "demo.png"))
    assert png.ndim == 3 and png.shape[0] > 2 * 32 and png.std() > 0
