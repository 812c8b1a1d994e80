"""Damaged tars read by pipeline.sources: lost regions become error records in place, every intact sample is recovered,
and the scan (headers only) agrees exactly with the read. Real tar bytes, damaged in place (tests.helpers.corpus)."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from tests.helpers import corpus

from featup.errors import InputError
from pipeline.sources.decode import DecodeSpec, FailedSample, decode_sample
from pipeline.sources.shards import iter_shard_samples, scan_shard


def _read(url: str) -> tuple[list[dict], list[dict]]:
    """(entries with a key, end markers) of one shard's read."""
    items = list(iter_shard_samples(url))
    return [s for s in items if s["__key__"] is not None], [s for s in items if s["__key__"] is None]


def _payloads(sample: dict) -> dict[str, bytes]:
    return {k: v for k, v in sample.items() if not k.startswith("__")}


@pytest.mark.parametrize("kind", corpus.DAMAGE_KINDS)
def test_damaged_shard_scan_and_read_give_the_expected_entries(tmp_path, kind):
    shard = corpus.make_damaged_shard(tmp_path, kind)
    info = scan_shard(shard.path, 0)
    got, markers = _read(shard.path)
    assert info.keys == shard.keys == tuple(s["__key__"] for s in got)
    assert dict(info.flagged).keys() == shard.failed.keys() == {i for i, s in enumerate(got) if "__error__" in s}
    for position, fragment in shard.failed.items():
        assert fragment in got[position]["__error__"] and shard.path in got[position]["__error__"]
        assert dict(info.flagged)[position] == got[position]["__error__"]  # the scan knows the same reason
    assert (info.error is not None) == shard.truncated == (len(markers) == 1)
    for i, sample in enumerate(got):
        if i in shard.failed or sample["__key__"] not in shard.written:
            continue
        written = shard.written[sample["__key__"]]
        if sample["__key__"] in shard.partial:  # lost its first member with the damaged header; the rest is exact
            assert _payloads(sample).items() < written.items()
        elif kind == "zeroed-data" and i == 1:  # a tar has no checksum over data: the payload differs, decoding decides
            assert _payloads(sample).keys() == written.keys() and _payloads(sample)["jpg"] != written["jpg"]
        else:
            assert _payloads(sample) == written


def test_bad_checksum_on_the_third_header_keeps_all_eight_samples(tmp_path):
    # The reported defect: tarfile's stream mode read this tar as 1 sample and silently dropped the other 7.
    shard = corpus.make_damaged_shard(tmp_path, "bad-checksum")
    with tarfile.open(shard.path, "r|") as tar:
        assert len([m for m in tar]) == 2  # what tarfile (and so WebDataset) sees
    got, markers = _read(shard.path)
    spec = DecodeSpec(image_size=32, stride=8, mean=(0.5,) * 3, std=(0.5,) * 3, labels=("seg.png",))
    decoded = [decode_sample(s, spec) for s in got]
    assert len(decoded) == 8 and markers == []
    assert isinstance(decoded[0], FailedSample) and "d00000.cls" in decoded[0].reason
    assert not any(isinstance(d, FailedSample) for d in decoded[1:])


def test_damage_without_a_name_becomes_a_byte_range_record(tmp_path):
    shard = corpus.make_damaged_shard(tmp_path, "zeroed-header")
    got, _ = _read(shard.path)
    record = got[1]
    assert record["__key__"].startswith("<damaged bytes ") and set(record) == {"__key__", "__url__", "__error__"}
    failed = decode_sample(record, DecodeSpec(image_size=32, stride=8, mean=(0.5,) * 3, std=(0.5,) * 3))
    assert isinstance(failed, FailedSample) and failed.key == record["__key__"] and "zeroed header block" in failed.reason


def _single_block_damages(data: bytes) -> list[tuple[str, bytes]]:
    """The tar with each 512-byte block in turn made garbage, zeroed or given a bad checksum byte."""
    rng = np.random.default_rng(3)
    out = []
    for start in range(0, len(data) - 1024, 512):
        for how in ("garbage", "zero", "checksum"):
            damaged = bytearray(data)
            if how == "garbage":
                damaged[start : start + 512] = rng.integers(0, 256, 512, dtype=np.uint8).tobytes()
            elif how == "zero":
                damaged[start : start + 512] = bytes(512)
            else:
                damaged[start + 148] ^= 0x01
            out.append((f"{how}@{start}", bytes(damaged)))
    return out


def test_scan_and_read_agree_whatever_block_is_damaged(tmp_path):
    samples = [{"__key__": f"k{i}", "jpg": bytes([i + 1]) * (200 + 600 * i), "cls": str(i).encode()} for i in range(4)]
    data = Path(corpus.write_shard(tmp_path / "full.tar", samples)).read_bytes()
    headers = [offset for _, offset, _, _ in corpus.member_offsets(tmp_path / "full.tar")]
    owner = {offset: f"k{i // 2}" for i, offset in enumerate(headers)}  # header offset -> key of its sample
    path = tmp_path / "damaged.tar"
    for label, damaged in _single_block_damages(data):
        path.write_bytes(damaged)
        if label == "garbage@0":  # no tar header at all where the file starts: not a tar
            with pytest.raises(InputError, match="not a tar archive"):
                scan_shard(str(path), 0)
            assert _read(str(path))[0] == []
            continue
        info = scan_shard(str(path), 0)
        got, markers = _read(str(path))
        assert info.keys == tuple(s["__key__"] for s in got), label
        assert [i for i, _ in info.flagged] == [i for i, s in enumerate(got) if "__error__" in s], label
        assert info.error is None and markers == [], label  # one damaged block never reads as a truncated tar
        start = int(label.split("@")[1])
        hit = owner.get(start)  # the sample whose header was hit (None: a data block, invisible to tar)
        intact = [s for s in got if "__error__" not in s and s["__key__"] != hit and not s["__key__"].startswith("<")]
        assert {s["__key__"] for s in intact} >= {f"k{i}" for i in range(4)} - {hit} - _data_owner(start, headers), label


def _data_owner(start: int, headers: list[int]) -> set[str]:
    """The sample whose data holds the block at ``start`` (its payload may change, but it is still read)."""
    before = [i for i, h in enumerate(headers) if h < start]
    return {f"k{before[-1] // 2}"} if before else set()


def test_long_names_gnu_pax_and_webdataset_writer_are_read(tmp_path):
    long_key = "d" * 120 + "/sample"
    for fmt, name in ((tarfile.GNU_FORMAT, "gnu"), (tarfile.PAX_FORMAT, "pax")):
        path = tmp_path / f"{name}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            for member, data in ((f"{long_key}.jpg", b"abc"), (f"{long_key}.cls", b"1"), ("é" * 70 + ".jpg", b"x")):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        assert scan_shard(str(path), 0).keys == (long_key, "é" * 70), name
        got, _ = _read(str(path))
        assert got[0]["jpg"] == b"abc" and got[0]["cls"] == b"1" and got[1]["jpg"] == b"x", name
    path = tmp_path / "wds.tar"
    with wds.TarWriter(str(path)) as writer:
        writer.write({"__key__": long_key, "jpg": b"abc", "cls": b"1"})
        writer.write({"__key__": "short", "jpg": b"z"})
    assert scan_shard(str(path), 0).keys == (long_key, "short")
    assert [_payloads(s) for s in _read(str(path))[0]] == [{"jpg": b"abc", "cls": b"1"}, {"jpg": b"z"}]


def test_damaged_header_after_a_long_name_keeps_the_long_name(tmp_path):
    long_key = "e" * 150
    path = tmp_path / "pax.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for member, data in (("a.jpg", b"1"), (f"{long_key}.jpg", b"2"), (f"{long_key}.cls", b"3"), ("b.jpg", b"4")):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    members = corpus.member_offsets(path)
    raw = bytearray(path.read_bytes())
    raw[members[1][2] - 512 + 148] ^= 0x01  # the real header, after the pax header that holds the long name
    path.write_bytes(bytes(raw))
    got, _ = _read(str(path))
    assert [s["__key__"] for s in got] == ["a", long_key, "b"] == list(scan_shard(str(path), 0).keys)
    assert f"{long_key}.jpg" in got[1]["__error__"] and got[1]["cls"] == b"3"


def test_gzipped_damaged_shard_is_recovered_too(tmp_path):
    shard = corpus.make_damaged_shard(tmp_path, "bad-checksum")
    path = tmp_path / "damaged.tar.gz"
    path.write_bytes(gzip.compress(Path(shard.path).read_bytes(), mtime=0))
    got, markers = _read(str(path))
    assert scan_shard(str(path), 0).keys == shard.keys == tuple(s["__key__"] for s in got) and markers == []


def test_corrupt_gzip_stream_ends_the_shard_like_a_truncation(tmp_path):
    samples = [{"__key__": f"k{i}", "jpg": np.random.default_rng(i).bytes(4000)} for i in range(6)]
    data = gzip.compress(Path(corpus.write_shard(tmp_path / "x.tar", samples)).read_bytes(), mtime=0)
    broken = bytearray(data)
    broken[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    path = tmp_path / "broken.tar.gz"
    path.write_bytes(bytes(broken))
    info = scan_shard(str(path), 0)
    got, markers = _read(str(path))
    assert info.keys == tuple(s["__key__"] for s in got) and 0 < len(got) < 6
    assert "corrupt gz stream" in info.error and len(markers) == 1 and "corrupt gz stream" in markers[0]["__error__"]


def test_first_header_damaged_is_recovered_but_random_bytes_are_not_a_tar(tmp_path):
    path = corpus.write_shard(tmp_path / "x.tar", [{"__key__": "a", "cls": b"1"}, {"__key__": "b", "cls": b"2"}])
    raw = bytearray(Path(path).read_bytes())
    raw[148] ^= 0x01  # the first header's checksum: still a tar (ustar magic), its member lost
    Path(path).write_bytes(bytes(raw))
    assert scan_shard(path, 0).keys == ("a", "b") and "__error__" in _read(path)[0][0]
    with pytest.raises(InputError, match="not a tar archive"):
        scan_shard(corpus.make_unreadable_shard(tmp_path), 0)


def test_all_broken_shard_set_decodes_to_failures_only(tmp_path):
    paths, count = corpus.make_all_broken_shards(tmp_path)
    spec = DecodeSpec(image_size=32, stride=8, mean=(0.5,) * 3, std=(0.5,) * 3)
    decoded = [decode_sample(s, spec) for p in paths for s in iter_shard_samples(p)]
    assert sum(scan_shard(p, i).num_samples for i, p in enumerate(paths)) == count == len(decoded)
    assert all(isinstance(d, FailedSample) for d in decoded)
