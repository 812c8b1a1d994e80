"""PrecomputeConfig validation, the store fingerprint, the --max-errors parser and the locations resolved once."""

import pytest

from featup.errors import ConfigError
from pipeline.runtime.storage import options_for
from pipeline.precompute.config import FINGERPRINT_FIELDS, PrecomputeConfig, parse_max_errors


def _config(**overrides):
    return PrecomputeConfig(**{"inputs": ("a.tar",), "output": "out.zarr", "backbone": "dino16", **overrides})


def test_fingerprint_holds_the_content_settings_and_not_the_resources():
    base = _config()
    assert set(base.store_fingerprint()) == set(FINGERPRINT_FIELDS)
    resources = dict(actors=4, batch_size=2, cpus_per_actor=2.0, gpus_per_actor=0.5, address="auto", max_errors=3,
                     decode_threads=4, kernel_backend="eager", overwrite=True, device="cpu", inputs=("b.tar",))
    assert _config(**resources).store_fingerprint() == base.store_fingerprint()
    assert _config(in_process=True).store_fingerprint() == base.store_fingerprint()  # where it runs: not the content
    for name, value in dict(dtype="float32", image_size=448, channels=8, labels=("seg.png",), upsampler="bilinear",
                            compact=True).items():
        assert _config(**{name: value}).store_fingerprint()[name] != base.store_fingerprint()[name]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(inputs=()), "inputs: expected one or more shard paths"),
        (dict(upsampler="nearest"), "--upsampler: expected one of jbu, bilinear, implicit, anyup, jafar, loftup, naf, uplift, got 'nearest'"),
        (dict(dtype="int8"), "--dtype: expected one of float16, bfloat16, float32, got 'int8'"),
        (dict(scale=2, output_size=64), "expected at most one of them"),
        (dict(image_size=0), "image-size: expected a positive integer, got 0"),
        (dict(channels=-3), "channels: expected a positive integer, got -3"),
        (dict(checkpoint="jbu.ckpt", upsampler="bilinear"), "--upsampler: expected jbu or one of anyup, jafar, loftup, naf, uplift with --checkpoint"),
        (dict(labels=("seg.png", "seg.png")), "expected distinct extensions"),
        (dict(labels=("features",)), "expected names other than"),
        (dict(actors=0), "actors: expected a positive integer, got 0"),
        (dict(cpus_per_actor=0), "--cpus-per-actor: expected a number > 0, got 0"),
        (dict(gpus_per_actor=-1), "--gpus-per-actor: expected a number >= 0, got -1"),
        (dict(write_threads=-1), "--write-threads: expected an integer >= 0, got -1"),
        (dict(device="tpu"), "--device: expected auto, cpu or cuda[:N], got 'tpu'"),
        (dict(in_process="yes"), "--in-process: expected True or False, got 'yes'"),
        (dict(in_process=True, address="auto"), "--in-process: expected no --address .*, got --address auto"),
        (dict(in_process=True, actors=2), "--in-process: expected --actors 1 .*, got --actors 2"),
        (dict(in_process=True, actors="auto"), "--in-process: expected --actors 1 .*, got --actors auto"),
        (dict(device="cuda", gpus_per_actor=0), "--gpus-per-actor: expected a number > 0 with --device cuda"),
        (dict(max_errors=1.5), "--max-errors: expected a fraction between 0 and 1, got 1.5"),
        (dict(kernel_backend="fast"), "--kernel-backend: expected one of auto, compiled, eager, got 'fast'"),
    ],
)
def test_bad_settings_are_refused_naming_the_option(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _config(**overrides)


def test_max_errors_is_a_count_or_a_fraction():
    assert parse_max_errors("10") == 10 and isinstance(parse_max_errors("10"), int)
    assert parse_max_errors("0.05") == pytest.approx(0.05) and parse_max_errors("5%") == pytest.approx(0.05)
    assert parse_max_errors("0") == 0
    for bad in ("-1", "ten", "150%", "1.5"):
        with pytest.raises(ConfigError, match="--max-errors"):
            parse_max_errors(bad)
    assert _config(max_errors=10).error_limit(1000) == 10
    assert _config(max_errors=0.05).error_limit(1000) == 50 and _config(max_errors=0.05).error_limit(39) == 1
    assert _config().error_limit(1000) == 50  # the default: 5% of all samples
    assert _config(max_errors=None).error_limit(1000) is None and parse_max_errors("none") is None


def test_remote_options_are_given_to_remote_urls_only_and_hidden_in_reports():
    options = {"key": "secret-key"}
    assert options_for("s3://bucket/x.tar", options) == options
    assert options_for("/data/x.tar", options) == {} and options_for("file:///data/x.tar", options) == {}
    assert _config(storage_options=options).describe()["storage_options"] == {"key": "***"}
    remote = _config(output="s3://bucket/out.zarr", checkpoint="s3://bucket/jbu.ckpt", storage_options=options)
    assert remote.output_location.options == options and remote.checkpoint_location.options == options
    assert _config(storage_options=options).output_location.options == {}  # a local output takes none
    assert "output_location" not in remote.describe() and "secret-key" not in str(remote.describe())


def test_bfloat16_is_stored_as_float32_and_other_dtypes_as_themselves():
    assert [_config(dtype=d).storage_dtype for d in ("float16", "bfloat16", "float32")] == ["float16", "float32", "float32"]


def test_cpus_per_actor_auto_shares_a_local_machine_and_an_explicit_value_wins():
    assert _config(actors=1).with_machine_resources(2).cpus_per_actor == 2.0
    assert _config(actors=2).with_machine_resources(2).cpus_per_actor == 1.0
    assert _config(actors=3).with_machine_resources(16).cpus_per_actor == 5.0
    assert _config(actors=4).with_machine_resources(2).cpus_per_actor == 1.0  # at least one each
    assert _config(actors=1, cpus_per_actor=1.5).with_machine_resources(8).cpus_per_actor == 1.5
    assert _config(actors="auto").with_machine_resources(8).cpus_per_actor == 1.0
    assert _config(actors=2, address="auto").with_machine_resources(8).cpus_per_actor == 1.0  # the cluster places by GPU
