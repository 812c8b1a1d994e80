"""``RowWriter``: a batch's rows are encoded and written on a thread pool while the model computes the next batch.

Each task writes one row of one array, which is one stored object (a chunk, or a shard of spatial tiles), so tasks
never share an object and object-store puts run concurrently. zarr encodes a row's tiles on its own thread pool;
this pool keeps several rows in flight so that encoding, the store's I/O and the model overlap.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

MAX_BATCHES_IN_FLIGHT = 1  # batches still being written while the model runs: bounds the feature memory held


def cpu_actor_write_threads(cpus_per_actor: float | None) -> int:
    """Writer threads of an actor whose model runs on its CPUs: one per CPU it holds (at least one).

    They share the model's cores, yet still beat writing in the model's thread: ViT-S/16 + JBU on 2 cores, 0.348
    against 0.417 s per image in steady state (``bench/bench_precompute.py --images 48 --compare "--write-threads 0"``).
    """
    return max(1, int(cpus_per_actor or 1))


class RowWriter:
    """Writes batches of rows into ``store``: on ``threads`` background threads, or in the caller's thread with 0.

    ``wait`` blocks until at most ``keep`` batches are in flight, re-raising a write's error, and adds the time
    blocked to ``result.write_s`` (the part of writing the model did not hide); an inline write is counted whole.
    """

    def __init__(self, store: Any, threads: int) -> None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise ValueError(f"write threads: expected an integer >= 0, got {threads!r}")
        self.store = store
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="write") if threads else None
        self._pending: list[list[Future]] = []  # one list of row futures per batch, oldest first

    def submit(self, result: Any, rows: list[int], arrays: dict[str, np.ndarray]) -> None:
        """Queues every row of every array of a batch (``arrays[name][i]`` is row ``rows[i]``)."""
        tasks = [(row, {name: value[i : i + 1]}) for name, value in arrays.items() for i, row in enumerate(rows)]
        if self._pool is None:
            start = time.perf_counter()
            for row, one in tasks:
                self.store.write_rows(row, one)
            result.write_s += time.perf_counter() - start
            return
        self._pending.append([self._pool.submit(self.store.write_rows, row, one) for row, one in tasks])

    def wait(self, result: Any, keep: int = MAX_BATCHES_IN_FLIGHT) -> None:
        """Blocks until at most ``keep`` batches are still being written; raises the first error of a finished batch."""
        start = time.perf_counter()
        try:
            while len(self._pending) > keep:
                for future in self._pending.pop(0):
                    future.result()
        finally:
            result.write_s += time.perf_counter() - start

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)  # on an error, let in-flight writes end before the shard is retried
