"""Feature stores written directly with FeatureStore (no Ray, no model), for the reader, probe, inspect and show tests.

Import it as ``from tests.helpers import store as store_helpers``.

``coordinate_store`` writes values that say where they are, so tests can check alignment by arithmetic:
features channel 0/1 = the feature pixel's y/x, channel 2 = the store row; the image (2x the feature resolution)
holds the feature pixel's y/x and the row in its RGB; the ``seg.png`` label (uint16) is the image pixel's id
``y * IMAGE_W + x``; lowres (1/4 of the feature resolution) holds the low-res cell's y/x.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
from typing import Sequence

import numpy as np
import pyarrow.parquet as pq
import zarr

from pipeline.store.index import build_index_table
from pipeline.store.features import ArraySpec, FeatureStore

C, H, W = 5, 8, 12  # features (non-square, to catch swapped axes)
IMAGE_H, IMAGE_W = 2 * H, 2 * W
LOW_H, LOW_W = H // 4, W // 4
ATTRS = {"backbone": "test", "backbone_weights": "random", "upsampler": "jbu", "image_size": IMAGE_W, "dtype": "float16"}


def coordinate_rows(rows: Sequence[int]) -> dict[str, np.ndarray]:
    """The arrays of ``rows`` for coordinate_store."""
    n = len(rows)
    yy, xx = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")  # (H, W)
    feats = np.zeros((n, C, H, W), np.float32)
    feats[:, 0], feats[:, 1] = yy, xx
    feats[:, 2] = np.asarray(rows, np.float32)[:, None, None]
    feats[:, 3:] = np.random.default_rng(list(rows)).standard_normal((n, C - 3, H, W))
    iy, ix = np.meshgrid(np.arange(IMAGE_H), np.arange(IMAGE_W), indexing="ij")  # (2H, 2W)
    image = np.zeros((n, IMAGE_H, IMAGE_W, 3), np.uint8)
    image[..., 0], image[..., 1] = iy // 2, ix // 2
    image[..., 2] = np.asarray(rows, np.uint8)[:, None, None]
    seg = np.broadcast_to((iy * IMAGE_W + ix).astype(np.uint16), (n, IMAGE_H, IMAGE_W))
    ly, lx = np.meshgrid(np.arange(LOW_H), np.arange(LOW_W), indexing="ij")
    low = np.zeros((n, C, LOW_H, LOW_W), np.float32)
    low[:, 0], low[:, 1] = ly, lx
    return {"features": feats, "image": image, "seg.png": np.array(seg), "lowres": low}


def coordinate_store(url: str, storage_options: dict | None = None, *, shards: Sequence[Sequence[int]] = ((0, 1, 2, 3), (4, 5, 6)),
                     errors: Sequence[int] = (2, 5), uncommitted: Sequence[int] = ()) -> FeatureStore:
    """A store with ``shards`` (lists of rows), the rows in ``errors`` failed, shards in ``uncommitted`` left uncommitted."""
    num_rows = sum(len(s) for s in shards)
    specs = [
        ArraySpec("features", (C, H, W), "float16", ("channel", "y", "x")),
        ArraySpec("lowres", (C, LOW_H, LOW_W), "float16", ("channel", "lowres_y", "lowres_x")),
        ArraySpec("image", (IMAGE_H, IMAGE_W, 3), "uint8", ("image_y", "image_x", "rgb")),
        ArraySpec("seg.png", (IMAGE_H, IMAGE_W), "uint16", ("image_y", "image_x")),
    ]
    store = FeatureStore.create(url, num_rows=num_rows, arrays=specs, attrs=ATTRS, storage_options=storage_options,
                                keys=[f"k{r}" for r in range(num_rows)])
    for s, rows in enumerate(shards):
        ok = [r for r in rows if r not in errors]
        if ok:  # failed rows keep the fill value, as in a real run
            data = coordinate_rows(ok)
            for j, r in enumerate(ok):
                store.write_rows(r, {name: value[j : j + 1] for name, value in data.items()})
        if s not in uncommitted:
            store.commit_shard(s, index_table(rows, errors, shard=f"shard-{s:06d}.tar"))
    return store


def index_table(rows: Sequence[int], errors: Sequence[int] = (), shard: str = "shard-000000.tar", reason: str = "image is truncated",
                keys: Sequence[str] | None = None):
    """Index rows for ``rows`` with key ``k<row>`` (or ``keys[row]``); rows in ``errors`` failed with ``reason``."""
    return build_index_table([
        {"row": r, "shard": shard, "key": keys[r] if keys is not None else f"k{r}", "width": IMAGE_W, "height": IMAGE_H,
         "status": "error" if r in errors else "ok", "error": reason if r in errors else ""}
        for r in rows
    ])


def label_store(url: str, features: np.ndarray, labels: np.ndarray, *, label_name: str = "seg.png",
                images: np.ndarray | None = None, storage_options: dict | None = None, attrs: dict | None = None,
                per_shard: int = 8, feature_dtype: str = "float16", keys: Sequence[str] | None = None) -> FeatureStore:
    """A store of given features (N, C, h, w) and labels (N, H, W[, D]) (and images), every row valid, keys ``k<row>``
    unless given."""
    n = len(features)
    specs = [ArraySpec("features", features.shape[1:], feature_dtype, ("channel", "y", "x"))]
    extra = tuple(f"{label_name.replace('.', '_')}_{i}" for i in range(2, labels.ndim - 1))
    specs.append(ArraySpec(label_name, labels.shape[1:], labels.dtype.name, ("image_y", "image_x", *extra)))
    data = {"features": features, label_name: labels}
    if images is not None:
        specs.append(ArraySpec("image", images.shape[1:], "uint8", ("image_y", "image_x", "rgb")))
        data["image"] = images
    store = FeatureStore.create(url, num_rows=n, arrays=specs, attrs=attrs or ATTRS, storage_options=storage_options,
                                keys=list(keys) if keys is not None else [f"k{r}" for r in range(n)])
    store.write_rows(0, data)
    for s, start in enumerate(range(0, n, per_shard)):
        store.commit_shard(s, index_table(range(start, min(n, start + per_shard)), shard=f"shard-{s:06d}.tar", keys=keys))
    return store


def format1_store(url: str, *, shards: Sequence[Sequence[int]] = ((0, 1, 2), (3, 4)), errors: Sequence[int] = (1,),
                  report: dict | None = None) -> dict[str, np.ndarray]:
    """A local store in the layout of store format 1, built by hand as older versions wrote it: the group at the root
    without a key coordinate, and index/ (no orientation column), commits/ and report.json beside the arrays.
    Returns the rows written (coordinate_rows of every valid row)."""
    num_rows = sum(len(s) for s in shards)
    attrs = {"featup": ATTRS, "featup_store": {"format": 1, "num_rows": num_rows, "arrays": ["features", "image"]}}
    group = zarr.open_group(url, mode="w-", attributes=attrs)
    data = coordinate_rows(range(num_rows))
    for name, dims in (("features", ("sample", "channel", "y", "x")), ("image", ("sample", "image_y", "image_x", "rgb"))):
        array = group.create_array(name, shape=data[name].shape, chunks=(1, *data[name].shape[1:]), dtype="float16"
                                   if name == "features" else "uint8", dimension_names=dims, fill_value=0)
        valid = [r for r in range(num_rows) if r not in errors]
        array[valid] = data[name][valid].astype(array.dtype)
    for s, rows in enumerate(shards):
        table = index_table(rows, errors, shard=f"shard-{s:06d}.tar").drop_columns(["orientation"])  # format-1 schema
        os.makedirs(f"{url}/index", exist_ok=True)
        pq.write_table(table, f"{url}/index/shard-{s:06d}.parquet")
        os.makedirs(f"{url}/commits", exist_ok=True)
        with open(f"{url}/commits/shard-{s:06d}.json", "w") as f:
            json.dump({"shard_index": s, "num_samples": len(rows)}, f)
    with open(f"{url}/report.json", "w") as f:
        json.dump(report or {"status": "complete"}, f)
    return {name: value for name, value in data.items() if name in ("features", "image")}


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of ``target`` (host, port) whose outages are real: while down it resets every
    open connection and refuses new ones (accepts and closes them at once), as an unreachable endpoint does."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._up = threading.Event()
        self._up.set()
        self._conns: set[socket.socket] = set()
        self._guard = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def down(self) -> None:
        """Starts an outage: resets every open connection; new ones are dropped until ``up``."""
        self._up.clear()
        with self._guard:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            _reset(conn)

    def up(self) -> None:
        self._up.set()

    def close(self) -> None:
        self._closed = True
        self.down()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._up.is_set():
                _reset(client)
                continue
            try:
                server = socket.create_connection(self.target)
            except OSError:
                _reset(client)
                continue
            with self._guard:
                self._conns.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for conn in (source, sink):
                with self._guard:
                    self._conns.discard(conn)
                _reset(conn)


def _reset(conn: socket.socket) -> None:
    """Closes with RST (SO_LINGER 0), as a dropped connection looks to the client."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
    except OSError:
        pass
