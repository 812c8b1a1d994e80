"""The feature store: a Zarr v3 group (local path or fsspec URL) with the sample keys, Parquet index files, commit
markers, a report and a lock (where each lives: ``pipeline/store/layout.py``).

A store is created under its lock, taken before its first byte (``pipeline/store/location.py``): of jobs creating one
store at the same moment exactly one does.

Every operation on storage goes through the store's RetryPolicy (``retry=`` of ``create``/``open``/``exists``):
transient faults are retried within its budget, then raise TransientIOError; access denied is a one-line error.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from fsspec.implementations.local import LocalFileSystem

from featup.errors import ConfigError, InputError
from pipeline.runtime.retry import RetryPolicy, is_transient
from pipeline.runtime.storage import put_atomic
from pipeline.store.access import retry_policy, store_call
from pipeline.store.codecs import ZSTD_LEVEL, StorageCodec
from pipeline.store.integrity import StrictStore
from pipeline.store.index import check_index_table, concat_index_tables, empty_index_table
from pipeline.store.layout import (KEYS_ARRAY, LAYOUTS, SIDE_GROUP, STORE_FORMAT, Layout, create_side_group, layout_for,
                                   refuse_resume)
from pipeline.store.location import CREATING, LOCK_FILE, clear_location, remove_except_lock, store_meta, writable_location
from pipeline.store.lock import HEARTBEAT_S, MIN_STALE_S, StoreLock, StoreLockedError

__all__ = ["ArraySpec", "FeatureStore", "StoreLockedError", "STORE_FORMAT", "ZSTD_LEVEL", "check_compatible"]

logger = logging.getLogger(__name__)

# zstd level 1: float16 feature maps compress about 1.09x at level 1 and at level 3 alike, and level 1
# takes about half the CPU time, which on a CPU actor is taken from the model.
LEGACY_CODEC = StorageCodec(codec="zstd", tile=None)  # zstd level 1, one chunk per row
ROW_DIM = "sample"
KEY_CHUNK = 1 << 16  # sample keys per chunk of the ``sample`` coordinate (written once, at creation)
RESERVED_NAMES = ("index", "commits", "report.json", "lock.json", "zarr.json", KEYS_ARRAY, SIDE_GROUP)
_COMMIT_NAME = re.compile(r"^shard-(\d+)\.json$")
INPUTS_NAME = "index/inputs.json"  # the shards a store is made from, with their content identity


@dataclass(frozen=True)
class ArraySpec:
    """One stored array: ``(num_rows, *shape_per_row)`` of ``dtype``; ``dims`` names the per-row axes (``sample`` is prepended;
    a tuple that already names the row axis is taken as is)."""

    name: str
    shape_per_row: tuple[int, ...]
    dtype: str
    dims: tuple[str, ...]
    spatial_axes: tuple[int, ...] | None = None  # per-row axes tiled by a sharded layout (None: one chunk per row)
    codes: bool = False  # int8 codes of a float array (the codec's ``auto`` picks their compressor)
    attributes: dict | None = None  # e.g. the dequantisation formula of codes (pipeline.store.quantize.quant_attrs)


class FeatureStore:
    """Rows of per-sample arrays in Zarr plus the committed-shard index; every stored object has exactly one writer."""

    def __init__(self, url: str, fs: fsspec.AbstractFileSystem, root: str, group: zarr.Group, storage_options: dict | None,
                 mode: str, retry: RetryPolicy | None = None, layout: Layout = LAYOUTS[STORE_FORMAT],
                 lock: StoreLock | None = None):
        self.url, self.fs, self.root, self.group = url, fs, root.rstrip("/"), group
        self.storage_options, self.mode = storage_options, mode
        self.retry, self.layout = retry_policy(retry), layout
        self._arrays: dict[str, zarr.Array] = {}
        self._writers: dict[str, zarr.Array] = {}  # the same arrays, configured for row writes (see _writer)
        self._lock = lock if lock is not None else StoreLock(fs, self._path("lock.json"), url, self.retry)

    @classmethod
    def lock_output(cls, url: str, run_id: str, storage_options: dict | None = None, *, overwrite: bool = False,
                    retry: RetryPolicy | None = None, stale_after_s: float = MIN_STALE_S,
                    heartbeat_s: float = HEARTBEAT_S) -> StoreLock:
        """Takes the lock of the store at ``url`` for ``run_id``, whether the store exists yet or not: a job's first step,
        before it decides, under the lock, between resuming (``open``) and creating (``create``), both given the lock.

        Refused with nothing written: an output holding other data, a store of an older format without ``overwrite``;
        StoreLockedError (naming the holder) while another job holds the lock."""
        retry = retry_policy(retry)
        fs, root = _resolve(url, storage_options)
        writable_location(url, fs, root, retry, overwrite=overwrite, resume=True)
        lock = StoreLock(fs, f"{root}/{LOCK_FILE}", url, retry)
        lock.acquire(run_id, stale_after_s, heartbeat_s)
        return lock

    @classmethod
    def create(cls, url: str, *, num_rows: int, arrays: Sequence[ArraySpec], attrs: dict,
               storage_options: dict | None = None, overwrite: bool = False, keys: Sequence[str] | None = None,
               retry: RetryPolicy | None = None, codec: StorageCodec | None = None,
               side_nodes: tuple[str, ...] = (), notes: dict[str, str] | None = None,
               lock: StoreLock | None = None) -> FeatureStore:
        """Creates a new store (``overwrite`` first deletes an existing FeatUp store there) with empty, zero-filled arrays
        and the sample key of every row (``keys``; duplicates allowed, "" where unknown) as the ``sample`` coordinate.

        ``codec`` encodes the arrays (default: zstd level 1, one chunk per row, as stores were before codecs);
        ``side_nodes`` names optional side-file folders (``upsampler``: a compact store's upsampler); ``notes`` are
        top-level group attributes for plain Zarr and xarray users (a compact store's ``features``: how to get them).
        Everything is written, and ``overwrite`` deletes, under the store's lock: of jobs creating one store at the same
        moment exactly one does, the others get StoreLockedError (or, once it is made, the error of an existing store)
        and write nothing. ``lock``: the lock the caller holds (``lock_output``), kept by the new store; without one,
        a lock is taken for the creation alone and released once the store is whole."""
        layouts = _check_specs(arrays, num_rows)
        _check_json("store attributes", attrs)
        key_values = _check_keys(keys, num_rows)
        retry = retry_policy(retry)
        fs, root = _resolve(url, storage_options)
        own = lock is None
        if own:
            writable_location(url, fs, root, retry, overwrite=overwrite, resume=False)  # refusals write no lock
            lock = StoreLock(fs, f"{root}/{LOCK_FILE}", url, retry)
            lock.acquire(f"create-{uuid.uuid4().hex}")
        elif not lock.held or lock.path != f"{root}/{LOCK_FILE}":
            raise ConfigError(f"store {url}: expected the held lock of this location (FeatureStore.lock_output), "
                              f"got {'a released lock' if not lock.held else 'the lock at ' + lock.path}")
        group_attrs = {"featup": attrs, "featup_store": {"format": STORE_FORMAT, "num_rows": num_rows, "arrays": list(layouts),
                                                         "keys": KEYS_ARRAY, "side_files": SIDE_GROUP}, **(notes or {})}
        codec = codec if codec is not None else LEGACY_CODEC
        try:
            meta = writable_location(url, fs, root, retry, overwrite=overwrite, resume=False)  # again, now under the lock
            clear_location(url, fs, root, meta, retry)
            group = store_call(retry, "create the store at", url, _create_group, url, fs, root, storage_options, group_attrs,
                               layouts, key_values, codec, tuple(side_nodes))
        finally:
            if own:
                lock.release()
        return cls(url, fs, root, group, storage_options, "r+", retry, lock=None if own else lock)

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None, mode: str = "r+", *,
             retry: RetryPolicy | None = None, strict: bool = False, lock: StoreLock | None = None) -> FeatureStore:
        """Opens an existing store for reading (``"r"``, any known format) or for writing rows and commits (``"r+"``,
        this version's format only: an older store is refused with what to do instead).

        ``strict``: a missing object of a row array raises ``integrity.MissingObjectError`` instead of reading as zeros
        (for readers of ``ok`` rows of committed shards, whose objects are always written). ``lock``: its lock, held by
        the caller (``lock_output``), which the store then renews and releases."""
        if mode not in ("r", "r+"):
            raise ConfigError(f"store mode: expected 'r' or 'r+', got {mode!r}")
        retry = retry_policy(retry)
        fs, root = _resolve(url, storage_options)
        writing = mode == "r+"
        meta = store_call(retry, "open the store at", url, store_meta, fs, root, writing=writing)
        if meta is None:
            raise InputError(f"store {url}: expected a FeatUp feature store, got no store there")
        store_format = meta["attributes"]["featup_store"].get("format")
        layout = layout_for(store_format, url)
        if writing and layout.format != STORE_FORMAT:
            raise ConfigError(refuse_resume(url, store_format))
        strict_arrays = meta["attributes"]["featup_store"].get("arrays", []) if strict else None
        group = store_call(retry, "open the store at", url, _open_group, url, fs, root, storage_options, mode,
                           strict_arrays, writing=writing)
        return cls(url, fs, root, group, storage_options, mode, retry, layout, lock)

    @staticmethod
    def exists(url: str, storage_options: dict | None = None, *, retry: RetryPolicy | None = None) -> bool:
        """Whether a FeatUp store (of any format) is at ``url`` (what decides between resuming and creating)."""
        fs, root = _resolve(url, storage_options)
        return store_call(retry_policy(retry), "look for a store at", url, store_meta, fs, root) is not None

    def __reduce__(self):
        """Pickles as a reopen of the same URL (a Ray actor gets its own connection; a held lock is not carried)."""
        return (_reopen, (self.url, self.storage_options, self.mode, self.retry))

    @property
    def format(self) -> int:
        """The store format (2 for stores of this version, 1 for older ones, opened read-only)."""
        return self.layout.format

    @property
    def attrs(self) -> dict:
        """The run's provenance attributes given to ``create``."""
        return dict(self.group.attrs["featup"])

    @property
    def num_rows(self) -> int:
        """Rows of every array (samples counted before the run)."""
        return int(self.group.attrs["featup_store"]["num_rows"])

    @property
    def array_names(self) -> tuple[str, ...]:
        """Names of the stored arrays, in creation order (the ``sample`` key coordinate is not among them)."""
        return tuple(self.group.attrs["featup_store"]["arrays"])

    def array(self, name: str) -> zarr.Array:
        """The Zarr array ``name``."""
        if name not in self._arrays:
            if name not in self.array_names:
                raise ConfigError(f"store array: expected one of {list(self.array_names)}, got {name!r}")
            self._arrays[name] = self._call("open the array", f"{self.url}/{name}", self.group.__getitem__, name)
        return self._arrays[name]

    def sample_keys(self) -> list[str]:
        """The key of every row as written at creation (the ``sample`` coordinate; format-1 stores have none: [])."""
        if self.layout.format < 2:
            return []
        keys = self._call("read the sample keys of", self.url, lambda: self.group[KEYS_ARRAY][:], writing=False)
        return [str(k) for k in keys.tolist()]

    def write_rows(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        """Writes rows ``[start, start + n)`` of each named array (one chunk per row, so rows of other writers are untouched)."""
        self._require_writable()
        prepared = {name: self._prepare_rows(name, value) for name, value in arrays.items()}
        counts = {name: len(value) for name, value in prepared.items()}
        if len(set(counts.values())) > 1:
            raise InputError(f"rows to write: expected the same number of rows in every array, got {counts}")
        n = next(iter(counts.values()), 0)
        if start < 0 or start + n > self.num_rows:
            raise InputError(f"rows to write: expected rows within [0, {self.num_rows}), got rows [{start}, {start + n})")
        for name, value in prepared.items():
            # A whole-row write is idempotent (one chunk or shard per row): after a fault it is simply done again.
            self._call(f"write rows [{start}, {start + n}) of", f"{self.url}/{name}", self._writer(name).__setitem__,
                       slice(start, start + n), value)

    def _writer(self, name: str) -> zarr.Array:
        """Array ``name`` configured for writing rows: every chunk is stored, even one of zeros.

        zarr otherwise compares each chunk with the fill value before encoding it, a full extra pass over the
        bytes that cost a quarter of the CPU time of a sharded row write (measured; a zero chunk is a few bytes).
        """
        if name not in self._writers:
            self._writers[name] = self.array(name).with_config({"write_empty_chunks": True})
        return self._writers[name]

    def _prepare_rows(self, name: str, value: np.ndarray) -> np.ndarray:
        """The rows as an array of the stored dtype, after checking the per-row shape and that the cast loses nothing."""
        target, value = self.array(name), np.asarray(value)
        if value.shape[1:] != target.shape[1:] or value.ndim != target.ndim:
            raise InputError(f"array {name} rows: expected shape (n, {', '.join(map(str, target.shape[1:]))}), got {value.shape}")
        return _cast_lossless(value, np.dtype(target.dtype), name)

    def commit_shard(self, shard_index: int, table: pa.Table) -> None:
        """Commits a shard once all its rows are written: its index file first, then its marker (each one atomic PUT/rename)."""
        self._require_writable()
        if shard_index < 0:
            raise InputError(f"shard index: expected a non-negative integer, got {shard_index}")
        table = check_index_table(table, self.num_rows)
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression="zstd")
        index_path, marker_path = self._path(self.layout.index_name(shard_index)), self._path(self.layout.commit_name(shard_index))
        self._call(f"commit shard {shard_index}: write", index_path, put_atomic, self.fs, index_path, buf.getvalue().to_pybytes())
        errors = sum(s == "error" for s in table["status"].to_pylist())
        marker = {"shard_index": shard_index, "num_samples": table.num_rows, "ok": table.num_rows - errors, "errors": errors,
                  "index_file": self.layout.index_name(shard_index), "committed_at": datetime.now(timezone.utc).isoformat()}
        self._call(f"commit shard {shard_index}: write", marker_path, put_atomic, self.fs, marker_path, _json_bytes(marker))

    def uncommit_shard(self, shard_index: int) -> None:
        """Deletes a shard's commit marker, so a run computes it again (its old index file is replaced at the commit)."""
        self._require_writable()
        path = self._path(self.layout.commit_name(shard_index))
        self._call(f"un-commit shard {shard_index}: delete", path, _remove_file, self.fs, path)

    def committed_shards(self) -> set[int]:
        """Indexes of the shards whose commit marker exists."""
        return self._call("list the commit markers of", self.url, self._list_commits, writing=False)

    def _list_commits(self) -> set[int]:
        folder = self._path("commits")
        self.fs.invalidate_cache(folder)
        try:
            names = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return set()
        matches = (_COMMIT_NAME.match(n.rstrip("/").rsplit("/", 1)[-1]) for n in names)
        return {int(m.group(1)) for m in matches if m}

    def read_index(self) -> pa.Table:
        """The index rows of all committed shards, sorted by row (index files of uncommitted shards are ignored;
        format-1 index files, which have no ``orientation``, read with orientation 0)."""
        paths = [self._path(self.layout.index_name(i)) for i in sorted(self.committed_shards())]
        if not paths:
            return empty_index_table()
        contents = self._call("read the index files of", self.url, self._cat_index_files, paths, writing=False)
        missing = [p for p, data in contents.items() if isinstance(data, Exception)]
        if missing or len(contents) != len(paths):
            raise InputError(f"store {self.url}: expected an index file for every commit marker, got none at {missing or paths}")
        return concat_index_tables([pq.read_table(pa.BufferReader(data)) for data in contents.values()])

    def _cat_index_files(self, paths: list[str]) -> dict[str, Any]:
        """Every index file's bytes (or the error of a missing one); a transient error of any file is raised, to retry."""
        contents = self.fs.cat(paths, on_error="return")
        for data in contents.values():
            if isinstance(data, Exception) and (is_transient(data) or isinstance(data, PermissionError)):
                raise data
        return contents

    def read_shard_index(self, shard_index: int) -> pa.Table:
        """The index rows of one committed shard (an InputError when it is not committed)."""
        if shard_index not in self.committed_shards():
            raise InputError(f"store {self.url}: expected shard {shard_index} to be committed, got no commit marker for it")
        path = self._path(self.layout.index_name(shard_index))
        data = self._call("read the index file of", path, self.fs.cat_file, path, writing=False)
        return check_index_table(pq.read_table(pa.BufferReader(data)), self.num_rows)

    def write_side_file(self, name: str, data: bytes) -> None:
        """Writes the side file ``name`` (``upsampler/upsampler.json``...) atomically under ``_featup/``."""
        self._require_writable()
        path = self._path(name)
        self._call("write", path, put_atomic, self.fs, path, data)

    def read_side_file(self, name: str) -> bytes | None:
        """The bytes of the side file ``name``, or None when there is none."""
        path = self._path(name)

        def read() -> bytes | None:
            try:
                return self.fs.cat_file(path)
            except FileNotFoundError:
                return None

        return self._call("read", path, read, writing=False)

    @property
    def report_url(self) -> str:
        """Where the run report is (``_featup/run/report.json`` under the store's root; ``report.json`` in format 1)."""
        return f"{self.url.rstrip('/')}/{self.layout.relative('report.json')}"

    def write_report(self, report: dict) -> None:
        """Writes the run report (replacing the previous run's)."""
        self._require_writable()
        _check_json("run report", report)
        path = self._path("report.json")
        self._call("write the run report", path, put_atomic, self.fs, path, _json_bytes(report))

    def read_report(self) -> dict | None:
        """The last run report, or None when no run has finished writing one."""
        return self._call("read the run report of", self.url, self._read_json, "report.json", writing=False)

    def write_inputs(self, inputs: dict) -> None:
        """Records the shards the store is made from (``pipeline.precompute.inputs``), beside the index files."""
        self._require_writable()
        _check_json("input list", inputs)
        path = self._path(INPUTS_NAME)
        self._call("write the input list", path, put_atomic, self.fs, path, _json_bytes(inputs))

    def read_inputs(self) -> dict | None:
        """The shards the store was made from as ``write_inputs`` recorded them, or None (older stores have none)."""
        return self._call("read the input list of", self.url, self._read_json, INPUTS_NAME, writing=False)

    def _read_json(self, name: str) -> dict | None:
        """The side file ``name`` parsed, or None when it does not exist."""
        try:
            return json.loads(self.fs.cat_file(self._path(name)))
        except FileNotFoundError:
            return None

    def acquire_lock(self, run_id: str, stale_after_s: float = MIN_STALE_S, *, heartbeat_s: float = HEARTBEAT_S) -> dict | None:
        """Takes the lock for ``run_id``, refusing while another run's is live; returns the stale lock it took over, if any.

        The lock records its staleness window: at least ``stale_after_s``, and longer than this store's retry budget plus
        three heartbeats of ``heartbeat_s`` (the caller's interval), so an outage this run rides out never frees its lock.
        """
        self._require_writable()
        return self._lock.acquire(run_id, stale_after_s, heartbeat_s)

    def heartbeat(self) -> None:
        """Refreshes this run's lock (riding out transient faults); raises StoreLockedError if another run took it over."""
        self._lock.heartbeat()

    def release_lock(self) -> None:
        """Removes this run's lock (a lock owned by another run is left alone)."""
        self._lock.release()

    def lock_holder(self) -> str | None:
        """The run id of whoever holds the lock now (None without a lock): what a worker checks before it commits."""
        lock = self._lock.current()
        return None if lock is None else lock.get("run_id")

    @property
    def lock_stale_after_s(self) -> float:
        """The staleness window this store's lock records (that of the lock this handle holds, once acquired)."""
        return self._lock.stale_after_s

    def _call(self, operation: str, target: str, fn, *args, writing: bool = True):
        return store_call(self.retry, operation, target, fn, *args, writing=writing and self.mode == "r+")

    def _require_writable(self) -> None:
        if self.mode != "r+":
            raise ConfigError(f"store {self.url}: expected a store opened with mode 'r+' to write, got mode {self.mode!r}")

    def _path(self, name: str) -> str:
        """The path of ``name`` under the root; side files by their format-1 names (``lock.json``, ``commits``...)."""
        return f"{self.root}/{self.layout.relative(name)}"


def check_compatible(existing_attrs: dict, new_attrs: dict, keys: Sequence[str]) -> None:
    """Raises a ConfigError naming every key in ``keys`` whose value differs between the store and this run."""
    missing = object()

    def show(value: Any) -> str:
        return "(not set)" if value is missing else json.dumps(value)

    def same(a: Any, b: Any) -> bool:
        # A setting added in a later version is None when unused, and absent from older stores: the same thing.
        a, b = (None if v is missing else v for v in (a, b))
        return _json_roundtrip(a) == _json_roundtrip(b)

    diffs = []
    for key in keys:
        old, new = existing_attrs.get(key, missing), new_attrs.get(key, missing)
        if not same(old, new):
            diffs.append(f"{key}: store has {show(old)}, this run has {show(new)}")
    if diffs:
        raise ConfigError(f"store configuration: expected this run's settings to match the existing store, "
                          f"got {'; '.join(diffs)}. Rerun with the store's settings to resume it, "
                          "or pass --overwrite to start over.")


def _check_specs(arrays: Sequence[ArraySpec], num_rows: int) -> dict[str, tuple[ArraySpec, tuple[str, ...]]]:
    """Validated specs by name with their full dimension names; a dimension name has one size across arrays (for xarray)."""
    if not isinstance(num_rows, (int, np.integer)) or num_rows < 0:
        raise ConfigError(f"store num_rows: expected a non-negative integer, got {num_rows!r}")
    if not arrays:
        raise ConfigError("store arrays: expected at least one ArraySpec, got none")
    layouts, sizes = {}, {ROW_DIM: ("rows", num_rows)}
    for spec in arrays:
        if spec.name in layouts or spec.name in RESERVED_NAMES or not spec.name or "/" in spec.name or spec.name.startswith("."):
            raise ConfigError(f"store array name: expected a unique plain name not in {RESERVED_NAMES}, got {spec.name!r}")
        if not all(isinstance(s, (int, np.integer)) and s > 0 for s in spec.shape_per_row):
            raise ConfigError(f"array {spec.name} shape_per_row: expected positive integers, got {spec.shape_per_row}")
        dims = tuple(spec.dims) if len(spec.dims) == len(spec.shape_per_row) + 1 else (ROW_DIM, *spec.dims)
        if len(dims) != len(spec.shape_per_row) + 1:
            raise ConfigError(f"array {spec.name} dims: expected {len(spec.shape_per_row)} names, got {spec.dims}")
        try:
            np.dtype(spec.dtype)  # what numpy cannot hold (bfloat16) Zarr cannot store
        except TypeError:
            raise ConfigError(f"array {spec.name} dtype: expected a numpy dtype such as float16, got {spec.dtype!r}") from None
        for dim, size in zip(dims, (num_rows, *spec.shape_per_row)):
            owner, known = sizes.setdefault(dim, (spec.name, size))
            if known != size:
                raise ConfigError(f"array {spec.name} dimension {dim}: expected size {known} as in {owner}, got {size}")
        layouts[spec.name] = (spec, dims)
    return layouts


def _cast_lossless(value: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
    """``value`` as ``dtype``: same-kind casts (float32 -> float16) and integer casts whose values fit; never float -> int."""
    if value.dtype == dtype or np.can_cast(value.dtype, dtype, "same_kind"):
        return value.astype(dtype, copy=False)
    if value.dtype.kind in "biu" and dtype.kind in "iu":
        info = np.iinfo(dtype)
        if value.size == 0 or (value.min() >= info.min and value.max() <= info.max):
            return value.astype(dtype)
    raise InputError(f"array {name} rows: expected values that fit {dtype}, got {value.dtype} values")

def _reopen(url: str, storage_options: dict | None, mode: str, retry: RetryPolicy) -> FeatureStore:
    return FeatureStore.open(url, storage_options, mode, retry=retry)


def _check_keys(keys: Sequence[str] | None, num_rows: int) -> np.ndarray:
    """The sample keys as a string array of ``num_rows`` ("" for every row when not given)."""
    if keys is None:
        return np.full(num_rows, "", dtype=object)
    if isinstance(keys, str) or len(keys) != num_rows or not all(isinstance(k, str) for k in keys):
        got = f"a string" if isinstance(keys, str) else f"{len(keys)} values of types {sorted({type(k).__name__ for k in keys})}"
        raise ConfigError(f"store keys: expected {num_rows} strings (one per row), got {got}")
    return np.asarray(list(keys), dtype=object)


def _create_group(url: str, fs: fsspec.AbstractFileSystem, root: str, storage_options: dict | None, attrs: dict,
                  layouts: dict, keys: np.ndarray, codec: StorageCodec, side_nodes: tuple[str, ...] = ()) -> zarr.Group:
    """The new group with its arrays, the ``sample`` key coordinate and the side-file sub-group, written under this job's
    lock. The root group's attributes (``featup_store``) come last: the store exists for ``exists`` and ``open`` only
    once whole. Safe to run again after a fault: each try first deletes what an earlier one left (all but the lock)."""
    remove_except_lock(fs, root)
    store = _zarr_store(url, fs, root, storage_options, read_only=False)
    group = zarr.create_group(store, attributes={CREATING: {"format": STORE_FORMAT}}, overwrite=False)
    for name, (spec, dims) in layouts.items():
        # One sample per stored object (a chunk, or a shard of spatial tiles): every object has one writer, and any
        # row can be redone alone.
        layout = codec.array_kwargs(spec.dtype, spec.shape_per_row, spec.spatial_axes, codes=spec.codes)
        group.create_array(name, shape=(len(keys), *spec.shape_per_row), dtype=spec.dtype, dimension_names=dims,
                           fill_value=0, attributes=spec.attributes, **layout)
    coordinate = group.create_array(KEYS_ARRAY, shape=(len(keys),), chunks=(max(1, min(len(keys), KEY_CHUNK)),), dtype=str,
                                    dimension_names=(ROW_DIM,), fill_value="")
    if len(keys):
        coordinate[:] = keys
    create_side_group(group, side_nodes)
    group.attrs.put(attrs)
    return group


def _open_group(url: str, fs: fsspec.AbstractFileSystem, root: str, storage_options: dict | None, mode: str,
                strict_arrays: Sequence[str] | None = None) -> zarr.Group:
    store = _zarr_store(url, fs, root, storage_options, read_only=mode == "r")
    return zarr.open_group(store if strict_arrays is None else StrictStore(store, strict_arrays), mode=mode)


def _resolve(url: str, storage_options: dict | None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and root path of a local path or fsspec URL."""
    fs, root = fsspec.core.url_to_fs(os.fspath(url), **(storage_options or {}))
    return fs, root.rstrip("/") or root


def _zarr_store(url: str, fs: fsspec.AbstractFileSystem, root: str, storage_options: dict | None, read_only: bool):
    """A LocalStore for local paths, an FsspecStore (async s3fs, gcsfs, ...) otherwise."""
    if isinstance(fs, LocalFileSystem):
        return zarr.storage.LocalStore(root, read_only=read_only)
    return zarr.storage.FsspecStore.from_url(url, storage_options=storage_options, read_only=read_only)


def _check_json(what: str, value: dict) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what}: expected JSON-serialisable values, got {e}") from None


def _json_roundtrip(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _remove_file(fs: fsspec.AbstractFileSystem, path: str) -> None:
    try:
        fs.rm_file(path)
    except FileNotFoundError:  # a retry after the deletion went through
        pass


def _json_bytes(value: dict) -> bytes:
    return json.dumps(value, indent=2).encode()
