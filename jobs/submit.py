"""Run a featup command on a Ray cluster through Ray's Jobs API: submit it, follow its logs, exit with its status."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence, TextIO

from featup.errors import ConfigError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Left out of the uploaded working dir (Ray also honours .gitignore): environments, VCS, outputs, stores, shards.
EXCLUDES = (
    ".venv", "venv", ".git", ".gpu_fixtures", "demo-out", "out", "build", ".whl", "__pycache__", "*.egg-info", ".pytest_cache",
    "*.zarr", "*.tar",
)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
POLL_S = 1.0
PROJECT_ROOT = Path(__file__).resolve().parents[1]

EPILOG = """\
examples:
  featup submit --address http://HEAD:8265 -- precompute 's3://bucket/train-{000000..000127}.tar' \\
      --output s3://bucket/train.zarr --backbone dino16 --device cuda --actors auto

the same with Ray's own command (what featup submit sends):
  ray job submit --address http://HEAD:8265 --working-dir . \\
      --runtime-env-json '{"excludes": [".venv", ".git", "demo-out", "*.zarr", "*.tar"]}' \\
      -- featup precompute 's3://bucket/train-{000000..000127}.tar' --output s3://bucket/train.zarr \\
      --backbone dino16 --device cuda --actors auto --address auto

The job's driver runs on the head node; `--address auto`, added to commands that take --address (precompute,
train-jbu) when missing, joins that cluster. The command's arguments are checked here before anything is uploaded.
Ctrl-C stops following the logs; the job keeps running (stop it with `ray job stop JOB_ID --address ...`).
With token authentication (Ray's default), the cluster's token must be here too: RAY_AUTH_MODE=token and
RAY_AUTH_TOKEN, or the token file ~/.ray/auth_token.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``featup submit`` options; everything after ``--`` is the featup command to run on the cluster."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument(
        "--address", default=None,
        help=f"the head's dashboard (Jobs API) URL (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS or {DEFAULT_ADDRESS})",
    )
    parser.add_argument("--working-dir", default=None, help="folder uploaded as the job's working dir (default: this project)")
    parser.add_argument(
        "--no-working-dir", action="store_true", help="upload nothing: the cluster has the project installed (cluster.yaml)"
    )
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable of the job (repeatable)")
    parser.add_argument("--submission-id", default=None, help="the job's id (default: chosen by Ray)")
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return without following the job")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...", help="the featup subcommand and its arguments")


def run(args: argparse.Namespace) -> int:
    """Submits the command, prints the job id, follows the logs to the end and returns 0 if the job succeeded."""
    try:
        command = check_command(args.command)
    except SystemExit as e:  # argparse printed the remote command's usage error (or its --help)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    address = args.address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    runtime_env = build_runtime_env(args)
    warn_visible_credentials([*(f"--env={pair}" for pair in args.env), *command])
    client = connect(address)
    job_id = client.submit_job(
        entrypoint=shlex.join(["featup", *command]), runtime_env=runtime_env, submission_id=args.submission_id,
        metadata={"featup_command": command[0]},
    )
    out = sys.stdout
    print(f"featup: submitted job {job_id} to {address}", file=out, flush=True)
    if args.no_wait:
        print(f"featup: follow it with `ray job logs --follow {job_id} --address {address}`", file=out, flush=True)
        return EXIT_OK
    try:
        follow_logs(client, job_id, out)
        status = wait_for_end(client, job_id)
    except KeyboardInterrupt:
        print(
            f"\nfeatup: stopped following; job {job_id} keeps running (stop it with `ray job stop {job_id} --address {address}`)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    message = (client.get_job_info(job_id).message or "").strip().splitlines()[:1]  # the rest repeats the logs above
    message = message[0] if message else ""
    print(f"featup: job {job_id} {status}" + (f": {message}" if message and status != "SUCCEEDED" else ""), file=out, flush=True)
    return EXIT_OK if status == "SUCCEEDED" else EXIT_FAILED


def check_command(command: Sequence[str]) -> list[str]:
    """The featup command to run remotely, checked here with its own parser; ``--address auto`` added when it joins Ray.

    A usage error in the command's arguments exits (SystemExit) before anything is uploaded.
    """
    from jobs.cli import SUBCOMMANDS

    command = list(command)
    if command and command[0] == "--":
        command = command[1:]
    names = sorted(n for n in SUBCOMMANDS if n != "submit")
    if not command or command[0] not in names:
        got = command[0] if command else "nothing"
        raise ConfigError(f"submit: expected a featup command after -- ({', '.join(names)}), got {got!r}")
    parser = argparse.ArgumentParser(prog=f"featup submit -- {command[0]}")
    importlib.import_module(SUBCOMMANDS[command[0]]).add_arguments(parser)
    parsed = parser.parse_args(command[1:])
    if hasattr(parsed, "backbone") and hasattr(parsed, "checkpoint"):  # a model command: its backbone named or implied
        from jobs.models import resolve_names

        try:
            resolve_names(parsed)  # no network: the cluster fetches named weights itself
        except ConfigError as e:
            parser.error(str(e))
    has_address = any("--address" in action.option_strings for action in parser._actions)
    given = any(a == "--address" or a.startswith("--address=") for a in command[1:])
    return command + ["--address", "auto"] if has_address and not given else command


def warn_visible_credentials(argv: Sequence[str]) -> None:
    """One warning naming the credentials given to the job (masked): the cluster shows them to whoever holds its token.

    ``--env`` values travel only in the job's runtime environment (never in the entrypoint), but ``ray job list``
    prints that environment, and the entrypoint with its ``--storage-option`` values, to every holder of the token.
    """
    from pipeline.runtime.secrets import credential_options

    found = credential_options(argv)
    if found:
        print(f"featup: warning: {', '.join(found)} can be read on the cluster by anyone holding its token "
              "(`ray job list` shows the job's command line and environment); give the nodes their own storage "
              "credentials instead (an instance profile, or the nodes' environment: see cluster.yaml)", file=sys.stderr)


def build_runtime_env(args: argparse.Namespace) -> dict[str, Any]:
    """The job's runtime environment: the project folder (small: environments and outputs excluded) and env vars."""
    env: dict[str, Any] = {}
    if args.env:
        env["env_vars"] = dict(_env_pair(pair) for pair in args.env)
    if args.no_working_dir:
        if args.working_dir:
            raise ConfigError(f"--working-dir: expected no folder with --no-working-dir, got {args.working_dir!r}")
        return env
    folder = Path(args.working_dir) if args.working_dir else PROJECT_ROOT
    if not (folder / "pyproject.toml").is_file():
        raise ConfigError(
            f"--working-dir: expected the featup-pipeline project folder (with pyproject.toml), got {str(folder)!r}; "
            "pass --no-working-dir when the cluster has the project installed"
        )
    return {**env, "working_dir": str(folder), "excludes": list(EXCLUDES)}


def _env_pair(pair: str) -> tuple[str, str]:
    key, sep, value = pair.partition("=")
    if not sep or not key:  # the whole text may be a secret given without its name: never echoed
        raise ConfigError("--env: expected KEY=VALUE, got a value without a name and '=' (not shown: it may be a secret)")
    return key, value


def connect(address: str):
    """A JobSubmissionClient of the cluster at ``address``; an unreachable or refusing cluster is a ConfigError."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError as e:
        raise ConfigError(
            f"--address {address}: the cluster refused this client's token ({str(e).splitlines()[0]}); "
            "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or ~/.ray/auth_token) to the cluster's token"
        ) from None
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise ConfigError(f"--address: expected a reachable Ray dashboard (Jobs API), got {address} ({e})") from None


def follow_logs(client, job_id: str, out: TextIO) -> None:
    """Writes the job's logs as they come until the job ends (streamed; polled if the stream cannot be opened).

    Whole lines are written, each masked (``pipeline.runtime.secrets.mask_text``): a secret is never split across
    two writes, where masking could not see it whole.
    """
    lines = _LineWriter(out)

    async def stream() -> None:
        async for chunk in client.tail_job_logs(job_id):
            lines.write(chunk)

    try:
        asyncio.run(stream())
        lines.close()
        return
    except Exception as e:  # websocket refused or dropped (proxies, aiohttp errors): the plain HTTP API still works
        print(f"featup: warning: log stream of job {job_id} broke ({e!r}); polling the logs instead", file=sys.stderr)
    while True:
        done = str(client.get_job_status(job_id).value) in TERMINAL  # read before the logs, so the last lines are not missed
        logs = client.get_job_logs(job_id)
        lines.write(logs[lines.received:])
        if done:
            lines.close()
            return
        time.sleep(POLL_S)


class _LineWriter:
    """Writes text to ``out`` a whole line at a time, masked; ``received`` counts the characters given to it."""

    def __init__(self, out: TextIO) -> None:
        self.out, self.pending, self.received = out, "", 0

    def write(self, text: str) -> None:
        from pipeline.runtime.secrets import mask_text

        self.received += len(text)
        whole, newline, self.pending = (self.pending + text).rpartition("\n")
        if newline:
            self.out.write(mask_text(whole + newline))
            self.out.flush()

    def close(self) -> None:
        from pipeline.runtime.secrets import mask_text

        if self.pending:
            self.out.write(mask_text(self.pending))
            self.out.flush()
        self.pending = ""


def wait_for_end(client, job_id: str) -> str:
    """The job's final status (the log stream can end a moment before the status is final)."""
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        time.sleep(POLL_S / 4)
