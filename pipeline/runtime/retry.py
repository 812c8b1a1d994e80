"""Transient storage faults, told apart from content errors and retried with backoff within a time budget (tenacity).

Two kinds of error are kept apart everywhere data is read or written:

- *content* errors (bytes that do not decode, a structurally broken tar, a missing object, access denied) are
  facts about the data: they are recorded per sample, or refused with a message, and never retried;
- *transient* errors (connection reset or refused, timeouts, HTTP 5xx, throttling such as ``SlowDown``) are
  faults of the moment: ``retrying(...)`` retries them with exponential backoff and full jitter until the budget
  (``--io-retry-seconds``) is spent, then raises ``TransientIOError``, which says to rerun the same command.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from typing import Callable, TypeVar

import tenacity

from featup.errors import ConfigError, FeatUpError

T = TypeVar("T")

DEFAULT_BUDGET_S = 120.0  # ride out two minutes of unavailability
FIRST_WAIT_S = 0.5
MAX_WAIT_S = 10.0
# errno values of faults of the moment: resets, refusals, timeouts, broken pipes, busy (s3fs maps SlowDown/503 to
# EBUSY), remote I/O errors (s3fs maps InternalError to EREMOTEIO).
TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE, errno.EBUSY,
                    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EAGAIN, getattr(errno, "EREMOTEIO", errno.EIO)}
# Error codes of S3 (and S3-compatible) services that mean "try again".
TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed", "InternalError",
                   "ServiceUnavailable", "503", "500", "502", "504", "RequestLimitExceeded", "TooManyRequests"}
# Exception class names of the HTTP stacks under fsspec (botocore, aiohttp, urllib3, requests) that are transient.
TRANSIENT_NAMES = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                   "ClientConnectionError", "ClientConnectorError", "ServerDisconnectedError", "ClientOSError",
                   "ClientPayloadError", "ServerTimeoutError", "IncompleteRead", "ProtocolError", "ResponseStreamingError",
                   "HTTPClientError", "ConnectionError", "ChunkedEncodingError"}


class TransientIOError(FeatUpError):
    """Storage stayed unavailable for the whole retry budget; nothing is lost: rerunning the same command resumes."""

    exit_code = 1  # the job failed (not a usage error): the CLI exits 1

    def __init__(self, operation: str, target: str, cause: BaseException, budget_s: float) -> None:
        self.operation, self.target, self.cause, self.budget_s = operation, target, cause, budget_s
        super().__init__(
            f"{operation} {target}: storage unavailable for {budget_s:g} s ({describe(cause)}); "
            "rerun the same command to resume"
        )

    def __reduce__(self):
        """Pickles as its message (an actor raises it, the driver reads it): the cause object itself may not pickle."""
        return (_rebuild_transient_io_error, (self.operation, self.target, str(self), self.budget_s))


def _rebuild_transient_io_error(operation: str, target: str, message: str, budget_s: float) -> TransientIOError:
    """A TransientIOError unpickled in another process: the same message and fields, without the cause object."""
    error = TransientIOError.__new__(TransientIOError)
    error.operation, error.target, error.cause, error.budget_s = operation, target, None, budget_s
    Exception.__init__(error, message)
    return error


@dataclass(frozen=True)
class RetryPolicy:
    """How long transient faults are retried (``budget_s`` of wall time per operation) and how the waits grow."""

    budget_s: float = DEFAULT_BUDGET_S
    first_wait_s: float = FIRST_WAIT_S
    max_wait_s: float = MAX_WAIT_S

    def __post_init__(self) -> None:
        for name in ("budget_s", "first_wait_s", "max_wait_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{name}: expected a number of seconds >= 0, got {value!r}")

    def call(self, operation: str, target: str, fn: Callable[..., T], *args, **kwargs) -> T:
        """``fn(*args, **kwargs)``, retried on transient errors; ``TransientIOError`` once the budget is spent."""
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_transient),
            wait=tenacity.wait_random_exponential(multiplier=self.first_wait_s, max=self.max_wait_s),
            stop=tenacity.stop_after_delay(self.budget_s),
            reraise=True,
        )
        try:
            return retrying(fn, *args, **kwargs)
        except Exception as e:
            if is_transient(e):
                raise TransientIOError(operation, target, e, self.budget_s) from e
            raise


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) is a fault of the moment rather than a fact about the data."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, TransientIOError):
            return True
        if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return False
        if isinstance(error, (ConnectionError, TimeoutError, socket.timeout)):
            return True
        if isinstance(error, OSError) and error.errno in TRANSIENT_ERRNOS:
            return True
        if type(error).__name__ in TRANSIENT_NAMES or _service_code(error) in TRANSIENT_CODES:
            return True
        error = error.__cause__ or error.__context__
        seen += 1
    return False


def _service_code(error: BaseException) -> str | None:
    """The S3 error code of a botocore ClientError (``SlowDown``...) or its HTTP status, else None."""
    response = getattr(error, "response", None)
    if not isinstance(response, dict):
        return None
    code = (response.get("Error") or {}).get("Code")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    if code in TRANSIENT_CODES:
        return code
    return str(status) if status is not None and int(status) >= 500 else code


def describe(error: BaseException) -> str:
    """``Type: first line`` of an error, at most 200 characters."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:200]
