"""Storage options: the --storage-option parser and atomic whole-object writes."""

import pytest

from featup.errors import ConfigError
from pipeline.runtime.storage import Location, parse_storage_options, put_atomic


def test_storage_options_nest_on_dots_and_read_plain_values():
    pairs = ["anon=false", "client_kwargs.endpoint_url=http://127.0.0.1:9000", "client_kwargs.verify=true", "block_size=1024"]
    options = parse_storage_options(pairs)
    assert options == {"anon": False, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "verify": True}, "block_size": 1024}
    with pytest.raises(ConfigError, match="--storage-option: expected KEY=VALUE, got a value without a key and '=' \\(not shown"):
        parse_storage_options(["anon"])


def test_location_reaches_its_filesystem_and_put_atomic_leaves_no_temp_file(tmp_path):
    location = Location.resolve(str(tmp_path / "sub" / "file.bin"), {"key": "ignored for local paths"})
    assert location.options == {}
    fs, path = location.filesystem()
    put_atomic(fs, path, b"first")
    put_atomic(fs, path, b"second")
    assert (tmp_path / "sub" / "file.bin").read_bytes() == b"second"
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["file.bin"]


def _abandon_failing_task(error: BaseException) -> None:
    """Runs a loop with a task that raises ``error`` and is never awaited, then lets asyncio report it on collection."""
    import asyncio
    import gc

    async def fail():
        raise error

    async def main():
        asyncio.get_running_loop().create_task(fail())
        await asyncio.sleep(0.01)

    asyncio.run(main())
    gc.collect()


def test_abandoned_connection_errors_of_http_tasks_are_quiet_and_other_errors_are_still_reported(caplog):
    import aiohttp

    from pipeline.runtime.storage import quiet_abandoned_request_errors

    quiet_abandoned_request_errors()
    quiet_abandoned_request_errors()  # idempotent: one filter
    import logging

    assert sum(type(f).__name__ == "_AbandonedRequestFilter" for f in logging.getLogger("asyncio").filters) == 1
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        _abandon_failing_task(aiohttp.client_exceptions.ClientConnectionResetError("Cannot write to closing transport"))
        _abandon_failing_task(ConnectionResetError("reset by peer"))
        assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
        _abandon_failing_task(ValueError("a real bug"))
    reported = [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert len(reported) == 1 and isinstance(reported[0].exc_info[1], ValueError)
