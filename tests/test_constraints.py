"""constraints.txt, the one resolved set (Linux x86-64, Python 3.11): it covers pyproject.toml, is closed, and every install uses it."""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
# The supported platform the lock was resolved for: markers are evaluated there, whatever machine runs the test.
TARGET = default_environment() | {
    "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
    "python_version": "3.11",
}


def read_pins(text: str) -> dict[NormalizedName, Version]:
    """Name -> version of every `name==version` line of a pip-compile output (comments and options skipped)."""
    pins: dict[NormalizedName, Version] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==" and not req.extras and not req.marker, line
        name = canonicalize_name(req.name)
        assert name not in pins, f"{name} pinned twice"
        pins[name] = Version(specs[0].version)
    return pins


def declared(project: dict) -> list[tuple[str, Requirement]]:
    """(group, requirement) of every dependency in pyproject's [project]: group `base` or the extra's name."""
    groups = {"base": project["dependencies"], **project["optional-dependencies"]}
    return [(group, Requirement(line)) for group, lines in groups.items() for line in lines]


def applies(req: Requirement, extra: str = "") -> bool:
    """Whether a requirement is wanted on the target platform (with `extra` requested)."""
    return req.marker is None or req.marker.evaluate(TARGET | {"extra": extra})


def lock_problems(project: dict, pins: dict[NormalizedName, Version]) -> list[str]:
    """One line per declared dependency that the lock does not pin, or pins outside pyproject's range."""
    problems = []
    for group, req in declared(project):
        if not applies(req, group):
            continue
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req} ({group}) is not pinned in constraints.txt: run make lock")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{name}=={pins[name]} in constraints.txt is outside {req} ({group}): run make lock")
    return problems


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


@pytest.fixture(scope="module")
def pins() -> dict[NormalizedName, Version]:
    return read_pins(LOCK.read_text())


def test_every_declared_dependency_of_every_extra_is_pinned_inside_its_range(project, pins):
    groups = {group for group, _ in declared(project)}
    assert groups == {"base", "pipeline", "test", "demo", "docs"}
    assert lock_problems(project, pins) == []
    assert pins[canonicalize_name("torch")] == Version("2.14.1")  # by version, as pyproject.toml pins it
    assert pins[canonicalize_name("torchvision")] == Version("0.29.1")


def test_the_check_names_a_range_the_lock_misses_an_unpinned_dependency_and_a_dropped_pin(project, pins):
    drifted = copy.deepcopy(project)
    drifted["optional-dependencies"]["pipeline"] = [
        "zarr>=99" if d.startswith("zarr") else d for d in drifted["optional-dependencies"]["pipeline"]
    ] + ["notapackage>=1"]
    missing = {name: v for name, v in pins.items() if name != "moto"}
    problems = lock_problems(drifted, missing)
    assert len(problems) == 3, problems
    assert re.fullmatch(rf"zarr=={re.escape(str(pins['zarr']))} in constraints.txt is outside zarr>=99 \(pipeline\).*",
                        problems[0])
    assert problems[1].startswith("notapackage>=1 (pipeline) is not pinned")
    assert problems[2].startswith("moto[server]>=5 (test) is not pinned")


def test_the_lock_is_closed_and_is_what_this_environment_runs(project, pins):
    """Walk every requirement from pyproject's through the installed packages' own metadata (with the extras asked
    for): each one is pinned inside its range and installed at its pin, and nothing else is pinned."""
    wanted: dict[NormalizedName, set[str]] = {}
    todo = [(req, group) for group, req in declared(project)]
    problems = []
    while todo:
        req, extra = todo.pop()
        if not applies(req, extra):
            continue
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req} (needed with extra {extra!r}) is not pinned")
            continue
        if not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{name}=={pins[name]} is outside {req}")
        new = set(req.extras) | {""}
        if name in wanted and new <= wanted[name]:
            continue
        wanted.setdefault(name, set()).update(new)
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            installed = "not"
        assert installed == pins[name], f"{name} {installed} installed, constraints.txt pins {pins[name]}: run make"
        for line in metadata.requires(name) or []:
            todo.extend((Requirement(line), e) for e in new)
    assert problems == []
    assert sorted(set(pins) - set(wanted)) == []  # a pin nothing needs: left over from a removed dependency


def test_the_lock_says_how_it_was_made_and_make_lock_makes_it_so():
    header = LOCK.read_text().split("\n\n", 1)[0]
    command = re.search(r"^#\s+make lock\s+\(= (pip-tools==\S+): pip-compile (.*) pyproject\.toml\)$", header, re.M)
    assert command, header
    makefile = (ROOT / "Makefile").read_text()
    variables = dict(re.findall(r"^(\w+) :?= (.*)$", makefile, re.M))
    opts = variables["LOCK_OPTS"].replace("$(CONSTRAINTS)", variables["CONSTRAINTS"])
    assert (command[1], shlex.split(command[2])) == (variables["PIP_TOOLS"], shlex.split(opts))
    assert "--all-extras" in opts and variables["CONSTRAINTS"] == LOCK.name


def test_the_readme_commands_and_ci_install_with_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    rule = re.search(r"^\$\(VENV\)/\.installed: (.*)\n((?:\t.*\n)+)", makefile, re.M)
    assert rule, "no install rule in the Makefile"
    assert {"pyproject.toml", "$(CONSTRAINTS)"} <= set(rule[1].split())  # a new lock reinstalls
    assert re.search(r"pip install .*-c \$\(CONSTRAINTS\) .*-e '\.\[pipeline,test,demo,docs\]'", rule[2])
    for target in ("demo", "test"):
        assert re.search(rf"^{target}: \$\(VENV\)/\.installed$", makefile, re.M), target
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^exec make test$", ci, re.M)
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme and "make lock" in readme
