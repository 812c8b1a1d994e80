"""Transient storage faults are retried within the budget; content errors are never retried."""

import errno
import pickle

import pytest

from pipeline.runtime.retry import RetryPolicy, TransientIOError, is_transient


class _Flaky:
    def __init__(self, error, failures):
        self.error, self.failures, self.calls = error, failures, 0

    def __call__(self):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "done"


class _ClientError(Exception):  # the shape of botocore's ClientError
    def __init__(self, code, status):
        super().__init__(code)
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


@pytest.mark.parametrize("error", [
    ConnectionResetError(errno.ECONNRESET, "reset"), ConnectionRefusedError(errno.ECONNREFUSED, "refused"), TimeoutError("t"),
    OSError(errno.EBUSY, "SlowDown"), _ClientError("SlowDown", 503), _ClientError("InternalError", 500),
    type("EndpointConnectionError", (Exception,), {})("could not connect"),
])
def test_faults_of_the_moment_are_transient(error):
    assert is_transient(error)


@pytest.mark.parametrize("error", [
    FileNotFoundError("gone"), PermissionError(errno.EACCES, "denied"), ValueError("bad bytes"), _ClientError("AccessDenied", 403),
    OSError(errno.EINVAL, "invalid"),
])
def test_facts_about_the_data_are_not(error):
    assert not is_transient(error)


def test_a_cause_chain_is_followed():
    try:
        try:
            raise ConnectionResetError("reset")
        except ConnectionResetError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert is_transient(outer)


def test_transient_errors_are_retried_until_they_pass():
    flaky = _Flaky(ConnectionResetError("reset"), failures=3)
    assert RetryPolicy(budget_s=5, first_wait_s=0.01, max_wait_s=0.02).call("read", "s3://b/x", flaky) == "done"
    assert flaky.calls == 4


def test_a_spent_budget_raises_one_clear_error_and_content_errors_pass_through_at_once():
    flaky = _Flaky(ConnectionRefusedError("refused"), failures=10**6)
    with pytest.raises(TransientIOError, match=r"^write s3://b/x: storage unavailable for 0.2 s \(ConnectionRefusedError: "
                                              r"refused\); rerun the same command to resume$"):
        RetryPolicy(budget_s=0.2, first_wait_s=0.01, max_wait_s=0.02).call("write", "s3://b/x", flaky)
    assert flaky.calls > 2
    missing = _Flaky(FileNotFoundError("no such key"), failures=1)
    with pytest.raises(FileNotFoundError):
        RetryPolicy(budget_s=5).call("read", "s3://b/x", missing)
    assert missing.calls == 1


class _Unpicklable(ConnectionError):
    """A cause that cannot cross a process boundary (its constructor needs an argument pickle does not keep)."""

    def __init__(self, host: str, detail: str) -> None:
        super().__init__(f"{host}: {detail}")


def test_a_spent_budget_error_crosses_processes_with_its_message_whatever_its_cause():
    # An actor raises it and the driver unpickles it (Ray). It used not to unpickle at all (its constructor takes four
    # arguments, an exception pickles its message only), which the driver saw as Ray's "Failed to deserialize
    # exception" traceback instead of the one-line error; the cause object is dropped, since it may not pickle.
    error = TransientIOError("read", "shard s3://b/x.tar", _Unpicklable("127.0.0.1", "connection refused"), 2)
    with pytest.raises(TypeError):
        pickle.loads(pickle.dumps(error.cause))
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is TransientIOError and str(again) == str(error)
    assert "storage unavailable for 2 s" in str(again) and "rerun the same command to resume" in str(again)
    assert (again.operation, again.target, again.budget_s, again.cause) == ("read", "shard s3://b/x.tar", 2, None)
