"""``featup demo``: shards from scikit-image's photos, a precompute run on local Ray, the report and a PNG of features."""

import json

import pytest

import numpy as np
from PIL import Image

from jobs.cli import main
from jobs.demo import VARIANTS, write_demo_shards
from jobs.sample_images import sample_image_paths
from pipeline.sources.shards import scan_shard
from pipeline.store.features import FeatureStore


@pytest.fixture
def closed_hub(monkeypatch, tmp_path):
    """No network: the FeatUp hub URL points at a closed port of 127.0.0.1 and the torch hub cache is empty."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("FEATUP_HUB_URL", f"http://127.0.0.1:{port}/pretrained/")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_demo_shards_hold_every_variant_of_every_photo(tmp_path):
    photos = sample_image_paths()
    paths = write_demo_shards(photos, tmp_path, 3)
    keys = [key for i, path in enumerate(paths) for key in scan_shard(path, i).keys]
    assert sorted(keys) == sorted(f"{p.stem}-{v}" for p in photos for v in VARIANTS)


def test_demo_offline_falls_back_to_the_teacher_and_its_jbu_restores_edges(tmp_path, monkeypatch, capsys, closed_hub):
    import hashlib

    import torch
    import torch.nn.functional as F

    from featup.backbones.teacher import teacher16
    from jobs.assets import TEACHER_JBU
    from pipeline.store.reader import open_features

    monkeypatch.setenv("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--image-size", "128", "--shards", "2", "--actors", "1", "--panels", "2",
            "--kernel-backend", "eager", "--json"]
    assert main(args) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert "offline" in captured.err and "using the synthetic teacher" in captured.err
    total = len(sample_image_paths()) * len(VARIANTS)
    assert report["status"] == "complete" and report["samples"]["ok"] == total
    store = FeatureStore.open(str(out / "features.zarr"), mode="r")
    assert store.attrs["backbone"] == "featup.backbones.teacher:teacher16"
    assert store.attrs["checkpoint_sha256"] == hashlib.sha256(TEACHER_JBU.read_bytes()).hexdigest()
    png = np.asarray(Image.open(out / "demo.png"))
    assert png.ndim == 3 and png.shape[0] > 2 * 128 and png.std() > 0

    teacher, reader = teacher16(), open_features(str(out / "features.zarr"))
    mean, std = torch.tensor(teacher.mean).view(1, 3, 1, 1), torch.tensor(teacher.std).view(1, 3, 1, 1)
    errors = {"jbu": [], "bilinear": []}
    for i in range(len(reader)):
        sample = reader[i]
        image = (sample["image"][None].float() / 255 - mean) / std  # (1, 3, S, S)
        with torch.no_grad():
            truth = teacher.true_features(image)  # (1, 32, S, S): the teacher's per-pixel features
        guesses = {"jbu": sample["features"][None],
                   "bilinear": F.interpolate(sample["lowres"][None], size=truth.shape[-2:], mode="bilinear", align_corners=False)}
        for name, guess in guesses.items():
            errors[name].append(float((guess - truth).norm() / truth.norm()))
    # The shipped JBU beats bilinear on the teacher's true features of real photos, though it was trained on
    # generated images only (0.50 against 0.53 here; 0.52x bilinear on held-out generated images): the photos' fine
    # textures, finer than any 16-pixel cell, keep both errors high.
    assert np.mean(errors["jbu"]) < np.mean(errors["bilinear"]), errors


def test_a_model_named_by_the_user_never_falls_back(tmp_path, capsys, closed_hub):
    args = ["demo", "--out", str(tmp_path / "demo"), "--checkpoint", "featup:dino16", "--image-size", "32"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("featup: error:") and "dino16_jbu_stack_cocostuff.ckpt" in err[0], err
    assert not (tmp_path / "demo" / "features.zarr").exists()
