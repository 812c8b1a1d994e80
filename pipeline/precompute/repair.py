"""Repairing a store on resume: committed shards whose ``ok`` rows lost their stored objects are computed again.

A missing object reads as zeros through zarr (``pipeline.store.integrity``). On resume the driver lists each array's
objects once (``find_lost_rows``) and un-commits, under its lock, every committed shard holding such a row, so the run
computes it again like any uncommitted shard: the store ends equal to a clean run's, with no command of its own to
learn, and the run says which shards it redid (on screen and in its report's ``redone_for_lost_rows``).
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Any, TextIO

from pipeline.store.integrity import find_lost_rows, summarize_lost

MAX_NAMED = 5  # shards named in the warning


def redo_lost_rows(store: Any, plan: Any, committed: set[int], err: TextIO) -> tuple[set[int], list[str]]:
    """(committed shards to skip, URLs of shards to compute again): a committed shard with a lost row (an ``ok`` row
    whose stored object is missing, which would read as zeros) is un-committed, under this run's lock, and redone.

    Recomputing is what a rerun does for any uncommitted shard and its result equals a clean run's, so the damage is
    repaired by the command the user already runs; the run says so and its report lists the shards."""
    damaged, lost = lost_row_shards(store, plan, committed)
    for index in sorted(damaged):
        store.uncommit_shard(index)
    if damaged:
        print(f"featup: warning: store {plan.config.output}: {lost_text(plan, damaged, lost)}; those shards are "
              "computed again", file=err)
    return committed - damaged, [plan.shards[i].url for i in sorted(damaged)]


def committed_to_skip(store: Any, plan: Any, committed: set[int], err: TextIO) -> set[int]:
    """For a dry run: the committed shards a run would skip (those with a lost row it would compute again, said so)."""
    damaged, lost = lost_row_shards(store, plan, committed)
    if damaged:
        print(f"featup: warning: store {plan.config.output}: {lost_text(plan, damaged, lost)}; a run computes those "
              "shards again", file=err)
    return committed - damaged


def lost_row_shards(store: Any, plan: Any, committed: set[int]) -> tuple[set[int], list]:
    """The committed shards holding a lost row, and the lost rows (one listing per array; nothing when none committed)."""
    if not committed:
        return set(), []
    lost = find_lost_rows(store)
    return {bisect_right(plan.offsets, r.row) - 1 for r in lost} & committed, lost


def lost_text(plan: Any, damaged: set[int], lost: list) -> str:
    """``3 ok rows of 2 committed shards (a.tar, b.tar) lost stored objects (features row 12 (sample k); ...)``."""
    names = ", ".join(plan.shards[i].url for i in sorted(damaged)[:MAX_NAMED]) + (", ..." if len(damaged) > MAX_NAMED else "")
    rows = len({r.row for r in lost})
    return (f"{rows} ok rows of {len(damaged)} committed shards ({names}) lost their stored objects and would read as "
            f"zeros ({summarize_lost(lost)})")
