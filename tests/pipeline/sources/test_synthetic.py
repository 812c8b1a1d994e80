"""The synthetic segmentation set, and the round trip it exists for: precompute -> open -> probe, which misaligned labels fail.

Bar of the round trip (the tiny random-weight backbone of precompute_helpers, stride 8, 16 channels, JBU to 64x64;
4 classes, 64 images of 64x96, 13 held out): pixel accuracy >= 0.90 and mIoU >= 0.70. Measured when this test was
written: accuracy 0.942, mIoU 0.807. The features come from random weights, so they carry colour and position, not
meaning: the classes differ in colour, which is what makes the bar reachable. Labels resized wrongly (squashed to
the square instead of centre-cropped like the image) scored accuracy 0.857, mIoU 0.488 with the same features; always
predicting the background scores accuracy 0.78.
"""

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import precompute as helpers
from tests.helpers import store as sh

from jobs.cli import main  # noqa: E402
from pipeline.store.reader import open_features  # noqa: E402
from pipeline.sources.shards import iter_shard_samples, scan_shard  # noqa: E402
from pipeline.sources.synthetic import CLASS_COLOURS, SyntheticSpec, render_sample, write_synthetic_shards  # noqa: E402

SPEC = SyntheticSpec(height=64, width=96, classes=4)
SHARDS, PER_SHARD, IMAGE_SIZE = 4, 16, 64
BAR_ACCURACY, BAR_MIOU = 0.90, 0.70


def test_the_same_arguments_write_the_same_bytes_and_another_seed_does_not(tmp_path):
    a = write_synthetic_shards(tmp_path / "a", 2, 3, SPEC, seed=1)
    b = write_synthetic_shards(tmp_path / "b", 2, 3, SPEC, seed=1)
    c = write_synthetic_shards(tmp_path / "c", 2, 3, SPEC, seed=2)
    assert [Path(p).read_bytes() for p in a] == [Path(p).read_bytes() for p in b]
    assert Path(a[0]).read_bytes() != Path(c[0]).read_bytes()


def test_each_class_is_drawn_in_its_colour_on_a_grey_background():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(20):
        image, mask = render_sample(rng, SPEC)
        assert image.shape == (64, 96, 3) and mask.shape == (64, 96) and mask.max() < SPEC.classes
        pixels = image.astype(float)
        background = pixels[mask == 0].mean(0)
        assert np.ptp(background) < 2.0  # grey: r = g = b up to the noise
        for c in set(np.unique(mask).tolist()) - {0}:
            mean = pixels[mask == c].mean(0)
            assert np.all(np.abs(mean - CLASS_COLOURS[c - 1]) <= SPEC.colour_jitter + 2.0), (c, mean)
            seen.add(c)
    assert seen == {1, 2, 3}


def test_shards_read_back_as_webdataset_samples_of_image_and_mask(tmp_path):
    paths = write_synthetic_shards(tmp_path, 2, 3, SPEC, seed=5)
    info = scan_shard(paths[1], 1)
    assert info.num_samples == 3 and info.keys == ("syn0001-00000", "syn0001-00001", "syn0001-00002")
    first = next(iter_shard_samples(paths[1]))
    assert set(first) >= {"__key__", "png", "seg.png"}
    image, mask = render_sample(np.random.default_rng((5, 1)), SPEC)  # the first sample of shard 1
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(first["png"]))), image)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(first["seg.png"]))), mask)


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory, tiny_modules):
    """The synthetic set precomputed with ``featup precompute --in-process`` (tiny random backbone, JBU, labels and
    images stored; the set, not Ray, is the subject)."""
    root = tmp_path_factory.mktemp("synthetic-round-trip")
    write_synthetic_shards(root / "in", SHARDS, PER_SHARD, SPEC)
    store = str(root / "jbu.zarr")
    code = main(["precompute", str(root / "in" / "synthetic-{000000..000003}.tar"), "--output", store,
                 "--backbone", helpers.TINY_BACKBONE, "--weights", "random", "--image-size", str(IMAGE_SIZE),
                 "--kernel-backend", "eager", "--device", "cpu", "--labels", "seg.png", "--save-image", "--in-process",
                 "--cpus-per-actor", "1"])  # one torch thread: two oversubscribe a loaded 2-core machine (10x slower)
    assert code == 0
    return root, store


def _original_masks(folder: Path) -> dict[str, np.ndarray]:
    """Every mask as written in the shards (read with tarfile and PIL only)."""
    masks = {}
    for path in sorted(folder.glob("synthetic-*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".seg.png"):
                    masks[member.name.split(".")[0]] = np.asarray(Image.open(tar.extractfile(member)))
    return masks


def test_stored_labels_are_the_masks_centre_cropped_like_the_images(round_trip):
    root, store = round_trip
    reader = open_features(store)
    masks = _original_masks(root / "in")
    assert len(reader) == SHARDS * PER_SHARD and reader.attrs["backbone_weights"] == "random"
    left = (SPEC.width - IMAGE_SIZE) // 2  # shorter side is already 64: no resize, a centre crop of the columns
    for i in range(len(reader)):
        sample = reader[i]
        assert sample["features"].shape == (16, IMAGE_SIZE, IMAGE_SIZE)
        np.testing.assert_array_equal(sample["seg.png"].numpy(), masks[sample["key"]][:, left : left + IMAGE_SIZE])


def test_probe_on_the_precomputed_store_reaches_the_bar_and_wrongly_resized_labels_fail_it(round_trip, tmp_path, capsys):
    root, store = round_trip
    reader = open_features(store)
    masks = _original_masks(root / "in")
    feats = np.stack([reader[i]["features"].numpy() for i in range(len(reader))])  # (N, 16, 64, 64), exact float16 values
    squashed = np.stack([np.asarray(Image.fromarray(masks[k]).resize((IMAGE_SIZE, IMAGE_SIZE), Image.NEAREST)) for k in reader.keys])
    wrong = str(tmp_path / "squashed.zarr")
    sh.label_store(wrong, feats, squashed, keys=reader.keys, per_shard=PER_SHARD)  # same features, same keys: same split

    out = tmp_path / "probe"
    code = main(["probe", store, "--target", "seg.png", "--classes", "4", "--epochs", "10", "--lr", "0.05",
                 "--out", str(out), "--compare", wrong])
    assert code == 0
    good, bad = (json.loads((out / f"{name}.metrics.json").read_text()) for name in ("jbu", "squashed"))
    assert good["val_samples"] == bad["val_samples"] == 13
    assert good["accuracy"] >= BAR_ACCURACY and good["miou"] >= BAR_MIOU, good
    assert bad["accuracy"] < BAR_ACCURACY and bad["miou"] < BAR_MIOU, bad
    table = capsys.readouterr().out
    assert f"{good['miou']:.4f}" in table and f"{bad['miou']:.4f}" in table and "squashed.zarr" in table
