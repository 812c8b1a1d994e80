"""``train_jbu`` on real WebDataset shards with the tiny user backbone: lowers the objective, checkpoints, resumes exactly."""

from __future__ import annotations

import csv
import io
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.helpers import corpus
from tests.helpers import precompute as helpers

from featup.checkpoint import load_featup_checkpoint, read_checkpoint  # noqa: E402
from featup.errors import ConfigError, InputError  # noqa: E402

SIZE = 32  # tiny backbone: stride 8 -> 4x4 features, 3 JBU stages


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny user backbone module importable, and shards: 2 for training, 1 held out (other images)."""
    root = tmp_path_factory.mktemp("train")
    module_dir = helpers.write_tiny_module(root / "module")
    sys.path.insert(0, str(module_dir))
    train = corpus.make_good_shards(root / "train", 2, 4, size=(40, 48), seed=0)
    held_out = corpus.make_good_shards(root / "held-out", 1, 4, size=(40, 48), seed=1)
    yield {"root": root, "train": train, "held_out": held_out}
    sys.path.remove(str(module_dir))


def _config(inputs, output, **overrides):
    from pipeline.train.loop import TrainConfig

    settings = dict(inputs=tuple(inputs), backbone=helpers.TINY_BACKBONE, weights="random", output=str(output),
                    steps=4, batch_size=2, image_size=SIZE, max_pad=4, n_jitters=2, checkpoint_every=2, log_every=1,
                    device="cpu", decode_threads=1)
    settings.update(overrides)
    return TrainConfig(**settings)


def _held_out_objective(config, state_dict, held_out) -> float:
    """The objective, in eval mode, on the first held-out batch with views drawn from a fixed seed."""
    from featup.training import JBUTrainingModel, evaluate_objective
    from pipeline.sources.decode import DecodeSpec
    from pipeline.train.loop import prepare
    from pipeline.train.stream import ImageBatches

    setup = prepare(replace(config, output=config.output + ".absent"))
    hp = setup.hyper_parameters
    model = JBUTrainingModel(hp["dim"], hp["stride"], SIZE, config.settings(), num_stages=hp["stages"],
                             generator=torch.Generator().manual_seed(config.seed))  # the run's initial state
    if state_dict is not None:
        model.load_official_state_dict(state_dict)
    spec = DecodeSpec(image_size=SIZE, stride=hp["stride"], mean=hp["mean"], std=hp["std"])
    batches = iter(ImageBatches(held_out, spec, 4, seed=0))
    images = next(batches).images  # (4, 3, 32, 32), images the run never saw
    batches.close()
    return evaluate_objective(model, setup.backbone, images, seed=123)["total"]


@pytest.fixture(scope="module")
def trained(tiny):
    """One short run (30 steps) shared by the tests that inspect its outputs."""
    from pipeline.train.loop import train_jbu

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = _config(tiny["train"], tiny["root"] / "run" / "jbu.ckpt", steps=30, checkpoint_every=10, log_every=5)
        result = train_jbu(config, err=io.StringIO())
    finally:
        torch.set_num_threads(threads)
    return config, result


def test_a_short_run_lowers_the_objective_on_held_out_views(trained, tiny):
    config, result = trained
    assert result.steps == 30 and result.resumed_from == 0 and result.skipped == 0
    saved, _ = read_checkpoint(result.checkpoint)
    before = _held_out_objective(config, None, tiny["held_out"])
    after = _held_out_objective(config, saved["state_dict"], tiny["held_out"])
    assert after < before - 0.02, (before, after)


def test_the_checkpoint_records_the_run_and_loads_with_weights_only(trained):
    config, result = trained
    saved, _ = read_checkpoint(result.checkpoint)  # torch.load(weights_only=True)
    hp = saved["hyper_parameters"]
    assert hp["backbone"] == helpers.TINY_BACKBONE and hp["weights_id"] == "random"
    assert (hp["stride"], hp["dim"], hp["image_size"], hp["stages"]) == (8, 16, SIZE, 3)
    assert hp["settings"]["lr"] == 1e-3 and hp["settings"]["n_jitters"] == 2
    state = saved["featup_training"]
    assert state["step"] == 30 and len(state["ranks"]) == 1 and state["optimizer"]["state"]
    prefixes = {key.split(".")[0] for key in saved["state_dict"]}
    assert prefixes == {"upsampler", "downsampler", "scale_net", "model"}
    upsampler = load_featup_checkpoint(result.checkpoint, backend="eager")
    assert upsampler.upsampler.num_stages == 3 and upsampler.norm is not None
    assert upsampler.hyper_parameters["backbone"] == helpers.TINY_BACKBONE


def test_precompute_runs_with_the_trained_checkpoint(trained, tiny):
    from pipeline.precompute.extract import FeatureExtractor

    _, result = trained
    config = helpers.tiny_config(tiny["held_out"], tiny["root"] / "unused.zarr", checkpoint=result.checkpoint)
    extractor = FeatureExtractor(config, device="cpu")
    assert extractor.upsampler.sha256 is not None
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    out = extractor(images)
    assert out["features"].shape == (2, 16, SIZE, SIZE)
    assert torch.isfinite(torch.from_numpy(out["features"])).all()


def test_precompute_refuses_the_checkpoint_for_another_backbone(trained, tiny):
    from pipeline.precompute.config import PrecomputeConfig
    from pipeline.precompute.extract import build_upsampler_for

    _, result = trained
    config = PrecomputeConfig(inputs=tuple(tiny["held_out"]), output="x.zarr", backbone="dino16", checkpoint=result.checkpoint)
    with pytest.raises(ConfigError, match="expected a JBU trained for backbone 'dino16', got one trained for 'featup_tiny_net:tiny'"):
        build_upsampler_for(config, 16)


def test_loss_log_csv_and_plot_match_the_result(trained):
    _, result = trained
    assert [row["step"] for row in result.losses] == [5, 10, 15, 20, 25, 30]
    with open(result.loss_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "total", "reconstruction", "crf", "tv"]
    for row, logged in zip(rows, result.losses, strict=True):
        assert {k: float(v) for k, v in row.items()} == pytest.approx(logged, rel=0, abs=0)
    with Image.open(result.loss_plot) as plot:
        assert plot.format == "PNG" and plot.size[0] >= 400 and plot.size[1] >= 300


def test_resume_continues_from_the_saved_step_and_equals_an_uninterrupted_run(tiny):
    from pipeline.train.loop import train_jbu

    first = _config(tiny["train"], tiny["root"] / "resume" / "jbu.ckpt", steps=3)
    assert train_jbu(first, err=io.StringIO()).steps == 3
    resumed = train_jbu(replace(first, steps=6), err=io.StringIO())
    assert resumed.resumed_from == 3 and resumed.steps == 6
    straight = train_jbu(_config(tiny["train"], tiny["root"] / "straight" / "jbu.ckpt", steps=6), err=io.StringIO())
    assert [r["step"] for r in resumed.losses] == list(range(1, 7))
    for got, expected in zip(resumed.losses, straight.losses, strict=True):
        assert got == pytest.approx(expected, rel=1e-5)
    a, _ = read_checkpoint(resumed.checkpoint)
    b, _ = read_checkpoint(straight.checkpoint)
    for key, value in b["state_dict"].items():
        torch.testing.assert_close(a["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert torch.equal(a["featup_training"]["ranks"][0]["position"], b["featup_training"]["ranks"][0]["position"])


def test_other_settings_are_refused_and_overwrite_starts_over(tiny):
    from pipeline.train.loop import train_jbu

    config = _config(tiny["train"], tiny["root"] / "mismatch" / "jbu.ckpt", steps=2)
    train_jbu(config, err=io.StringIO())
    with pytest.raises(ConfigError, match=r"lr: 0\.001 there, 0\.01 here.*--overwrite"):
        train_jbu(replace(config, lr=1e-2, steps=4), err=io.StringIO())
    again = train_jbu(replace(config, lr=1e-2, steps=2, overwrite=True), err=io.StringIO())
    assert again.resumed_from == 0 and again.steps == 2
    err = io.StringIO()
    done = train_jbu(replace(config, lr=1e-2, steps=2), err=err)
    assert done.resumed_from == 2 and "already trained to step 2" in err.getvalue()


def test_an_output_that_is_not_a_training_checkpoint_is_refused(tiny):
    from pipeline.train.loop import train_jbu

    output = tiny["root"] / "foreign.ckpt"
    torch.save({"state_dict": {"upsampler.x": torch.zeros(1)}}, output)
    with pytest.raises(ConfigError, match="expected a new path or a checkpoint of featup train-jbu"):
        train_jbu(_config(tiny["train"], output), err=io.StringIO())


def test_stream_resumes_at_a_batch_position_and_cycles_epochs(tiny):
    from pipeline.sources.decode import DecodeSpec
    from pipeline.train.stream import ImageBatches

    spec = DecodeSpec(image_size=SIZE, stride=8, mean=(0.5,) * 3, std=(0.25,) * 3)

    def take(start=None, n=5):
        stream = ImageBatches(tiny["train"], spec, 3, seed=4, **({"start": start} if start else {}))
        it = iter(stream)
        out = [next(it) for _ in range(n)]
        it.close()
        return out

    batches = take()  # 15 samples from 8: crosses two epoch boundaries
    assert {b.position.epoch for b in batches} == {0, 1}
    keys = [k for b in batches for k in b.keys]
    assert len(set(keys[:8])) == 8  # one epoch sees every sample once
    later = take(batches[1].position, 3)
    for got, expected in zip(later, batches[2:5]):
        assert got.keys == expected.keys
        assert torch.equal(got.images, expected.images)


def test_workers_read_disjoint_shards_or_samples(tiny):
    from pipeline.sources.decode import DecodeSpec
    from pipeline.train.stream import ImageBatches

    spec = DecodeSpec(image_size=SIZE, stride=8, mean=(0.5,) * 3, std=(0.25,) * 3)

    def epoch_keys(urls, rank, world):
        it = iter(ImageBatches(urls, spec, 1, seed=0, rank=rank, world=world))
        keys = set()
        while True:
            batch = next(it)
            if batch.position.epoch > 0:
                break
            keys.update(batch.keys)
        it.close()
        return keys

    for urls in (tiny["train"], tiny["train"][:1]):  # 2 shards: one each; 1 shard: every other sample
        a, b = epoch_keys(urls, 0, 2), epoch_keys(urls, 1, 2)
        assert a and b and not a & b
        assert len(a | b) == 4 * len(urls)


def test_bad_samples_are_skipped_and_never_unpickled(tiny, tmp_path):
    from pipeline.sources.decode import DecodeSpec
    from pipeline.train.stream import ImageBatches

    bad, expected = corpus.make_bad_shard(tmp_path)
    spec = DecodeSpec(image_size=SIZE, stride=8, mean=(0.5,) * 3, std=(0.25,) * 3)
    stream = ImageBatches([bad], spec, 1, seed=0)
    it = iter(stream)
    keys = {k for _ in range(sum(v == "ok" for v in expected.values())) for k in next(it).keys}
    it.close()
    assert keys == {k for k, v in expected.items() if v == "ok"}
    assert stream.skipped == sum(v == "error" for v in expected.values())
    assert not corpus.pickle_marker(tmp_path).exists()


def test_a_stream_without_usable_images_stops_with_a_clear_error(tmp_path):
    from pipeline.sources.decode import DecodeSpec
    from pipeline.train.stream import ImageBatches

    shard = corpus.write_shard(tmp_path / "text.tar", [{"__key__": "a", "jpg": b"not an image"}])
    spec = DecodeSpec(image_size=SIZE, stride=8, mean=(0.5,) * 3, std=(0.25,) * 3)
    with pytest.raises(InputError, match="expected decodable images, got 1 bad samples and none usable"):
        next(iter(ImageBatches([shard], spec, 2, seed=0)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"steps": 0}, "--steps: expected a positive integer, got 0"),
        ({"batch_size": -1}, "--batch-size: expected a positive integer, got -1"),
        ({"max_pad": 40}, "--max-pad: expected an integer >= 0 below --image-size 32, got 40"),
        ({"max_zoom": 0.5}, "--max-zoom: expected a number >= 1, got 0.5"),
        ({"projection_dim": 0}, "--projection-dim: expected none or an integer >= 1, got 0"),
        ({"crf_weight": -1.0}, "--crf-weight: expected a weight >= 0, got -1.0"),
        ({"lr": -1.0}, "--lr: expected a positive learning rate, got -1.0"),
        ({"device": "tpu"}, "--device: expected auto, cpu or cuda"),
        ({"inputs": ()}, "inputs: expected one or more shard paths or URLs"),
    ],
)
def test_config_is_validated_with_the_flag_names(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        settings = dict(overrides)
        _config(settings.pop("inputs", ["x.tar"]), "out.ckpt", **settings)


def test_image_size_must_be_a_multiple_of_the_stride(tiny):
    from pipeline.train.loop import prepare

    with pytest.raises(ConfigError, match="--image-size: expected a multiple of the stride 8 of backbone 'featup_tiny_net:tiny', got 36"):
        prepare(_config(tiny["train"], tiny["root"] / "never.ckpt", image_size=36))


def test_missing_shards_are_refused_before_training(tiny):
    from pipeline.train.loop import train_jbu

    with pytest.raises(InputError, match="cannot be read"):
        train_jbu(_config([*tiny["train"], str(tiny["root"] / "missing.tar")], tiny["root"] / "never.ckpt"), err=io.StringIO())


def test_overwrite_checks_inputs_and_backbone_before_deleting_the_old_model(tiny):
    from featup.errors import FeatUpError
    from pipeline.train.loop import train_jbu

    config = _config(tiny["train"], tiny["root"] / "keep" / "jbu.ckpt", steps=1)
    train_jbu(config, err=io.StringIO())
    files = {p.name: p.read_bytes() for p in (tiny["root"] / "keep").iterdir()}
    assert set(files) == {"jbu.ckpt", "jbu.losses.csv", "jbu.losses.png"}
    typo = str(tiny["root"] / "no-such-shards-{0..1}.tar")
    with pytest.raises(FeatUpError, match="no-such-shards"):
        train_jbu(replace(config, inputs=(typo,), overwrite=True), err=io.StringIO())
    with pytest.raises(FeatUpError, match="expected a multiple of the stride"):
        train_jbu(replace(config, image_size=36, overwrite=True), err=io.StringIO())
    assert {p.name: p.read_bytes() for p in (tiny["root"] / "keep").iterdir()} == files  # the trained model is intact
