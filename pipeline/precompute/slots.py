"""The driver's view of its shard workers: slots (one per worker), and the pool interface both kinds of pool implement.

The driver talks to a pool only through ``SlotPool``'s methods (fill, poll, submit, wait, take, poll_progress, close),
so ``ActorPool`` (Ray actors, pipeline.precompute.pool) and ``LocalPool`` (one worker in this process, no Ray,
pipeline.precompute.local) share its loop, retries, error limit, progress bar, report, commits and lock heartbeat.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def first_line(error: BaseException) -> str:
    """The error's type and first message line, at most 300 characters."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


@dataclass
class Slot:
    """One worker: pending until ``info`` (its ready() answer) arrives, then idle or computing ``task``.

    ``ready_ref``, ``ref`` and ``progress_ref`` are Ray object refs in an ActorPool, futures in a LocalPool.
    """

    actor: Any
    name: str
    ready_ref: Any
    info: dict[str, Any] | None = None
    task: Any = None  # pipeline.worker.ShardTask
    ref: Any = None
    progress_ref: Any = None
    progress: float = 0
    compiling: bool = False  # its kernels are being compiled in the background (its last status() answer)

    def start(self, task: Any, ref: Any) -> None:
        """Marks the slot busy with ``task``, whose result ``ref`` will hold."""
        self.task, self.ref, self.progress, self.progress_ref = task, ref, 0, None

    def finish(self) -> Any:
        """Marks the slot idle again; returns the ref of the result it was computing."""
        ref = self.ref
        self.task, self.ref, self.progress, self.progress_ref = None, None, 0, None
        return ref


class ShardLost(Exception):
    """A shard that came back without a result (its worker died or raised); ``reason`` ends the driver's retry line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SlotPool:
    """What the driver needs of a pool of shard workers; ActorPool (Ray) and LocalPool (in this process) implement it.

    The driver's loop: ``fill`` (start workers for the work left), ``poll`` (note the ones that are ready), ``submit``
    a shard to each idle slot, ``wait`` for finished ones and ``take`` their results (a ShardLost says why there is
    none), ``poll_progress``; ``close`` at the end. ``start_failure`` stops the job when workers cannot start.
    """

    mode = ""  # "ray" or "in-process": the report's actors section says which
    slots: list[Slot]
    started = 0
    deaths = 0
    placed: dict[str, dict[str, Any]]  # worker name -> its ready() answer

    def idle(self) -> list[Slot]:
        return [s for s in self.slots if s.info is not None and s.task is None]

    def busy(self) -> list[Slot]:
        return [s for s in self.slots if s.task is not None]

    def pending(self) -> list[Slot]:
        return [s for s in self.slots if s.info is None]

    def node_of(self, worker: str) -> dict[str, Any]:
        """The ready() answer of a worker (its node), or {} when it never answered."""
        return self.placed.get(worker, {})

    @property
    def start_failure(self) -> str | None:
        """Why the job must stop because its workers cannot start, or None."""
        raise NotImplementedError

    def fill(self, outstanding: int) -> None:
        raise NotImplementedError

    def poll(self) -> None:
        raise NotImplementedError

    def submit(self, slot: Slot, task: Any) -> None:
        raise NotImplementedError

    def wait(self, timeout: float) -> list[Slot]:
        """The busy slots whose result is ready, waiting at most ``timeout`` seconds for one."""
        raise NotImplementedError

    def take(self, slot: Slot) -> Any:
        """The ShardResult of a finished slot (the slot becomes idle); raises ShardLost when there is none."""
        raise NotImplementedError

    def poll_progress(self) -> None:
        """Updates the busy slots' ``progress`` and ``compiling`` for the progress bar."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError
