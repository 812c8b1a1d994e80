"""Ground-truth benchmark images: deterministic WebDataset shards of textured regions with sharp edges and edge maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featup.backbones.teacher import teacher16
from featup.errors import ConfigError
from pipeline.evaluate.groundtruth import GroundTruthSpec, edge_map, read_groundtruth, write_groundtruth_shards
from pipeline.sources.images import normalize
from pipeline.sources.shards import scan_shards

SPEC = GroundTruthSpec(image_size=64, multiple=16)


def _read(tmp_path, split="test", count=3, seed=0, spec=SPEC, name="a"):
    paths = write_groundtruth_shards(tmp_path / name, split, count, spec, seed=seed, per_shard=2)
    return paths, list(read_groundtruth(paths))


def test_same_arguments_write_the_same_bytes_and_splits_differ(tmp_path):
    paths_a, _ = _read(tmp_path, name="a")
    paths_b, _ = _read(tmp_path, name="b")
    assert [p.rsplit("/", 1)[1] for p in paths_a] == ["test-000000.tar", "test-000001.tar"]
    assert [open(p, "rb").read() for p in paths_a] == [open(p, "rb").read() for p in paths_b]
    _, test = _read(tmp_path, name="c")
    _, train = _read(tmp_path, split="train", name="d")
    _, other_seed = _read(tmp_path, seed=1, name="e")
    for a, b, c in zip(test, train, other_seed):
        assert not np.array_equal(a.image, b.image) and not np.array_equal(a.image, c.image)


def test_shards_are_readable_webdataset_with_image_regions_and_edges(tmp_path):
    paths, samples = _read(tmp_path, count=3)
    infos = scan_shards(paths)
    assert sum(len(info.keys) for info in infos) == 3
    assert [s.key for s in samples] == ["test00000", "test00001", "test00002"]
    for s in samples:
        assert s.image.dtype == np.uint8 and s.image.shape[:2] == s.regions.shape == s.edges.shape
        assert np.array_equal(s.edges, edge_map(s.regions)) and s.edges.any() and not s.edges.all()


def test_sizes_are_multiples_of_the_stride_at_several_aspect_ratios():
    assert [SPEC.size(i) for i in range(4)] == [(64, 64), (64, 96), (80, 64), (64, 64)]
    spec14 = GroundTruthSpec(image_size=64, multiple=14)
    assert [spec14.size(i) for i in range(3)] == [(70, 70), (70, 112), (98, 70)]


def test_edge_map_marks_both_sides_of_every_region_change():
    regions = np.zeros((5, 6), dtype=np.uint8)
    regions[:, 3:] = 1
    expected = np.zeros((5, 6), dtype=bool)
    expected[:, 2:4] = True
    assert np.array_equal(edge_map(regions), expected)


def test_regions_have_distinct_colours_and_faint_texture(tmp_path):
    _, samples = _read(tmp_path, count=3)
    for s in samples:
        labels = np.unique(s.regions)
        assert len(labels) >= 3
        means = np.stack([s.image[s.regions == k].mean(0) for k in labels])  # (R, 3)
        spread = max(float(s.image[s.regions == k].std(0).max()) for k in labels)
        gaps = [np.abs(means[i] - means[j]).max() for i in range(len(labels)) for j in range(i)]
        assert min(gaps) > 4 * spread  # regions differ far more than pixels inside one region


def test_true_features_are_sharp_at_edges_and_smooth_inside_regions(tmp_path):
    _, samples = _read(tmp_path, count=3)
    teacher = teacher16()
    for s in samples:
        image = normalize(torch.from_numpy(s.image.copy()).permute(2, 0, 1).float() / 255, teacher.mean, teacher.std)
        truth = teacher.true_features(image[None])[0]  # (C, H, W)
        step = (truth[:, :, 1:] - truth[:, :, :-1]).norm(dim=0)  # (H, W-1)
        across = torch.from_numpy(s.regions[:, 1:] != s.regions[:, :-1])
        assert step[across].mean() > 5 * step[~across].mean()


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="image size: expected at least the multiple 16"):
        GroundTruthSpec(image_size=8, multiple=16)
    with pytest.raises(ConfigError, match="split: expected one of train, test, got 'val'"):
        write_groundtruth_shards(tmp_path, "val", 2, SPEC)
    with pytest.raises(ConfigError, match="aspect ratios: expected positive"):
        GroundTruthSpec(aspect_ratios=(1.0, 0.0))
