"""The ``--implicit-*`` options of ``featup precompute``: parsed into an ImplicitFitConfig, refused without implicit."""

import pytest

from featup.upsamplers.implicit_fit import ImplicitFitConfig
from jobs.cli import build_parser, main
from jobs.implicit_options import OPTIONS
from jobs.precompute import build_config

BASE = ["precompute", "in.tar", "--output", "out.zarr", "--backbone", "dino16", "--weights", "random"]


def _config(*extra):
    return build_config(build_parser().parse_args([*BASE, *extra]))


def test_every_fit_setting_has_a_flag():
    from dataclasses import fields

    assert sorted(opt.field for opt in OPTIONS) == sorted(f.name for f in fields(ImplicitFitConfig))


def test_flags_set_the_fit_and_unset_ones_keep_the_published_defaults():
    config = _config(
        "--upsampler", "implicit", "--implicit-steps", "5", "--implicit-views", "8", "--implicit-lr", "0.01",
        "--implicit-no-flips", "--implicit-kernel-size", "29", "--implicit-downsampler", "blur", "--implicit-blur-pin", "0",
    )
    expected = ImplicitFitConfig(steps=5, n_views=8, lr=0.01, use_flips=False, kernel_size=29, downsampler="blur", blur_pin_weight=0.0)
    assert config.implicit == expected
    assert _config("--upsampler", "implicit").implicit == ImplicitFitConfig()
    assert _config().implicit is None


def test_implicit_flags_without_the_implicit_upsampler_are_refused(capsys):
    assert main([*BASE, "--implicit-steps", "5", "--implicit-no-color"]) == 2
    err = capsys.readouterr().err
    assert "featup: error: --implicit-steps, --implicit-no-color: expected --upsampler implicit, got --upsampler jbu" in err


def test_bad_values_name_the_flag(capsys):
    assert main([*BASE, "--upsampler", "implicit", "--implicit-dropout", "1.5"]) == 2
    assert "featup: error: --implicit-dropout: expected a number in [0, 1), got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args([*BASE, "--implicit-lr", "-1"])
    assert "--implicit-lr: expected a number > 0, got '-1'" in capsys.readouterr().err
