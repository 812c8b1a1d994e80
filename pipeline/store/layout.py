"""Where a feature store keeps its side files (Parquet index, commit markers, report, lock), per store format.

Format 2 (this version) keeps them inside the Zarr sub-group ``_featup`` of the root, in three empty Zarr arrays
whose prefixes hold the plain files::

    zarr.json, <array>/..., sample/...      the group, its arrays and the sample keys (a string coordinate on ``sample``)
    _featup/zarr.json                       a Zarr group describing the side files
    _featup/index/shard-000003.parquet      index rows of shard 3 (written first)
    _featup/commits/shard-000003.json       commit marker of shard 3 (written last)
    _featup/run/report.json, lock.json      the run report and the lock of the run writing the store
    _featup/upsampler/upsampler.json, ...   a compact store's upsampler (pipeline.store.compact; compact stores only)

Why arrays: zarr lists the members of every group (``group.members()``, xarray's ``open_datatree``) and warns about
each key that is not a Zarr node, but it never lists inside an array's prefix; an empty array has no chunks, so the
files never meet a chunk key (``c/...``). Format 1 (older versions) kept the same files at the store root, where
every plain ``zarr.open_group`` and ``xarray.open_zarr`` warned about them.
"""

from __future__ import annotations

from dataclasses import dataclass

import zarr

from featup.errors import InputError

STORE_FORMAT = 2
SIDE_GROUP = "_featup"
KEYS_ARRAY = "sample"  # the sample keys, a string coordinate array on the ``sample`` dimension
_SIDE_NODES = {
    "index": "the Parquet index file of every committed shard (index/shard-NNNNNN.parquet)",
    "commits": "the commit marker of every committed shard, written after its index file (commits/shard-NNNNNN.json)",
    "run": "the run report (report.json) and the lock of the run writing the store (lock.json)",
}
# Side nodes only some stores have: a compact store's upsampler (pipeline.store.compact).
_OPTIONAL_NODES = {
    "upsampler": "a compact store's upsampler: its record (upsampler.json) and parameters (state.safetensors)",
}
_FILE_DIM = "featup_file"


@dataclass(frozen=True)
class Layout:
    """The relative paths of a store format's side files; ``relative`` maps a format-1 name to its place."""

    format: int
    side: str  # folder of index/ and commits/ ("" at the root in format 1)
    run: str  # folder of report.json and lock.json

    def relative(self, name: str) -> str:
        """Where the side file known as ``name`` in format 1 (``lock.json``, ``index/shard-...``, ``commits``) lives."""
        if name in ("report.json", "lock.json"):
            return f"{self.run}{name}"
        if name.split("/", 1)[0] in ("index", "commits", *_OPTIONAL_NODES):
            return f"{self.side}{name}"
        return name

    def index_name(self, shard_index: int) -> str:
        return self.relative(f"index/shard-{shard_index:06d}.parquet")

    def commit_name(self, shard_index: int) -> str:
        return self.relative(f"commits/shard-{shard_index:06d}.json")


LAYOUTS = {1: Layout(1, "", ""), 2: Layout(2, f"{SIDE_GROUP}/", f"{SIDE_GROUP}/run/")}


def layout_for(store_format: object, url: str) -> Layout:
    """The layout of a store of ``store_format``; a format this version does not know is refused by name."""
    if store_format not in LAYOUTS:
        raise InputError(f"store {url}: expected store format {' or '.join(map(str, LAYOUTS))}, got format {store_format!r} "
                         "(written by a newer featup: upgrade featup to read it)")
    return LAYOUTS[store_format]


def create_side_group(group: zarr.Group, optional: tuple[str, ...] = ()) -> None:
    """The ``_featup`` sub-group and its empty arrays (three, and the ``optional`` ones, e.g. ``upsampler``), whose
    prefixes hold the side files (format 2).

    Never with zarr's ``overwrite``: it deletes a node's whole prefix, and ``run/`` holds the lock of the job creating it."""
    unknown = [name for name in optional if name not in _OPTIONAL_NODES]
    if unknown:
        raise InputError(f"side nodes: expected names among {list(_OPTIONAL_NODES)}, got {unknown}")
    nodes = {**_SIDE_NODES, **{name: _OPTIONAL_NODES[name] for name in optional}}
    side = group.create_group(SIDE_GROUP, attributes={
        "description": "FeatUp pipeline bookkeeping: the plain files under these empty arrays are not Zarr data",
        "files": nodes,
    })
    for name, holds in nodes.items():
        side.create_array(name, shape=(0,), chunks=(1,), dtype="uint8", dimension_names=(_FILE_DIM,), fill_value=0,
                          attributes={"holds": holds})


def refuse_resume(url: str, store_format: int) -> str:
    """Why a store of an older format is not opened for writing, and what to do instead."""
    return (f"store {url}: expected a store of format {STORE_FORMAT} to write into, got format {store_format} (written by an "
            f"older featup, with its index and markers beside the arrays); it is never resumed into the format-{STORE_FORMAT} "
            "layout: pass --overwrite to start over, or write to a new output (the old store stays readable)")
