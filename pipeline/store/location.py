"""Where a store is made: what a location holds, what a job may do there, and clearing it while its lock stays held.

A store's lock is ``_featup/run/lock.json`` under its root (``pipeline/store/layout.py``) before, during and after
creation: on an object store a key exists before anything else under its prefix does, and locally the lock creates
its own folders. So the lock is taken before the first byte of a new store is written, creation and ``--overwrite``
happen under it, and of jobs creating one store at the same moment exactly one does. Why not a sibling
``<output>.lock``: the lock would then differ between a store's creation and its resumes (and from the lock every
format-2 store already has), it would need write access to the parent folder or prefix, a bucket-root output has no
sibling, and it would outlive a deleted store.

Hence what a location may hold besides a store: the lock's own files (the lock, its guard, temp and probe files),
which count as nothing, and an interrupted creation: the root group is written first with the ``featup_creating``
attribute and gets its ``featup_store`` attributes last, so a store exists for ``exists``/``open`` only once whole,
and a creation that died half-way is simply made again by the next job that holds the lock.
"""

from __future__ import annotations

import json

import fsspec

from featup.errors import ConfigError
from pipeline.runtime.retry import RetryPolicy
from pipeline.store.access import store_call
from pipeline.store.layout import LAYOUTS, STORE_FORMAT, layout_for, refuse_resume
from pipeline.store.lock import MIN_STALE_S, locked_error, read_lock, stale_reason

LOCK_FILE = LAYOUTS[STORE_FORMAT].relative("lock.json")  # the lock of a store of this format, relative to its root
CREATING = "featup_creating"  # the root group's only attribute until the store is whole
_LOCK_FOLDERS = tuple(LOCK_FILE.split("/")[:-1])
_LOCK_NAME = LOCK_FILE.rsplit("/", 1)[-1]


def store_meta(fs: fsspec.AbstractFileSystem, root: str) -> dict | None:
    """The root ``zarr.json`` of a whole store written by FeatureStore.create (any format), else None."""
    meta = _root_group(fs, root)
    return meta if meta is not None and "featup_store" in meta["attributes"] else None


def writable_location(url: str, fs: fsspec.AbstractFileSystem, root: str, retry: RetryPolicy, *, overwrite: bool,
                      resume: bool) -> dict | None:
    """The metadata of the store at ``root`` (None where there is none), once what this job may not touch is refused,
    with nothing written: other data (never deleted), and an existing store unless ``overwrite`` or (``resume``) it is
    of this format. Checked before the lock is taken, and again under it."""
    meta = store_call(retry, "look for a store at", url, store_meta, fs, root)
    if meta is None:
        if store_call(retry, "look at the output", url, _holds_data, fs, root):
            raise ConfigError(f"output {url}: expected a new or empty location or a FeatUp store, "
                              "got other data there (nothing was deleted)")
        return None
    store_format = meta["attributes"]["featup_store"].get("format")
    layout = layout_for(store_format, url)
    if not overwrite and not resume:
        raise ConfigError(f"output {url}: expected a new store, got an existing FeatUp store; "
                          "rerun the same command to resume it, or pass --overwrite to start over")
    if not overwrite and layout.format != STORE_FORMAT:
        raise ConfigError(refuse_resume(url, store_format))
    return meta


def clear_location(url: str, fs: fsspec.AbstractFileSystem, root: str, meta: dict | None, retry: RetryPolicy) -> None:
    """Under this job's lock: deletes the store there (``meta``) but the lock's own files. A store of an older format
    keeps its lock elsewhere: it is deleted only when that lock is not live."""
    if meta is None:
        return
    layout = layout_for(meta["attributes"]["featup_store"].get("format"), url)
    if layout.format != STORE_FORMAT:
        lock = store_call(retry, "read the lock of", url, read_lock, fs, f"{root}/{layout.relative('lock.json')}")
        if lock is not None and stale_reason(lock, MIN_STALE_S) is None:
            raise locked_error(url, lock, MIN_STALE_S)
    store_call(retry, "delete the store at", url, remove_except_lock, fs, root)


def remove_except_lock(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Deletes everything under ``root`` but the lock's own files (this job holds the lock: it must stay)."""
    for entry in _other_entries(fs, root):
        try:
            fs.rm(entry, recursive=True)
        except FileNotFoundError:  # a retry after the deletion went through
            pass
    fs.invalidate_cache(root)


def _holds_data(fs: fsspec.AbstractFileSystem, root: str) -> bool:
    """Whether ``root`` holds anything but the lock's own files and an interrupted creation."""
    return bool(_other_entries(fs, root)) and _root_group(fs, root, creating=True) is None


def _other_entries(fs: fsspec.AbstractFileSystem, folder: str, lock_path: tuple[str, ...] = _LOCK_FOLDERS) -> list[str]:
    """What ``folder`` holds besides the folders that lead to the lock and the lock's own files (the lock, its
    ``flock`` guard, temp files and probe objects: every name that starts with ``lock.json`` or ``.lock.json``)."""
    found = []
    for entry in _listing(fs, folder):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if lock_path and name == lock_path[0] and entry.rstrip("/") != folder.rstrip("/"):
            found += _other_entries(fs, entry, lock_path[1:])
        elif lock_path or not name.lstrip(".").startswith(_LOCK_NAME):
            found.append(entry)
    return found


def _listing(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    """The paths directly under ``folder`` (a file lists as itself; nothing there lists as none)."""
    fs.invalidate_cache(folder)
    try:
        return list(fs.ls(folder, detail=False))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _root_group(fs: fsspec.AbstractFileSystem, root: str, creating: bool = False) -> dict | None:
    """The root ``zarr.json`` when it is a group written by FeatureStore.create (with ``creating``: one whose creation
    has not finished), else None."""
    try:
        meta = json.loads(fs.cat_file(f"{root}/zarr.json"))
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(meta, dict) or meta.get("node_type") != "group" or not isinstance(meta.get("attributes"), dict):
        return None
    attributes = meta["attributes"]
    if creating:
        return meta if CREATING in attributes and "featup_store" not in attributes else None
    return meta
