"""Conditional writes of one small file (a store's lock) on each kind of storage: create if absent, replace or delete
if unchanged, each answering whether it won.

- S3: ``If-None-Match: *`` to create, ``If-Match: <ETag>`` to replace or delete; a refusal (412) is a lost race. A
  ``409 ConditionalRequestConflict`` (AWS's answer to a conditional write that races another on the same key) raises
  ConditionalConflict, for the caller to retry. An endpoint that accepts a conditional create over an existing
  object (it ignores ``If-None-Match``) is found by a probe object, once per endpoint and bucket in a process, and
  reported as having no conditional writes, with a one-line warning.
- Local files: create by a hard link (exclusive), replace and delete under an ``flock`` with a compare of the bytes.
- Other fsspec filesystems: check-then-write, no conditions.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.runtime.storage import write_temp

logger = logging.getLogger("pipeline.store.lock")  # its warnings are the lock's

CONFIRM_AFTER_S = 1.0  # without conditional writes: the wait between writing the lock and reading it back
_HONOURS_IF_NONE_MATCH: dict[tuple[str | None, str], bool] = {}  # (endpoint, bucket) -> found by one probe per process
_PROBING = threading.Lock()  # threads of one process asking at once: one probe, one warning


class ConditionalConflict(Exception):
    """S3 answered ``409 ConditionalRequestConflict``: the conditional write raced another write of the same key."""


def versioned_file(fs: fsspec.AbstractFileSystem, path: str):
    """Conditional writes of one file, by what the filesystem supports (S3 ETags, local links and locks, or none)."""
    if isinstance(fs, LocalFileSystem):
        return _LocalFile(path)
    if "s3" in protocols(fs) and hasattr(fs, "call_s3"):
        return _S3Object(fs, path)
    return PlainFile(fs, path)


class _S3Object:
    """One S3 object written with ``If-None-Match: *`` (create) and ``If-Match: <ETag>`` (replace, delete)."""

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

    def conditional_writes(self) -> bool:
        """Whether this endpoint refuses a conditional create over an existing object (probed once per process)."""
        key = (_endpoint(self.fs), self.bucket)
        with _PROBING:
            if key in _HONOURS_IF_NONE_MATCH:
                return _HONOURS_IF_NONE_MATCH[key]
            _HONOURS_IF_NONE_MATCH[key] = self._probe()
            if not _HONOURS_IF_NONE_MATCH[key]:
                logger.warning("S3 endpoint %s, bucket %s: expected a conditional create over an existing object to be "
                               "refused, got it accepted (If-None-Match is ignored); store locks there fall back to write, "
                               "wait %g s, read back, so two jobs started within that time may both run",
                               key[0] or "of AWS", self.bucket, CONFIRM_AFTER_S)
        return _HONOURS_IF_NONE_MATCH[key]

    def _probe(self) -> bool:
        """Writes a probe object beside the lock, then a conditional create over it: refused (412, or 409 from an endpoint
        that weighs conditions) means conditional writes hold; accepted means the endpoint ignores them."""
        probe = f"{self.key}.probe-{uuid.uuid4().hex}"
        self.fs.call_s3("put_object", Bucket=self.bucket, Key=probe, Body=b"")
        try:
            self.fs.call_s3("put_object", Bucket=self.bucket, Key=probe, Body=b"", IfNoneMatch="*")
            return False
        except OSError as e:
            if _precondition_failed(e) or _conflicting(e):
                return True
            raise
        finally:
            try:
                self.fs.call_s3("delete_object", Bucket=self.bucket, Key=probe)
            except OSError:  # a probe left behind is a few bytes beside the lock, ignored like it
                pass

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
            if _conflicting(e):
                raise ConditionalConflict() from None
            raise
        finally:
            self.fs.invalidate_cache(self.path)

    def _put(self, data: bytes, **condition: str) -> str | None:
        try:
            return self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, **condition)["ETag"]
        except (FileNotFoundError, OSError) as e:  # FileExistsError, or EINVAL from a failed If-Match; 404 if it is gone
            if isinstance(e, FileNotFoundError) or _precondition_failed(e):
                return None
            if _conflicting(e):  # EIO from s3fs: 409 ConditionalRequestConflict
                raise ConditionalConflict() from None
            raise
        finally:
            self.fs.invalidate_cache(self.path)


class _LocalFile:
    """A local file: exclusive create by a hard link, replace and delete under an flock with a compare of its bytes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.guard = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.guard")

    def conditional_writes(self) -> bool:
        return True

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


class PlainFile:
    """Any other fsspec filesystem: check-then-write, no compare (the lock's read-back is the only check)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.fs, self.path = fs, path

    def conditional_writes(self) -> bool:
        return False

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
    code, status = _s3_answer(error)
    return isinstance(error, FileExistsError) or code in ("PreconditionFailed", "412") or status == 412


def _conflicting(error: BaseException) -> bool:
    """Whether S3 answered ``409 ConditionalRequestConflict`` (s3fs raises it as ``OSError(EIO)``)."""
    code, status = _s3_answer(error)
    return code == "ConditionalRequestConflict" or status == 409


def _s3_answer(error: BaseException) -> tuple[str | None, int | None]:
    """The S3 error code and HTTP status behind an s3fs error (botocore's ClientError is its cause)."""
    response = getattr(error.__cause__, "response", None) or getattr(error, "response", None) or {}
    return (response.get("Error") or {}).get("Code"), (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")


def _endpoint(fs: Any) -> str | None:
    """The S3 endpoint URL a filesystem talks to (None: AWS's default)."""
    return getattr(fs, "endpoint_url", None) or (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url")


def protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
