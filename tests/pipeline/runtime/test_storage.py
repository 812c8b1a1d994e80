"""Storage options: the --storage-option parser and atomic whole-object writes."""

import pytest

from featup.errors import ConfigError
from pipeline.runtime.storage import Location, parse_storage_options, put_atomic


def test_storage_options_nest_on_dots_and_read_plain_values():
    pairs = ["anon=false", "client_kwargs.endpoint_url=http://127.0.0.1:9000", "client_kwargs.verify=true", "block_size=1024"]
    options = parse_storage_options(pairs)
    assert options == {"anon": False, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "verify": True}, "block_size": 1024}
    with pytest.raises(ConfigError, match="--storage-option: expected KEY=VALUE, got 'anon'"):
        parse_storage_options(["anon"])


def test_location_reaches_its_filesystem_and_put_atomic_leaves_no_temp_file(tmp_path):
    location = Location.resolve(str(tmp_path / "sub" / "file.bin"), {"key": "ignored for local paths"})
    assert location.options == {}
    fs, path = location.filesystem()
    put_atomic(fs, path, b"first")
    put_atomic(fs, path, b"second")
    assert (tmp_path / "sub" / "file.bin").read_bytes() == b"second"
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["file.bin"]
