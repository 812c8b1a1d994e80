"""The suite's own scheduling settings (tests/conftest.py) name modules that exist."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import RUN_FIRST

ROOT = Path(__file__).resolve().parents[1]


def test_every_module_run_first_exists_once():
    assert len(set(RUN_FIRST)) == len(RUN_FIRST)
    assert [path for path in RUN_FIRST if not (ROOT / path).is_file()] == []
