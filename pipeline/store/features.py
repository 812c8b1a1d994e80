"""The feature store: a Zarr v3 group (local path or fsspec URL) with Parquet index files, commit markers, a report and a lock.

Layout under the store root (a folder or an object-store prefix)::

    zarr.json, <array>/...          the Zarr group and its arrays, one sample per chunk (one writer per object)
    index/shard-000003.parquet      index rows of shard 3 (written first)
    commits/shard-000003.json       commit marker of shard 3 (written last: a marker never exists without its index)
    report.json, lock.json          the run report and the lock of the run writing the store
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
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

from featup.errors import ConfigError, FeatUpError, InputError
from pipeline.runtime.storage import put_atomic, write_temp
from pipeline.store.index import check_index_table, concat_index_tables, empty_index_table

logger = logging.getLogger(__name__)

STORE_FORMAT = 1
# zstd level 1: float16 feature maps compress about 1.09x at level 1 and at level 3 alike, and level 1
# takes about half the CPU time, which on a CPU actor is taken from the model.
ZSTD_LEVEL = 1
ROW_DIM = "sample"
RESERVED_NAMES = ("index", "commits", "report.json", "lock.json", "zarr.json")
_COMMIT_NAME = re.compile(r"^shard-(\d+)\.json$")


class StoreLockedError(FeatUpError):
    """Another live run holds the store's lock (or took it over from this run)."""


@dataclass(frozen=True)
class ArraySpec:
    """One stored array: ``(num_rows, *shape_per_row)`` of ``dtype``; ``dims`` names the per-row axes (``sample`` is prepended;
    a tuple that already names the row axis is taken as is)."""

    name: str
    shape_per_row: tuple[int, ...]
    dtype: str
    dims: tuple[str, ...]


class FeatureStore:
    """Rows of per-sample arrays in Zarr plus the committed-shard index; every stored object has exactly one writer."""

    def __init__(self, url: str, fs: fsspec.AbstractFileSystem, root: str, group: zarr.Group,
                 storage_options: dict | None, mode: str):
        self.url, self.fs, self.root, self.group = url, fs, root.rstrip("/"), group
        self.storage_options, self.mode = storage_options, mode
        self._arrays: dict[str, zarr.Array] = {}
        self._run_id: str | None = None
        self._stale_after_s = 60.0

    @classmethod
    def create(cls, url: str, *, num_rows: int, arrays: Sequence[ArraySpec], attrs: dict,
               storage_options: dict | None = None, overwrite: bool = False) -> FeatureStore:
        """Creates a new store (``overwrite`` first deletes an existing FeatUp store there) with empty, zero-filled arrays."""
        layouts = _check_specs(arrays, num_rows)
        _check_json("store attributes", attrs)
        fs, root = _resolve(url, storage_options)
        _clear_location(url, fs, root, overwrite)
        group_attrs = {"featup": attrs, "featup_store": {"format": STORE_FORMAT, "num_rows": num_rows, "arrays": list(layouts)}}
        group = zarr.open_group(_zarr_store(url, fs, root, storage_options, read_only=False), mode="w-", attributes=group_attrs)
        for name, (spec, dims) in layouts.items():
            # One sample per chunk: every stored object has one writer, and any row can be redone alone.
            group.create_array(name, shape=(num_rows, *spec.shape_per_row), chunks=(1, *spec.shape_per_row), dtype=spec.dtype,
                               compressors=zarr.codecs.ZstdCodec(level=ZSTD_LEVEL), dimension_names=dims, fill_value=0)
        return cls(url, fs, root, group, storage_options, "r+")

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None, mode: str = "r+") -> FeatureStore:
        """Opens an existing store for reading (``"r"``) or for writing rows and commits (``"r+"``)."""
        if mode not in ("r", "r+"):
            raise ConfigError(f"store mode: expected 'r' or 'r+', got {mode!r}")
        fs, root = _resolve(url, storage_options)
        if not _is_featup_store(fs, root):
            raise InputError(f"store {url}: expected a FeatUp feature store, got no store there")
        group = zarr.open_group(_zarr_store(url, fs, root, storage_options, read_only=mode == "r"), mode=mode)
        return cls(url, fs, root, group, storage_options, mode)

    @staticmethod
    def exists(url: str, storage_options: dict | None = None) -> bool:
        """Whether a FeatUp store is at ``url`` (what decides between resuming and creating)."""
        return _is_featup_store(*_resolve(url, storage_options))

    def __reduce__(self):
        """Pickles as a reopen of the same URL (a Ray actor gets its own connection; a held lock is not carried)."""
        return (FeatureStore.open, (self.url, self.storage_options, self.mode))

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
        """Names of the stored arrays, in creation order."""
        return tuple(self.group.attrs["featup_store"]["arrays"])

    def array(self, name: str) -> zarr.Array:
        """The Zarr array ``name``."""
        if name not in self._arrays:
            if name not in self.array_names:
                raise ConfigError(f"store array: expected one of {list(self.array_names)}, got {name!r}")
            self._arrays[name] = self.group[name]
        return self._arrays[name]

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
            self.array(name)[start : start + n] = value

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
        put_atomic(self.fs, self._path(_index_name(shard_index)), buf.getvalue().to_pybytes())
        errors = sum(s == "error" for s in table["status"].to_pylist())
        marker = {"shard_index": shard_index, "num_samples": table.num_rows, "ok": table.num_rows - errors, "errors": errors,
                  "index_file": _index_name(shard_index), "committed_at": datetime.now(timezone.utc).isoformat()}
        put_atomic(self.fs, self._path(_commit_name(shard_index)), _json_bytes(marker))

    def committed_shards(self) -> set[int]:
        """Indexes of the shards whose commit marker exists."""
        folder = self._path("commits")
        self.fs.invalidate_cache(folder)
        try:
            names = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return set()
        matches = (_COMMIT_NAME.match(n.rstrip("/").rsplit("/", 1)[-1]) for n in names)
        return {int(m.group(1)) for m in matches if m}

    def read_index(self) -> pa.Table:
        """The index rows of all committed shards, sorted by row (index files of uncommitted shards are ignored)."""
        paths = [self._path(_index_name(i)) for i in sorted(self.committed_shards())]
        if not paths:
            return empty_index_table()
        contents = self.fs.cat(paths, on_error="return")
        missing = [p for p, data in contents.items() if isinstance(data, Exception)]
        if missing or len(contents) != len(paths):
            raise InputError(f"store {self.url}: expected an index file for every commit marker, got none at {missing or paths}")
        return concat_index_tables([pq.read_table(pa.BufferReader(data)) for data in contents.values()])

    @property
    def report_url(self) -> str:
        """Where the run report is (``report.json`` at the store's root)."""
        return f"{self.url.rstrip('/')}/report.json"

    def write_report(self, report: dict) -> None:
        """Writes the run report as ``report.json`` (replacing the previous run's)."""
        self._require_writable()
        _check_json("run report", report)
        put_atomic(self.fs, self._path("report.json"), _json_bytes(report))

    def read_report(self) -> dict | None:
        """The last run report, or None when no run has finished writing one."""
        try:
            return json.loads(self.fs.cat_file(self._path("report.json")))
        except FileNotFoundError:
            return None

    def acquire_lock(self, run_id: str, stale_after_s: float = 60) -> dict | None:
        """Takes the lock for ``run_id``, refusing while another run's is live; returns the stale lock it took over, if any."""
        self._require_writable()
        path = self._path("lock.json")
        current = _read_lock(self.fs, path)
        taken_over = None
        if current is not None and current.get("run_id") != run_id:
            reason = _stale_reason(current, stale_after_s)
            if reason is None:
                raise _locked_error(self.url, current, stale_after_s)
            logger.warning("store %s: taking over the lock of run %s (%s)", self.url, current.get("run_id"), reason)
            taken_over = {**current, "stale_reason": reason}
        payload = _json_bytes(_lock_payload(run_id))
        if current is None and not _put_exclusive(self.fs, path, payload):
            raise _locked_error(self.url, _read_lock(self.fs, path) or {}, stale_after_s)
        if current is not None:
            put_atomic(self.fs, path, payload)
        self._run_id, self._stale_after_s = run_id, stale_after_s
        self._check_lock_owner()  # read back: of two runs racing for the lock, the one whose write landed last wins
        return taken_over

    def heartbeat(self) -> None:
        """Refreshes this run's lock; raises StoreLockedError if another run took it over meanwhile."""
        lock = self._check_lock_owner()
        put_atomic(self.fs, self._path("lock.json"), _json_bytes(_lock_payload(self._run_id, lock.get("acquired"))))

    def release_lock(self) -> None:
        """Removes this run's lock (a lock owned by another run is left alone)."""
        lock = _read_lock(self.fs, self._path("lock.json"))
        if self._run_id is not None and lock is not None and lock.get("run_id") == self._run_id:
            self.fs.rm_file(self._path("lock.json"))
        self._run_id = None

    def _check_lock_owner(self) -> dict:
        """The lock, after checking that this run still owns it."""
        if self._run_id is None:
            raise ConfigError(f"store {self.url} lock: expected acquire_lock before heartbeat, got no lock held")
        lock = _read_lock(self.fs, self._path("lock.json"))
        if lock is None or lock.get("run_id") != self._run_id:
            self._run_id = None
            raise _locked_error(self.url, lock or {"run_id": "<none: the lock was removed>"}, self._stale_after_s)
        return lock

    def _require_writable(self) -> None:
        if self.mode != "r+":
            raise ConfigError(f"store {self.url}: expected a store opened with mode 'r+' to write, got mode {self.mode!r}")

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"


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


def _resolve(url: str, storage_options: dict | None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and root path of a local path or fsspec URL."""
    fs, root = fsspec.core.url_to_fs(os.fspath(url), **(storage_options or {}))
    return fs, root.rstrip("/") or root


def _zarr_store(url: str, fs: fsspec.AbstractFileSystem, root: str, storage_options: dict | None, read_only: bool):
    """A LocalStore for local paths, an FsspecStore (async s3fs, gcsfs, ...) otherwise."""
    if isinstance(fs, LocalFileSystem):
        return zarr.storage.LocalStore(root, read_only=read_only)
    return zarr.storage.FsspecStore.from_url(url, storage_options=storage_options, read_only=read_only)


def _is_featup_store(fs: fsspec.AbstractFileSystem, root: str) -> bool:
    """Whether ``root`` holds a Zarr group written by FeatureStore.create."""
    try:
        meta = json.loads(fs.cat_file(f"{root}/zarr.json"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return False
    return meta.get("node_type") == "group" and "featup_store" in meta.get("attributes", {})


def _clear_location(url: str, fs: fsspec.AbstractFileSystem, root: str, overwrite: bool) -> None:
    """Frees ``root``: an existing store is deleted only with ``overwrite`` and no live lock; other data never is."""
    if _is_featup_store(fs, root):
        if not overwrite:
            raise ConfigError(f"output {url}: expected a new store, got an existing FeatUp store; "
                              "rerun the same command to resume it, or pass --overwrite to start over")
        lock = _read_lock(fs, f"{root}/lock.json")
        if lock is not None and _stale_reason(lock, 60) is None:
            raise _locked_error(url, lock, 60)
        fs.rm(root, recursive=True)
        return
    fs.invalidate_cache(root)
    if fs.isfile(root) or (fs.isdir(root) and fs.ls(root, detail=False)):
        raise ConfigError(f"output {url}: expected a new or empty location or a FeatUp store, "
                          "got other data there (nothing was deleted)")


def _put_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Creates ``path`` only if it does not exist (a hard link locally); object stores get one PUT. False if it existed."""
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        return True
    tmp = write_temp(path, data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def _read_lock(fs: fsspec.AbstractFileSystem, path: str) -> dict | None:
    """The lock's content, None without a lock; an unreadable lock reads as one with no heartbeat (stale)."""
    try:
        lock = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        lock = None
    return lock if isinstance(lock, dict) else {"run_id": "<unreadable lock>", "heartbeat": 0.0}


def _lock_payload(run_id: str, acquired: float | None = None) -> dict:
    now = time.time()
    return {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "pid_namespace": _pid_namespace(),
            "acquired": acquired or now, "heartbeat": now}


def _stale_reason(lock: dict, stale_after_s: float) -> str | None:
    """Why the lock is stale (no heartbeat for too long, or its process is gone on this host), or None if it is live."""
    age = time.time() - float(lock.get("heartbeat", 0.0))
    if age > stale_after_s:
        return f"no heartbeat for {age:.0f} s"
    namespace = _pid_namespace()
    visible = namespace is not None and lock.get("host") == socket.gethostname() and lock.get("pid_namespace") == namespace
    if visible and not _pid_alive(int(lock.get("pid", -1))):
        return f"its process {lock.get('pid')} on this host is gone"
    return None


def _locked_error(url: str, lock: dict, stale_after_s: float) -> StoreLockedError:
    age = time.time() - float(lock.get("heartbeat", time.time()))
    return StoreLockedError(
        f"output {url}: expected no other job writing to it, got run {lock.get('run_id')} "
        f"(host {lock.get('host')}, pid {lock.get('pid')}, last heartbeat {age:.0f} s ago); "
        f"wait for it to end or stop it (a lock without a heartbeat for {stale_after_s:.0f} s is taken over)"
    )


def _pid_namespace() -> str | None:
    """This process's PID namespace (Linux), so a PID is only judged dead by a process that can see it."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    return pid > 0


def _index_name(shard_index: int) -> str:
    return f"index/shard-{shard_index:06d}.parquet"


def _commit_name(shard_index: int) -> str:
    return f"commits/shard-{shard_index:06d}.json"


def _check_json(what: str, value: dict) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what}: expected JSON-serialisable values, got {e}") from None


def _json_roundtrip(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _json_bytes(value: dict) -> bytes:
    return json.dumps(value, indent=2).encode()
