"""Tests of pipeline.store.index: the index schema, and that no failed sample can be recorded as valid."""

import pyarrow as pa
import pytest

from featup.errors import InputError
from pipeline.store.index import INDEX_SCHEMA, build_index_table, check_index_table, concat_index_tables, empty_index_table


def _row(row: int, status: str = "ok", error: str = "", **kw) -> dict:
    return {"row": row, "shard": "/data/train-000000.tar", "key": f"s{row:04d}", "width": 640, "height": 480,
            "status": status, "error": error, **kw}


def test_build_index_table_keeps_values_with_the_schema():
    rows = [_row(0), _row(1, "error", "image is truncated"), {k: v for k, v in _row(2).items() if k != "error"}]
    table = build_index_table(rows)
    assert table.schema == INDEX_SCHEMA
    assert table["row"].to_pylist() == [0, 1, 2]
    assert table["status"].to_pylist() == ["ok", "error", "ok"]
    assert table["error"].to_pylist() == ["", "image is truncated", ""]  # left-out error of an ok row is ""
    assert table["key"].to_pylist() == ["s0000", "s0001", "s0002"]
    assert table["width"].type == pa.int32() and table["height"].to_pylist() == [480] * 3


def test_schema_columns_are_the_documented_ones():
    assert INDEX_SCHEMA.names == ["row", "shard", "key", "width", "height", "status", "error", "orientation"]
    s, i32 = pa.string(), pa.int32()
    assert [f.type for f in INDEX_SCHEMA] == [pa.int64(), s, s, i32, i32, s, s, pa.int16()]


@pytest.mark.parametrize(
    "row, words",
    [
        (_row(0, "ok", "decode failed"), "ok"),  # a failed sample marked valid
        (_row(0, "error", ""), "reason"),  # an error without its reason
        (_row(0, "skipped"), "status"),
    ],
)
def test_build_index_table_refuses_inconsistent_status(row, words):
    with pytest.raises(InputError, match=words):
        build_index_table([row])


def test_build_index_table_names_missing_and_unknown_columns():
    row = _row(0)
    del row["key"]
    row["label"] = 3
    with pytest.raises(InputError, match=r"missing \['key'\] and unknown \['label'\]"):
        build_index_table([row])


def test_build_index_table_refuses_wrong_types():
    with pytest.raises(InputError, match="INDEX_SCHEMA"):
        build_index_table([_row(0, width="wide")])


def test_check_index_table_casts_and_refuses_duplicate_or_out_of_range_rows():
    narrow = pa.table({"row": pa.array([1, 0], pa.int32()), "shard": ["a", "a"], "key": ["x", "y"], "width": [1, 2],
                       "height": [3, 4], "status": ["ok", "ok"], "error": ["", ""]})
    assert check_index_table(narrow, num_rows=2).schema == INDEX_SCHEMA
    with pytest.raises(InputError, match=r"rows in \[0, 2\)"):
        check_index_table(build_index_table([_row(0), _row(2)]), num_rows=2)
    with pytest.raises(InputError, match="unique"):
        check_index_table(pa.concat_tables([build_index_table([_row(1)])] * 2))


def test_concat_index_tables_sorts_by_row_and_empty_has_the_schema():
    later, earlier = build_index_table([_row(5), _row(3)]), build_index_table([_row(1), _row(2, "error", "no image")])
    table = concat_index_tables([later, earlier])
    assert table["row"].to_pylist() == [1, 2, 3, 5]
    assert table["status"].to_pylist() == ["ok", "error", "ok", "ok"]
    assert concat_index_tables([]).schema == INDEX_SCHEMA and empty_index_table().num_rows == 0


def test_orientation_defaults_to_unknown_and_is_checked():
    table = build_index_table([_row(0, orientation=6), _row(1, "error", "no image")])
    assert table["orientation"].to_pylist() == [6, 0] and table["orientation"].type == pa.int16()
    with pytest.raises(InputError, match="orientation: expected EXIF orientations 1-8"):
        build_index_table([_row(0, orientation=9)])


def test_an_index_without_orientation_reads_with_orientation_zero():
    old = build_index_table([_row(0, orientation=3), _row(1)]).drop_columns(["orientation"])  # a format-1 index file
    assert check_index_table(old)["orientation"].to_pylist() == [0, 0]
    assert concat_index_tables([old, build_index_table([_row(2, orientation=8)])])["orientation"].to_pylist() == [0, 0, 8]
