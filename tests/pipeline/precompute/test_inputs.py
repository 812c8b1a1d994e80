"""Resume checks the shards by content identity (size + ETag on object stores, size + mtime on files): a shard rewritten
with other content and the same sample count is refused by name. Store level: the refusal comes before any row or Ray."""

import io
import json
import os
from pathlib import Path

import fsspec
import pytest
import zarr

from tests.helpers import corpus
from tests.helpers import precompute as helpers

from featup.errors import ConfigError  # noqa: E402
from pipeline.precompute.driver import open_store  # noqa: E402
from pipeline.precompute.inputs import legacy_shards_sha256  # noqa: E402
from pipeline.precompute.plan import make_plan  # noqa: E402


@pytest.fixture(autouse=True)
def tiny_module(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(helpers.write_tiny_module(tmp_path / "mods")))


def _open(config) -> str:
    """Opens (creates or resumes) the store as a job would, releases its lock; returns what it printed."""
    err = io.StringIO()
    store, *_ = open_store(make_plan(config), "test", err)
    store.release_lock()
    return err.getvalue()


def _same_size_rewrite(data: bytes) -> bytes:
    """Other content of the same size and sample count: the first ``cls`` payload's digit changed."""
    at = data.index(b".cls\0")  # the first cls member's header; its one-digit payload starts 512 bytes after the header
    start = at - at % 512 + 512
    return data[:start] + (b"1" if data[start:start + 1] != b"1" else b"2") + data[start + 1:]


def test_a_local_shard_rewritten_with_the_same_size_and_count_is_refused_by_name(tmp_path):
    shards = corpus.make_good_shards(tmp_path / "in", n_shards=2, per_shard=3)
    config = helpers.tiny_config(shards, tmp_path / "out.zarr")
    _open(config)
    assert "resuming" in _open(config)  # the same shards: resumed
    before = os.stat(shards[1])
    Path(shards[1]).write_bytes(_same_size_rewrite(Path(shards[1]).read_bytes()))
    os.utime(shards[1], ns=(before.st_atime_ns, before.st_mtime_ns + 2_000_000_000))  # as a rewrite a moment later
    assert os.stat(shards[1]).st_size == before.st_size
    with pytest.raises(ConfigError) as e:
        _open(config)
    message = str(e.value)
    assert f"shard {shards[1]} was rewritten (mtime {before.st_mtime} -> " in message and shards[0] not in message
    assert message.startswith("inputs: expected the shards store") and "pass --overwrite" in message

    group = zarr.open_group(config.output, mode="r+")  # a store made before content identities: URLs and counts only
    group.attrs["featup"] = {**group.attrs["featup"], "shards_sha256": legacy_shards_sha256(make_plan(config).shards)}
    assert "made before shards were fingerprinted by their content" in _open(config)


def test_an_s3_shard_rewritten_with_the_same_size_and_count_is_refused_by_name(tmp_path, s3_server):
    options = s3_server.storage_options
    shards = corpus.make_good_shards(s3_server.url("inputs"), n_shards=2, per_shard=2, storage_options=options)
    config = helpers.tiny_config(shards, tmp_path / "out.zarr", storage_options=options)
    _open(config)
    recorded = json.loads((tmp_path / "out.zarr" / "_featup" / "index" / "inputs.json").read_text())["shards"]
    assert [r[2].keys() for r in recorded] == [{"size", "etag"}] * 2
    fs = fsspec.filesystem("s3", **options)
    fs.pipe_file(shards[0], _same_size_rewrite(fs.cat_file(shards[0])))
    with pytest.raises(ConfigError, match=f"shard {shards[0]} was rewritten \\(etag ") as e:
        _open(config)
    assert "size" not in str(e.value).split("was rewritten")[1].split(")")[0]  # only the ETag changed
