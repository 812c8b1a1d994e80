"""The precompute driver: plans the job, opens or resumes the store under a lock, runs Ray actors over a shard queue.

Actors are ``ray.remote(NodeWorker)`` (a ShardWorker that knows its node), kept by ``pipeline.cluster.ActorPool``;
each takes whole shards, writes their rows into the store itself and commits them. The driver only moves shard
descriptions and small results: it gives shards to placed actors only, requeues the shard of an actor that dies (the
pool starts a replacement if one is still needed), stops the job when ``--max-errors`` is exceeded, shows progress
and writes the run report (with each actor's node).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from collections import Counter, deque
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Iterator, Sequence, TextIO

from featup.errors import ConfigError
from pipeline.runtime.retry import TransientIOError
from pipeline.precompute.pool import MAX_START_FAILURES, ActorPool, Slot, first_line
from pipeline.precompute.config import PrecomputeConfig
from pipeline.precompute.extract import Projection
from pipeline.precompute.compact import compact_attrs, compact_notes, ensure_upsampler, stored_upsampler
from pipeline.store.compact import UPSAMPLER_NODE, write_upsampler
from pipeline.precompute.plan import COMPAT_KEYS, Plan, plan_keys, estimate_bytes, fit_projection, format_plan, make_plan
from pipeline.runtime.progress import ProgressBar, precompute_postfix
from pipeline.runtime.ray_session import ray_session
from pipeline.precompute.heartbeat import HEARTBEAT_S, LockHeartbeat
from pipeline.precompute.report import format_run_summary, summarize_reasons
from pipeline.precompute.worker import ShardResult, ShardTask

EXIT_OK, EXIT_FAILED = 0, 1
MAX_ATTEMPTS = 3  # a shard whose worker dies or fails this many times stops the job (it stays uncommitted)
TICK_S = 0.5
ACTOR_PREFIX = "featup-precompute"


def run_precompute(
    config: PrecomputeConfig, *, command_line: Sequence[str] = (), out: TextIO | None = None, err: TextIO | None = None,
    json_output: bool = False,
) -> int:
    """Runs (or with ``dry_run`` only plans) a precompute job; returns the process exit code.

    The end of the run goes to ``out``: a short summary, or with ``json_output`` the whole report (as in ``report.json``).
    """
    out, err = out or sys.stdout, err or sys.stderr
    config = config.with_machine_resources(_machine_cpus())  # resolved once, passed down to the actors
    plan = make_plan(config, command_line)
    if config.dry_run:
        print(format_plan(plan, estimate_bytes(plan), _existing_commits(plan)), file=out)
        return EXIT_OK
    if config.upsampler == "implicit":  # slow by nature: say so before the progress bar starts
        from pipeline.precompute.plan import implicit_notice

        print(implicit_notice(plan), file=err)
    return run_plan(plan, out=out, err=err, json_output=json_output)


def run_plan(plan: Plan, *, out: TextIO, err: TextIO, json_output: bool = False, worker: type | None = None) -> int:
    """Opens or resumes the plan's store under a lock, computes its uncommitted shards on actors of ``worker`` (default:
    precompute's), writes the report and prints the summary; returns the process exit code."""
    config = plan.config
    run_id = uuid.uuid4().hex
    store, committed, projection, clean = open_store(plan, run_id, err)
    try:
        with LockHeartbeat(store) as heartbeat:
            driver = Driver(plan, store, committed, projection, clean=clean, run_id=run_id, err=err, heartbeat=heartbeat,
                            worker=worker)
            with ray_session(config.address, _local_cpus(config)) if driver.queue else nullcontext():
                report = driver.run()
            _write_report(store, report, err)
    finally:
        _release_lock(store, err)
    print(json.dumps(report, indent=2) if json_output else format_run_summary(report, store.report_url), file=out)
    if report["failure"]:
        reasons = summarize_reasons(report["samples"]["error_reasons"])
        print(f"featup: error: {report['failure']}" + (f"; most common reasons:\n{reasons}" if reasons else ""), file=err)
    return EXIT_OK if report["status"] == "complete" else EXIT_FAILED


def _write_report(store, report: dict, err: TextIO) -> None:
    """Writes report.json; storage still down after the retry budget fails the run (its rows and commits are safe)."""
    try:
        store.write_report(report)
    except TransientIOError as e:
        report["status"] = "failed"
        report["failure"] = report["failure"] or str(e)
        print(f"featup: warning: the run report was not written: {e}", file=err)


def _release_lock(store, err: TextIO) -> None:
    """Releases the lock; if storage is still down it is left to go stale (a rerun from this host takes it over)."""
    try:
        store.release_lock()
    except TransientIOError as e:
        print(f"featup: warning: the store's lock was not released ({e}); it expires after "
              f"{store.lock_stale_after_s:g} s without renewal", file=err)


def open_store(plan: Plan, run_id: str, err: TextIO):
    """(store, committed shards, projection, clean): resumes a compatible store or creates one; holds its lock."""
    from pipeline.store.features import FeatureStore, check_compatible

    c = plan.config
    options = c.output_location.options
    if FeatureStore.exists(c.output, options, retry=c.retry) and not c.overwrite:
        store = FeatureStore.open(c.output, options, retry=c.retry)
        store.acquire_lock(run_id, heartbeat_s=HEARTBEAT_S)  # refuses while another job runs, before anything is read or written
        _checked(store, lambda: check_compatible(store.attrs, plan.attrs, COMPAT_KEYS))
        committed = store.committed_shards() & {s.index for s in plan.shards}
        projection = Projection.from_attrs(store.attrs["pca"]) if c.channels else None
        if c.compact:
            _checked(store, lambda: ensure_upsampler(store, stored_upsampler(plan.extractor, projection)))
        print(
            f"featup: resuming {c.output}: {len(committed)} of {len(plan.shards)} shards already committed and skipped, "
            f"{len(plan.shards) - len(committed)} to compute",
            file=err,
        )
        return store, committed, projection, False
    projection = plan.projection if plan.projection is not None else (fit_projection(plan) if c.channels else None)
    upsampler = stored_upsampler(plan.extractor, projection) if c.compact else None
    attrs = {**plan.attrs, "pca": projection.to_attrs() if projection else None,
             **(compact_attrs(upsampler[0]) if upsampler else {})}
    store = FeatureStore.create(
        c.output, num_rows=plan.num_rows, arrays=plan.arrays, attrs=attrs, storage_options=options, overwrite=c.overwrite,
        keys=plan_keys(plan), retry=c.retry, codec=c.storage_codec, side_nodes=(UPSAMPLER_NODE,) if upsampler else (),
        notes=compact_notes() if upsampler else None,
    )
    store.acquire_lock(run_id, heartbeat_s=HEARTBEAT_S)
    if upsampler is not None:  # before any row: a compact store is never without its upsampler once rows exist
        _checked(store, lambda: write_upsampler(store, *upsampler))
    return store, set(), projection, True


def _checked(store, step) -> None:
    """Runs ``step`` on a locked store; on any error the lock is released before it is raised."""
    try:
        step()
    except Exception:
        store.release_lock()
        raise


def _existing_commits(plan: Plan) -> set[int] | None:
    """For a dry run: the committed shards of a compatible existing store (None when there is none or it is replaced)."""
    from pipeline.store.features import FeatureStore, check_compatible

    c = plan.config
    options = c.output_location.options
    if c.overwrite or not FeatureStore.exists(c.output, options, retry=c.retry):
        return None
    store = FeatureStore.open(c.output, options, mode="r", retry=c.retry)
    check_compatible(store.attrs, plan.attrs, COMPAT_KEYS)
    return store.committed_shards()


@dataclass
class _Totals:
    """What this run has computed so far."""

    samples: int = 0
    ok: int = 0
    failed: int = 0
    shards: int = 0
    retries: int = 0
    reasons: Counter = field(default_factory=Counter)
    shard_errors: dict = field(default_factory=dict)
    times: Counter = field(default_factory=Counter)
    per_actor: dict = field(default_factory=dict)


class Driver:
    """The ray.wait loop over a queue of uncommitted shards, with actor replacement, error limit, progress and report."""

    def __init__(
        self, plan: Plan, store, committed: set[int], projection: Projection | None, *, clean: bool, run_id: str, err: TextIO,
        heartbeat: LockHeartbeat | None = None, worker: type | None = None,
    ) -> None:
        self.plan, self.store, self.projection, self.run_id, self.err = plan, store, projection, run_id, err
        self.heartbeat, self.worker = heartbeat, worker
        config = plan.config
        self.queue = deque(
            ShardTask(shard, offset, clean=clean, duplicates=plan.duplicates.get(shard.index, {}))
            for shard, offset in zip(plan.shards, plan.offsets) if shard.index not in committed
        )
        self.skipped = len(committed)
        self.total = _Totals()
        self.previous = _previous_errors(store) if committed else (0, Counter())
        self.limit = config.error_limit(plan.num_rows)
        self.failure: str | None = None
        self.todo_samples = sum(t.shard.num_samples for t in self.queue)
        self.todo_shards = len(self.queue)
        self.progress = ProgressBar(self.todo_samples, desc="precompute", unit="img", stream=err)
        self.pool: ActorPool | None = None

    def run(self) -> dict:
        """Computes every queued shard (or stops on the error limit or a fatal failure) and returns the report."""
        started_at, start = datetime.now(timezone.utc), time.monotonic()
        try:
            if self.queue:
                config = self.plan.config
                self.pool = ActorPool(
                    config, actor_resources(config), projection=self.projection, run_id=self.run_id, prefix=ACTOR_PREFIX, err=self.err,
                    worker=self.worker,
                )
                self._loop(self.pool)
            self.progress.set(self.total.samples, self._postfix())  # drawn once more by close()
            self._check_some_succeeded()
        finally:
            if self.pool is not None:
                self.pool.close()
            self.progress.close()
        return self._report(started_at, time.monotonic() - start)

    def _loop(self, pool: ActorPool) -> None:
        """Hands queued shards to placed idle actors, collects results, and keeps the pool sized to the work left."""
        while self.failure is None and (self.queue or pool.busy()):
            pool.fill(len(self.queue) + len(pool.busy()))
            pool.poll()
            self._check_start_failures(pool)
            for slot in pool.idle():
                if self.queue:
                    self._assign(slot, self.queue.popleft())
            ready = self._wait(pool.refs())
            for slot in [s for s in pool.busy() if s.ref in ready]:
                self._collect(slot)
            self._check_error_limit()
            self._poll_progress(pool.busy())
            self.progress.set(self.total.samples + sum(s.progress for s in pool.busy()), self._postfix())
            if self.heartbeat is not None and self.heartbeat.error is not None:
                self.failure = f"the store's lock could not be renewed: {self.heartbeat.error}"

    @staticmethod
    def _wait(refs: list) -> list:
        """The refs that are ready after at most one tick (one is enough to act on)."""
        import ray

        if not refs:
            time.sleep(TICK_S)
            return []
        ready, _ = ray.wait(refs, num_returns=1, timeout=TICK_S)
        return ready

    def _check_start_failures(self, pool: ActorPool) -> None:
        if pool.start_failures >= MAX_START_FAILURES and self.failure is None:
            self.failure = f"{pool.start_failures} precompute actors failed to start; last error: {pool.last_start_error}"

    def _assign(self, slot: Slot, task: ShardTask) -> None:
        slot.task, slot.progress, slot.progress_ref = task, 0, None
        slot.ref = slot.actor.process_shard.remote(task)

    def _collect(self, slot: Slot) -> None:
        """Takes a finished shard's result, or requeues it after a worker death (the pool replaces the actor) or failure."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        task, ref = slot.task, slot.ref
        slot.task, slot.ref, slot.progress, slot.progress_ref = None, None, 0, None
        try:
            result: ShardResult = ray.get(ref)
        except RayActorError as e:
            self.pool.lost(slot)
            self._retry(task, f"its worker died ({first_line(e)})")
            return
        except RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, TransientIOError):  # storage stayed down for the whole retry budget
                self._retry(task, str(cause))
            else:
                self._retry(task, f"its worker failed ({first_line(e)})")
            return
        self._record(result)

    def _retry(self, task: ShardTask, reason: str) -> None:
        self.total.retries += 1
        if task.attempt >= MAX_ATTEMPTS:
            self.failure = f"shard {task.shard.url} was tried {task.attempt} times and not committed; last time {reason}"
            return
        print(f"\nfeatup: warning: shard {task.shard.url} will be redone: {reason}", file=self.err)
        self.queue.appendleft(replace(task, attempt=task.attempt + 1, clean=False))

    def _record(self, result: ShardResult) -> None:
        t = self.total
        t.shards += 1
        t.samples += result.num_samples
        t.ok += result.num_ok
        t.failed += result.num_failed
        t.reasons.update(result.reasons)
        if result.shard_error:
            t.shard_errors[result.url] = result.shard_error
        t.times.update({"read_wait": result.read_s, "decode_threads": result.decode_s, "model": result.model_s, "write": result.write_s})
        actor = t.per_actor.setdefault(result.worker, Counter())
        actor.update({"shards": 1, "samples": result.num_samples, "busy_s": result.wall_s})

    def _postfix(self) -> str:
        return precompute_postfix(self.total.shards, self.todo_shards, self._errors())

    def _check_some_succeeded(self) -> None:
        """A finished job in which no sample of the store succeeded has failed, whatever --max-errors allows."""
        rows = self.plan.num_rows
        if self.failure is None and not self.queue and rows and self._errors() >= rows:
            self.failure = f"no sample succeeded: all {rows} samples failed"

    def _errors(self) -> int:
        return self.previous[0] + self.total.failed

    def _check_error_limit(self) -> None:
        if self.limit is not None and self._errors() > self.limit and self.failure is None:
            self.failure = (
                f"{self._errors()} failed samples exceed --max-errors {self.plan.config.max_errors} "
                f"(at most {self.limit} of {self.plan.num_rows} samples)"
            )

    def _poll_progress(self, slots: list[Slot]) -> None:
        """Asks busy actors how far they are into their shard (answers arrive by the next tick)."""
        import ray

        for slot in slots:
            if slot.task is None:
                continue
            if slot.progress_ref is not None:
                ready, _ = ray.wait([slot.progress_ref], timeout=0)
                if not ready:
                    continue
                try:
                    slot.progress = min(float(ray.get(ready[0])), slot.task.shard.num_samples)  # fractional: implicit fits
                except Exception:  # the actor died: its shard's result says so
                    pass
            slot.progress_ref = slot.actor.progress.remote()

    def _actors_report(self) -> dict:
        """Actors wanted, started and lost, each actor's throughput and node, and the work done per node."""
        pool = self.pool
        nodes = {name: pool.node_of(name) for name in self.total.per_actor} if pool else {}
        return {
            "count": self.plan.config.actors,
            "started": pool.started if pool else 0,
            "restarts": pool.deaths if pool else 0,
            "per_actor": _per_actor(self.total.per_actor, nodes),
            "nodes": _per_node(self.total.per_actor, nodes),
        }

    def _report(self, started_at: datetime, wall_s: float) -> dict:
        """The run report: config, counts, wall time, throughput, per-actor throughput and the time split."""
        t, plan = self.total, self.plan
        reasons = self.previous[1] + t.reasons
        busy = sum(t.times[k] for k in ("read_wait", "model", "write"))
        return {
            "status": "complete" if self.failure is None else "failed",
            "failure": self.failure,
            "run_id": self.run_id,
            "store": plan.config.output,
            "started_at": started_at.isoformat(),
            "wall_s": round(wall_s, 3),
            "config": plan.config.describe(),
            "command_line": plan.attrs.get("command_line", []),
            "shards": {
                "total": len(plan.shards),
                "skipped_committed": self.skipped,
                "computed": t.shards,
                "retries": t.retries,
                "read_errors": t.shard_errors,
            },
            "samples": {
                "total": plan.num_rows,
                "computed": t.samples,
                "ok": t.ok,
                "failed": t.failed,
                "failed_in_store": self._errors(),
                "duplicate_keys": plan.num_duplicates,
                "error_limit": self.limit,
                "error_reasons": dict(reasons.most_common(20)),
            },
            "throughput_images_per_s": round(t.samples / wall_s, 3) if wall_s > 0 else 0.0,
            "actors": self._actors_report(),
            "time_split_s": {k: round(v, 3) for k, v in t.times.items()},
            "time_split_fraction": {k: round(t.times[k] / busy, 4) for k in ("read_wait", "model", "write")} if busy else {},
        }


def _machine_cpus() -> int:
    """The CPUs a local job shares out: those of the Ray already running in this process, else this machine's."""
    import ray

    if ray.is_initialized():
        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    return os.cpu_count() or 1


def _local_cpus(config: PrecomputeConfig) -> int:
    """CPUs a local Ray needs for the actors asked for (--actors auto: the machine's)."""
    return 0 if config.actors == "auto" else math.ceil(config.actors * config.cpus_per_actor)


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


def _previous_errors(store) -> tuple[int, Counter]:
    """Failed samples (and their reasons) of the shards committed by earlier runs."""
    index = store.read_index()
    errors = [e for s, e in zip(index["status"].to_pylist(), index["error"].to_pylist()) if s == "error"]
    return len(errors), Counter(errors)


def _per_actor(stats: dict[str, Counter], nodes: dict[str, dict]) -> dict[str, dict]:
    return {
        name: {"shards": s["shards"], "samples": s["samples"], "busy_s": round(s["busy_s"], 3),
               "images_per_s": round(s["samples"] / s["busy_s"], 3) if s["busy_s"] else 0.0,
               "node_id": nodes.get(name, {}).get("node_id"), "node_ip": nodes.get(name, {}).get("node_ip"),
               "decode_threads": nodes.get(name, {}).get("decode_threads"),
               "torch_threads": nodes.get(name, {}).get("torch_threads"),
               "write_threads": nodes.get(name, {}).get("write_threads")}
        for name, s in stats.items()
    }


def _per_node(stats: dict[str, Counter], nodes: dict[str, dict]) -> dict[str, dict]:
    """Actors, shards and samples per node id (two nodes on one machine share an IP, so nodes are told apart by id)."""
    out: dict[str, dict] = {}
    for name, s in stats.items():
        info = nodes.get(name, {})
        node = out.setdefault(
            str(info.get("node_id")),
            {"ip": info.get("node_ip"), "resources": info.get("node_resources", {}), "actors": 0, "shards": 0, "samples": 0},
        )
        node["actors"] += 1
        node["shards"] += s["shards"]
        node["samples"] += s["samples"]
    return out
