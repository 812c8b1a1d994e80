"""Transient storage faults are retried within the budget; content errors are never retried."""

import errno

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
