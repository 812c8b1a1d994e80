"""Tests of the ``featup`` command dispatcher: subcommand registry, --version, error handling and exit codes."""

import argparse
import textwrap

import pytest
import torch

from featup import __version__
from featup.errors import ConfigError
from jobs import cli


@pytest.fixture
def fake_command(tmp_path, monkeypatch):
    """Registers an importable subcommand module ``fake_cmd`` whose ``run`` does what ``--mode`` says."""
    (tmp_path / "fake_cmd.py").write_text(
        textwrap.dedent(
            '''
            """Do a fake thing for the tests."""
            from featup.errors import ConfigError

            def add_arguments(parser):
                parser.add_argument("--mode", default="ok")

            def run(args):
                if args.mode == "config":
                    raise ConfigError("widget 'blue': expected red or green, got blue")
                if args.mode == "interrupt":
                    raise KeyboardInterrupt
                if args.mode == "bug":
                    raise RuntimeError("a real bug")
                return 0 if args.mode == "ok" else 1
            '''
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.SUBCOMMANDS, "fake", "fake_cmd")


def test_version_prints_package_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"featup {__version__}"


def test_missing_subcommand_is_a_usage_error(capsys):
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().err


def test_help_lists_registered_subcommands_with_their_summary(capsys, fake_command):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "upsample" in out and "fake" in out and "Do a fake thing for the tests." in out


def test_subcommand_runs_and_its_return_value_is_the_exit_code(fake_command):
    assert cli.main(["fake"]) == 0
    assert cli.main(["fake", "--mode", "fail"]) == 1


def test_featup_error_becomes_one_line_and_exit_2(capsys, fake_command):
    assert cli.main(["fake", "--mode", "config"]) == 2
    err = capsys.readouterr().err
    assert err == "featup: error: widget 'blue': expected red or green, got blue\n"


def test_keyboard_interrupt_exits_130(capsys, fake_command):
    assert cli.main(["fake", "--mode", "interrupt"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_other_exceptions_are_not_swallowed(fake_command):
    with pytest.raises(RuntimeError, match="a real bug"):
        cli.main(["fake", "--mode", "bug"])


def test_upsample_help_shows_its_options(capsys):
    assert cli.main(["upsample", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--backbone", "--weights", "--checkpoint", "--upsampler", "--image-size", "--device", "--out"):
        assert option in out


def test_upsample_requires_backbone_and_out(capsys):
    assert cli.main(["upsample", "x.png"]) == 2
    assert "--backbone" in capsys.readouterr().err


def test_resolve_device_auto_follows_cuda_availability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cli.resolve_device("auto") == torch.device("cuda")
    assert cli.resolve_device("cuda:1") == torch.device("cuda:1")


def test_resolve_device_rejects_unavailable_or_unknown(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        cli.resolve_device("cuda")
    with pytest.raises(ConfigError, match="'gpu0'"):
        cli.resolve_device("gpu0")
    with pytest.raises(ConfigError, match="'meta'"):
        cli.resolve_device("meta")


def test_positive_int():
    assert cli.positive_int("64") == 64
    for bad in ("0", "-3", "abc"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.positive_int(bad)
