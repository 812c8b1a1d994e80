"""``LocalPool``: the shards of an ``--in-process`` run computed by one worker in this process, without Ray.

It implements the driver's ``SlotPool`` interface, so the driver's loop, retries, error limit, progress bar, report,
commits and lock heartbeat are those of a Ray run. The worker (a ``NodeWorker`` that takes this machine as its node)
is built and runs on one background thread, so the driver keeps ticking while it computes (the progress bar, the
lock's renewal); its torch threads are set on that thread (``--cpus-per-actor``), as an actor sets its process's. Ray is never imported: for debugging (breakpoints and profilers see the worker), notebooks and small
jobs, and the tests whose subject is not Ray.
"""

from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any

from pipeline.precompute.config import PrecomputeConfig
from pipeline.precompute.extract import Projection
from pipeline.precompute.pool import NodeWorker, machine_node
from pipeline.precompute.slots import ShardLost, Slot, SlotPool, first_line
from pipeline.runtime.retry import TransientIOError

WORKER_NAME = "in-process"


class LocalPool(SlotPool):
    """One ShardWorker in this process, on one thread; a worker that cannot be built stops the job at once."""

    mode = "in-process"

    def __init__(self, config: PrecomputeConfig, *, projection: Projection | None, run_id: str) -> None:
        import torch

        self.config, self.projection, self.run_id = config, projection, run_id
        self.slots: list[Slot] = []
        self.started = 0
        self.deaths = 0  # a thread does not die: a shard that raises is a failure, retried like a Ray task's
        self.placed: dict[str, dict[str, Any]] = {}
        self._start_error: str | None = None
        self._torch_threads = torch.get_num_threads()  # where torch's count is per process, the worker's; close() restores it
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="featup-shard")

    @property
    def start_failure(self) -> str | None:
        if self._start_error is None:
            return None
        return f"the in-process worker failed to start: {self._start_error}"

    def fill(self, outstanding: int) -> None:
        """Starts building the one worker once there is work (it is never rebuilt: it would fail the same way)."""
        if outstanding > 0 and not self.slots and self.started == 0:
            self.started = 1
            self.slots.append(Slot(None, WORKER_NAME, self._executor.submit(self._build)))

    def poll(self) -> None:
        """Marks the worker ready once built; a constructor that raised is the job's start failure."""
        for slot in [s for s in self.pending() if s.ready_ref.done()]:
            try:
                slot.actor, slot.info = slot.ready_ref.result()
            except Exception as e:
                self.slots.remove(slot)
                self._start_error = first_line(e)
                continue
            self.placed[slot.info["worker"]] = slot.info

    def submit(self, slot: Slot, task: Any) -> None:
        slot.start(task, self._executor.submit(slot.actor.process_shard, task))

    def wait(self, timeout: float) -> list[Slot]:
        futures: list[Future] = [s.ref for s in self.busy()] + [s.ready_ref for s in self.pending()]
        if not futures:
            time.sleep(timeout)
            return []
        wait_futures(futures, timeout=timeout, return_when=FIRST_COMPLETED)
        return [s for s in self.busy() if s.ref.done()]

    def take(self, slot: Slot) -> Any:
        """The shard's ShardResult; a shard that raised is a ShardLost naming the cause, as a Ray task's would be."""
        future = slot.finish()
        try:
            return future.result()
        except TransientIOError as e:  # storage stayed down for the whole retry budget
            raise ShardLost(str(e)) from e
        except Exception as e:
            raise ShardLost(f"its worker failed ({first_line(e)})") from e

    def poll_progress(self) -> None:
        """Reads the worker's progress directly (plain numbers it updates as it goes)."""
        for slot in self.busy():
            progress, slot.compiling = slot.actor.status()
            slot.progress = min(float(progress), slot.task.shard.num_samples)

    def close(self) -> None:
        """Stops a shard still being computed at its next sample (it is not committed), waits for the thread, and gives
        the process its torch threads back."""
        import torch

        for slot in self.busy():
            slot.actor.cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.slots.clear()
        torch.set_num_threads(self._torch_threads)

    def _build(self) -> tuple[NodeWorker, dict[str, Any]]:
        """The worker and its ready() answer, both on the worker's thread (torch's thread count can be per thread)."""
        threads = max(1, int(self.config.cpus_per_actor))
        worker = NodeWorker(self.config, projection=self.projection, torch_threads=threads, run_id=self.run_id,
                            node=machine_node(), gpus=local_gpus(self.config))
        return worker, worker.ready()


def local_gpus(config: PrecomputeConfig) -> float:
    """The GPUs an in-process worker counts as its own (it sizes its threads from them): ``--gpus-per-actor``, else 1
    when its device is CUDA (or auto and torch sees one), else 0."""
    if config.gpus_per_actor is not None:
        return float(config.gpus_per_actor)
    if config.device.startswith("cuda"):
        return 1.0
    if config.device == "auto":
        import torch

        return 1.0 if torch.cuda.is_available() else 0.0
    return 0.0
