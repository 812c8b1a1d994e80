"""The ``--implicit-*`` options of ``featup precompute``: every knob of the per-image implicit fit, defaults published."""

from __future__ import annotations

import argparse
from typing import Any, NamedTuple

from jobs.cli import positive_int


class _Option(NamedTuple):
    flag: str
    field: str  # the ImplicitFitConfig field it sets
    kind: Any  # an argparse type, or False for a switch that turns a published default off
    help: str


def _number(kind: type, low: float, strict: bool, expected: str):
    """An argparse type: a ``kind`` number above ``low`` (strictly when ``strict``), else "expected ..."."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not (value > low if strict else value >= low):  # NaN fails too
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_float = _number(float, 0.0, True, "a number > 0")
_non_negative_float = _number(float, 0.0, False, "a number >= 0")
_non_negative_int = _number(int, 0, False, "an integer >= 0")


OPTIONS = (
    _Option("--implicit-steps", "steps", positive_int, "optimiser steps per image (default 1200)"),
    _Option("--implicit-views", "n_views", positive_int, "jittered views featurized per image (default 3000)"),
    _Option("--implicit-views-per-step", "views_per_step", positive_int, "views drawn for each step (default 10)"),
    _Option("--implicit-pca-dim", "pca_dim", positive_int, "fit in this many PCA channels of the views (default 128)"),
    _Option("--implicit-pca-views", "pca_views", positive_int, "views the fit's PCA is computed on (default 50)"),
    _Option("--implicit-lr", "lr", _positive_float, "NAdam learning rate (default 0.002)"),
    _Option("--implicit-max-pad", "max_pad", _non_negative_int, "jitter: reflect padding, less than the image size (default 30)"),
    _Option("--implicit-max-zoom", "max_zoom", _positive_float, "jitter: largest zoom, >= 1 (default 1.8)"),
    _Option("--implicit-no-flips", "use_flips", False, "jitter: no horizontal flips"),
    _Option("--implicit-freqs", "n_freqs", positive_int, "Fourier frequencies of coordinates and colour (default 30)"),
    _Option("--implicit-hidden-dim", "hidden_dim", positive_int, "hidden width of the network (default 128)"),
    _Option("--implicit-no-color", "color_feats", False, "Fourier features of the coordinates only, not of the colour"),
    _Option("--implicit-dropout", "dropout", _non_negative_float, "dropout of the network, in [0, 1) (default 0.2)"),
    _Option("--implicit-downsampler", "downsampler", str, "attention (default) or blur"),
    _Option("--implicit-kernel-size", "kernel_size", positive_int, "downsampler window (default: the backbone's stride)"),
    _Option("--implicit-no-blur-attn", "blur_attn", False, "attention downsampler without its Gaussian pre-blur"),
    _Option("--implicit-no-scale-net", "scale_net", False, "no predicted per-pixel uncertainty of the views' features"),
    _Option("--implicit-mag-weight", "magnitude_weight", _non_negative_float, "weight of the magnitude term (default 0.001)"),
    _Option("--implicit-mag-tv-weight", "magnitude_tv_weight", _non_negative_float, "weight of the magnitude TV term (default 0.05)"),
    _Option("--implicit-blur-pin", "blur_pin_weight", _non_negative_float, "weight of the blur pin term (default 0.1)"),
    _Option("--implicit-featurize-batch", "featurize_batch", positive_int, "views per backbone call (default 64)"),
)


def add_implicit_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``--implicit-*`` group; unset options keep the published defaults."""
    group = parser.add_argument_group("implicit upsampler (with --upsampler implicit; about a minute per image on an A100)")
    for opt in OPTIONS:
        if opt.kind is False:
            group.add_argument(opt.flag, dest=_dest(opt), action="store_const", const=False, default=None, help=opt.help)
        else:
            group.add_argument(opt.flag, dest=_dest(opt), type=opt.kind, default=None, help=opt.help)


def implicit_settings(args: argparse.Namespace):
    """The ImplicitFitConfig of the given options with --upsampler implicit (None otherwise; options then refused)."""
    from featup.errors import ConfigError

    given = {opt.field: getattr(args, _dest(opt)) for opt in OPTIONS if getattr(args, _dest(opt), None) is not None}
    if args.upsampler != "implicit":
        if given:
            flags = ", ".join(opt.flag for opt in OPTIONS if opt.field in given)
            raise ConfigError(f"{flags}: expected --upsampler implicit, got --upsampler {args.upsampler}")
        return None
    from featup.upsamplers.implicit_fit import ImplicitFitConfig

    try:
        return ImplicitFitConfig(**given)
    except ConfigError as e:  # name the flag, not the config field
        message = str(e)
        for opt in OPTIONS:
            message = message.replace(f"implicit {opt.field}", opt.flag)
        raise ConfigError(message) from None


def _dest(opt: _Option) -> str:
    return opt.flag.removeprefix("--").replace("-", "_")
