"""Every shell command shown in README.md and docs/ is checked: ``featup`` flags against the subcommand's parser (in
process, as ``featup <command> --help`` lists them), ``make`` targets, ``python`` scripts and their flags, ``pip``
extras. Blocks marked ``<!-- illustrative: reason -->`` are skipped (Ray's own CLI, a cluster)."""

from __future__ import annotations

import pytest

from tests.helpers import docs as doc_helpers


def shown_commands() -> list[tuple[str, str]]:
    """(page:line, command) of every shell command outside illustrative blocks."""
    return [
        (f"{block.path.relative_to(doc_helpers.ROOT)}:{line}", command)
        for page in doc_helpers.pages()
        for block in doc_helpers.blocks(page)
        if block.lang == "bash" and block.marker != "illustrative"
        for line, command in doc_helpers.shell_commands(block)
    ]


def test_every_command_shown_checks_out():
    commands = shown_commands()
    assert len(commands) > 20  # the docs show the featup subcommands, make targets and benchmarks
    problems = [f"{where}: {problem}" for where, command in commands for problem in doc_helpers.check_command(command)]
    assert problems == []


def test_the_docs_show_every_featup_subcommand():
    shown = {doc_helpers.words(command)[1] for _, command in shown_commands() if doc_helpers.words(command)[:1] == ["featup"]}
    assert set(doc_helpers.subcommand_parsers()) <= shown


@pytest.mark.parametrize("command, problem", [
    ("featup precompute in.tar --output o.zarr --no-such-flag", "featup precompute has no option --no-such-flag"),
    ("featup precompute in.tar [--codec auto|zstd] [--tiles 64]", "featup precompute has no option --tiles"),
    ("featup submit --address http://h:8265 -- precompute in.tar --outptu o.zarr", "featup precompute has no option --outptu"),
    ("featup submit --adress http://h:8265 -- precompute in.tar", "featup submit has no option --adress"),
    ("featup compute in.tar", "featup has no subcommand 'compute'"),
    ("make docs-build", "the Makefile has no target 'docs-build'"),
    ("make lock LOCK_FLAGS=--upgrade", "the Makefile does not use a variable LOCK_FLAGS"),
    ("python bench/bench_codecs.py --mapz 6", "bench/bench_codecs.py defines no option --mapz"),
    ("python bench/no_such_bench.py", "no script bench/no_such_bench.py in the project"),
    ("pip install -c constraints.txt '.[pipeline,gpu]'", "pyproject.toml declares no extra 'gpu'"),
    ("ray up cluster.yaml", "no check for 'ray' commands"),
])
def test_the_check_names_what_is_wrong(command, problem):
    problems = doc_helpers.check_command(command)
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_the_check_passes_comments_placeholders_env_prefixes_and_flag_values():
    good = ("TQDM_DISABLE=1 featup precompute 'data/train-{0..9}.tar' --output=o.zarr [--actors N|auto] ...  # a comment",
            "featup precompute --help", "make lock LOCK_ARGS=--upgrade", "python -m jobs.assets.reproduce",
            "python bench/bench_codecs.py --maps 6")
    assert [doc_helpers.check_command(c) for c in good] == [[]] * len(good)
