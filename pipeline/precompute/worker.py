"""``ShardWorker``: computes one whole shard into the store (read + decode in background threads, model, write, commit).

A plain class, used as is in tests and wrapped with ``ray.remote`` by the scheduler. Feature maps are written
straight into the store from here; only a small ``ShardResult`` goes back to the driver.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.precompute.config import PrecomputeConfig
from pipeline.precompute.extract import FeatureExtractor, Projection
from pipeline.precompute.report import OTHER_REASONS
from pipeline.precompute.writes import RowWriter, cpu_actor_write_threads
from pipeline.runtime.models import quiet_cpu_only_warnings
from pipeline.runtime.retry import TransientIOError, is_transient
from pipeline.runtime.storage import quiet_abandoned_request_errors

MAX_REASONS = 50  # distinct error reasons a result carries; more are counted under OTHER_REASONS
_DONE = object()


class ShardCancelled(Exception):
    """The shard being computed was stopped by ``ShardWorker.cancel`` (its job is ending); it is not committed."""


@dataclass(frozen=True)
class ShardTask:
    """One shard to compute: its scanned description, its first row, and whether earlier attempts may have left rows."""

    shard: Any  # pipeline.shards.ShardInfo
    start_row: int
    attempt: int = 1
    clean: bool = True  # no earlier attempt wrote into this shard's rows, so failed rows need no zero-filling
    duplicates: dict[int, str] = field(default_factory=dict)  # position -> reason: keys seen earlier (plan.duplicates)


@dataclass
class ShardResult:
    """What a worker reports for a committed shard: counts, reasons of failures, and where its time went."""

    shard_index: int
    url: str
    num_samples: int
    num_ok: int = 0
    num_failed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    shard_error: str | None = None
    read_s: float = 0.0  # time the model loop waited for decoded samples (I/O + decoding not hidden by the threads)
    decode_s: float = 0.0  # decoding time summed over the background threads
    model_s: float = 0.0
    write_s: float = 0.0
    wall_s: float = 0.0
    worker: str = ""


@dataclass
class _Batch:
    """Decoded samples waiting for the model: their rows and their tensors."""

    rows: list[int] = field(default_factory=list)
    samples: list[Any] = field(default_factory=list)


class ShardWorker:
    """Holds one FeatureExtractor (loaded once) and computes shards into the store given by the config."""

    def __init__(
        self,
        config: PrecomputeConfig,
        *,
        projection: Projection | None = None,
        torch_threads: int | None = None,
        run_id: str | None = None,
    ) -> None:
        from pipeline.precompute.plan import decode_spec

        quiet_cpu_only_warnings()
        quiet_abandoned_request_errors()
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        if config.write_threads is None:  # outside a pool (tests, in-process use): the actor's CPUs
            config = replace(config, write_threads=cpu_actor_write_threads(config.cpus_per_actor))
        self.config = config
        self.extractor = FeatureExtractor(config, projection=projection)
        self.spec = decode_spec(config, self.extractor)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.run_id = run_id  # when set, shards are committed only while this run holds the store's lock
        self._store = None
        self._done_in_shard = 0
        self._cancelled = threading.Event()

    def pid(self) -> int:
        """This worker's process id (the fault tests kill it)."""
        return os.getpid()

    def progress(self) -> float:
        """Samples done so far in the shard being computed, fractional during implicit fits (polled for the progress bar)."""
        return self._done_in_shard + self.extractor.image_progress

    def status(self) -> tuple[float, bool]:
        """(``progress()``, whether kernels are being compiled in the background): polled for the progress bar."""
        from featup.ops.compiled import compiling

        return self.progress(), compiling()

    def cancel(self) -> None:
        """Stops the shard being computed at its next sample, uncommitted (an in-process job that ends: a thread cannot
        be killed the way a Ray actor is)."""
        self._cancelled.set()

    def store(self):
        """The store, opened on first use inside this process (zarr and s3fs clients do not survive fork or pickling)."""
        if self._store is None:
            from pipeline.store.features import FeatureStore

            self._store = FeatureStore.open(self.config.output_location.url, self.config.output_location.options, retry=self.config.retry)
        return self._store

    def process_shard(self, task: ShardTask) -> ShardResult:
        """Computes every sample of the shard, writes its rows, then commits the shard with its index table."""
        try:
            return self._process_shard(task)
        finally:
            self._done_in_shard = 0  # no shard in flight: progress() reads 0 until the next one starts

    def _process_shard(self, task: ShardTask) -> ShardResult:
        from pipeline.store.index import build_index_table

        start = time.perf_counter()
        store = self.store()
        result = ShardResult(task.shard.index, task.shard.url, task.shard.num_samples, worker=self.name)
        rows: dict[int, dict] = {}
        writes = RowWriter(store, self.config.write_threads)
        with ThreadPoolExecutor(self.config.decode_threads, thread_name_prefix="decode") as pool, writes, \
                closing(self._samples(task, pool, result)) as samples:  # an error stops the reader thread too
            batch = _Batch()
            for position, sample in samples:
                self._check_cancelled(task)
                row = task.start_row + position
                sample = self._check_labels(sample, store)
                rows[row] = _index_row(row, task.shard.url, sample)
                if _is_failure(sample):
                    self._write_failed(store, row, task, result)
                    self._done_in_shard += 1
                    continue
                batch.rows.append(row)
                batch.samples.append(sample)
                if len(batch.rows) == self.config.batch_size:
                    self._flush(store, batch, result, writes)
                    batch = _Batch()
            self._flush(store, batch, result, writes)
            writes.wait(result, keep=0)  # every row is written before the shard is committed
        self._add_missing(rows, task, result)
        t = time.perf_counter()
        self._check_cancelled(task)
        self._check_lock(store)
        store.commit_shard(task.shard.index, build_index_table([rows[r] for r in sorted(rows)]))
        result.write_s += time.perf_counter() - t
        _count(rows.values(), result)
        result.wall_s = time.perf_counter() - start
        return result

    def _check_cancelled(self, task: ShardTask) -> None:
        if self._cancelled.is_set():
            raise ShardCancelled(f"shard {task.shard.url}: stopped before it was committed")

    def _check_lock(self, store) -> None:
        """Refuses to commit for a run that no longer holds the lock (an orphan of a dead driver, say)."""
        from pipeline.store.features import StoreLockedError

        if self.run_id is None:
            return
        holder = store.lock_holder()
        if holder != self.run_id:
            raise StoreLockedError(f"store {store.url}: expected the lock of run {self.run_id} to commit, got run {holder}")

    def _samples(self, task: ShardTask, pool: ThreadPoolExecutor, result: ShardResult) -> Iterator[tuple[int, Any]]:
        """(position in the shard, DecodedSample | FailedSample), in shard order, checked against the scanned keys."""
        from pipeline.sources.decode import FailedSample

        keys = task.shard.keys
        position = 0
        with closing(_prefetch(task.shard, self.config, self.spec, pool, result)) as items:  # closed: its reader stops
            for item in items:
                if isinstance(item, str):  # the shard could not be read (further): the rest of it fails with this reason
                    result.shard_error = item
                    return
                if position >= len(keys):
                    result.shard_error = f"shard {task.shard.url}: expected {len(keys)} samples as scanned, got more"
                    return
                if item.key != keys[position]:
                    item = FailedSample(keys[position], f"sample key: expected {keys[position]!r} as scanned, got {item.key!r}")
                elif position in task.duplicates:
                    item = FailedSample(item.key, task.duplicates[position])
                yield position, item
                position += 1

    def _check_labels(self, sample: Any, store) -> Any:
        """The sample, or a FailedSample when a label does not fit the array laid out for it (shape or dtype)."""
        from pipeline.sources.decode import FailedSample

        if _is_failure(sample):
            return sample
        for name, value in sample.labels.items():
            target = store.array(name)
            if tuple(value.shape) != tuple(target.shape[1:]) or not _fits(value, np.dtype(target.dtype)):
                reason = (
                    f"label {name}: expected shape {tuple(target.shape[1:])} of {target.dtype} (as in the first samples), "
                    f"got shape {tuple(value.shape)} of {value.dtype}"
                )
                return FailedSample(sample.key, reason, sample.width, sample.height)
        return sample

    def _flush(self, store, batch: _Batch, result: ShardResult, writes: RowWriter) -> None:
        """Runs the model on a batch and hands its rows to the writer pool (the next batch's model overlaps them)."""
        if not batch.rows:
            return
        t = time.perf_counter()
        images = torch.stack([s.image for s in batch.samples])  # (B, 3, S, S)
        arrays = self.extractor(images)  # name -> (B, ...)
        result.model_s += time.perf_counter() - t
        if self.config.save_image or self.config.compact:  # a compact store's guidance image
            arrays["image"] = np.stack([s.image_uint8 for s in batch.samples])  # (B, S, S, 3)
        for name in self.config.labels:
            arrays[name] = np.stack([s.labels[name] for s in batch.samples])
        writes.submit(result, list(batch.rows), arrays)
        writes.wait(result)  # a bounded number of batches in flight bounds the memory held
        self._done_in_shard += len(batch.rows)

    def _write_failed(self, store, row: int, task: ShardTask, result: ShardResult) -> None:
        """Zero-fills a failed row when an earlier attempt may have written it (rows never written already read as zeros)."""
        if task.clean:
            return
        t = time.perf_counter()
        zeros = {name: np.zeros((1, *store.array(name).shape[1:]), dtype=store.array(name).dtype) for name in store.array_names}
        store.write_rows(row, zeros)
        result.write_s += time.perf_counter() - t

    def _add_missing(self, rows: dict[int, dict], task: ShardTask, result: ShardResult) -> None:
        """Index rows for the scanned samples the read never reached (an unreadable or truncated shard)."""
        reason = result.shard_error or f"shard {task.shard.url}: sample missing when the shard was read"
        store = self.store()
        for position, key in enumerate(task.shard.keys):
            row = task.start_row + position
            if row not in rows:
                rows[row] = {"row": row, "shard": task.shard.url, "key": key, "width": 0, "height": 0, "status": "error", "error": reason}
                self._write_failed(store, row, task, result)


def _prefetch(shard: Any, config: PrecomputeConfig, spec, pool: ThreadPoolExecutor, result: ShardResult) -> Iterator[Any]:
    """Decoded samples of a shard in order; a reader thread feeds the decode pool so the model never waits on I/O.

    Yields DecodedSample / FailedSample objects, and finally a reason string if the shard could not be read to the end.
    """
    depth = 2 * config.batch_size + config.decode_threads
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    reader = threading.Thread(target=_read_shard, args=(shard, config, spec, pool, items, stop), daemon=True, name="shard-reader")
    reader.start()
    try:
        while True:
            t = time.perf_counter()
            item = items.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, Future):
                item, seconds = item.result()
                result.decode_s += seconds
            result.read_s += time.perf_counter() - t
            yield item
    finally:
        stop.set()
        reader.join()


def _read_shard(shard: Any, config: PrecomputeConfig, spec, pool: ThreadPoolExecutor, items: queue.Queue, stop: threading.Event) -> None:
    """Reader thread: streams raw samples and queues their decode futures (or the reason the read stopped)."""
    from pipeline.sources.shards import iter_shard_samples

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    url = shard.url
    try:
        for raw in iter_shard_samples(url, shard.options, retry=config.retry):
            if raw.get("__key__") is None:  # the end marker of a read that broke
                put(str(raw.get("__error__") or f"shard {url}: read ended early"))
                break
            if not put(pool.submit(_timed_decode, raw, spec)):
                break
    except Exception as e:
        if is_transient(e):  # storage down past the retry budget: the shard is not committed, the driver retries it
            put(e if isinstance(e, TransientIOError) else TransientIOError("read", url, e, 0))
        else:  # an unreadable shard (content): its samples are recorded as failed, the job goes on
            put(f"shard {url}: cannot be read ({type(e).__name__}: {e})")
    finally:
        put(_DONE)


def _timed_decode(raw: dict, spec) -> tuple[Any, float]:
    from pipeline.sources.decode import decode_sample

    t = time.perf_counter()
    return decode_sample(raw, spec), time.perf_counter() - t


def _is_failure(sample: Any) -> bool:
    return not hasattr(sample, "image")


def _fits(value: np.ndarray, dtype: np.dtype) -> bool:
    """Whether a label's values can be stored as ``dtype`` without loss."""
    if np.can_cast(value.dtype, dtype, "safe"):
        return True
    if value.dtype.kind in "biu" and dtype.kind in "iu" and value.size:
        info = np.iinfo(dtype)
        return bool(value.min() >= info.min and value.max() <= info.max)
    return False


def _index_row(row: int, url: str, sample: Any) -> dict:
    failed = _is_failure(sample)
    return {
        "row": row,
        "shard": url,
        "key": sample.key,
        "width": int(sample.width),
        "height": int(sample.height),
        "status": "error" if failed else "ok",
        "error": sample.reason if failed else "",
        "orientation": 0 if failed else int(getattr(sample, "orientation", 1)),
    }


def _count(rows: Any, result: ShardResult) -> None:
    """Fills the ok/failed counts and the reason histogram (at most MAX_REASONS distinct reasons) of a result."""
    reasons: Counter = Counter()
    for row in rows:
        if row["status"] == "ok":
            result.num_ok += 1
        else:
            result.num_failed += 1
            reasons[row["error"]] += 1
    kept = dict(reasons.most_common(MAX_REASONS))
    other = sum(reasons.values()) - sum(kept.values())
    result.reasons = {**kept, **({OTHER_REASONS: other} if other else {})}
