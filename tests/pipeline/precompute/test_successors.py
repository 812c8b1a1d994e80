"""Precompute with FeatUp's successors (anyup, jafar, loftup, naf, uplift), in-process with plain ShardWorker calls: each store
equals the module applied directly to the same images in its own normalisation, records the kind, the checkpoint and
its sha256 (a changed checkpoint is refused on resume), and sizes or channels a checkpoint cannot take are refused at
plan time."""

import hashlib
import sys
import textwrap

import numpy as np
import pytest
import torch

from tests.helpers import corpus
from tests.helpers import precompute as helpers
from tests.helpers import successors

from featup.errors import ConfigError, InputError  # noqa: E402
from featup.upsamplers.base import IMAGENET_NORM, ImageNorm  # noqa: E402
from pipeline.precompute.driver import open_store  # noqa: E402
from pipeline.precompute.plan import make_plan  # noqa: E402
from pipeline.sources.decode import decode_sample  # noqa: E402
from pipeline.sources.shards import iter_shard_samples  # noqa: E402
from pipeline.store.features import FeatureStore  # noqa: E402

HALF_NORM = ImageNorm((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
HALF_BACKBONE = "featup_tiny_half:tiny"  # the tiny backbone with its own (non-ImageNet) normalisation
HALF_SOURCE = '''
from featup_tiny_net import TinyNet


class HalfNorm(TinyNet):
    mean = (0.5, 0.5, 0.5)
    std = (0.25, 0.25, 0.25)


def tiny():
    return HalfNorm()
'''


@pytest.fixture(autouse=True)
def tiny_modules(tmp_path, monkeypatch):
    folder = helpers.write_tiny_module(tmp_path / "mods")
    (folder / "featup_tiny_half.py").write_text(textwrap.dedent(HALF_SOURCE))
    monkeypatch.syspath_prepend(str(folder))


def _config(tmp_path, kind, **overrides):
    size = successors.NAF_MIN_SIZE if kind == "naf" else helpers.IMAGE_SIZE
    shards = corpus.make_good_shards(tmp_path / "in", n_shards=1, per_shard=3, size=(40, 56))
    checkpoint = successors.save_successor(kind, tmp_path / f"{kind}.pth")
    settings = dict(backbone=HALF_BACKBONE, upsampler=kind, checkpoint=str(checkpoint), image_size=size)
    return helpers.tiny_config(shards, tmp_path / "out.zarr", **{**settings, **overrides})


@pytest.mark.parametrize("kind", successors.KINDS)
def test_a_store_of_each_successor_equals_the_module_applied_to_the_same_images(kind, tmp_path, one_torch_thread):
    config = _config(tmp_path, kind)
    helpers.reference_store(config)
    arrays, index = helpers.read_store(config.output)
    attrs = FeatureStore.open(config.output, mode="r").attrs
    digest = hashlib.sha256(open(config.checkpoint, "rb").read()).hexdigest()
    assert (attrs["upsampler"], attrs["checkpoint"], attrs["checkpoint_sha256"]) == (kind, config.checkpoint, digest)
    assert (attrs["guidance_mean"], attrs["backbone_mean"]) == (list(IMAGENET_NORM.mean), list(HALF_NORM.mean))

    module = successors.small_successor(kind)
    spec = make_plan(config).spec
    samples = [decode_sample(raw, spec) for raw in iter_shard_samples(config.inputs[0])]
    assert [row["status"] for row in index] == ["ok"] * 3
    for row, sample in enumerate(samples):
        image = IMAGENET_NORM.convert(sample.image[None], HALF_NORM)  # the backbone's image in the upsampler's norm
        lowres = torch.from_numpy(arrays["lowres"][row : row + 1])  # (1, 16, h, w): what the backbone gave
        with torch.no_grad():
            expected = module(lowres, image, output_size=image.shape[2:])[0].numpy()  # (16, S, S)
        assert arrays["features"][row].shape == expected.shape == (16, config.image_size, config.image_size)
        np.testing.assert_allclose(arrays["features"][row], expected, rtol=1e-5, atol=1e-5, err_msg=f"{kind} row {row}")


def test_a_different_checkpoint_at_the_same_path_is_refused_on_resume(tmp_path):
    config = _config(tmp_path, "anyup")
    helpers.reference_store(config)
    successors.save_successor("anyup", tmp_path / "anyup.pth", seed=1)  # retrained weights, same file name
    with pytest.raises(ConfigError, match="checkpoint_sha256"):
        open_store(make_plan(config), "resume", sys.stderr)


@pytest.mark.parametrize("kind, overrides, error, message", [
    ("naf", {"image_size": 32}, InputError, "NAF: output height 32 does not fit a 9-wide window"),
    ("jafar", {"backbone": helpers.TINY_BACKBONE}, ConfigError, "expected a backbone with 384 channels"),
    ("anyup", {"checkpoint": "featup:dino16"}, ConfigError, "expected anyup weights .* got a FeatUp JBU name"),
])
def test_what_a_checkpoint_cannot_take_is_refused_before_any_work(kind, overrides, error, message, tmp_path):
    if kind == "jafar":
        overrides["checkpoint"] = str(successors.save_successor("jafar", tmp_path / "c384.pth", dim=384))
    with pytest.raises(error, match=message):
        make_plan(_config(tmp_path, kind, **overrides))
    assert not (tmp_path / "out.zarr").exists()
