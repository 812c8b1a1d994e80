"""``featup inspect``, ``featup show`` and ``featup probe`` through the CLI, on stores written directly (no Ray, no model)."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import store as sh

from jobs.cli import main  # noqa: E402
from jobs.show import PLACEHOLDER, RANDOM_WEIGHTS_NOTICE  # noqa: E402
from pipeline.store.index import build_index_table  # noqa: E402
from pipeline.analysis.probe import load_head  # noqa: E402
from pipeline.store.features import ZSTD_LEVEL, FeatureStore  # noqa: E402
from pipeline.analysis.pictures import BANNER_BACKGROUND, plan_panel  # noqa: E402


@pytest.fixture
def store(tmp_path):
    """Shards of rows (0-3), (4-6), (7-8): rows 2 and 5 failed, shard 2 not committed."""
    url = str(tmp_path / "features.zarr")
    sh.coordinate_store(url, shards=((0, 1, 2, 3), (4, 5, 6), (7, 8)), errors=(2, 5), uncommitted=(2,))
    return url


def _stored_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_inspect_json_counts_samples_reasons_shards_and_bytes_on_disk(store, capsys):
    s = FeatureStore.open(store)
    s.commit_shard(2, build_index_table([
        {"row": 7, "shard": "x.tar", "key": "k7", "width": 0, "height": 0, "status": "error", "error": "image is corrupt"},
        {"row": 8, "shard": "x.tar", "key": "k8", "width": 0, "height": 0, "status": "error", "error": "image is truncated"},
    ]))
    assert main(["inspect", store, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 9 and summary["samples"] == {"committed": 9, "ok": 5, "failed": 4, "not_committed": 0}
    assert summary["failure_reasons"] == [["image is truncated", 3], ["image is corrupt", 1]]
    assert summary["shards"] == {"committed": 3, "total": None}
    arrays = {a["name"]: a for a in summary["arrays"]}
    assert list(arrays) == ["features", "lowres", "image", "seg.png"]
    assert arrays["features"]["shape"] == [9, sh.C, sh.H, sh.W] and arrays["features"]["dtype"] == "float16"
    assert arrays["seg.png"]["dims"] == ["sample", "image_y", "image_x"] and arrays["seg.png"]["chunks"] == [1, sh.IMAGE_H, sh.IMAGE_W]
    assert arrays["image"]["codecs"] == ["bytes", f"zstd(level={ZSTD_LEVEL})"]
    for name, a in arrays.items():
        assert a["bytes_stored"] == _stored_bytes(Path(store) / name), name  # every object under the array's folder
        assert a["bytes"] == 9 * np.prod(a["shape"][1:]) * np.dtype(a["dtype"]).itemsize
    assert summary["provenance"] == sh.ATTRS and summary["report"] is None


def test_inspect_table_shows_arrays_counts_and_provenance(store, capsys):
    assert main(["inspect", store]) == 0
    text = capsys.readouterr().out
    assert f"features     (9, {sh.C}, {sh.H}, {sh.W})" in text and f"bytes+zstd(level={ZSTD_LEVEL})" in text
    assert "9 rows; 7 committed (5 ok, 2 failed); 2 in shards not committed yet" in text
    assert "     2  image is truncated" in text and "shards: 2 committed" in text
    assert "backbone_weights   random" in text


def test_show_draws_the_requested_rows_one_panel_each(store, tmp_path, capsys):
    out = tmp_path / "show" / "rows.png"
    assert main(["show", store, "--rows", "3,0", "--out", str(out)]) == 0
    assert "2 samples" in capsys.readouterr().err
    png = np.asarray(Image.open(out).convert("RGB"))
    stored = FeatureStore.open(store, mode="r").array("image")
    first = Image.fromarray(stored[4])  # position 3 of the valid samples is row 4
    layout, lines = plan_panel(first, [RANDOM_WEIGHTS_NOTICE])  # the store says random weights: a banner on the first panel
    assert lines and tuple(png[1, 1]) == BANNER_BACKGROUND
    left, top, right, bottom = layout.tile_box(0)
    expected = np.asarray(first.resize((right - left, bottom - top), Image.Resampling.NEAREST))
    np.testing.assert_array_equal(png[top:bottom, left:right], expected)
    second_top = layout.size[1] + plan_panel(first)[0].tile_box(0)[1]  # the second panel has no banner
    expected = np.asarray(Image.fromarray(stored[0]).resize((right - left, bottom - top), Image.Resampling.NEAREST))
    np.testing.assert_array_equal(png[second_top : second_top + bottom - top, left:right], expected)
    assert png.shape[0] == layout.size[1] + plan_panel(first)[0].size[1]


def test_show_draws_grey_placeholders_for_an_image_and_low_res_the_store_lacks(tmp_path):
    url = str(tmp_path / "bare.zarr")
    sh.label_store(url, np.random.default_rng(0).standard_normal((3, 4, 6, 10)).astype(np.float32),
                   np.zeros((3, 6, 10), np.uint8))
    out = tmp_path / "bare.png"
    assert main(["show", url, "--out", str(out)]) == 0  # default rows: the first 4, cut to the 3 valid samples
    png = np.asarray(Image.open(out).convert("RGB"))
    layout, _ = plan_panel(Image.new("RGB", (10, 6)), [RANDOM_WEIGHTS_NOTICE])
    for tile in (0, 1):
        left, top, right, bottom = layout.tile_box(tile)
        assert (png[top:bottom, left:right] == PLACEHOLDER).all()
    left, top, right, bottom = layout.tile_box(2)
    assert len(np.unique(png[top:bottom, left:right].reshape(-1, 3), axis=0)) > 10  # the features' PCA colours
    assert png.shape[0] == layout.size[1] + 2 * plan_panel(Image.new("RGB", (10, 6)))[0].size[1]


def test_show_refuses_rows_that_are_not_valid_samples(store, tmp_path, capsys):
    assert main(["show", store, "--rows", "0,9", "--out", str(tmp_path / "x.png")]) == 2
    assert "expected positions in [0, 5) of the valid samples, got [9]" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def _separable(tmp_path, name, noise):
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 3, (20, 6, 6))
    feats = noise * rng.standard_normal((20, 4, 6, 6)).astype(np.float32)
    feats[:, :3] += np.moveaxis(np.eye(3, dtype=np.float32)[classes], -1, 1)
    url = str(tmp_path / f"{name}.zarr")
    sh.label_store(url, feats, classes.astype(np.uint8))
    return url


def test_probe_writes_head_and_metrics_and_compares_stores_in_one_table(tmp_path, capsys):
    clean, noisy = _separable(tmp_path, "clean", 0.05), _separable(tmp_path, "noisy", 3.0)
    out = tmp_path / "out"
    assert main(["probe", clean, "--target", "seg.png", "--classes", "3", "--epochs", "10", "--lr", "0.05",
                 "--out", str(out), "--compare", noisy, "--device", "cpu"]) == 0
    table = capsys.readouterr().out.splitlines()
    clean_m, noisy_m = (json.loads((out / f"{n}.metrics.json").read_text()) for n in ("clean", "noisy"))
    assert clean_m["accuracy"] == 1.0 and clean_m["miou"] == 1.0 and noisy_m["miou"] < 0.9
    assert clean_m["store"] == clean and len(clean_m["iou"]) == 3 and clean_m["feature_shape"] == [4, 6, 6]
    rows = [line for line in table[: table.index("IoU per class:")] if ".zarr" in line]
    assert len(rows) == 2 and "clean.zarr" in rows[0] and "noisy.zarr" in rows[1]
    assert f"{clean_m['accuracy']:.4f}" in rows[0] and f"{noisy_m['miou']:.4f}" in rows[1]
    assert clean_m["split_sha256"] == noisy_m["split_sha256"] and not any("splits differ" in line for line in table)
    head = load_head(str(out / "clean.head.pt"))
    feats = torch.from_numpy(FeatureStore.open(clean, mode="r").array("features")[:2].astype(np.float32))
    labels = torch.from_numpy(FeatureStore.open(clean, mode="r").array("seg.png")[:2].astype(np.int64))
    assert torch.equal(head(feats).argmax(1), labels)


def test_probe_regression_reports_rmse(tmp_path, capsys):
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((12, 3, 4, 4)).astype(np.float32)
    depth = (2.0 * feats[:, 0] - feats[:, 2] + 5.0).astype(np.float32)
    url = str(tmp_path / "depth.zarr")
    sh.label_store(url, feats, depth, label_name="depth.npy", feature_dtype="float32")
    assert main(["probe", url, "--target", "depth.npy", "--regression", "--epochs", "30", "--lr", "0.05", "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "depth.metrics.json").read_text())
    assert metrics["rmse"] < 0.05 * float(depth.std()) and "rmse" in capsys.readouterr().out


def test_probe_names_the_label_arrays_when_the_target_is_wrong(store, tmp_path, capsys):
    assert main(["probe", store, "--target", "depth.npy", "--classes", "3", "--out", str(tmp_path)]) == 2
    assert "expected a label array of the store (seg.png), got 'depth.npy'" in capsys.readouterr().err


def test_probe_help_says_labels_are_resized_to_the_features_by_nearest_neighbour(capsys):
    assert main(["probe", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "trained and scored at the feature resolution" in text and "nearest neighbour" in text


def test_probe_writes_in_the_current_folder_by_default(tmp_path, monkeypatch):
    url = _separable(tmp_path, "here", 0.05)
    monkeypatch.chdir(tmp_path)
    assert main(["probe", url, "--target", "seg.png", "--classes", "3", "--epochs", "1"]) == 0
    assert os.path.exists(tmp_path / "here.metrics.json") and os.path.exists(tmp_path / "here.head.pt")
