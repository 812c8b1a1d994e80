"""Store I/O through a RetryPolicy: transient faults retried within its budget, access denied told in one line.

zarr-python 3 does not retry: its ``FsspecStore`` turns ``FileNotFoundError`` (and ``IsADirectoryError``,
``NotADirectoryError``) into a missing key, read as the fill value, and lets every other error of the filesystem
through as is. s3fs retries a few error kinds itself for about a second (timeouts, ``SlowDown``) and passes
botocore's ``EndpointConnectionError`` (a refused or dropped connection, after botocore's own few quick retries)
straight up. So every store operation is retried here, whole, on what ``is_transient`` calls transient.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from featup.errors import ConfigError, FeatUpError, InputError
from pipeline.runtime.preflight import storage_problem
from pipeline.runtime.retry import RetryPolicy, describe

T = TypeVar("T")


def retry_policy(retry: RetryPolicy | None) -> RetryPolicy:
    """The given policy, or the default one (a budget of 120 s)."""
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise ConfigError(f"store retry: expected a RetryPolicy or None, got {type(retry).__name__}")
    return retry if retry is not None else RetryPolicy()


def store_call(retry: RetryPolicy, operation: str, target: str, fn: Callable[..., T], *args, writing: bool = True) -> T:
    """``fn(*args)`` retried on transient errors (TransientIOError when the budget is spent); access denied, missing
    or rejected credentials and a missing bucket raise a ConfigError (writing: the output) or an InputError (reading)
    naming ``target`` and the cause, never a traceback."""
    try:
        return retry.call(operation, target, fn, *args)
    except PermissionError as e:
        kind = ConfigError if writing else InputError
        where = "a location this job may write" if writing else "a store this job may read"
        raise kind(f"{operation} {target}: expected {where}, got permission denied ({describe(e)}); "
                   "check the path's permissions or the storage credentials") from None
    except FeatUpError:
        raise
    except Exception as e:  # no credentials, or no such bucket: one line too
        problem = storage_problem(operation, target, e, writing=writing)
        if problem is None:
            raise
        raise problem from None
