"""The lock of a feature store: one run writes it at a time, taken and renewed by conditional writes
(``pipeline/store/versioned.py``).

- S3: created with ``If-None-Match: *`` and renewed, taken over or released with ``If-Match`` on its ETag, so of
  several jobs started at the same moment exactly one holds it. A ``409 ConditionalRequestConflict`` (AWS's answer
  to a conditional write racing another) is retried with backoff within the retry budget, then counts as a lost
  race, as a 412 does. On an endpoint that accepts a conditional create over an existing object (it ignores
  ``If-None-Match``; found once per process) the lock falls back to write, wait, read back, with a warning.
- Local files: created by a hard link (exclusive), renewed, taken over and released under an ``flock`` on a guard
  file beside it with a compare of its bytes.
- Other fsspec filesystems: check-then-write and read back, with a warning that two jobs started together may both run.

The lock records its staleness window (``stale_after_s``), longer than the holder's retry budget plus three
heartbeats, and every other job judges it with that window: a job riding out a storage outage keeps its lock. A
holder whose process is gone is taken over at once only from a process that can see its PID: same host name, same
kernel boot (the boot id, random at every boot, so it differs between machines that share a host name and the
initial PID namespace) and same PID namespace; any other lock is judged by its heartbeat alone.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from typing import Any, Callable

import fsspec
import tenacity

from featup.errors import ConfigError, FeatUpError
from pipeline.runtime.retry import RetryPolicy
from pipeline.store.access import store_call
from pipeline.store.versioned import CONFIRM_AFTER_S, ConditionalConflict, PlainFile, protocols, versioned_file

logger = logging.getLogger(__name__)

MIN_STALE_S = 60.0  # a lock is never judged stale sooner than this
HEARTBEAT_S = 10.0  # the heartbeat interval assumed when the caller does not say
HEARTBEATS_OF_SLACK = 3
_MAX_RACES = 8  # conditional writes lost in a row before giving up (another job keeps changing the lock)
_BOOT_ID = "/proc/sys/kernel/random/boot_id"


class StoreLockedError(FeatUpError):
    """Another live run holds the store's lock (or took it over from this run)."""


def stale_window(retry: RetryPolicy, heartbeat_s: float = HEARTBEAT_S, minimum_s: float = MIN_STALE_S) -> float:
    """How long a lock may go without a heartbeat before it is stale: more than a whole retry budget of outage."""
    return max(float(minimum_s), retry.budget_s + HEARTBEATS_OF_SLACK * float(heartbeat_s))


def lock_payload(run_id: str, token: str | None = None, stale_after_s: float = MIN_STALE_S,
                 acquired: float | None = None) -> dict:
    """The lock's content: who holds it (run; host, kernel boot, PID namespace and pid), this holder's token, its window
    and its last heartbeat."""
    now = time.time()
    return {"run_id": run_id, "token": token or uuid.uuid4().hex, "host": socket.gethostname(), "boot_id": _boot_id(),
            "pid": os.getpid(), "pid_namespace": _pid_namespace(), "acquired": acquired or now, "heartbeat": now,
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
    if pid_visible(lock) and not _pid_alive(int(lock.get("pid", -1))):
        return f"its process {lock.get('pid')} on this host is gone"
    return None


def pid_visible(lock: dict) -> bool:
    """Whether the holder's PID names a process this one can look up: same host name, kernel boot and PID namespace.

    The host name alone is shared by containers (``localhost``, a pod template's name) and the initial PID namespace
    has the same inode on every Linux host; the boot id tells the machines apart. A lock without one (no ``/proc``,
    or written by an older featup) never counts as visible: its liveness is its heartbeat.
    """
    here = (socket.gethostname(), _boot_id(), _pid_namespace())
    return None not in here and (lock.get("host"), lock.get("boot_id"), lock.get("pid_namespace")) == here


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
        conditional = store_call(self.retry, "check the conditional writes of", self.url, self._versions.conditional_writes)
        if not conditional and isinstance(self._versions, PlainFile):
            logger.warning("store %s: %s storage has no conditional writes here; two jobs started at the same moment may "
                           "both take its lock", self.url, protocols(self.fs)[0])
        token = uuid.uuid4().hex
        taken = store_call(self.retry, "take the lock of", self.url, self._acquire, run_id, token, window,
                           _Tries(self.retry), conditional)
        self.run_id, self.token, self.stale_after_s = run_id, token, window
        if taken is not None:
            logger.warning("store %s: took over the lock of run %s (%s)", self.url, taken.get("run_id"), taken["stale_reason"])
        return taken

    @property
    def held(self) -> bool:
        """Whether this handle holds the lock (acquired and not released or lost since)."""
        return self.token is not None

    def heartbeat(self) -> None:
        """Refreshes this holder's lock; raises StoreLockedError if another run took it over meanwhile."""
        if self.token is None:
            raise ConfigError(f"store {self.url} lock: expected acquire_lock before heartbeat, got no lock held")
        store_call(self.retry, "renew the lock of", self.url, self._renew, _Tries(self.retry))

    def release(self) -> None:
        """Removes this holder's lock (a lock now held by another run is left alone)."""
        if self.token is not None:
            store_call(self.retry, "release the lock of", self.url, self._release, _Tries(self.retry))
        self.run_id = self.token = None

    def _acquire(self, run_id: str, token: str, window: float, tries: _Tries, conditional: bool) -> dict | None:
        for _ in range(_MAX_RACES):
            found = self._versions.read()
            if found is None:
                if tries.write(self._versions.create, _encode(lock_payload(run_id, token, window))) is not None:
                    return self._confirm(token, None, conditional)
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
            if tries.write(self._versions.replace, _encode(lock_payload(run_id, token, window)), tag) is not None:
                return self._confirm(token, taken, conditional)
        raise StoreLockedError(f"output {self.url}: expected to take the lock, got it changed by other jobs "
                               f"{_MAX_RACES} times in a row{tries.note()}; rerun the same command")

    def _confirm(self, token: str, taken: dict | None, conditional: bool) -> dict | None:
        """Without conditional writes: wait, then read back (of runs racing, the one whose write landed last wins)."""
        if not conditional:
            time.sleep(CONFIRM_AFTER_S)  # longer than a racing job takes from finding no lock to writing its own
            found = self._versions.read()
            lock = None if found is None else _parse(found[0])
            if lock is None or lock.get("token") != token:
                raise locked_error(self.url, lock or {"run_id": "<none: the lock was removed>"}, MIN_STALE_S)
        return taken

    def _renew(self, tries: _Tries) -> None:
        for _ in range(_MAX_RACES):
            found = self._versions.read()
            lock = None if found is None else _parse(found[0])
            if lock is None or lock.get("token") != self.token:
                self.run_id = self.token = None
                raise locked_error(self.url, lock or {"run_id": "<none: the lock was removed>"}, self.stale_after_s)
            payload = lock_payload(self.run_id, self.token, self.stale_after_s, lock.get("acquired"))
            if tries.write(self._versions.replace, _encode(payload), found[1]) is not None:
                return
        raise StoreLockedError(f"output {self.url}: expected to renew the lock, got it changed {_MAX_RACES} times in a "
                               f"row{tries.note()}")

    def _release(self, tries: _Tries) -> None:
        for _ in range(_MAX_RACES):
            found = self._versions.read()
            if found is None or _parse(found[0]).get("token") != self.token:
                return
            if tries.write(self._versions.delete, found[1]):
                return

class _Tries:
    """The conditional writes of one lock operation: a ``409`` conflict is retried with the retry policy's backoff while
    its budget lasts (the racing write is still in flight), then the write counts as lost, as after a ``412``."""

    def __init__(self, retry: RetryPolicy) -> None:
        self.retry, self.deadline, self.conflicts = retry, time.monotonic() + retry.budget_s, 0

    def write(self, write: Callable[..., Any], *args: Any) -> Any:
        """``write(*args)``: its result, or None once conflicts outlast the budget."""
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(ConditionalConflict),
            wait=tenacity.wait_random_exponential(multiplier=self.retry.first_wait_s, max=self.retry.max_wait_s),
            stop=tenacity.stop_after_delay(max(0.0, self.deadline - time.monotonic())), reraise=True,
        )
        try:
            return retrying(self._counted, write, *args)
        except ConditionalConflict:
            return None

    def _counted(self, write: Callable[..., Any], *args: Any) -> Any:
        try:
            return write(*args)
        except ConditionalConflict:
            self.conflicts += 1
            raise

    def note(self) -> str:
        """What the storage answered, for an error message (empty without conflicts)."""
        return f" (the storage answered 409 ConditionalRequestConflict {self.conflicts} times)" if self.conflicts else ""


def _parse(data: bytes) -> dict:
    try:
        lock = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        lock = None
    return lock if isinstance(lock, dict) else {"run_id": "<unreadable lock>", "heartbeat": 0.0}


def _encode(lock: dict) -> bytes:
    return json.dumps(lock, indent=2).encode()


def _boot_id() -> str | None:
    """The kernel's boot id (Linux): random at every boot, so two machines never share it, while every container on
    one kernel does (their PID namespaces tell them apart). ``/etc/machine-id`` is not used: it is copied with the
    image into containers and cloned virtual machines."""
    try:
        with open(_BOOT_ID) as f:
            return f.read().strip() or None
    except OSError:
        return None


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
