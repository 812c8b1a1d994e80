"""Reading a feature store back: valid samples as torch tensors, channel subsets, aligned random crops, fork-safe datasets.

``open_features(url)`` gives a ``FeatureReader``: ``len()`` valid samples, ``reader[i]`` a dict with ``features``
(float32 (C, H, W)), ``key``, ``row`` and every other stored array (``lowres`` float32 (C, h, w), ``image`` uint8
(3, S, S), labels as stored, e.g. ``seg.png`` (S, S)). Failed rows, and rows of uncommitted shards, are never served;
a served row whose stored object is missing raises ``LostRowError`` naming the store, array and row (never zeros).

A compact store (``featup precompute --compact``) serves the same ``features``, upsampled where they are read by the
upsampler stored with it, from the low-res window a crop needs and for the channels asked for only
(``pipeline.store.compact``); ``torch_dataset(upsample=False)`` yields those windows instead, for ``reader.upsampler()``
to upsample batches on a training device.

The reader holds no open store across a fork or a pickle: the store is (re)opened lazily in the process that reads,
since zarr's event-loop thread and s3fs sessions do not survive a fork of a process that already used them.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from featup.errors import ConfigError
from pipeline.runtime.retry import RetryPolicy
from pipeline.store.access import retry_policy, store_call
from pipeline.store.compact import KERNEL_BACKEND, CompactSource, StoredUpsampler, is_compact
from pipeline.store.features import FeatureStore
from pipeline.store.integrity import MissingObjectError, lost_row_error
from pipeline.store.quantize import QUANTIZATION, dequantize_int8_numpy

CHANNEL_FIRST = ("features", "lowres")  # (C, H, W) per row; every other array is (H, W, ...) per row
# Torch has few ops for wide unsigned ints: such labels are widened to the next signed type.
_WIDEN = {np.dtype("uint16"): np.int32, np.dtype("uint32"): np.int64, np.dtype("uint64"): np.int64}


@dataclass(frozen=True)
class ReadOptions:
    """What ``reader[i]`` returns: which arrays, which feature channels, and an optional random crop."""

    arrays: tuple[str, ...] | None = None  # None: every stored array
    channels: tuple[int, ...] | None = None  # feature (and lowres) channels to keep, in this order; None: all
    crop: tuple[int, int] | None = None  # (h, w) in feature pixels; None: whole rows
    seed: int = 0  # seeds the crop generator of single-process reading (DataLoader workers use their own seed)


def open_features(url: str, *, retry: RetryPolicy | None = None, kernel_backend: str = KERNEL_BACKEND,
                  **storage_options: Any) -> FeatureReader:
    """Opens the feature store at ``url`` (local path or fsspec URL) for reading; ``storage_options`` go to fsspec, and
    transient faults are retried within ``retry`` (default: a budget of 120 s). ``kernel_backend`` runs a compact
    store's JBU kernels: ``auto`` (torch.compile, a few seconds once per process), ``eager`` or ``compiled``."""
    return FeatureReader(url, storage_options, retry=retry, kernel_backend=kernel_backend)


class FeatureReader:
    """The valid samples of a feature store, by position: ``reader[i]`` is the i-th valid row in row order."""

    def __init__(self, url: str, storage_options: dict | None = None, options: ReadOptions = ReadOptions(),
                 retry: RetryPolicy | None = None, kernel_backend: str = KERNEL_BACKEND) -> None:
        self.url, self.storage_options, self.retry = url, dict(storage_options or {}), retry_policy(retry)
        store = FeatureStore.open(url, self.storage_options or None, mode="r", retry=self.retry, strict=True)
        self._store, self._pid = store, os.getpid()
        self._generator: tuple[tuple[int, int], torch.Generator] | None = None
        self.attrs: dict = store.attrs
        self.num_rows: int = store.num_rows
        self.index: pa.Table = store.read_index()  # every committed row, failed ones included, sorted by row
        ok = self.index.filter(pc.equal(self.index["status"], "ok"))  # never error rows (failed, duplicate keys)
        self.rows = np.asarray(ok["row"].to_numpy(), dtype=np.int64)  # store row of each valid sample
        self.keys: list[str] = ok["key"].to_pylist()
        self.quantized = quantized_arrays(store)  # name -> (scale array, offset array) of int8-coded arrays
        companions = {part for pair in self.quantized.values() for part in pair}
        self.shapes = {name: (tuple(store.array(name).shape[1:]),
                              np.dtype(np.float32) if name in self.quantized else np.dtype(store.array(name).dtype))
                       for name in store.array_names if name not in companions}  # per-row shape and (decoded) dtype
        self.compact: CompactSource | None = None  # a compact store's upsampler: features are computed on read
        if is_compact(self.attrs):
            self.compact = CompactSource.open(store, self.shapes["lowres"][0][0], kernel_backend)
            self.shapes = {"features": (self.compact.feature_shape, np.dtype(np.float32)), **self.shapes}
        self.options = _check_options(options, self.shapes, self._default_arrays())

    def select(self, *, arrays: Sequence[str] | None = None, channels: Sequence[int] | None = None,
               crop: int | Sequence[int] | None = None, seed: int = 0) -> FeatureReader:
        """A reader of the same store returning only ``arrays`` (features always), ``channels``, cropped to ``crop``.

        ``crop`` is (h, w) (or one side) in feature pixels; the image and labels get the same region at their own
        resolution. The crop's corner is drawn on the grid of the coarsest returned array, so every array's box is
        exact: leave ``lowres`` out of ``arrays`` for crops at any feature pixel.
        """
        names = None if arrays is None else tuple(dict.fromkeys(["features", *arrays]))
        chans = None if channels is None else tuple(int(c) for c in channels)
        size = None if crop is None else ((int(crop), int(crop)) if isinstance(crop, (int, np.integer)) else tuple(map(int, crop)))
        view = copy.copy(self)
        view.options = _check_options(ReadOptions(names, chans, size, seed), self.shapes, self._default_arrays())
        view._generator = None
        return view

    def torch_dataset(self, *, arrays: Sequence[str] | None = None, channels: Sequence[int] | None = None,
                      crop: int | Sequence[int] | None = None, seed: int = 0, upsample: bool = True) -> FeatureDataset:
        """A ``torch.utils.data.Dataset`` of this store for DataLoaders with any number of workers (fork or spawn).

        ``upsample=False`` (compact stores): items hold, instead of ``features``, the ``lowres`` and ``image`` windows
        (and with a crop its ``origin``) that ``self.select(...).upsampler(device=...)`` turns into the features.
        """
        if not upsample and self.compact is None:
            raise ConfigError(f"upsample=False: expected a compact store (featup precompute --compact), got {self.url}, "
                              "whose features are stored")
        return FeatureDataset(self.select(arrays=arrays, channels=channels, crop=crop, seed=seed), upsample=upsample)

    def upsampler(self, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> StoredUpsampler:
        """A compact store's upsampler as a module on ``device``: ``up(lowres, image, origin=None) -> features`` for the
        channels and crop size of this reader's selection (batches of ``torch_dataset(upsample=False)``)."""
        if self.compact is None:
            raise ConfigError(f"upsampler(): expected a compact store (featup precompute --compact), got {self.url}, "
                              "whose features are stored")
        return self.compact.upsampler(self.options.channels, self.options.crop, device=device, dtype=dtype)

    def _default_arrays(self) -> tuple[str, ...]:
        """What ``reader[i]`` returns unless told: every array; a compact store's ``lowres`` only when asked for."""
        return tuple(n for n in self.shapes if not (self.compact is not None and n == "lowres"))

    @property
    def array_names(self) -> tuple[str, ...]:
        """The arrays ``reader[i]`` returns."""
        return self.options.arrays or tuple(self.shapes)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.get(i)

    def get(self, i: int, generator: torch.Generator | None = None, *, upsample: bool = True) -> dict[str, Any]:
        """Valid sample ``i`` as tensors; a crop's corner is drawn from ``generator`` (default: this process's own).

        ``upsample=False`` (compact stores): the ``lowres``, ``image`` (and ``origin``) windows instead of ``features``."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i}: expected a position in [0, {len(self)}) of the valid samples, got {i}")
        row = int(self.rows[i])
        boxes = self._crop_boxes(generator) if self.options.crop else {}
        store = self._open()
        out: dict[str, Any] = {"key": self.keys[i], "row": row}
        inputs = None  # a compact store's low-res and guidance windows (features come first)
        for name in self.array_names:
            try:
                if name == "features" and self.compact is not None:
                    inputs = self._compact_inputs(store, row, boxes.get(name))
                    out.update(self._compact_features(inputs, boxes.get(name), upsample))
                    continue
                if inputs is not None and name in ("lowres", "image") and not upsample:
                    continue  # the upsampler's windows take their place
                if inputs is not None and name == "image":  # cut from the guidance window already read
                    out[name] = self.compact.image_crop(inputs, boxes.get("features"), boxes.get(name))
                    continue
                value = store_call(self.retry, f"read row {row} of", f"{self.url}/{name}", _read, store.array(name), name,
                                   row, boxes.get(name), self.options.channels, writing=False)
                if name in self.quantized:  # int8 codes -> float32 with the row's per-channel scale and offset
                    value = store_call(self.retry, f"read row {row} of", f"{self.url}/{name}", self._dequantize, store,
                                       name, row, value, writing=False)
            except MissingObjectError as e:  # an ok row's object is always written: a missing one is lost data
                raise lost_row_error(self.url, e.key.split("/", 1)[0], row, e.key, self.keys[i]) from None
            out[name] = _to_tensor(name, value)
        return out

    def _compact_inputs(self, store: FeatureStore, row: int, box: tuple[int, int, int, int] | None) -> dict[str, torch.Tensor]:
        """The low-res and guidance windows the features of ``row`` (cropped to ``box``) are upsampled from."""
        def read(name: str, window: tuple[int, int, int, int], channels: tuple[int, ...] | None) -> np.ndarray:
            return store_call(self.retry, f"read row {row} of", f"{self.url}/{name}", _read, store.array(name), name, row,
                              window, channels, writing=False)

        return self.compact.inputs(read, box, self.options.channels)

    def _compact_features(self, inputs: dict[str, torch.Tensor], box: tuple[int, int, int, int] | None,
                          upsample: bool) -> dict[str, torch.Tensor]:
        """A compact store's features (cropped to ``box``), or with ``upsample`` False the windows they need."""
        if not upsample:
            return inputs if box is not None else {k: v for k, v in inputs.items() if k != "origin"}
        return {"features": self.compact.features(inputs, box, self.options.channels)}

    def _dequantize(self, store: FeatureStore, name: str, row: int, codes: np.ndarray) -> np.ndarray:
        """(K, h, w) codes of ``name`` at ``row`` as float32 features (crops need only the row's per-channel values)."""
        scale_name, offset_name = self.quantized[name]
        chans = slice(None) if self.options.channels is None else list(self.options.channels)
        scale = np.asarray(store.array(scale_name).oindex[row, chans])  # (K,)
        offset = np.asarray(store.array(offset_name).oindex[row, chans])  # (K,)
        return dequantize_int8_numpy(codes, scale, offset)

    def _open(self) -> FeatureStore:
        """The store handle of this process, opened on first use after a fork or an unpickle."""
        if self._store is None or self._pid != os.getpid():
            self._store = FeatureStore.open(self.url, self.storage_options or None, mode="r", retry=self.retry, strict=True)
            self._pid = os.getpid()
        return self._store

    def _crop_boxes(self, generator: torch.Generator | None) -> dict[str, tuple[int, int, int, int]]:
        """(top, left, height, width) of the same region in every returned array, drawn from ``generator``."""
        sizes = {name: _spatial_size(name, self.shapes[name][0]) for name in self.array_names}
        coarse, ratios, (ch, cw) = _crop_grid(sizes, self.options.crop)
        g = generator if generator is not None else self._default_generator()
        top = int(torch.randint(0, coarse[0] - ch + 1, (1,), generator=g))
        left = int(torch.randint(0, coarse[1] - cw + 1, (1,), generator=g))
        return {name: (top * ry, left * rx, ch * ry, cw * rx) for name, (ry, rx) in ratios.items()}

    def _default_generator(self) -> torch.Generator:
        """This process's crop generator: seeded by the DataLoader worker's seed inside a worker, else by ``seed``."""
        info = torch.utils.data.get_worker_info()
        owner = (os.getpid(), info.seed if info is not None else self.options.seed)
        if self._generator is None or self._generator[0] != owner:
            self._generator = (owner, torch.Generator().manual_seed(owner[1]))
        return self._generator[1]

    def __getstate__(self) -> dict:
        """Pickled without the open store and generator: the unpickling process opens its own."""
        state = dict(self.__dict__)
        state.update(_store=None, _pid=None, _generator=None)
        return state


class FeatureDataset(torch.utils.data.Dataset):
    """A reader as a torch Dataset; each DataLoader worker opens the store itself and crops with its own seed."""

    def __init__(self, reader: FeatureReader, upsample: bool = True) -> None:
        self.reader, self.upsample = reader, upsample

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.reader.get(i, upsample=self.upsample)


def _check_options(options: ReadOptions, shapes: dict[str, tuple[tuple[int, ...], np.dtype]],
                   default: tuple[str, ...]) -> ReadOptions:
    """The options after checking them against the store's arrays (array names, channel range, crop geometry)."""
    names = options.arrays or default
    unknown = [n for n in names if n not in shapes]
    if unknown:
        raise ConfigError(f"arrays to read: expected names among {list(shapes)}, got {unknown}")
    channels = shapes["features"][0][0]
    if options.channels is not None:
        bad = [c for c in options.channels if not 0 <= c < channels]
        if bad or not options.channels:
            raise ConfigError(f"channels: expected a non-empty list of indexes in [0, {channels}), got {list(options.channels)}")
    if options.crop is not None:
        _crop_grid({n: _spatial_size(n, shapes[n][0]) for n in names}, options.crop)
    return replace(options, arrays=tuple(names))


def _spatial_size(name: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """(height, width) of one row of array ``name``."""
    return tuple(shape[1:3]) if name in CHANNEL_FIRST else tuple(shape[0:2])


def _crop_grid(sizes: dict[str, tuple[int, int]], crop: tuple[int, int]) -> tuple[tuple[int, int], dict, tuple[int, int]]:
    """The coarsest grid (H, W), each array's integer ratio to it, and the feature crop's size on that grid."""
    if len(crop) != 2 or min(crop) < 1:
        raise ConfigError(f"crop: expected a positive (height, width), got {crop}")
    feat = sizes["features"]
    if crop[0] > feat[0] or crop[1] > feat[1]:
        raise ConfigError(f"crop: expected at most the feature size {feat[0]}x{feat[1]}, got {crop[0]}x{crop[1]}")
    coarse = (min(s[0] for s in sizes.values()), min(s[1] for s in sizes.values()))
    if any(s[0] % coarse[0] or s[1] % coarse[1] for s in sizes.values()):
        raise ConfigError(f"crop: expected array sizes that are integer multiples of each other, got {sizes}; "
                          "read fewer arrays (arrays=...) to crop")
    ratios = {name: (s[0] // coarse[0], s[1] // coarse[1]) for name, s in sizes.items()}
    ry, rx = ratios["features"]
    if crop[0] % ry or crop[1] % rx:
        raise ConfigError(f"crop: expected a multiple of ({ry}, {rx}) feature pixels (the coarsest array's cell), "
                          f"got {crop[0]}x{crop[1]}; leave lowres out of the arrays read to crop at any pixel")
    return coarse, ratios, (crop[0] // ry, crop[1] // rx)


def _read(array: Any, name: str, row: int, box: tuple[int, int, int, int] | None,
          channels: tuple[int, ...] | None) -> np.ndarray:
    """One row of a Zarr array, optionally a spatial box of it and (for features and lowres) some channels."""
    ys, xs = (slice(None), slice(None)) if box is None else (slice(box[0], box[0] + box[2]), slice(box[1], box[1] + box[3]))
    if name not in CHANNEL_FIRST:
        return np.asarray(array[(row, ys, xs)])  # (h, w, ...)
    if channels is None:
        return np.asarray(array[row, :, ys, xs])  # (C, h, w)
    return np.asarray(array.oindex[row, list(channels), ys, xs])  # (K, h, w)


def _to_tensor(name: str, value: np.ndarray) -> torch.Tensor:
    """Features as float32 (C, H, W), the image as uint8 (3, S, S), labels in their stored layout."""
    if name in CHANNEL_FIRST:
        return torch.from_numpy(value.astype(np.float32, copy=False))
    if name == "image":
        return torch.from_numpy(np.ascontiguousarray(value.transpose(2, 0, 1)))  # (S, S, 3) -> (3, S, S)
    if value.dtype in _WIDEN:
        value = value.astype(_WIDEN[value.dtype])
    return torch.from_numpy(np.ascontiguousarray(value))


def quantized_arrays(store: FeatureStore) -> dict[str, tuple[str, str]]:
    """The int8-coded arrays of a store with the names of their scale and offset arrays (from their attributes)."""
    found = {}
    for name in store.array_names:
        attrs = store.array(name).attrs
        if attrs.get("quantization") == QUANTIZATION:
            found[name] = (attrs["scale_array"], attrs["offset_array"])
    return found
