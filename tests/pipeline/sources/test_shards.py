"""Tests of pipeline.sources.shards on real tar files: input expansion, counts that match iteration, broken shards, fsspec URLs."""

from __future__ import annotations

import gzip
import io
import pickle
import sys
import tarfile
import uuid
from pathlib import Path

import fsspec
import pytest

from tests.helpers import corpus

from featup.errors import InputError  # noqa: E402
from pipeline.sources.shards import ShardInfo, expand_inputs, iter_shard_samples, scan_shard, scan_shards  # noqa: E402


def _samples(url: str, storage_options: dict | None = None) -> tuple[list[dict], list[dict]]:
    """(samples, error markers) of one shard's iteration."""
    items = list(iter_shard_samples(url, storage_options))
    return [s for s in items if s["__key__"] is not None], [s for s in items if s["__key__"] is None]


@pytest.fixture
def memory_folder():
    """A fresh ``memory://`` folder, removed afterwards (fsspec's memory filesystem is process-wide)."""
    folder = f"memory://shards-{uuid.uuid4().hex[:8]}"
    yield folder
    fs = fsspec.filesystem("memory")
    if fs.exists(folder):
        fs.rm(folder, recursive=True)


def test_expand_inputs_braces_order_dedupe_and_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    urls = expand_inputs(["data/train-{000..002}.tar", "s3://bucket/x-{1..2}.tar", "data/train-001.tar", "memory://m.tar"])
    local = [str(tmp_path / "data" / f"train-{i:03d}.tar") for i in range(3)]
    assert urls == local + ["s3://bucket/x-1.tar", "s3://bucket/x-2.tar", "memory://m.tar"]


def test_expand_inputs_refuses_no_inputs():
    with pytest.raises(InputError, match="at least one shard"):
        expand_inputs([])


def test_scan_counts_what_iteration_yields_on_good_shards(tmp_path):
    paths = corpus.make_good_shards(tmp_path, n_shards=2, per_shard=5)
    for index, path in enumerate(paths):
        info = scan_shard(path, index)
        samples, markers = _samples(path)
        assert info == ShardInfo(path, index, 5, tuple(f"s{index:04d}-{i:05d}" for i in range(5)))
        assert [s["__key__"] for s in samples] == list(info.keys) and markers == []
        assert all(set(s) == {"__key__", "__url__", "jpg", "seg.png", "cls"} and s["__url__"] == path for s in samples)


def test_samples_carry_the_exact_member_bytes(tmp_path):
    written = [
        {"__key__": "a", "jpg": b"\xff\xd8 not decoded", "seg.png": b"label", "json": b"{}"},
        {"__key__": "b", "cls": b"7"},
    ]
    path = corpus.write_shard(tmp_path / "raw.tar", written)
    samples, _ = _samples(path)
    assert [{k: v for k, v in s.items() if k != "__url__"} for s in samples] == written


# Member names that exercise WebDataset's filters and key rule: directories, metadata, names without a dot,
# hidden files, nested paths, upper-case extensions, a key that comes back later, reserved extensions.
_TRICKY = [
    ("dir", None), ("dir/a.jpg", b"1"), ("dir/a.seg.png", b"2"), ("__meta__", b"m"), ("README", b"r"),
    ("b.JPG", b"3"), ("b.Cls", b"4"), (".hidden.jpg", b"h"), ("c.d.e.txt", b"5"), ("__index__.json", b"i"),
    ("dir/a.cls", b"6"), ("d.jpg", b"7"), ("d.__key__", b"x"), ("d.__bad__", b"x"), ("e.__url__", b"x"), ("f.jpg", b"8"),
]


def test_scan_keys_follow_webdataset_grouping_on_tricky_names(tmp_path):
    path = corpus.write_tar(tmp_path / "tricky.tar", _TRICKY)
    info = scan_shard(path, 0)
    samples, markers = _samples(path)
    assert [s["__key__"] for s in samples] == list(info.keys) and markers == []
    assert info.keys == ("dir/a", "b", "c", "__index__", "dir/a", "d", "f")
    assert samples[1]["jpg"] == b"3" and samples[1]["cls"] == b"4"  # extensions lower-cased, keys not
    assert samples[2]["d.e.txt"] == b"5"  # key is the path up to the first dot
    assert "__bad__" not in samples[5] and samples[5]["__key__"] == "d"  # reserved extensions never reach a sample
    assert all(set(s) - {"__key__", "__url__"} for s in samples)


def _tar_cuts(data: bytes) -> list[int]:
    """Cut points across the whole tar: every header boundary and several offsets inside headers and data."""
    return sorted({c for c in range(0, len(data), 131)} | {c for c in range(0, len(data), 512)} | {len(data) - 1})


def test_a_cut_anywhere_before_the_end_marker_is_reported_and_keeps_the_whole_samples_before_it(tmp_path):
    samples = [{"__key__": f"k{i}", "jpg": bytes([i]) * (300 + 700 * i), "cls": str(i).encode()} for i in range(4)]
    data = Path(corpus.write_shard(tmp_path / "full.tar", samples)).read_bytes()
    complete = {s["__key__"]: {k: v for k, v in s.items() if k != "__key__"} for s in samples}
    members = corpus.member_offsets(tmp_path / "full.tar")
    marker = members[-1][2] + -(-members[-1][3] // 512) * 512  # the end-of-archive marker: two zero blocks from here
    # Sample i is whole once the next sample's first header is read (or, for the last one, the end marker).
    whole_from = [members[2 * (i + 1)][1] + 512 for i in range(3)] + [marker + 1024]
    cut_path = tmp_path / "cut.tar"
    for cut in _tar_cuts(data):
        cut_path.write_bytes(data[:cut])
        got, markers = _samples(str(cut_path))
        try:
            info = scan_shard(str(cut_path), 0)
        except InputError:  # no complete header at all: unreadable, and iteration yields only the marker
            assert cut < 512 and got == [] and len(markers) == 1, cut
            continue
        assert [s["__key__"] for s in got] == list(info.keys) == [f"k{i}" for i in range(4) if cut >= whole_from[i]], cut
        assert all({k: v for k, v in s.items() if not k.startswith("__")} == complete[s["__key__"]] for s in got), cut
        assert (len(markers) == 1) == (info.error is not None) == (cut < marker + 1024), cut
        if markers:
            reason = markers[0]["__error__"]
            assert f"after {len(got)} samples" in reason and str(cut_path) in reason, cut
            in_member = any(offset + 512 <= cut < offset + 512 + -(-size // 512) * 512 for _, offset, _, size in members)
            assert ("unexpected end of data" if in_member else "without it after") in reason, (cut, reason)


def test_a_shard_cut_at_a_header_says_it_ends_without_the_end_marker(tmp_path):
    samples = [{"__key__": f"k{i}", "jpg": bytes([i]) * 700, "cls": str(i).encode()} for i in range(3)]
    path = corpus.write_shard(tmp_path / "full.tar", samples)
    data, members = Path(path).read_bytes(), corpus.member_offsets(path)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: members[4][1]])  # at the header of k2.jpg: tarfile and GNU tar read 2 samples, no error
    with tarfile.open(cut) as tar:
        assert len(tar.getmembers()) == 4
    info = scan_shard(str(cut), 0)
    got, markers = _samples(str(cut))
    assert info.keys == ("k0",) == tuple(s["__key__"] for s in got)  # k1 may have had more members: left out
    assert markers[0]["__error__"] == (
        f"shard {cut}: expected a tar archive closed by its end-of-archive marker, got one that ends without it after "
        f"1 samples (no end-of-archive marker (two zero blocks): the file ends at byte {members[4][1]}, where the next "
        "header belongs, so it was cut there; sample k1, being read there, is left out); the samples after the cut are lost")
    assert info.error in markers[0]["__error__"]


def test_what_tar_writers_write_is_never_reported_as_cut(tmp_path):
    import webdataset as wds

    written = tmp_path / "wds.tar"
    with wds.TarWriter(str(written)) as sink:
        for i in range(3):
            sink.write({"__key__": f"w{i}", "cls": str(i), "txt": "x" * (100 * i)})
    data = written.read_bytes()
    assert len(data) % 10240 == 0 and data.endswith(bytes(1024))  # tarfile: two zero blocks, then a 10240-byte record
    for name, payload in (("exact.tar", _trim_to_marker(data)), ("padded.tar", data),
                          ("trailing.tar", data + b"garbage after the end of the archive")):
        path = tmp_path / name
        path.write_bytes(payload)
        got, markers = _samples(str(path))
        assert [s["__key__"] for s in got] == ["w0", "w1", "w2"] and markers == [], name
        assert scan_shard(str(path), 0).error is None, name
    one_block = tmp_path / "one-zero-block.tar"  # cut inside the marker: GNU tar warns of "a lone zero block"
    one_block.write_bytes(_trim_to_marker(data)[:-512])
    assert "one zero block of two" in scan_shard(str(one_block), 0).error


def test_a_cut_shard_on_s3_and_a_cut_gzip_stream_are_reported_by_scan_and_read_alike(tmp_path, s3_server):
    samples = [{"__key__": f"k{i}", "jpg": bytes([i]) * 5000, "cls": str(i).encode()} for i in range(3)]
    data = Path(corpus.write_shard(tmp_path / "full.tar", samples)).read_bytes()
    cut = corpus.member_offsets(tmp_path / "full.tar")[4][1]  # k2's first header: the scan seeks past k0 and k1's data
    url = f"{s3_server.url('cut')}/shard.tar"
    with fsspec.open(url, "wb", **s3_server.storage_options) as f:
        f.write(data[:cut])
    gz = tmp_path / "cut.tar.gz"
    gz.write_bytes(gzip.compress(data)[: len(gzip.compress(data)) // 2])
    for shard, options in ((url, s3_server.storage_options), (str(gz), None)):
        info = scan_shard(shard, 0, options)
        got, markers = _samples(shard, options)
        assert list(info.keys) == [s["__key__"] for s in got] and info.error is not None, shard
        assert len(markers) == 1 and f"after {len(got)} samples" in markers[0]["__error__"], shard
    assert info.keys == () and "after 0 samples" in markers[0]["__error__"]  # the gzip cut falls inside k0


def _trim_to_marker(data: bytes) -> bytes:
    """A tar up to and including its end-of-archive marker, without the record padding after it."""
    members = list(tarfile.open(fileobj=io.BytesIO(data)))
    last = members[-1]
    return data[: last.offset_data + -(-last.size // 512) * 512 + 1024]


def test_truncated_corpus_shard_keeps_the_samples_before_the_cut(tmp_path):
    path, expected = corpus.make_truncated_shard(tmp_path)
    info = scan_shard(path, 3)
    samples, markers = _samples(path)
    assert list(info.keys) == list(expected) == [s["__key__"] for s in samples]
    assert "unexpected end of data" in info.error
    assert len(markers) == 1 and markers[0]["__url__"] == path


def test_gzipped_shards_are_counted_and_read(tmp_path):
    samples = [{"__key__": "a", "cls": b"1"}, {"__key__": "b", "cls": b"2"}]
    for path in [corpus.write_shard(tmp_path / f"x.{ext}", samples) for ext in ("tar.gz", "tgz")]:
        assert Path(path).read_bytes()[:2] == b"\x1f\x8b"  # really gzipped
        assert scan_shard(path, 0).keys == ("a", "b")
        assert [s["cls"] for s in _samples(path)[0]] == [b"1", b"2"]


def test_empty_tar_has_no_samples(tmp_path):
    path = corpus.write_tar(tmp_path / "empty.tar", [])
    assert scan_shard(path, 0) == ShardInfo(path, 0, 0, ())
    assert _samples(path) == ([], [])


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda d: str(d / "missing.tar"), "No such file"),
        (lambda d: str(d), "directory"),
        (lambda d: _write(d / "zero.tar", b""), "empty file"),
        (corpus.make_unreadable_shard, "expected a tar archive"),
    ],
    ids=["missing", "directory", "zero-bytes", "not-a-tar"],
)
def test_unreadable_shard_is_an_input_error_naming_it_and_iteration_only_marks_it(tmp_path, make, reason):
    url = make(tmp_path)
    with pytest.raises(InputError, match=reason) as e:
        scan_shard(url, 0)
    assert f"shard {url}" in str(e.value)
    samples, markers = _samples(url)
    assert samples == [] and len(markers) == 1 and url in markers[0]["__error__"]


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_scan_shards_keeps_order_and_indexes(tmp_path):
    paths = corpus.make_good_shards(tmp_path, n_shards=3, per_shard=2)
    infos = scan_shards(list(reversed(paths)), max_workers=2)
    assert [(i.url, i.index, i.num_samples) for i in infos] == [(p, k, 2) for k, p in enumerate(reversed(paths))]


def test_scan_shards_lists_every_unreadable_shard_in_one_error(tmp_path):
    good = corpus.make_good_shards(tmp_path, n_shards=2, per_shard=1)
    missing = [str(tmp_path / "gone-1.tar"), str(tmp_path / "gone-2.tar")]
    broken = corpus.make_unreadable_shard(tmp_path)
    with pytest.raises(InputError) as e:
        scan_shards([good[0], missing[0], broken, good[1], missing[1]])
    message = str(e.value)
    assert "got 3 that cannot be read" in message
    assert all(url in message for url in missing + [broken]) and not any(url in message for url in good)


def test_duplicate_members_flag_their_sample_without_changing_the_count(tmp_path):
    path = corpus.write_tar(tmp_path / "dup.tar", [("a.jpg", b"1"), ("a.jpg", b"2"), ("a.cls", b"c"), ("b.jpg", b"3")])
    info = scan_shard(path, 0)
    samples, markers = _samples(path)
    assert info.keys == ("a", "b") == tuple(s["__key__"] for s in samples) and markers == []
    assert "a.jpg twice" in samples[0]["__error__"] and "__error__" not in samples[1]


def test_pickled_payloads_stay_bytes_and_are_never_unpickled(tmp_path):
    path, _ = corpus.make_bad_shard(tmp_path)
    marker = corpus.pickle_marker(tmp_path)
    samples, _ = _samples(path)
    payloads = [s[ext] for s in samples for ext in ("pyd", "pickle") if ext in s]
    assert len(payloads) == 2 and all(isinstance(p, bytes) for p in payloads)
    assert not marker.exists()


def test_corpus_pickle_would_create_the_marker_if_unpickled(tmp_path):
    marker = tmp_path / "proof"
    pickle.loads(corpus.marker_pickle(marker)).close()  # what a careless decoder would do
    assert marker.exists()


def test_file_and_memory_urls_read_like_local_paths(tmp_path, memory_folder):
    local = corpus.make_good_shards(tmp_path, n_shards=1, per_shard=3)[0]
    memory = corpus.make_good_shards(memory_folder, n_shards=1, per_shard=3)[0]
    expected = scan_shard(local, 0).keys
    for url in (Path(local).as_uri(), memory):
        assert scan_shard(url, 0).keys == expected
        samples, markers = _samples(url)
        assert [s["__key__"] for s in samples] == list(expected) and markers == []
        assert samples[0]["jpg"] == _samples(local)[0][0]["jpg"]


def test_storage_options_reach_fsspec(tmp_path):
    corpus.make_good_shards(tmp_path, n_shards=1, per_shard=2)
    options = {"path": str(tmp_path), "target_protocol": "file"}  # the "dir" filesystem cannot work without them
    url = "dir://shard-000000.tar"
    with pytest.raises(InputError, match=url):
        scan_shard(url, 0)
    assert scan_shard(url, 0, storage_options=options).num_samples == 2
    assert scan_shards([url], storage_options=options)[0].num_samples == 2
    assert [s["__key__"] for s in _samples(url, options)[0]] == ["s0000-00000", "s0000-00001"]


def test_iteration_stops_cleanly_when_the_consumer_stops(tmp_path):
    path = corpus.make_good_shards(tmp_path, n_shards=1, per_shard=4)[0]
    iterator = iter_shard_samples(path)
    assert next(iterator)["__key__"] == "s0000-00000"
    iterator.close()  # closes the stream; nothing raised


def test_expand_inputs_globs_local_and_memory_patterns_in_sorted_order(tmp_path, monkeypatch, memory_folder):
    monkeypatch.chdir(tmp_path)
    for name in ("b-000.tar", "a-001.tar", "a-000.tar", "notes.txt"):
        corpus.write_tar(tmp_path / "data" / name, [])
    (tmp_path / "data" / "dir.tar").mkdir()  # a directory matching the glob is not a shard
    local = expand_inputs(["data/*.tar", "data/a-00?.tar", "data/{b,a}-000.tar"])
    assert local == [str(tmp_path / "data" / n) for n in ("a-000.tar", "a-001.tar", "b-000.tar")]
    corpus.write_tar(f"{memory_folder}/y.tar", [])
    corpus.write_tar(f"{memory_folder}/x.tar", [])
    memory = fsspec.filesystem("memory")  # matches come back in the filesystem's own spelling of its URLs
    expected = [memory.unstrip_protocol(memory._strip_protocol(f"{memory_folder}/{n}")) for n in ("x.tar", "y.tar")]
    assert expand_inputs([f"{memory_folder}/*.tar"]) == expected
    assert all(_samples(url) == ([], []) for url in expected)  # and they read (no error marker)


def test_expand_inputs_names_a_glob_that_matches_nothing(tmp_path):
    pattern = str(tmp_path / "nothing" / "*.tar")
    with pytest.raises(InputError, match="expected at least one file matching") as e:
        expand_inputs([pattern])
    assert pattern in str(e.value)


def test_expand_inputs_keeps_a_literal_name_with_glob_characters(tmp_path):
    path = corpus.write_tar(tmp_path / "odd[1].tar", [])
    assert expand_inputs([str(path)]) == [str(path)]
