"""The precompute driver: plans the job, opens or resumes the store under a lock, runs Ray actors over a shard queue.

Actors are ``ray.remote(NodeWorker)`` (a ShardWorker that knows its node), kept by ``pipeline.precompute.pool.ActorPool``;
each takes whole shards, writes their rows into the store itself and commits them. The driver only moves shard
descriptions and small results: it gives shards to placed actors only, requeues the shard of an actor that dies (the
pool starts a replacement if one is still needed), stops the job when ``--max-errors`` is exceeded, shows progress
and writes the run report (with each actor's node). With ``in_process`` (``--in-process``) the same loop drives one
worker in this process instead (``pipeline.precompute.local.LocalPool``) and Ray is never imported.
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
from pipeline.precompute.pool import ActorPool, actor_resources
from pipeline.precompute.slots import ShardLost, Slot, SlotPool
from pipeline.precompute.config import PrecomputeConfig
from pipeline.precompute.extract import Projection
from pipeline.precompute.compact import compact_attrs, compact_notes, ensure_upsampler, stored_upsampler
from pipeline.store.compact import UPSAMPLER_NODE, write_upsampler
from pipeline.precompute.inputs import check_inputs, write_inputs
from pipeline.precompute.repair import committed_to_skip, redo_lost_rows
from pipeline.precompute.plan import COMPAT_KEYS, Plan, plan_keys, estimate_bytes, fit_projection, format_plan, make_plan
from pipeline.runtime.progress import ProgressBar, precompute_postfix
from pipeline.runtime.ray_session import ray_session
from pipeline.runtime.secrets import mask_json
from pipeline.precompute.heartbeat import HEARTBEAT_S, LockHeartbeat
from pipeline.precompute.report import actors_per_node, format_run_summary, per_actor, summarize_reasons
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
    check_local_devices(config)  # before the shards are scanned and Ray starts
    preflight(config)  # the output, inputs and checkpoint storage answer: one line each if not
    config = config.with_machine_resources(_machine_cpus(config))  # resolved once, passed down to the actors
    plan = make_plan(config, command_line)
    if config.dry_run:
        print(format_plan(plan, estimate_bytes(plan), _existing_commits(plan, err)), file=out)
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
            committed, redone = redo_lost_rows(store, plan, committed, err)
            driver = Driver(plan, store, committed, projection, clean=clean, run_id=run_id, err=err, heartbeat=heartbeat,
                            redone=redone, worker=worker)
            with ray_session(config.address, _local_cpus(config)) if driver.queue and not config.in_process else nullcontext():
                report = driver.run()
            _write_report(store, report, err)
    finally:
        _release_lock(store, err)
    print(json.dumps(report, indent=2) if json_output else format_run_summary(report, store.report_url), file=out)
    if report["failure"]:
        reasons = summarize_reasons(report["samples"]["error_reasons"])
        print(f"featup: error: {report['failure']}" + (f"; most common reasons:\n{reasons}" if reasons else ""), file=err)
    return EXIT_OK if report["status"] == "complete" else EXIT_FAILED


def _warn(warning: str | None, err: TextIO) -> None:
    if warning:
        print(warning, file=err)


def preflight(config: PrecomputeConfig) -> None:
    """Before any work: the output can be created (or, for a dry run, read), and the inputs' and a checkpoint URL's
    storage answers; credentials, buckets and permissions that cannot work are refused in one line each."""
    from pipeline.runtime import preflight as checks

    checks.check_output(config.output_location, config.retry, write=not config.dry_run)
    checks.check_inputs(config.inputs, config.storage_options, config.retry)
    if config.checkpoint_location is not None and "://" in config.checkpoint_location.url:
        checks.check_readable(config.checkpoint_location, config.retry, what="--checkpoint")


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
    """(store, committed shards, projection, clean): resumes a compatible store or creates one; holds its lock.

    The lock comes first, before anything is written: whether to resume or create is decided under it, so of jobs
    started together on a new output exactly one creates the store and the others are refused naming it."""
    from pipeline.store.features import FeatureStore

    c = plan.config
    options = c.output_location.options
    lock = FeatureStore.lock_output(c.output, run_id, options, overwrite=c.overwrite, retry=c.retry, heartbeat_s=HEARTBEAT_S)
    try:
        if not c.overwrite and FeatureStore.exists(c.output, options, retry=c.retry):
            return _resume_store(plan, FeatureStore.open(c.output, options, retry=c.retry, lock=lock), err)
        with LockHeartbeat(lock) as heartbeat:  # fitting the PCA may take longer than the lock's window
            projection = plan.projection if plan.projection is not None else (fit_projection(plan) if c.channels else None)
        if heartbeat.error is not None:
            raise heartbeat.error
        upsampler = stored_upsampler(plan.extractor, projection) if c.compact else None
        attrs = {**plan.attrs, "pca": projection.to_attrs() if projection else None,
                 **(compact_attrs(upsampler[0]) if upsampler else {})}
        store = FeatureStore.create(
            c.output, num_rows=plan.num_rows, arrays=plan.arrays, attrs=attrs, storage_options=options,
            overwrite=c.overwrite, keys=plan_keys(plan), retry=c.retry, codec=c.storage_codec, lock=lock,
            side_nodes=(UPSAMPLER_NODE,) if upsampler else (), notes=compact_notes() if upsampler else None,
        )
        if upsampler is not None:  # before any row, under the lock: a compact store never has rows without its upsampler
            write_upsampler(store, *upsampler)
        write_inputs(store, plan.shards)  # the shards' content identities, to refuse a resume against changed ones
    except BaseException:
        try:
            lock.release()
        except TransientIOError:  # storage is down: the lock goes stale; the error that stopped the job is the one told
            pass
        raise
    return store, set(), projection, True


def _resume_store(plan: Plan, store, err: TextIO):
    """(store, committed shards, projection, clean) of an existing store this run may resume (settings compared; a
    compact store's upsampler checked, and written if the creating run stopped before it)."""
    from pipeline.store.features import check_compatible

    c = plan.config
    _warn(check_inputs(store, plan.shards), err)  # the shards the store was made from, by content, first
    check_compatible(store.attrs, plan.attrs, COMPAT_KEYS)
    committed = store.committed_shards() & {s.index for s in plan.shards}
    projection = Projection.from_attrs(store.attrs["pca"]) if c.channels else None
    if c.compact:
        ensure_upsampler(store, stored_upsampler(plan.extractor, projection))
    print(
        f"featup: resuming {c.output}: {len(committed)} of {len(plan.shards)} shards already committed and skipped, "
        f"{len(plan.shards) - len(committed)} to compute",
        file=err,
    )
    return store, committed, projection, False


def _existing_commits(plan: Plan, err: TextIO) -> set[int] | None:
    """For a dry run: the committed shards of a compatible existing store (None when there is none or it is replaced)."""
    from pipeline.store.features import FeatureStore, check_compatible

    c = plan.config
    options = c.output_location.options
    if c.overwrite or not FeatureStore.exists(c.output, options, retry=c.retry):
        return None
    store = FeatureStore.open(c.output, options, mode="r", retry=c.retry)
    _warn(check_inputs(store, plan.shards), err)
    check_compatible(store.attrs, plan.attrs, COMPAT_KEYS)
    return committed_to_skip(store, plan, store.committed_shards(), err)


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
    """The loop over a queue of uncommitted shards (on a pool of Ray actors or in process), with worker replacement,
    error limit, progress and report."""

    def __init__(
        self, plan: Plan, store, committed: set[int], projection: Projection | None, *, clean: bool, run_id: str, err: TextIO,
        heartbeat: LockHeartbeat | None = None, redone: Sequence[str] = (), worker: type | None = None,
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
        self.pool: SlotPool | None = None
        self.redone = list(redone)  # committed shards computed again because rows of theirs lost their objects

    def run(self) -> dict:
        """Computes every queued shard (or stops on the error limit or a fatal failure) and returns the report."""
        started_at, start = datetime.now(timezone.utc), time.monotonic()
        try:
            if self.queue:
                self.pool = self._make_pool()
                self._loop(self.pool)
            self.progress.set(self.total.samples, self._postfix())  # drawn once more by close()
            self._check_some_succeeded()
        finally:
            if self.pool is not None:
                self.pool.close()
            self.progress.close()
        return self._report(started_at, time.monotonic() - start)

    def _make_pool(self) -> SlotPool:
        """Ray actors, or with ``in_process`` one worker in this process (Ray is not imported)."""
        config = self.plan.config
        if config.in_process:
            from pipeline.precompute.local import LocalPool

            if self.worker is not None:  # materialize's actors read compact rows; LocalPool builds precompute's worker
                raise ConfigError(f"in-process mode: expected precompute's worker, got {self.worker.__name__}, which runs "
                                  "on Ray actors only (run it without in-process mode)")
            return LocalPool(config, projection=self.projection, run_id=self.run_id)
        return ActorPool(config, actor_resources(config), projection=self.projection, run_id=self.run_id, prefix=ACTOR_PREFIX,
                         err=self.err, worker=self.worker)

    def _loop(self, pool: SlotPool) -> None:
        """Hands queued shards to ready idle workers, collects results, and keeps the pool sized to the work left."""
        while self.failure is None and (self.queue or pool.busy()):
            pool.fill(len(self.queue) + len(pool.busy()))
            pool.poll()
            if pool.start_failure is not None and self.failure is None:
                self.failure = pool.start_failure
            for slot in pool.idle():
                if self.queue:
                    pool.submit(slot, self.queue.popleft())
            for slot in pool.wait(TICK_S):
                self._collect(pool, slot)
            self._check_error_limit()
            pool.poll_progress()
            self.progress.set(self.total.samples + sum(s.progress for s in pool.busy()), self._postfix())
            if self.heartbeat is not None and self.heartbeat.error is not None:
                self.failure = f"the store's lock could not be renewed: {self.heartbeat.error}"

    def _collect(self, pool: SlotPool, slot: Slot) -> None:
        """Takes a finished shard's result, or requeues it after a worker death (the pool replaces the actor) or failure."""
        task = slot.task
        try:
            result: ShardResult = pool.take(slot)
        except ShardLost as e:
            self._retry(task, e.reason)
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
        compiling = self.pool is not None and any(s.compiling for s in self.pool.busy())
        return precompute_postfix(self.total.shards, self.todo_shards, self._errors(), compiling)

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

    def _actors_report(self) -> dict:
        """Actors wanted, started and lost, each actor's throughput and node, and the work done per node."""
        pool = self.pool
        nodes = {name: pool.node_of(name) for name in self.total.per_actor} if pool else {}
        return {
            "mode": "in-process" if self.plan.config.in_process else "ray",  # in-process: one worker here, no Ray
            "count": self.plan.config.actors,
            "started": pool.started if pool else 0,
            "restarts": pool.deaths if pool else 0,
            "per_actor": per_actor(self.total.per_actor, nodes),
            "nodes": actors_per_node(self.total.per_actor, nodes),
        }

    def _report(self, started_at: datetime, wall_s: float) -> dict:
        """The run report: config, counts, wall time, throughput, per-actor throughput and the time split."""
        t, plan = self.total, self.plan
        reasons = self.previous[1] + t.reasons
        busy = sum(t.times[k] for k in ("read_wait", "model", "write"))
        return mask_json({  # URLs may carry credentials (pre-signed, user:password@): report.json is shared
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
                "redone_for_lost_rows": self.redone,
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
        })


def check_local_devices(config: PrecomputeConfig) -> None:
    """A local run's CUDA request on a machine without a usable GPU is a ConfigError at once (a cluster is not checked:
    its GPU nodes may differ from the driver's machine)."""
    if config.address is not None:
        return
    wants_cuda = config.device.startswith("cuda") or (config.gpus_per_actor or 0) > 0
    if wants_cuda:
        from featup.devices import resolve_device

        resolve_device(config.device if config.device.startswith("cuda") else "cuda")


def _machine_cpus(config: PrecomputeConfig) -> int:
    """The CPUs a local job shares out: those of the Ray already running in this process, else this machine's (always
    this machine's for an in-process job, which does not import Ray)."""
    if not config.in_process:
        import ray

        if ray.is_initialized():
            return max(1, int(ray.cluster_resources().get("CPU", 1)))
    return os.cpu_count() or 1


def _local_cpus(config: PrecomputeConfig) -> int:
    """CPUs a local Ray needs for the actors asked for (--actors auto: the machine's)."""
    return 0 if config.actors == "auto" else math.ceil(config.actors * config.cpus_per_actor)


def _previous_errors(store) -> tuple[int, Counter]:
    """Failed samples (and their reasons) of the shards committed by earlier runs."""
    index = store.read_index()
    errors = [e for s, e in zip(index["status"].to_pylist(), index["error"].to_pylist()) if s == "error"]
    return len(errors), Counter(errors)
