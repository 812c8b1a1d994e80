"""The first checks of a job's inputs and output, made before any work (before a model loads or Ray starts).

What a new user meets first is told in one line that names the URL or path and what to do, never a traceback:
no storage credentials, credentials the store rejects, a bucket that does not exist, access denied, and an
output that cannot be created (its folder is a file, on a read-only or special file system, or not writable).

- ``check_output``: the nearest existing folder of a local output must take a new file (a temporary file is made
  there and removed: root passes permission bits, not a read-only or special file system); on an object store the
  bucket must answer, and a probe object under the output is written and deleted (a dry run only reads).
- ``check_inputs`` / ``check_readable``: the bucket of each input pattern answers, and its first object, if it
  exists, may be read (missing shards are listed together by the scan that follows).
- ``storage_problem``: the one-line error of a storage failure that no retry can fix (also used by every store
  call, so credentials that expire mid-run read the same).
"""

from __future__ import annotations

import errno
import os
import tempfile
import uuid
from typing import Any, Sequence

import braceexpand
from fsspec.implementations.local import LocalFileSystem

from featup.errors import ConfigError, FeatUpError, InputError
from pipeline.runtime.retry import RetryPolicy, describe
from pipeline.runtime.secrets import mask_text
from pipeline.runtime.storage import Location

PROBE_PREFIX = ".featup-write-check-"
# botocore's exceptions for credentials that cannot be found (by class name: botocore is optional).
NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "NoAuthTokenError",
                  "UnauthorizedSSOTokenError", "SSOTokenLoadError"}
# S3 error codes of credentials that were sent and refused (unknown key, wrong secret, expired session).
REJECTED_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired",
                  "AuthorizationHeaderMalformed", "InvalidSecurity", "AuthFailure", "UnrecognizedClientException"}
NO_BUCKET_CODES = {"NoSuchBucket"}
DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "403"}
CREDENTIALS_HELP = ("give this machine credentials (an instance profile or role, AWS_PROFILE, or AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY in its environment) "
                    "or pass --storage-option key=<id> --storage-option secret=<secret>")


def check_output(location: Location, retry: RetryPolicy, *, write: bool = True, what: str = "--output",
                 file: bool = False) -> None:
    """Refuses, in one line, an output that cannot be written: raises ConfigError naming it and what to do.

    The output is a folder (a store), or with ``file`` a single file (a checkpoint) made in its parent folder.
    """
    fs, path = location.filesystem()
    if isinstance(fs, LocalFileSystem):
        _check_local_output(location.url, path, write=write, what=what, file=file)
        return
    _check_bucket(fs, path, location.url, retry, what=what, writing=True)
    if not write:
        return
    folder = path.rstrip("/").rsplit("/", 1)[0] if file else path.rstrip("/")
    probe = f"{folder}/{PROBE_PREFIX}{uuid.uuid4().hex}"
    try:
        _call(retry, "write a probe object under", location.url, what, True, fs.pipe_file, probe, b"")
        _call(retry, "delete the probe object under", location.url, what, True, fs.rm_file, probe)
    except FeatUpError:
        raise
    except Exception as e:  # a filesystem that cannot write at all (http), or any other refusal of the store
        raise ConfigError(f"{what} {mask_text(location.url)}: expected a location where the store can be written, "
                          f"got {describe(e)}; choose another {what}") from None


def check_inputs(patterns: Sequence[str], storage_options: dict[str, Any], retry: RetryPolicy, what: str = "input") -> None:
    """Refuses, in one line, input patterns whose storage cannot be read (credentials, bucket, access denied)."""
    seen: set[tuple[str, str]] = set()
    for pattern in patterns:
        first = next(iter(braceexpand.braceexpand(pattern)), pattern)
        location = Location.resolve(first, storage_options)
        fs, path = location.filesystem()
        if isinstance(fs, LocalFileSystem):
            continue  # a missing or unreadable local shard is named by the scan, with all the others
        where = (location.url.partition("://")[0], _bucket(fs, path) or location.url)
        if where in seen:
            continue
        seen.add(where)
        check_readable(location, retry, what=what, glob=any(c in path for c in "*?["))


def check_readable(location: Location, retry: RetryPolicy, *, what: str = "input", glob: bool = False) -> None:
    """Refuses, in one line, a remote file that exists but cannot be read, or whose storage cannot be reached at all;
    a missing file passes (the caller names every missing one)."""
    fs, path = location.filesystem()
    if isinstance(fs, LocalFileSystem):
        return
    _check_bucket(fs, path, location.url, retry, what=what, writing=False)
    if glob:
        return
    try:
        _call(retry, "read", location.url, what, False, fs.info, path)
    except FileNotFoundError:
        pass


def storage_problem(what: str, url: str, error: BaseException, *, writing: bool) -> FeatUpError | None:
    """The one-line error for a storage failure no retry can fix (credentials, bucket, access), else None."""
    url = mask_text(url)
    names = {type(e).__name__ for e in _chain(error)}
    codes = {c for c in map(_code, _chain(error)) if c}
    cause = describe(error)
    kind = ConfigError if writing else InputError
    if names & NO_CREDENTIALS:
        return ConfigError(f"{what} {url}: expected storage credentials, got none ({cause}); {CREDENTIALS_HELP}")
    if codes & REJECTED_CODES:
        return ConfigError(f"{what} {url}: expected credentials the storage accepts, got ones it rejects ({cause}); "
                           "check the access key and secret, or renew expired session credentials")
    if codes & NO_BUCKET_CODES or "bucket does not exist" in cause:
        bucket = url.partition("://")[2].split("/", 1)[0]
        return kind(f"{what} {url}: expected an existing bucket, got none named {bucket!r} ({cause}); "
                    "correct the bucket name (and the region or endpoint_url), or create the bucket")
    if codes & DENIED_CODES or isinstance(error, PermissionError) or _status(error) in (401, 403):
        rights = ("s3:ListBucket, s3:PutObject and s3:DeleteObject" if writing else "s3:ListBucket and s3:GetObject")
        return kind(f"{what} {url}: expected a location these credentials may {'write' if writing else 'read'}, got access "
                    f"denied ({cause}); allow {rights} on it (see cluster.yaml) or use other credentials")
    return None


def _check_local_output(url: str, path: str, *, write: bool, what: str, file: bool = False) -> None:
    """The output is a folder (a file, with ``file``) or nothing, under folders, and its nearest existing folder
    takes a new file."""
    if file and os.path.isdir(path):
        raise ConfigError(f"{what} {url}: expected a file path, got a folder; name a file inside it")
    if not file and os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{what} {url}: expected a folder for the store (or nothing there yet), got a file; "
                          "choose another path, or remove the file")
    existing = os.path.dirname(path) if file else path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"{what} {url}: expected a path through folders, got {existing}, which is a file; "
                          "choose another path")
    if not write:
        return
    try:
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=existing)
    except OSError as e:
        thing = "the file" if file else "the store"
        raise ConfigError(f"{what} {url}: expected a location where {thing} can be created, got "
                          f"{_local_reason(e, existing)} ({type(e).__name__}: {e.strerror}); "
                          "choose a folder on a writable file system") from None
    os.close(fd)
    os.unlink(probe)


def _local_reason(error: OSError, folder: str) -> str:
    if error.errno == errno.EROFS:
        return f"{folder} on a read-only file system"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"no permission to write in {folder}"
    if error.errno == errno.ENOSPC:
        return f"no space left in {folder}"
    return f"{folder}, where no new file can be made"  # /proc, /sys and other special file systems


def _check_bucket(fs: Any, path: str, url: str, retry: RetryPolicy, *, what: str, writing: bool) -> None:
    """The bucket (container) of ``path`` answers: credentials found and accepted, it exists and may be listed.

    On S3 a one-key listing asks (HEAD requests have no body, so their 403 cannot tell a refused key from a denied
    action); elsewhere the bucket's ``info``.
    """
    root = _bucket(fs, path)
    if not root:
        return
    if callable(getattr(fs, "call_s3", None)):
        key = path.partition("/")[2]
        _call(retry, "list the bucket of", url, what, writing, fs.call_s3, "list_objects_v2",
              dict(Bucket=root, Prefix=key, MaxKeys=1))
        return
    try:
        _call(retry, "reach the bucket of", url, what, writing, fs.info, root)
    except FileNotFoundError as e:
        raise (ConfigError if writing else InputError)(
            f"{what} {mask_text(url)}: expected an existing bucket, got none named {root!r} ({describe(e)}); "
            "correct the bucket name (and the region or endpoint_url), or create the bucket") from None


def _bucket(fs: Any, path: str) -> str:
    """The bucket (container) of an object-store path, as s3fs, gcsfs and adlfs split it; "" for other filesystems."""
    split = getattr(fs, "split_path", None)
    if not callable(split):
        return ""
    try:
        return split(path)[0]
    except Exception:  # not a path of its form: no bucket to check first
        return ""


def _call(retry: RetryPolicy, operation: str, url: str, what: str, writing: bool, fn, *args):
    """``fn(*args)`` retried on transient faults; credential, bucket and access errors become one line."""
    try:
        return retry.call(operation, f"{what} {mask_text(url)}", fn, *args)
    except FeatUpError:
        raise
    except Exception as e:
        problem = storage_problem(what, url, e, writing=writing)
        if problem is None:
            raise
        raise problem from None


def _chain(error: BaseException | None) -> list[BaseException]:
    seen: list[BaseException] = []
    while error is not None and error not in seen and len(seen) < 8:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def _code(error: BaseException) -> str | None:
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        return (response.get("Error") or {}).get("Code")
    return None


def _status(error: BaseException) -> int | None:
    """The HTTP status of an error of the chain: aiohttp's ``status`` or botocore's response metadata."""
    for e in _chain(error):
        status = getattr(e, "status", None)
        if status is None and isinstance(getattr(e, "response", None), dict):
            status = (e.response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        if isinstance(status, int):
            return status
    return None
