"""The per-sample index of a feature store: one Parquet row per sample, saying where it lives and whether it is valid."""

from __future__ import annotations

from typing import Any, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from featup.errors import InputError
from pipeline.runtime.secrets import mask_text

INDEX_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64(), nullable=False),  # its row in every array of the store
        pa.field("shard", pa.string(), nullable=False),  # the shard URL it came from
        pa.field("key", pa.string(), nullable=False),  # the WebDataset __key__
        pa.field("width", pa.int32(), nullable=False),  # original image size (0 when it could not be read)
        pa.field("height", pa.int32(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # "ok" or "error"
        pa.field("error", pa.string(), nullable=False),  # the reason of an error, "" when ok
        pa.field("orientation", pa.int16(), nullable=False),  # EXIF orientation 1-8 of the image, 0 when failed or unknown
    ]
)
STATUSES = ("ok", "error")
ORIENTATIONS = range(0, 9)  # 0: unknown (failed samples, and index files written before the column existed)
_DEFAULTS = {"error": "", "orientation": 0}
_MASKED = ("shard", "error")  # URLs and messages: their credentials (pre-signed URLs, user:password@) become ***


def build_index_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """A checked index table (INDEX_SCHEMA) from row dicts; ``error`` may be left out for valid samples, ``orientation``
    (0: unknown) for any. Shard URLs and error messages are stored with their credentials masked."""
    expected = set(INDEX_SCHEMA.names)
    full, masked = [], {}  # a shard's rows share their URL: each distinct text is masked once
    for i, row in enumerate(rows):
        row = {**_DEFAULTS, **row}
        for name in _MASKED:
            text = row.get(name)
            if isinstance(text, str):
                row[name] = masked[text] if text in masked else masked.setdefault(text, mask_text(text))
        if set(row) != expected:
            missing, extra = sorted(expected - set(row)), sorted(set(row) - expected)
            raise InputError(f"index row {i}: expected the columns {INDEX_SCHEMA.names}, "
                             f"got missing {missing} and unknown {extra}")
        full.append(row)
    try:
        table = pa.Table.from_pylist(full, schema=INDEX_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise InputError(f"index rows: expected values of the types in INDEX_SCHEMA, got {e}") from None
    return check_index_table(table)


def check_index_table(table: pa.Table, num_rows: int | None = None) -> pa.Table:
    """The table cast to INDEX_SCHEMA after checking that no failed sample is marked valid and rows are unique and in range;
    a table without ``orientation`` (an older index file) gets orientation 0."""
    table = with_defaults(table)
    if set(table.column_names) != set(INDEX_SCHEMA.names):
        raise InputError(f"index table: expected the columns {INDEX_SCHEMA.names}, got {table.column_names}")
    try:
        table = table.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as e:
        raise InputError(f"index table: expected columns castable to INDEX_SCHEMA, got {e}") from None
    _check_statuses(table)
    _check_rows(table, num_rows)
    _check_orientations(table)
    return table


def with_defaults(table: pa.Table) -> pa.Table:
    """``table`` with the columns added after format 1 (``orientation``) filled with their default where missing."""
    if "orientation" not in table.column_names:
        table = table.append_column(INDEX_SCHEMA.field("orientation"), pa.array([0] * table.num_rows, pa.int16()))
    return table


def _check_orientations(table: pa.Table) -> None:
    """Orientations are EXIF's 1-8, or 0 for unknown."""
    if table.num_rows == 0:
        return
    lo, hi = pc.min(table["orientation"]).as_py(), pc.max(table["orientation"]).as_py()
    if lo < ORIENTATIONS.start or hi >= ORIENTATIONS.stop:
        raise InputError(f"index column orientation: expected EXIF orientations 1-8 (0: unknown), got values from {lo} to {hi}")


def _check_statuses(table: pa.Table) -> None:
    """Status is ok or error; ok rows carry no reason and error rows always carry one."""
    status, error = table["status"], table["error"]
    unknown = set(pc.unique(status).to_pylist()) - set(STATUSES)
    if unknown:
        raise InputError(f"index column status: expected one of {STATUSES}, got {sorted(unknown)}")
    has_reason = pc.not_equal(error, "")
    if pc.any(pc.and_(pc.equal(status, "ok"), has_reason)).as_py():
        raise InputError("index rows: expected status 'ok' rows to have an empty error, got an ok row with an error reason")
    if pc.any(pc.and_(pc.equal(status, "error"), pc.invert(has_reason))).as_py():
        raise InputError("index rows: expected every status 'error' row to have a reason, got an empty error")


def _check_rows(table: pa.Table, num_rows: int | None) -> None:
    """Row numbers are unique, non-negative and below ``num_rows`` when it is given."""
    if table.num_rows == 0:
        return
    rows = table["row"]
    lo, hi = pc.min(rows).as_py(), pc.max(rows).as_py()
    if lo < 0 or (num_rows is not None and hi >= num_rows):
        raise InputError(f"index column row: expected rows in [0, {num_rows}), got rows from {lo} to {hi}")
    if pc.count_distinct(rows).as_py() != table.num_rows:
        raise InputError("index column row: expected unique rows, got duplicates")


def empty_index_table() -> pa.Table:
    """An index with no rows (the index of a store with no committed shard)."""
    return INDEX_SCHEMA.empty_table()


def concat_index_tables(tables: Sequence[pa.Table]) -> pa.Table:
    """The union of several shards' index tables (older ones with orientation 0), sorted by row."""
    if not tables:
        return empty_index_table()
    return pa.concat_tables([with_defaults(t).select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA) for t in tables]).sort_by("row")
