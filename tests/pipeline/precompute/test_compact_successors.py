"""``precompute --compact`` with FeatUp's successors (anyup, jafar, loftup, naf, uplift): small random checkpoints, one
shard, in-process ShardWorker calls. The compact store of each kind serves the features of the full store of the same
command (whole maps, crops, channel subsets, ``upsample=False`` batches through the stored upsampler, materialize),
guided in the successor's own normalisation (the backbone's is another); --channels is refused in one line.
"""

import io

import pytest
import torch

from tests.helpers import corpus
from tests.helpers import precompute as helpers
from tests.helpers import successors

from featup.errors import ConfigError  # noqa: E402
from featup.upsamplers.base import IMAGENET_NORM  # noqa: E402
from pipeline.store.compact import read_upsampler  # noqa: E402
from pipeline.store.features import FeatureStore  # noqa: E402
from pipeline.store.reader import open_features  # noqa: E402

TOLERANCE = 1e-4  # max abs difference, float32 stores
CHANNELS = [7, 2, 11]
HALF_SOURCE = '''
from featup_tiny_net import TinyNet


class HalfNorm(TinyNet):
    mean = (0.5, 0.5, 0.5)
    std = (0.25, 0.25, 0.25)


def tiny():
    return HalfNorm()
'''


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_modules):
    """One shard of three samples, the tiny backbone with a non-ImageNet normalisation, and a cache of store pairs."""
    (tiny_modules / "featup_tiny_half.py").write_text(HALF_SOURCE)
    root = tmp_path_factory.mktemp("compact-successors")
    return {"root": root, "shards": corpus.make_good_shards(root / "in", n_shards=1, per_shard=3, size=(40, 56)),
            "pairs": {}}


def _config(env, kind, name, **overrides):
    checkpoint = successors.save_successor(kind, env["root"] / f"{kind}.pth")
    size = successors.NAF_MIN_SIZE if kind == "naf" else helpers.IMAGE_SIZE
    settings = dict(backbone="featup_tiny_half:tiny", upsampler=kind, checkpoint=str(checkpoint), image_size=size,
                    save_lowres=False, save_image=True, **overrides)
    return helpers.tiny_config(env["shards"], env["root"] / f"{kind}-{name}.zarr", **settings)


def _pair(env, kind):
    """(full config, compact config) of the same command, both stores computed in this process (cached)."""
    if kind not in env["pairs"]:
        full, compact = _config(env, kind, "full"), _config(env, kind, "compact", compact=True)
        helpers.reference_store(full)
        helpers.reference_store(compact)
        env["pairs"][kind] = (full, compact)
    return env["pairs"][kind]


def _reader(url):
    return open_features(url, kernel_backend="eager")


def _assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    assert float((a - b).abs().max()) <= TOLERANCE


@pytest.mark.parametrize("kind", successors.KINDS)
def test_compact_store_of_each_successor_serves_the_features_of_the_full_store(env, kind, one_torch_thread):
    full_config, compact_config = _pair(env, kind)
    full, compact = _reader(full_config.output), _reader(compact_config.output)
    assert len(compact) == len(full) == 3 and compact.shapes["features"] == full.shapes["features"]
    record, _ = read_upsampler(FeatureStore.open(compact_config.output, mode="r"))
    assert (record.guidance_mean, record.guidance_std) == (IMAGENET_NORM.mean, IMAGENET_NORM.std)  # its own
    assert (record.backbone_mean, record.backbone_std) == ((0.5,) * 3, (0.25,) * 3)  # converted from, as precompute does
    for i in range(len(full)):
        _assert_close(compact[i]["features"], full[i]["features"])
        assert torch.equal(compact[i]["image"], full[i]["image"])
    crop = full_config.image_size // 4
    for channels in (None, CHANNELS):  # a crop, and a crop of some channels: cut from the whole map's output
        views = full.select(crop=crop, channels=channels), compact.select(crop=crop, channels=channels)
        for i in range(len(full)):
            expected, got = (v.get(i, torch.Generator().manual_seed(i)) for v in views)
            _assert_close(got["features"], expected["features"])
    view = compact.select(crop=crop, channels=CHANNELS)
    assert not view.compact.plan((crop, crop)).exact_windows  # the kind reads the whole low-res map
    # upsample=False: whole low-res maps of every channel, upsampled in one batch (LoftUp one image at a time)
    batch = next(iter(torch.utils.data.DataLoader(view.torch_dataset(crop=crop, channels=CHANNELS, upsample=False),
                                                  batch_size=3)))
    assert batch["lowres"].shape[1] == 16
    features = view.upsampler(device="cpu")(batch["lowres"], batch["image"], batch["origin"])
    for b, row in enumerate(batch["row"].tolist()):
        top, left = batch["origin"][b].tolist()
        whole = full[full.rows.tolist().index(row)]["features"]
        _assert_close(features[b], whole[CHANNELS, top : top + crop, left : left + crop])


@pytest.mark.parametrize("kind", ["loftup", "naf"])
def test_materialize_writes_the_full_store_of_a_successor(env, kind, tmp_path, one_torch_thread):
    from pipeline.precompute.driver import open_store
    from pipeline.precompute.materialize import MaterializeWorker, make_materialize_plan, materialize_config
    from pipeline.precompute.worker import ShardTask

    full_config, compact_config = _pair(env, kind)
    config = materialize_config(compact_config.output, str(tmp_path / "full.zarr"), kernel_backend="eager", batch_size=3)
    plan = make_materialize_plan(config)
    store, _, projection, _ = open_store(plan, "materialize", io.StringIO())
    try:
        worker = MaterializeWorker(config, projection=projection, torch_threads=1)
        for shard, offset in zip(plan.shards, plan.offsets):
            worker.process_shard(ShardTask(shard, offset))
    finally:
        store.release_lock()
    helpers.assert_materialized(full_config.output, config.output, TOLERANCE)


@pytest.mark.parametrize("kind", successors.KINDS)
def test_compact_channels_are_refused_for_each_successor_in_one_line(kind):
    from pipeline.precompute.config import PrecomputeConfig

    with pytest.raises(ConfigError, match=rf"^--channels: expected it left out with --compact --upsampler {kind} .*"
                                          r"jbu, bilinear\), got --channels 8$") as caught:
        PrecomputeConfig(inputs=("a.tar",), output="o.zarr", backbone="dino16", upsampler=kind, checkpoint="w.pth",
                         compact=True, channels=8)
    assert "\n" not in str(caught.value)


def test_naf_weighs_each_channel_group_by_its_own_head_so_subsets_and_projections_need_every_channel(one_torch_thread):
    """Why NAF, whose weights come from the image only, still reads every channel and refuses --channels."""
    from featup.upsampler_hub import KINDS

    naf = successors.small_successor("naf")
    lowres, image = torch.randn(1, 16, 9, 9, generator=torch.Generator().manual_seed(0)), torch.zeros(1, 3, 72, 72)
    image[:, :, :36] = 1.0  # an edge: the heads' attention differs
    projection = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = naf(lowres, image)  # (1, 16, 72, 72)
        projected = naf(torch.einsum("kc,bchw->bkhw", projection, lowres), image)  # (1, 4, 72, 72)
        subset = naf(lowres[:, [0, 1, 2, 3]], image)  # head 0's group of the 16, one head each of the 4
    assert float((projected - torch.einsum("kc,bchw->bkhw", projection, whole)).abs().max()) > 1e-3
    assert float((subset - whole[:, [0, 1, 2, 3]]).abs().max()) > 1e-3
    assert KINDS["naf"].all_channels and not KINDS["naf"].commutes_with_projection
