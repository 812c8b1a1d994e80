"""``precompute --compact``: compact and full stores of the same command, written in-process (no Ray), read the same.

Compared row by row through the reader: whole maps, crops, channel subsets, PCA channels, bilinear, DataLoader workers,
``upsample=False`` batches through the stored upsampler, S3; an altered upsampler is refused by name; resume and
--overwrite; ``materialize`` (in-process workers) writes the full store; probe, show and inspect work on it.
"""

import io
import shutil
import warnings

import numpy as np
import pytest
import torch

from tests.helpers import corpus
from tests.helpers import precompute as helpers

from featup.errors import ConfigError, InputError  # noqa: E402
from pipeline.precompute.driver import open_store  # noqa: E402
from pipeline.precompute.plan import make_plan  # noqa: E402
from pipeline.store.features import FeatureStore  # noqa: E402
from pipeline.store.reader import open_features  # noqa: E402

TOLERANCE = 1e-4  # max abs difference, float32 stores


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_modules):
    """Two shards of two samples (the tiny backbone importable here), and a cache of store pairs."""
    root = tmp_path_factory.mktemp("compact")
    return {"root": root, "shards": corpus.make_good_shards(root / "in", n_shards=2, per_shard=2), "pairs": {}}


def _configs(env, name, **settings):
    common = dict(save_lowres=False, save_image=True, labels=("seg.png",), **settings)
    root = env["root"]
    return (helpers.tiny_config(env["shards"], root / f"{name}-full.zarr", **common),
            helpers.tiny_config(env["shards"], root / f"{name}-compact.zarr", compact=True, **common))


def _pair(env, name, **settings):
    """(full config, compact config) of the same command, both stores computed by plain ShardWorker calls (cached)."""
    if name not in env["pairs"]:
        full, compact = _configs(env, name, **settings)
        helpers.reference_store(full)
        helpers.reference_store(compact)
        env["pairs"][name] = (full, compact)
    return env["pairs"][name]


def _reader(url, **options):
    return open_features(url, kernel_backend="eager", **options)


def _assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    assert float((a - b).abs().max()) <= TOLERANCE


@pytest.mark.parametrize("name, settings", [("jbu", {}), ("pca", {"channels": 4}), ("bilinear", {"upsampler": "bilinear"})])
def test_compact_store_serves_the_features_of_the_full_store(env, name, settings, one_torch_thread):
    full_config, compact_config = _pair(env, name, **settings)
    full, compact = _reader(full_config.output), _reader(compact_config.output)
    assert len(compact) == len(full) == 4 and compact.array_names == full.array_names == ("features", "image", "seg.png")
    assert compact.shapes["features"] == full.shapes["features"]
    for i in range(len(full)):
        expected, got = full[i], compact[i]
        _assert_close(got["features"], expected["features"])
        assert torch.equal(got["image"], expected["image"]) and torch.equal(got["seg.png"], expected["seg.png"])
    channels = [3, 0] if name == "pca" else [7, 2, 11]
    crops = full.select(crop=8, channels=channels), compact.select(crop=8, channels=channels)
    for i in range(len(full)):  # the same generator draws the same crop in both
        expected, got = (r.get(i, torch.Generator().manual_seed(i)) for r in crops)
        _assert_close(got["features"], expected["features"])
        assert torch.equal(got["seg.png"], expected["seg.png"]) and torch.equal(got["image"], expected["image"])
    # upsample=False: the windows, upsampled in a batch by the stored upsampler, give the same crops
    batch = next(iter(torch.utils.data.DataLoader(crops[1].torch_dataset(crop=8, channels=channels, upsample=False),
                                                  batch_size=4)))
    assert "features" not in batch and batch["image"].dtype == torch.uint8
    up = crops[1].upsampler(device="cpu")
    features = up(batch["lowres"], batch["image"], batch["origin"])
    for b, row in enumerate(batch["row"].tolist()):
        top, left = batch["origin"][b].tolist()
        whole = full[full.rows.tolist().index(row)]["features"]
        _assert_close(features[b], whole[channels, top : top + 8, left : left + 8])


def test_crops_of_a_larger_map_read_a_window_of_the_low_res_features(env, one_torch_thread):
    full_config, compact_config = _pair(env, "large", image_size=160)  # 20x20 low-res: a 16 crop needs 18x18 of it
    full, compact = _reader(full_config.output), _reader(compact_config.output)
    assert compact.compact.plan((16, 16)).lengths[0] == (18, 18)
    views = full.select(crop=16, channels=[5, 9]), compact.select(crop=16, channels=[5, 9])
    for i in range(len(full)):
        for seed in range(3):  # crops at several places, the image cut from the guidance window read for them
            expected, got = (v.get(i, torch.Generator().manual_seed(seed)) for v in views)
            _assert_close(got["features"], expected["features"])
            assert torch.equal(got["image"], expected["image"]) and torch.equal(got["seg.png"], expected["seg.png"])


def test_dataloader_workers_upsample_the_same_crops_as_the_full_store(env, one_torch_thread):
    full_config, compact_config = _pair(env, "jbu")
    loaders = [torch.utils.data.DataLoader(_reader(c.output).torch_dataset(crop=16, channels=range(5), seed=3), batch_size=2,
                                           num_workers=2, generator=torch.Generator().manual_seed(0))  # same worker seeds
               for c in (full_config, compact_config)]
    for expected, got in zip(*loaders):  # workers seed their crops alike in both
        assert expected["key"] == got["key"] and torch.equal(expected["seg.png"], got["seg.png"])
        _assert_close(got["features"], expected["features"])


def test_a_compact_store_holds_inputs_and_upsampler_and_tells_plain_zarr_users(env):
    import xarray as xr
    import zarr

    full_config, compact_config = _pair(env, "jbu")
    store = FeatureStore.open(compact_config.output, mode="r")
    assert store.array_names == ("lowres", "image", "seg.png")
    assert store.array("lowres").shape[1:] == (16, 4, 4) and store.array("image").dtype == np.uint8
    group = zarr.open_group(compact_config.output, mode="r")
    assert "not stored" in group.attrs["features"] and "featup materialize" in group.attrs["features"]
    assert store.attrs["compact"] is True and len(store.attrs["upsampler_sha256"]) == 64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset = xr.open_zarr(compact_config.output, consolidated=False)
    assert set(dataset.data_vars) == {"lowres", "image", "seg.png"} and "not stored" in dataset.attrs["features"]
    full_bytes = sum(FeatureStore.open(full_config.output, mode="r").array(n).nbytes_stored() for n in ("features",))
    assert sum(store.array(n).nbytes_stored() for n in ("lowres", "image")) < full_bytes


def test_a_store_whose_upsampler_was_altered_is_refused_by_name(env, tmp_path):
    _, compact_config = _pair(env, "jbu")
    altered = tmp_path / "altered.zarr"
    shutil.copytree(compact_config.output, altered)
    state = altered / "_featup" / "upsampler" / "state.safetensors"
    data = bytearray(state.read_bytes())
    data[-1] ^= 0x01  # one bit of one parameter
    state.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"expected the stored upsampler .*_featup/upsampler/state.safetensors to have sha256"):
        _reader(str(altered))
    from jobs.cli import main

    assert main(["inspect", str(altered)]) == 2


def test_resume_overwrite_and_another_command_on_a_compact_store(env, tmp_path):
    full_config, compact_config = _pair(env, "jbu")
    url = tmp_path / "resumed.zarr"
    shutil.copytree(compact_config.output, url)
    (url / "_featup" / "upsampler" / "upsampler.json").unlink()  # as if the creating run died before writing it
    config = helpers.tiny_config(compact_config.inputs, url, compact=True, save_lowres=False, save_image=True,
                                 labels=("seg.png",))
    store, committed, _, clean = open_store(make_plan(config), "resume", io.StringIO())
    store.release_lock()
    assert committed == {0, 1} and not clean
    _assert_close(_reader(str(url))[1]["features"], _reader(compact_config.output)[1]["features"])  # rewritten, verified
    with pytest.raises(ConfigError, match="compact: store has true, this run has null"):
        open_store(make_plan(helpers.tiny_config(config.inputs, url, save_lowres=False, save_image=True,
                                                 labels=("seg.png",))), "other", io.StringIO())
    store, committed, _, _ = open_store(make_plan(helpers.tiny_config(config.inputs, url, compact=True, overwrite=True,
                                                                      save_lowres=False)), "over", io.StringIO())
    store.release_lock()
    assert committed == set() and store.array_names == ("lowres", "image")


def test_compact_store_on_s3_reads_as_the_local_one(env, s3_server, one_torch_thread):
    _, local = _pair(env, "jbu")
    options = s3_server.storage_options
    config = helpers.tiny_config(env["shards"], s3_server.url("compact") + "/store.zarr", compact=True, save_lowres=False,
                                 save_image=True, labels=("seg.png",), storage_options=options)
    helpers.reference_store(config)
    remote, expected = _reader(config.output, **options), _reader(local.output)
    for i in range(len(expected)):
        assert torch.equal(remote[i]["features"], expected[i]["features"])


def test_materialize_writes_the_full_store_of_the_same_command(env, tmp_path):
    from pipeline.precompute.materialize import MaterializeWorker, make_materialize_plan, materialize_config
    from pipeline.precompute.worker import ShardTask

    full_config, compact_config = _pair(env, "pca", channels=4)
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
    unfinished = tmp_path / "unfinished.zarr"  # a compact job that stopped before its last shard
    shutil.copytree(compact_config.output, unfinished)
    (unfinished / "_featup" / "commits" / "shard-000001.json").unlink()
    with pytest.raises(ConfigError, match="expected a finished compact store .* got 1 of 2 shards committed"):
        make_materialize_plan(materialize_config(str(unfinished), str(tmp_path / "never.zarr")))


def test_probe_show_and_inspect_on_a_compact_store(env, one_torch_thread):
    from jobs.show import render_rows
    from pipeline.analysis.probe import ProbeConfig, train_probe
    from pipeline.store.summary import format_summary, store_summary

    full_config, compact_config = _pair(env, "jbu")
    config = ProbeConfig(target="seg.png", classes=16, epochs=2, batch_size=2, val_fraction=0.5)
    metrics = [train_probe(_reader(c.output), config).metrics for c in (full_config, compact_config)]
    assert abs(metrics[0]["accuracy"] - metrics[1]["accuracy"]) < 1e-6 and metrics[0]["split_sha256"] == metrics[1]["split_sha256"]
    assert render_rows(_reader(compact_config.output), [0, 1]).size == render_rows(_reader(full_config.output), [0, 1]).size
    text = format_summary(store_summary(compact_config.output))
    assert "features: not stored (compact store)" in text and "jbu upsampler to 16x32x32" in text


@pytest.mark.parametrize("settings, message", [
    (dict(upsampler="implicit"), "--compact: expected an upsampler shared by every image"),
    (dict(quantize="int8"), "--compact: expected no lossy option"),
    (dict(save_lowres=True), "--save-lowres: expected it left out with --compact"),
])
def test_compact_refuses_what_it_cannot_store_in_one_line(settings, message):
    from pipeline.precompute.config import PrecomputeConfig

    with pytest.raises(ConfigError, match=message) as caught:
        PrecomputeConfig(inputs=("a.tar",), output="o.zarr", backbone="dino16", compact=True, **settings)
    assert "\n" not in str(caught.value)
