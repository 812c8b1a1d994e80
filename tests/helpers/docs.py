"""The examples of README.md and docs/: fenced blocks, their markers, and the checks of the shell commands they show.

Import it as ``from tests.helpers import docs as doc_helpers``.

A fenced block may be preceded (on the line before its fence, blank lines allowed) by one HTML comment that says how
the tests treat it; GitHub and MkDocs render neither the comment nor anything of it:

* ``<!-- illustrative: REASON -->``: shown, never run nor checked (a download, a cluster, another tool); the reason
  is required, so a reader of the source sees why.
* ``<!-- run -->`` before a ``bash`` block: each ``featup`` line is run in process against the docs fixture store
  and must exit 0 (``tests/docs/test_examples.py``).

Unmarked ``python`` blocks are executed, page by page in one namespace (``tests/docs/test_examples.py``); every
unmarked ``bash`` command is checked (``check_command``): ``featup`` flags against the subcommand's own parser,
``make`` targets against the Makefile, ``python`` scripts and their flags against the script's source, ``pip install``
constraints files and extras against the project.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)\s*$")
MARKER = re.compile(r"^<!--\s*(illustrative|run)\s*(?::\s*(.*?))?\s*-->$")
FLAG = re.compile(r"^\[?(--?[A-Za-z][\w-]*)")
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")


@dataclass(frozen=True)
class Block:
    """One fenced block: the file, the line of its first code line (1-based), language, text and marker."""

    path: Path
    line: int
    lang: str
    text: str
    marker: str | None = None  # "illustrative" or "run"
    reason: str = ""

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def pages() -> list[Path]:
    """README.md and every Markdown page under docs/, in a stable order."""
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, each with the marker comment just before its fence (if any)."""
    lines = path.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i].strip())
        if not opening:
            i += 1
            continue
        fence, lang = opening.groups()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence), None)
        if end is None:
            raise AssertionError(f"{path.relative_to(ROOT)}:{i + 1}: fence {fence} is never closed")
        marker, reason = _marker_before(lines, i)
        found.append(Block(path, i + 2, lang.lower(), "\n".join(lines[i + 1 : end]) + "\n", marker, reason))
        i = end + 1
    return found


def _marker_before(lines: list[str], fence_line: int) -> tuple[str | None, str]:
    """The marker comment on the last non-blank line before ``fence_line``, if it is one."""
    j = fence_line - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    match = MARKER.match(lines[j].strip()) if j >= 0 else None
    return (match[1], match[2] or "") if match else (None, "")


def shell_commands(block: Block) -> list[tuple[int, str]]:
    """(line, command) of each command in a shell block: continuation lines joined, blank and comment lines skipped."""
    commands: list[tuple[int, str]] = []
    pending, start = "", 0
    for offset, raw in enumerate(block.text.splitlines()):
        line = raw.rstrip()
        if not pending:
            start = block.line + offset
            if not line.strip() or line.lstrip().startswith("#"):
                continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        commands.append((start, pending + line))
        pending = ""
    if pending:
        commands.append((start, pending))
    return commands


def words(command: str) -> list[str]:
    """The command's words as the shell splits them (quotes removed, ``# comments`` dropped, ``VAR=value`` prefixes
    and a trailing ``&`` left out)."""
    tokens = shlex.split(command, comments=True)
    while tokens and ENV_ASSIGNMENT.match(tokens[0]):
        tokens.pop(0)
    return [t for t in tokens if t != "&"]


def flags(tokens: list[str]) -> list[str]:
    """The options named in a command's words, also inside ``[--flag VALUE]`` and as ``--flag=value``."""
    return [m[1].split("=")[0] for t in tokens if (m := FLAG.match(t)) and not t.startswith("---")]


def check_command(command: str) -> list[str]:
    """What is wrong with one shell command shown in the docs: an empty list when it checks out."""
    tokens = words(command)
    if not tokens:
        return []
    program = tokens[0]
    checkers = {"featup": check_featup, "make": check_make, "python": check_python, "pip": check_pip}
    if program not in checkers:
        return [f"no check for {program!r} commands: run it in a test, or mark its block <!-- illustrative: reason -->"]
    return checkers[program](tokens[1:])


def check_featup(args: list[str]) -> list[str]:
    """The subcommand exists and every flag shown is one of its options; ``submit -- CMD ...`` checks CMD too."""
    if not args or args[0] in ("-h", "--help", "--version"):
        return []
    parsers = subcommand_parsers()
    name = args[0]
    if name not in parsers:
        return [f"featup has no subcommand {name!r} (it has {', '.join(parsers)})"]
    rest = args[1:]
    if name == "submit" and "--" in rest:
        cut = rest.index("--")
        return _unknown_flags("submit", parsers["submit"], rest[:cut]) + check_featup(rest[cut + 1 :])
    return _unknown_flags(name, parsers[name], rest)


def _unknown_flags(name: str, parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    known = parser._option_string_actions  # every option string of the subcommand, as argparse matches them
    return [f"featup {name} has no option {flag} (see featup {name} --help)" for flag in flags(args) if flag not in known]


@cache
def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    """Subcommand name -> its argparse parser, built by jobs.cli as ``featup --help`` builds them (in process)."""
    from jobs.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def check_make(args: list[str]) -> list[str]:
    """Every target named is a rule of the Makefile, every ``VAR=value`` one of its variables."""
    makefile = (ROOT / "Makefile").read_text()
    problems = []
    for arg in args:
        if "=" in arg:
            variable = arg.split("=", 1)[0]
            if not re.search(rf"\$\({variable}\)", makefile):
                problems.append(f"the Makefile does not use a variable {variable}")
        elif not re.search(rf"^{re.escape(arg)}:", makefile, re.M):
            problems.append(f"the Makefile has no target {arg!r}")
    return problems


def check_python(args: list[str]) -> list[str]:
    """``python -m MODULE`` names a module of the project; ``python SCRIPT`` a file whose source defines each flag."""
    if args[:1] == ["-m"]:
        module = args[1] if len(args) > 1 else ""
        return [] if importlib.util.find_spec(module) else [f"no module {module!r} to run with python -m"]
    if not args:
        return ["python without a script"]
    script = ROOT / args[0]
    if not script.is_file():
        return [f"no script {args[0]} in the project"]
    source = script.read_text()
    return [f"{args[0]} defines no option {flag}" for flag in flags(args[1:])
            if f'"{flag}"' not in source and f"'{flag}'" not in source]


def check_pip(args: list[str]) -> list[str]:
    """``pip install -c FILE '.[extras]'``: the constraints file exists and each extra is declared in pyproject.toml."""
    if args[:1] != ["install"]:
        return [f"pip {' '.join(args[:1])}: only pip install is checked"]
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    problems = []
    for i, arg in enumerate(args):
        if arg == "-c" and not (ROOT / args[i + 1]).is_file():
            problems.append(f"no constraints file {args[i + 1]}")
        if arg.startswith(".["):
            problems += [f"pyproject.toml declares no extra {e!r}" for e in arg[2:-1].split(",") if e not in extras]
    return problems
