"""Precompute actors on a Ray cluster: node discovery, how many actors fit, decode threads per node, the actor pool.

Actors are started with plain Ray resource requests (num_gpus / num_cpus), so Ray places them by GPU and a pending
actor is demand the autoscaler sees. The pool hands work only to actors that answered ``ready()``: an actor whose node
died, or that waits for a node that is not there yet, may stay pending forever, and a shard given to it would never
come back. With ``--actors auto`` the pool counts the actors that fit on the live nodes every few seconds, so it grows
as nodes join; pending actors beyond what the remaining work needs are dropped. Work is pulled (an idle actor takes
the next shard), so faster nodes take more shards. The driver drives the pool through the ``SlotPool`` interface
(pipeline.precompute.slots), as it drives the in-process pool.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

from featup.errors import ConfigError
from pipeline.precompute.config import PrecomputeConfig
from pipeline.precompute.extract import Projection
from pipeline.precompute.slots import ShardLost, Slot, SlotPool, first_line
from pipeline.runtime.retry import TransientIOError
from pipeline.precompute.worker import ShardWorker
from pipeline.precompute.writes import cpu_actor_write_threads

NODE_POLL_S = 5.0  # how often --actors auto looks at the live nodes (nodes joining, nodes lost)
CPU_DECODE_THREADS = 2  # decode threads of an actor without a GPU (the model shares the same CPUs)
MAX_DECODE_THREADS = 16
MAX_WRITE_THREADS = 16
MAX_START_FAILURES = 3  # actors whose constructor raised, before the job gives up (a bad model setting, say)
WAITING_NOTICE_S = 30.0  # how often the driver says it is waiting for actors to be placed


@dataclass(frozen=True)
class NodeResources:
    """One Ray node: its id, IP, CPUs, GPUs and custom resources (Ray's internal ``node:*`` entries left out)."""

    node_id: str
    ip: str
    cpus: float
    gpus: float
    custom: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_ray(cls, info: dict[str, Any]) -> NodeResources:
        """From one entry of ``ray.nodes()``."""
        resources = info.get("Resources", {})
        custom = {
            k: v for k, v in resources.items()
            if k not in ("CPU", "GPU", "memory", "object_store_memory") and not k.startswith("node:")
        }
        return cls(info["NodeID"], info.get("NodeManagerAddress", ""), resources.get("CPU", 0.0), resources.get("GPU", 0.0), custom)


def alive_nodes() -> list[NodeResources]:
    """The live nodes of the Ray cluster this process is connected to."""
    import ray

    return [NodeResources.from_ray(n) for n in ray.nodes() if n.get("Alive")]


def actors_that_fit(nodes: list[NodeResources], num_cpus: float, num_gpus: float) -> int:
    """How many actors of ``num_cpus`` / ``num_gpus`` the nodes hold in total (whole actors per node)."""
    return sum(_fit(node, num_cpus, num_gpus) for node in nodes)


def _fit(node: NodeResources, num_cpus: float, num_gpus: float) -> int:
    counts = []
    if num_gpus > 0:
        counts.append(math.floor(node.gpus / num_gpus + 1e-9))
    if num_cpus > 0:
        counts.append(math.floor(node.cpus / num_cpus + 1e-9))
    return min(counts) if counts else 0


def _cpus_with_gpus(node: NodeResources, gpus_per_actor: float) -> int:
    """The node's CPUs that come with an actor's share of its GPUs (whole CPUs)."""
    return math.floor(node.cpus * min(gpus_per_actor, node.gpus) / node.gpus + 1e-9)


def decode_threads_for(node: NodeResources, gpus_per_actor: float) -> int:
    """Decode threads of an actor on ``node``: its share of the node's CPUs less one that feeds the GPU (1..16).

    An actor without a GPU runs the model on its CPUs, so it keeps CPU_DECODE_THREADS threads.
    """
    if gpus_per_actor <= 0 or node.gpus <= 0:
        return CPU_DECODE_THREADS
    return int(min(MAX_DECODE_THREADS, max(1, _cpus_with_gpus(node, gpus_per_actor) - 1)))


def write_threads_for(node: NodeResources, gpus_per_actor: float, cpus_per_actor: float | None) -> int:
    """Encode-and-write threads of an actor on ``node``: the CPUs that come with its GPUs (2..16), else its own CPUs.

    A GPU actor's model leaves those CPUs free for encoding; a CPU actor's writer threads share its cores with the
    model (``--write-threads 0`` writes in the model's thread instead).
    """
    if gpus_per_actor <= 0 or node.gpus <= 0:
        return cpu_actor_write_threads(cpus_per_actor)
    return int(min(MAX_WRITE_THREADS, max(2, _cpus_with_gpus(node, gpus_per_actor))))


def this_node() -> NodeResources:
    """The node this process runs on: from Ray inside a Ray worker, else this machine's CPUs and GPUs."""
    import ray

    if ray.is_initialized():
        node_id = ray.get_runtime_context().get_node_id()
        for info in ray.nodes():
            if info["NodeID"] == node_id:
                return NodeResources.from_ray(info)
    return machine_node()


def machine_node() -> NodeResources:
    """This machine as a node (id ``local``): its CPUs and the GPUs torch sees."""
    import torch

    return NodeResources("local", "127.0.0.1", float(os.cpu_count() or 1), float(torch.cuda.device_count()))


def _in_ray_worker() -> bool:
    """Whether this process is a Ray worker (an actor or task), not a driver that merely joined Ray."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE


def _assigned_gpus() -> float:
    """The GPUs Ray gave this actor (0 outside a Ray worker: an in-process worker in a driver that joined Ray too)."""
    import ray

    if not _in_ray_worker():
        return 0.0
    return float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))


class NodeWorker(ShardWorker):
    """A ShardWorker that sizes its decode threads from the node it was placed on and says where it runs.

    ``node`` and ``gpus`` default to what Ray says about this actor; an in-process worker passes this machine's.
    """

    def __init__(
        self, config: PrecomputeConfig, *, projection: Projection | None = None, torch_threads: int | None = None,
        run_id: str | None = None, node: NodeResources | None = None, gpus: float | None = None,
    ) -> None:
        node = node if node is not None else this_node()
        gpus = gpus if gpus is not None else _assigned_gpus()
        if config.decode_threads is None:
            config = replace(config, decode_threads=decode_threads_for(node, gpus))
        if config.write_threads is None:
            config = replace(config, write_threads=write_threads_for(node, gpus, config.cpus_per_actor))
        super().__init__(config, projection=projection, torch_threads=torch_threads, run_id=run_id)
        self.node = node

    def ready(self) -> dict[str, Any]:
        """Answered once the actor is placed and its model loaded: its name, node, decode and torch threads."""
        import torch

        return {
            "worker": self.name, "node_id": self.node.node_id, "node_ip": self.node.ip,
            "node_resources": {"CPU": self.node.cpus, "GPU": self.node.gpus, **self.node.custom},
            "decode_threads": self.config.decode_threads, "write_threads": self.config.write_threads,
            "torch_threads": torch.get_num_threads(),
        }


class ActorPool(SlotPool):
    """The precompute actors of one run: starts them, tracks which are placed, grows and shrinks to the work left."""

    mode = "ray"

    def __init__(
        self, config: PrecomputeConfig, resources: dict[str, float], *, projection: Projection | None, run_id: str,
        prefix: str, err: TextIO | None = None, worker: type | None = None,
    ) -> None:
        self.config, self.resources, self.projection, self.run_id, self.prefix = config, resources, projection, run_id, prefix
        self.worker = worker or NodeWorker  # the actor class: its constructor takes (config, projection=, torch_threads=, run_id=)
        self.err = err or sys.stderr
        self.slots: list[Slot] = []
        self.started = 0
        self.deaths = 0
        self.start_failures = 0
        self.last_start_error = ""
        self.placed: dict[str, dict[str, Any]] = {}  # worker name -> its ready() answer
        self._target: tuple[float, int] | None = None  # (when counted, actors that fit) for --actors auto
        self._waiting_since: float | None = None

    def target(self) -> int:
        """The number of actors wanted: ``--actors``, or with ``auto`` those that fit on the live nodes (at least 1)."""
        if self.config.actors != "auto":
            return int(self.config.actors)
        now = time.monotonic()
        if self._target is None or now - self._target[0] >= NODE_POLL_S:
            fit = actors_that_fit(alive_nodes(), self.resources["num_cpus"], self.resources["num_gpus"])
            self._target = (now, max(1, fit))
        return self._target[1]

    @property
    def start_failure(self) -> str | None:
        if self.start_failures < MAX_START_FAILURES:
            return None
        return f"{self.start_failures} precompute actors failed to start; last error: {self.last_start_error}"

    def refs(self) -> list[Any]:
        """What the driver waits on: busy actors' results and pending actors' ready() answers."""
        return [s.ref for s in self.busy()] + [s.ready_ref for s in self.pending()]

    def fill(self, outstanding: int) -> None:
        """Starts actors up to min(target, shards outstanding); drops pending actors beyond that (newest first)."""
        want = min(self.target(), outstanding)
        for _ in range(want - len(self.slots)):
            self.slots.append(self._start())
        surplus = len(self.slots) - want
        for slot in reversed(self.pending()):
            if surplus <= 0:
                break
            self._remove(slot)
            surplus -= 1

    def poll(self) -> None:
        """Marks pending actors that answered ready() as placed; forgets those that died before (node lost, bad init)."""
        import ray
        from ray.exceptions import RayActorError

        pending = self.pending()
        if not pending:
            self._waiting_since = None
            return
        done, _ = ray.wait([s.ready_ref for s in pending], num_returns=len(pending), timeout=0)
        for slot in [s for s in pending if s.ready_ref in done]:
            try:
                slot.info = ray.get(slot.ready_ref)
                self.placed[slot.info["worker"]] = slot.info
            except RayActorError as e:
                self._remove(slot)
                self.deaths += 1
                if getattr(e, "actor_init_failed", False):
                    self.start_failures += 1
                    self.last_start_error = last_line(e)  # the constructor's exception ends Ray's traceback
        self._notice_waiting()

    def submit(self, slot: Slot, task: Any) -> None:
        slot.start(task, slot.actor.process_shard.remote(task))

    def wait(self, timeout: float) -> list[Slot]:
        """Busy actors whose result is ready after at most one tick (one is enough to act on; a pending actor's ready()
        answer also ends the wait)."""
        import ray

        refs = self.refs()
        if not refs:
            time.sleep(timeout)
            return []
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        return [s for s in self.busy() if s.ref in ready]

    def take(self, slot: Slot) -> Any:
        """The actor's ShardResult; a dead actor is forgotten (``fill`` replaces it if still needed) and, like a task
        that raised, is a ShardLost naming the cause."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        ref = slot.finish()
        try:
            return ray.get(ref)
        except RayActorError as e:
            self.lost(slot)
            raise ShardLost(f"its worker died ({first_line(e)})") from e
        except RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, TransientIOError):  # storage stayed down for the whole retry budget
                raise ShardLost(str(cause)) from e
            raise ShardLost(f"its worker failed ({first_line(e)})") from e

    def poll_progress(self) -> None:
        """Asks busy actors how far they are into their shard (answers arrive by the next tick)."""
        import ray

        for slot in self.busy():
            if slot.progress_ref is not None:
                ready, _ = ray.wait([slot.progress_ref], timeout=0)
                if not ready:
                    continue
                try:
                    progress, slot.compiling = ray.get(ready[0])
                    slot.progress = min(float(progress), slot.task.shard.num_samples)  # fractional: implicit fits
                except Exception:  # the actor died: its shard's result says so
                    pass
            slot.progress_ref = slot.actor.status.remote()

    def lost(self, slot: Slot) -> None:
        """Forgets an actor that died while computing (its shard is requeued by the driver)."""
        self.deaths += 1
        self._remove(slot)

    def close(self) -> None:
        """Kills every actor of the run."""
        for slot in list(self.slots):
            self._remove(slot)

    def _start(self) -> Slot:
        import ray

        name = f"{self.prefix}-{self.run_id[:8]}-{self.started}"
        self.started += 1
        remote = ray.remote(self.worker).options(
            name=name, max_concurrency=2, max_restarts=0, max_task_retries=0, **self.resources
        )
        threads = max(1, int(self.config.cpus_per_actor))
        actor = remote.remote(self.config, projection=self.projection, torch_threads=threads, run_id=self.run_id)
        return Slot(actor, name, actor.ready.remote())

    def _remove(self, slot: Slot) -> None:
        import ray

        self.slots.remove(slot)
        ray.kill(slot.actor, no_restart=True)

    def _notice_waiting(self) -> None:
        """Says, now and then, that no actor is placed yet (a cluster waiting for nodes, or resources nobody has)."""
        if any(s.info is not None for s in self.slots):
            self._waiting_since = None
            return
        now = time.monotonic()
        if self._waiting_since is None:
            self._waiting_since = now
        elif now - self._waiting_since >= WAITING_NOTICE_S:
            self._waiting_since = now
            print(
                f"\nfeatup: waiting for {len(self.slots)} actor(s) to be placed, each needing {self.resources} "
                "(the cluster has no free node with these resources yet)",
                file=self.err,
            )


def actor_resources(config: PrecomputeConfig) -> dict[str, float]:
    """Ray resources of one actor; GPUs default to 1 when its device is CUDA (or auto and the cluster has GPUs).

    On a local Ray an actor that can never be placed is a ConfigError (a cluster may still grow, so it is not checked).
    """
    import ray

    available = ray.cluster_resources()
    gpus = config.gpus_per_actor
    if gpus is None:
        wants_gpu = config.device.startswith("cuda") or (config.device == "auto" and available.get("GPU", 0) >= 1)
        gpus = 1 if wants_gpu else 0
    if config.address is None:
        for name, need in (("CPU", config.cpus_per_actor), ("GPU", gpus)):
            if need > available.get(name, 0):
                flag = f"--{name.lower()}s-per-actor"
                raise ConfigError(f"{flag}: expected at most the {available.get(name, 0):g} {name}s of this machine, got {need:g}")
    return {"num_cpus": config.cpus_per_actor, "num_gpus": gpus}


def last_line(error: BaseException) -> str:
    """The last line of the error's message (the original exception of a remote traceback), at most 300 characters."""
    text = str(error).strip().splitlines()
    return (text[-1].strip() if text else type(error).__name__)[:300]
