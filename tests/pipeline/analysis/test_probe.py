"""Tests of pipeline.analysis.probe on stores written directly: split, metrics against direct counts, learnable targets, refusals."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import store as sh

from featup.errors import ConfigError, InputError  # noqa: E402
from pipeline.analysis.probe import (  # noqa: E402
    ProbeConfig,
    confusion_matrix,
    load_head,
    save_head,
    segmentation_metrics,
    split_positions,
    train_probe,
)
from pipeline.store.reader import open_features  # noqa: E402

N, K, FEAT = 24, 3, 8  # samples, classes, feature side (labels are stored at twice this side)


def separable(seed: int = 0, channels: int = 6, ignore_fraction: float = 0.1):
    """Features whose first K channels are a noisy one-hot of the class, labels at 2x the feature resolution.

    Each label pixel block of 2x2 has one class, so resizing to the features' size (nearest) recovers it exactly;
    a few blocks hold 255 (ignored).
    """
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, K, (N, FEAT, FEAT))
    feats = 0.1 * rng.standard_normal((N, channels, FEAT, FEAT)).astype(np.float32)
    feats[:, :K] += np.moveaxis(np.eye(K, dtype=np.float32)[classes], -1, 1)
    labels = classes.astype(np.uint8)
    labels[rng.random(labels.shape) < ignore_fraction] = 255
    return feats * 5.0 + 2.0, labels.repeat(2, 1).repeat(2, 2)  # an offset and scale the head's standardisation removes


def test_split_is_by_key_disjoint_sized_and_independent_of_order():
    keys = [f"img-{i:04d}" for i in range(50)]
    train, val = split_positions(keys, 0.2)
    assert len(val) == 10 and sorted(train + val) == list(range(50))
    shuffled = keys[::-1]
    train2, val2 = split_positions(shuffled, 0.2)
    assert {shuffled[i] for i in val2} == {keys[i] for i in val}
    assert split_positions(keys[:2], 0.01)[1] and split_positions(keys[:2], 0.99)[0]  # both sides never empty


def test_confusion_matrix_and_metrics_match_a_direct_count():
    rng = np.random.default_rng(3)
    target, pred = rng.integers(0, 4, 500), rng.integers(0, 3, 500)  # class 3 is never predicted
    target[target == 2] = 1  # class 2 is absent from the targets but predicted
    conf = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), 5)
    expected = np.zeros((5, 5), np.int64)
    np.add.at(expected, (target, pred), 1)
    np.testing.assert_array_equal(conf.numpy(), expected)
    m = segmentation_metrics(conf)
    assert m["accuracy"] == pytest.approx(np.mean(target == pred))
    for c in range(4):
        inter, union = np.sum((target == c) & (pred == c)), np.sum((target == c) | (pred == c))
        assert m["iou"][c] == pytest.approx(inter / union)
    assert m["iou"][4] is None  # neither present nor predicted: left out of the mean
    assert m["miou"] == pytest.approx(np.mean(m["iou"][:4]))
    assert m["class_pixels"] == np.bincount(target, minlength=5).tolist()


@pytest.mark.parametrize("cache_bytes, workers", [(2 << 30, 0), (0, 2)], ids=["in-memory", "streamed-2-workers"])
def test_a_linearly_separable_target_is_learnt_exactly_at_the_feature_resolution(tmp_path, cache_bytes, workers):
    feats, labels = separable()
    url = str(tmp_path / "sep.zarr")
    sh.label_store(url, feats, labels)
    config = ProbeConfig(target="seg.png", classes=K, epochs=15, lr=0.05, cache_bytes=cache_bytes, workers=workers)
    result = train_probe(open_features(url), config)
    m = result.metrics
    assert m["cached"] == (cache_bytes > 0)
    assert m["accuracy"] == 1.0 and m["miou"] == 1.0
    _, val = split_positions(open_features(url).keys, 0.2)
    small = labels[:, 1::2, 1::2][val]  # the label pixel nearest each feature pixel's centre
    assert m["val_pixels"] == int(np.sum(small != 255))  # ignored pixels are not scored
    assert m["class_pixels"] == np.bincount(small[small != 255], minlength=K).tolist()
    assert m["train_samples"] + m["val_samples"] == N and m["train_samples_per_s"] > 0


def test_a_head_round_trips_through_save_and_load(tmp_path):
    feats, labels = separable()
    url = str(tmp_path / "sep.zarr")
    sh.label_store(url, feats, labels)
    result = train_probe(open_features(url), ProbeConfig(target="seg.png", classes=K, epochs=2))
    save_head(result, str(tmp_path / "head.pt"))
    loaded = load_head(str(tmp_path / "head.pt"))
    x = torch.from_numpy(feats[:2])
    torch.testing.assert_close(loaded(x), result.head(x), rtol=0, atol=0)


def test_regression_recovers_a_linear_target_and_skips_non_finite_pixels(tmp_path):
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((N, 4, FEAT, FEAT)).astype(np.float32)
    w = np.array([[1.5, -2.0, 0.5, 0.0], [0.0, 1.0, 0.0, 3.0]], np.float32)
    depth = np.einsum("dc,nchw->nhwd", w, feats) + np.array([10.0, -4.0], np.float32)  # (N, H, W, 2)
    depth[:, 0, 0, :] = np.nan
    url = str(tmp_path / "depth.zarr")
    sh.label_store(url, feats, depth.astype(np.float32), label_name="depth.npy", feature_dtype="float32")
    m = train_probe(open_features(url), ProbeConfig(target="depth.npy", regression=True, epochs=40, lr=0.05)).metrics
    _, val = split_positions(open_features(url).keys, 0.2)
    spread = float(np.nanstd(depth[val]))  # the RMSE of predicting each channel's mean is about this
    assert m["rmse"] < 0.01 * spread and len(m["rmse_per_channel"]) == 2
    assert m["val_pixels"] == len(val) * (FEAT * FEAT - 1)


def test_label_values_outside_the_classes_are_refused_naming_the_sample(tmp_path):
    feats, labels = separable(ignore_fraction=0.0)
    labels[5, 0, 0:2] = 7
    url = str(tmp_path / "bad.zarr")
    sh.label_store(url, feats, labels)
    with pytest.raises(InputError, match=r"sample k5: expected classes in \[0, 3\) or 255 \(ignored\), got 7"):
        train_probe(open_features(url), ProbeConfig(target="seg.png", classes=K, epochs=1))


def test_targets_that_are_not_label_arrays_are_refused(tmp_path):
    feats, labels = separable()
    url = str(tmp_path / "sep.zarr")
    sh.label_store(url, feats, labels)
    with pytest.raises(ConfigError, match=r"expected a label array of the store \(seg.png\), got 'features'"):
        train_probe(open_features(url), ProbeConfig(target="features", classes=K))


@pytest.mark.parametrize("kwargs", [{}, {"classes": 3, "regression": True}, {"classes": 1}, {"classes": 3, "val_fraction": 1.0}])
def test_probe_config_refuses_ambiguous_or_impossible_settings(kwargs):
    with pytest.raises(ConfigError):
        ProbeConfig(target="seg.png", **kwargs)
