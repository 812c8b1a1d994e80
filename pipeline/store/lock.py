"""The lock of a feature store: one run writes it at a time, taken and renewed by conditional writes.

- S3: created with ``If-None-Match: *`` and renewed, taken over or released with ``If-Match`` on its ETag, so of
  several jobs started at the same moment exactly one holds it.
- Local files: created by a hard link (exclusive), renewed, taken over and released under an ``flock`` on a guard
  file beside it with a compare of its bytes.
- Other fsspec filesystems: check-then-write as before, with a warning that two jobs started together may both run.

The lock records its staleness window (``stale_after_s``), longer than the holder's retry budget plus three
heartbeats, and every other job judges it with that window: a job riding out a storage outage keeps its lock.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from featup.errors import ConfigError, FeatUpError
from pipeline.runtime.retry import RetryPolicy
from pipeline.runtime.storage import write_temp
from pipeline.store.access import store_call

logger = logging.getLogger(__name__)

MIN_STALE_S = 60.0  # a lock is never judged stale sooner than this
HEARTBEAT_S = 10.0  # the heartbeat interval assumed when the caller does not say
HEARTBEATS_OF_SLACK = 3
_MAX_RACES = 8  # conditional writes lost in a row before giving up (another job keeps changing the lock)


class StoreLockedError(FeatUpError):
    """Another live run holds the store's lock (or took it over from this run)."""


def stale_window(retry: RetryPolicy, heartbeat_s: float = HEARTBEAT_S, minimum_s: float = MIN_STALE_S) -> float:
    """How long a lock may go without a heartbeat before it is stale: more than a whole retry budget of outage."""
    return max(float(minimum_s), retry.budget_s + HEARTBEATS_OF_SLACK * float(heartbeat_s))


def lock_payload(run_id: str, token: str | None = None, stale_after_s: float = MIN_STALE_S,
                 acquired: float | None = None) -> dict:
    """The lock's content: who holds it (run, host, pid), this holder's token, its window and its last heartbeat."""
    now = time.time()
    return {"run_id": run_id, "token": token or uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
            "pid_namespace": _pid_namespace(), "acquired": acquired or now, "heartbeat": now,
            "stale_after_s": float(stale_after_s)}


def read_lock(fs: fsspec.AbstractFileSystem, path: str) -> dict | None:
    """The lock's content, None without a lock; an unreadable lock reads as one with no heartbeat (stale)."""
    try:
        return _parse(fs.cat_file(path))
    except FileNotFoundError:
        return None


def stale_reason(lock: dict, default_window_s: float) -> str | None:
    """Why the lock is stale (no heartbeat within the holder's window, or its process is gone on this host), else None."""
    window = holder_window(lock, default_window_s)
    age = time.time() - float(lock.get("heartbeat", 0.0))
    if age > window:
        return f"no heartbeat for {age:.0f} s"
    namespace = _pid_namespace()
    visible = namespace is not None and lock.get("host") == socket.gethostname() and lock.get("pid_namespace") == namespace
    if visible and not _pid_alive(int(lock.get("pid", -1))):
        return f"its process {lock.get('pid')} on this host is gone"
    return None


def holder_window(lock: dict, default_window_s: float) -> float:
    """The staleness window the holder recorded (a lock of an older version has none: ``default_window_s``)."""
    try:
        return float(lock["stale_after_s"])
    except (KeyError, TypeError, ValueError):
        return float(default_window_s)


def locked_error(url: str, lock: dict, default_window_s: float) -> StoreLockedError:
    age = time.time() - float(lock.get("heartbeat", time.time()))
    return StoreLockedError(
        f"output {url}: expected no other job writing to it, got run {lock.get('run_id')} "
        f"(host {lock.get('host')}, pid {lock.get('pid')}, last heartbeat {age:.0f} s ago); wait for it to end or stop it "
        f"(a lock without a heartbeat for {holder_window(lock, default_window_s):.0f} s is taken over)"
    )


class StoreLock:
    """The lock file of one store and, once acquired, this holder's token; every operation retried through ``retry``."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, url: str, retry: RetryPolicy) -> None:
        self.fs, self.path, self.url, self.retry = fs, path, url, retry
        self.run_id: str | None = None
        self.token: str | None = None
        self.stale_after_s = MIN_STALE_S
        self._versions = versioned_file(fs, path)

    def current(self) -> dict | None:
        """The lock as stored now (None without one)."""
        found = store_call(self.retry, "read the lock", self.url, self._versions.read)
        return None if found is None else _parse(found[0])

    def acquire(self, run_id: str, stale_after_s: float = MIN_STALE_S, heartbeat_s: float = HEARTBEAT_S) -> dict | None:
        """Takes the lock for ``run_id``, refusing while another run's is live; returns the stale lock it took over."""
        window = stale_window(self.retry, heartbeat_s, stale_after_s)
        if not self._versions.conditional:
            logger.warning("store %s: %s storage has no conditional writes here; two jobs started at the same moment may "
                           "both take its lock", self.url, _protocols(self.fs)[0])
        token = uuid.uuid4().hex
        taken = store_call(self.retry, "take the lock of", self.url, self._acquire, run_id, token, window)
        self.run_id, self.token, self.stale_after_s = run_id, token, window
        if taken is not None:
            logger.warning("store %s: took over the lock of run %s (%s)", self.url, taken.get("run_id"), taken["stale_reason"])
        return taken

    def heartbeat(self) -> None:
        """Refreshes this holder's lock; raises StoreLockedError if another run took it over meanwhile."""
        if self.token is None:
            raise ConfigError(f"store {self.url} lock: expected acquire_lock before heartbeat, got no lock held")
        store_call(self.retry, "renew the lock of", self.url, self._renew)

    def release(self) -> None:
        """Removes this holder's lock (a lock now held by another run is left alone)."""
        if self.token is not None:
            store_call(self.retry, "release the lock of", self.url, self._release)
        self.run_id = self.token = None

    def _acquire(self, run_id: str, token: str, window: float) -> dict | None:
        for _ in range(_MAX_RACES):
            found = self._versions.read()
            if found is None:
                if self._versions.create(_encode(lock_payload(run_id, token, window))) is not None:
                    return self._confirm(token, None)
                continue  # another job created it first: judge its lock
            lock, tag = _parse(found[0]), found[1]
            if lock.get("token") == token:  # our write landed, its answer was lost: retried
                return None
            taken = None
            if lock.get("run_id") != run_id:
                reason = stale_reason(lock, window)
                if reason is None:
                    raise locked_error(self.url, lock, window)
                taken = {**lock, "stale_reason": reason}
            if self._versions.replace(_encode(lock_payload(run_id, token, window)), tag) is not None:
                return self._confirm(token, taken)
        raise StoreLockedError(f"output {self.url}: expected to take the lock, got it changed by other jobs "
                               f"{_MAX_RACES} times in a row; rerun the same command")

    def _confirm(self, token: str, taken: dict | None) -> dict | None:
        """Without conditional writes: read back (of two runs racing, the one whose write landed last wins)."""
        if not self._versions.conditional:
            lock = read_lock(self.fs, self.path)
            if lock is None or lock.get("token") != token:
                raise locked_error(self.url, lock or {"run_id": "<none: the lock was removed>"}, MIN_STALE_S)
        return taken

    def _renew(self) -> None:
        for _ in range(_MAX_RACES):
            found = self._versions.read()
            lock = None if found is None else _parse(found[0])
            if lock is None or lock.get("token") != self.token:
                self.run_id = self.token = None
                raise locked_error(self.url, lock or {"run_id": "<none: the lock was removed>"}, self.stale_after_s)
            payload = lock_payload(self.run_id, self.token, self.stale_after_s, lock.get("acquired"))
            if self._versions.replace(_encode(payload), found[1]) is not None:
                return
        raise StoreLockedError(f"output {self.url}: expected to renew the lock, got it changed {_MAX_RACES} times in a row")

    def _release(self) -> None:
        found = self._versions.read()
        if found is not None and _parse(found[0]).get("token") == self.token:
            self._versions.delete(found[1])


def versioned_file(fs: fsspec.AbstractFileSystem, path: str):
    """Conditional writes of one file, by what the filesystem supports (S3 ETags, local links and locks, or none)."""
    if isinstance(fs, LocalFileSystem):
        return _LocalFile(path)
    if "s3" in _protocols(fs) and hasattr(fs, "call_s3"):
        return _S3Object(fs, path)
    return _PlainFile(fs, path)


class _S3Object:
    """One S3 object written with ``If-None-Match: *`` (create) and ``If-Match: <ETag>`` (replace, delete)."""

    conditional = True

    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path = fs, path
        self.bucket, self.key, _ = fs.split_path(path)

    def read(self) -> tuple[bytes, str] | None:
        from fsspec.asyn import sync

        try:
            return sync(self.fs.loop, self._get)
        except FileNotFoundError:
            return None

    async def _get(self) -> tuple[bytes, str]:
        response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
        body = response["Body"]
        try:
            return await body.read(), response["ETag"]
        finally:
            body.close()

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, tag: str) -> str | None:
        return self._put(data, IfMatch=tag)

    def delete(self, tag: str) -> bool:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=tag)
            return True
        except (FileNotFoundError, OSError) as e:
            if isinstance(e, FileNotFoundError) or _precondition_failed(e):
                return False
            raise
        finally:
            self.fs.invalidate_cache(self.path)

    def _put(self, data: bytes, **condition: str) -> str | None:
        try:
            return self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, **condition)["ETag"]
        except (FileNotFoundError, OSError) as e:  # FileExistsError, or EINVAL from a failed If-Match; 404 if it is gone
            if isinstance(e, FileNotFoundError) or _precondition_failed(e):
                return None
            raise
        finally:
            self.fs.invalidate_cache(self.path)


class _LocalFile:
    """A local file: exclusive create by a hard link, replace and delete under an flock with a compare of its bytes."""

    conditional = True

    def __init__(self, path: str) -> None:
        self.path = path
        self.guard = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.guard")

    def read(self) -> tuple[bytes, bytes] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, data

    def create(self, data: bytes) -> bytes | None:
        tmp = write_temp(self.path, data)
        try:
            os.link(tmp, self.path)
            return data
        except FileExistsError:
            return None
        finally:
            os.unlink(tmp)

    def replace(self, data: bytes, tag: bytes) -> bytes | None:
        with self._guarded():
            if self.read() != (tag, tag):
                return None
            os.replace(write_temp(self.path, data), self.path)
            return data

    def delete(self, tag: bytes) -> bool:
        with self._guarded():
            if self.read() != (tag, tag):
                return False
            os.unlink(self.path)
            return True

    @contextmanager
    def _guarded(self) -> Iterator[None]:
        fd = os.open(self.guard, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock


class _PlainFile:
    """Any other fsspec filesystem: check-then-write, no compare (the lock's read-back is the only check)."""

    conditional = False

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.fs, self.path = fs, path

    def read(self) -> tuple[bytes, bytes] | None:
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return data, data

    def create(self, data: bytes) -> bytes | None:
        self.fs.invalidate_cache(self.path)
        if self.fs.exists(self.path):
            return None
        self.fs.pipe_file(self.path, data)
        return data

    def replace(self, data: bytes, tag: bytes) -> bytes:
        self.fs.pipe_file(self.path, data)
        return data

    def delete(self, tag: bytes) -> bool:
        self.fs.rm_file(self.path)
        return True


def _precondition_failed(error: BaseException) -> bool:
    """Whether S3 refused a conditional write (412 PreconditionFailed, which s3fs raises as FileExistsError or EINVAL)."""
    if isinstance(error, FileExistsError):
        return True
    response = getattr(error.__cause__, "response", None) or getattr(error, "response", None) or {}
    code = (response.get("Error") or {}).get("Code")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "412") or status == 412


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def _parse(data: bytes) -> dict:
    try:
        lock = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        lock = None
    return lock if isinstance(lock, dict) else {"run_id": "<unreadable lock>", "heartbeat": 0.0}


def _encode(lock: dict) -> bytes:
    return json.dumps(lock, indent=2).encode()


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
