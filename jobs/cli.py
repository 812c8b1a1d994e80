"""The ``featup`` console command: one argparse subcommand per module listed in ``SUBCOMMANDS``."""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType
from typing import Sequence

from featup import __version__
from featup.devices import resolve_device  # noqa: F401  (re-exported: subcommands import it from here)
from featup.errors import FeatUpError

# Subcommand name -> module exposing ``add_arguments(parser)`` and ``run(args) -> int``.
# Modules should import optional heavy dependencies inside ``run`` so ``featup --help`` stays light.
SUBCOMMANDS: dict[str, str] = {
    "upsample": "jobs.upsample",
    "precompute": "jobs.precompute",
    "materialize": "jobs.materialize",
    "demo": "jobs.demo",
    "inspect": "jobs.inspect",
    "show": "jobs.show",
    "probe": "jobs.probe",
    "submit": "jobs.submit",
    "train-jbu": "jobs.train_jbu",
    "evaluate": "jobs.evaluate",
}

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def build_parser(subcommands: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """The top-level parser with one subparser per entry of ``subcommands`` (default ``SUBCOMMANDS``)."""
    parser = argparse.ArgumentParser(prog="featup", description="FeatUp: high-resolution deep features.")
    parser.add_argument("--version", action="version", version=f"featup {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in (subcommands or SUBCOMMANDS).items():
        module = importlib.import_module(module_name)
        summary = _summary(module)
        child = sub.add_parser(name, help=summary, description=summary)
        module.add_arguments(child)
        child.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parses ``argv`` and runs the subcommand; FeatUpErrors become one ``featup: error:`` line and exit code 2.

    Everything the command prints goes through ``pipeline.runtime.secrets.masking``: the credentials of its command
    line (``--storage-option``, ``--env``, credential URL parts) and of any URL it prints show as ``***``; the
    subcommand gets the masked command line as ``args.command_line``.
    """
    from pipeline.runtime.secrets import masking

    argv = list(sys.argv[1:] if argv is None else argv)
    with masking(["featup", *argv]) as command_line:
        return _main(argv, command_line)


def _main(argv: list[str], command_line: list[str]) -> int:
    from pipeline.runtime.storage import quiet_abandoned_request_errors

    parser = build_parser()
    quiet_abandoned_request_errors()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors: argparse has printed what to say
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    args.command_line = command_line  # masked: what a store's provenance and a report may keep
    try:
        return int(args.run(args))
    except FeatUpError as e:  # bad input or settings (exit 2), or a fault that a rerun resumes past (its own code, 1)
        print(f"featup: error: {e}", file=sys.stderr)
        return int(getattr(e, "exit_code", EXIT_USAGE))
    except KeyboardInterrupt:
        print("featup: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def command_line_of(args: argparse.Namespace) -> list[str]:
    """The masked command line of a parsed command (``main`` sets it), else this process's own, masked."""
    from pipeline.runtime.secrets import mask_argv

    return list(getattr(args, "command_line", None) or mask_argv(sys.argv))


def positive_int(text: str) -> int:
    """An argparse type: a strictly positive integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _summary(module: ModuleType) -> str:
    """The first line of a module's docstring, used as its subcommand help."""
    return (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""


if __name__ == "__main__":
    sys.exit(main())
