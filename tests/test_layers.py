"""Imports point down and never in a circle: featup <- pipeline (runtime <- sources <- store <- jobs' packages) <- jobs.

Every import counts, at module level, inside functions and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("featup", "pipeline", "jobs")
# Rank of each pipeline subpackage: a module may import only lower ranks (or its own subpackage).
PIPELINE_RANKS = {"runtime": 1, "sources": 2, "store": 3, "precompute": 4, "train": 4, "analysis": 4, "evaluate": 5}
COMPAT_MODULES = {"pipeline.reader": 6}  # re-exports kept for users' code: nothing in the project may import them
FEATUP_FORBIDDEN = ("ray", "zarr", "webdataset", "pyarrow", "numcodecs", "s3fs", "pipeline", "jobs")


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the three packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Everything ``path`` imports, anywhere in the file: project modules resolved to the most specific one."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in modules else node.module)
    return found


def graph() -> tuple[dict[str, Path], dict[str, set[str]]]:
    modules = project_modules()
    return modules, {name: imports_of(path, modules) for name, path in modules.items()}


def pipeline_rank(module: str) -> int | None:
    if module in COMPAT_MODULES:
        return COMPAT_MODULES[module]
    parts = module.split(".")
    if parts[0] != "pipeline" or len(parts) < 2:
        return None
    return PIPELINE_RANKS.get(parts[1])


def upward_imports() -> list[str]:
    """Imports that break the layering, as ``importer -> imported`` lines."""
    _, edges = graph()
    bad = []
    for importer, imported in sorted(edges.items()):
        for target in sorted(imported):
            root = target.split(".")[0]
            if importer.startswith("featup") and root in FEATUP_FORBIDDEN:
                bad.append(f"{importer} -> {target} (featup is the method only: no pipeline, jobs, Ray or data I/O)")
            elif importer.startswith("pipeline") and root == "jobs":
                bad.append(f"{importer} -> {target} (pipeline must not import jobs)")
            elif importer.startswith("pipeline") and root == "pipeline":
                mine, theirs = pipeline_rank(importer), pipeline_rank(target)
                same = importer.split(".")[:2] == target.split(".")[:2]
                if theirs is None or mine is None:
                    if importer != "pipeline" and target != "pipeline":
                        bad.append(f"{importer} -> {target} (every pipeline module belongs to a ranked subpackage)")
                elif not same and theirs >= mine:
                    bad.append(f"{importer} -> {target} (rank {theirs} imported from rank {mine})")
            elif target in COMPAT_MODULES:
                bad.append(f"{importer} -> {target} (a compatibility re-export, for users only)")
    return bad


def import_cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), plus modules that import themselves."""
    modules, edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges[node]:
            if target not in modules:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges[node]:
                cycles.append(sorted(component))

    for name in modules:
        if name not in index:
            visit(name)
    return cycles


def test_imports_only_point_down():
    assert upward_imports() == []


def test_no_import_circles():
    assert import_cycles() == []


def test_every_pipeline_module_sits_in_a_ranked_subpackage():
    modules = project_modules()
    loose = [m for m in modules if m.startswith("pipeline.") and pipeline_rank(m) is None]
    assert loose == []


def test_the_checker_sees_function_level_and_type_checking_imports(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipeline.train.loop import TrainConfig\n"
        "def f():\n    import jobs.cli\n    from pipeline.store import features\n"
    )
    found = imports_of(source, project_modules())
    assert {"pipeline.train.loop", "jobs.cli", "pipeline.store.features"} <= found


def test_every_subpackage_says_what_it_owns():
    for init in sorted((ROOT / "pipeline").glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "import" in doc.lower(), f"{init.relative_to(ROOT)}: expected a docstring saying what it owns and imports"
