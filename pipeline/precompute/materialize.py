"""``featup materialize``: a finished compact store's features, upsampled by its stored upsampler, written into a full store.

The job is ``featup precompute``'s own machinery with another actor: the plan lists the compact store's committed
shards (same rows, same index), the driver, lock, queue, retries and report are precompute's, and each
``MaterializeWorker`` reads a shard's ``lowres`` and ``image`` rows, upsamples them in batches on its device and writes
``features`` (and the image when the compact store's command had ``--save-image``, and the labels) before committing
the shard with the compact store's index rows. The full store's attributes are the compact store's with ``compact``
unset, so it is the store ``featup precompute`` without ``--compact`` writes: a rerun of that command resumes it, and
a rerun of ``materialize`` resumes what a killed run left.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, Sequence, TextIO

import numpy as np
import torch

from featup.errors import ConfigError
from pipeline.precompute.config import FINGERPRINT_FIELDS, PrecomputeConfig
from pipeline.precompute.extract import TORCH_DTYPES, Projection, compute_dtype
from pipeline.precompute.plan import Plan
from pipeline.precompute.worker import ShardResult, ShardTask, _count
from pipeline.precompute.writes import RowWriter, cpu_actor_write_threads
from pipeline.store.compact import CompactSource

COMPACT_ONLY_ATTRS = ("upsampler_sha256", "upsampler_record", "features")  # features: the note of earlier versions


def materialize_config(url: str, output: str, *, storage_options: dict | None = None, **settings: Any) -> PrecomputeConfig:
    """The config of materializing the compact store at ``url`` into ``output``: the compact store's command (from its
    attributes) without ``--compact``, with this job's resources (``settings``: actors, device, batch_size, tile...)."""
    from pipeline.store.compact import is_compact
    from pipeline.store.features import FeatureStore

    options = dict(storage_options or {})
    source = FeatureStore.open(url, options or None, mode="r")
    attrs = source.attrs
    if not is_compact(attrs):
        raise ConfigError(f"{url}: expected a compact store (featup precompute --compact), got a store whose features are "
                          "stored already")
    command = {name: attrs[name] for name in FINGERPRINT_FIELDS if name in attrs and name != "compact"}
    size = command.get("output_size")  # the attributes hold the resolved (H, W)
    command["output_size"] = None if command.get("scale") is not None or size is None else int(size[0])
    settings.setdefault("max_errors", None)  # the failed rows were the compact job's to judge: they are copied, not redone
    return PrecomputeConfig(inputs=(url,), output=output, **command, compact=False, materialize_from=url,
                            storage_options=options, **settings)


def make_materialize_plan(config: PrecomputeConfig, command_line: Sequence[str] = ()) -> Plan:
    """The plan of a materialize job: one task per committed shard of the compact store, the full store's arrays and
    attributes (those of the compact store, ``compact`` unset)."""
    from pipeline.sources.shards import ShardInfo
    from pipeline.store.features import FeatureStore

    source = FeatureStore.open(config.materialize_from, config.storage_options or None, mode="r", retry=config.retry)
    shards, offsets = [], []
    for index in sorted(source.committed_shards()):
        table = source.read_shard_index(index)
        rows = table["row"].to_pylist()
        shards.append(ShardInfo(table["shard"][0].as_py(), index, len(rows), tuple(table["key"].to_pylist())))
        offsets.append(min(rows))
    total = source.attrs.get("num_shards", len(shards))
    if len(shards) != total or [s.index for s in shards] != list(range(total)):
        raise ConfigError(f"{config.materialize_from}: expected a finished compact store (every shard committed), got "
                          f"{len(shards)} of {total} shards committed; rerun its precompute command to finish it first")
    attrs = {k: v for k, v in source.attrs.items() if k not in COMPACT_ONLY_ATTRS}
    attrs.update(compact=None, materialized_from=config.materialize_from, command_line=list(command_line),
                 created_at=datetime.now(timezone.utc).isoformat())
    projection = Projection.from_attrs(attrs["pca"]) if attrs.get("pca") else None
    return Plan(config, shards, offsets, full_arrays(source), attrs, extractor=None, spec=None, projection=projection,
                rows=source.num_rows, row_keys=source.sample_keys())


def full_arrays(source: Any) -> list:
    """The full store's arrays: ``features`` (K, H, W), the image if the command saved it, the labels as stored."""
    from pipeline.store.compact import CompactSource
    from pipeline.store.features import ArraySpec

    attrs = source.attrs
    channels = source.array("lowres").shape[1]
    shape = CompactSource.open(source, channels).feature_shape
    specs = [ArraySpec("features", shape, attrs["storage_dtype"], ("channel", "y", "x"), spatial_axes=(1, 2))]
    for name in source.array_names:
        if name == "lowres" or (name == "image" and not attrs.get("save_image")):
            continue
        array = source.array(name)
        specs.append(ArraySpec(name, tuple(array.shape[1:]), str(array.dtype), tuple(array.metadata.dimension_names),
                               spatial_axes=(0, 1)))
    return specs


def run_materialize(config: PrecomputeConfig, *, command_line: Sequence[str] = (), out: TextIO | None = None,
                    err: TextIO | None = None, json_output: bool = False) -> int:
    """Runs a materialize job (resumable like precompute); returns the process exit code."""
    from pipeline.precompute.driver import _machine_cpus, check_local_devices, run_plan
    from pipeline.runtime.preflight import check_output

    out, err = out or sys.stdout, err or sys.stderr
    check_local_devices(config)
    check_output(config.output_location, config.retry)  # one line if the output cannot be written, before Ray starts
    config = config.with_machine_resources(_machine_cpus(config))
    plan = make_materialize_plan(config, command_line)
    return run_plan(plan, out=out, err=err, json_output=json_output, worker=MaterializeWorker)


class MaterializeWorker:
    """A precompute actor that reads compact rows instead of shards: the stored upsampler, loaded once, on its device."""

    def __init__(self, config: PrecomputeConfig, *, projection: Projection | None = None, torch_threads: int | None = None,
                 run_id: str | None = None) -> None:
        from featup.devices import resolve_device
        from pipeline.precompute.pool import _assigned_gpus, this_node, write_threads_for
        from pipeline.runtime.models import quiet_cpu_only_warnings

        quiet_cpu_only_warnings()
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        self.node = this_node()
        if config.write_threads is None:
            gpus = _assigned_gpus()
            threads = write_threads_for(self.node, gpus, config.cpus_per_actor) if self.node.gpus else None
            config = replace(config, write_threads=threads or cpu_actor_write_threads(config.cpus_per_actor))
        self.config, self.run_id = config, run_id
        self.device = resolve_device(config.device)
        self.dtype = compute_dtype(config.dtype, self.device)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.source = self._open_source()
        compact = CompactSource.open(self.source, self.source.array("lowres").shape[1], config.kernel_backend)
        self.upsampler = compact.upsampler(device=self.device, dtype=self.dtype)  # whole maps, every channel
        self._store = None
        self._done_in_shard = 0

    def ready(self) -> dict[str, Any]:
        """Answered once placed and loaded: its name, node and threads (as precompute's actors)."""
        return {"worker": self.name, "node_id": self.node.node_id, "node_ip": self.node.ip,
                "node_resources": {"CPU": self.node.cpus, "GPU": self.node.gpus, **self.node.custom},
                "decode_threads": 0, "write_threads": self.config.write_threads, "torch_threads": torch.get_num_threads()}

    def pid(self) -> int:
        return os.getpid()

    def progress(self) -> float:
        """Rows done so far in the shard being computed (0 between shards)."""
        return float(self._done_in_shard)

    def status(self) -> tuple[float, bool]:
        """(``progress()``, whether kernels are being compiled in the background), as precompute's actors answer."""
        from featup.ops.compiled import compiling

        return self.progress(), compiling()

    def store(self):
        """The full store, opened on first use inside this process."""
        if self._store is None:
            from pipeline.store.features import FeatureStore

            location = self.config.output_location
            self._store = FeatureStore.open(location.url, location.options, retry=self.config.retry)
        return self._store

    def _open_source(self):
        from pipeline.store.features import FeatureStore

        return FeatureStore.open(self.config.materialize_from, self.config.storage_options or None, mode="r",
                                 retry=self.config.retry)

    def process_shard(self, task: ShardTask) -> ShardResult:
        """Upsamples every valid row of the shard, writes the rows, then commits the shard with the compact store's index."""
        try:
            return self._process_shard(task)
        finally:
            self._done_in_shard = 0  # no shard in flight: progress() reads 0 until the next one starts

    def _process_shard(self, task: ShardTask) -> ShardResult:
        start = time.perf_counter()
        store = self.store()
        result = ShardResult(task.shard.index, task.shard.url, task.shard.num_samples, worker=self.name)
        table = self.source.read_shard_index(task.shard.index)
        rows = table.to_pylist()
        valid = [r["row"] for r in rows if r["status"] == "ok"]
        batches = [valid[i : i + self.config.batch_size] for i in range(0, len(valid), self.config.batch_size)]
        self._done_in_shard = len(rows) - len(valid)
        with RowWriter(store, self.config.write_threads) as writes, ThreadPoolExecutor(1, thread_name_prefix="read") as pool:
            ahead = pool.submit(self._read, batches[0]) if batches else None
            for k, batch in enumerate(batches):
                t = time.perf_counter()
                arrays = ahead.result()
                result.read_s += time.perf_counter() - t
                ahead = pool.submit(self._read, batches[k + 1]) if k + 1 < len(batches) else None
                t = time.perf_counter()
                arrays["features"] = self._upsample(arrays.pop("lowres"), arrays.pop("guidance"))
                result.model_s += time.perf_counter() - t
                writes.submit(result, batch, arrays)
                writes.wait(result)
                self._done_in_shard += len(batch)
            if not task.clean:
                self._zero_failed(store, [r["row"] for r in rows if r["status"] != "ok"], result)
            writes.wait(result, keep=0)
        t = time.perf_counter()
        self._check_lock(store)
        store.commit_shard(task.shard.index, table)
        result.write_s += time.perf_counter() - t
        _count(rows, result)
        result.wall_s = time.perf_counter() - start
        return result

    def _read(self, rows: list[int]) -> dict[str, np.ndarray]:
        """The compact rows' lowres and guidance image, and the arrays copied as they are (image, labels)."""
        from pipeline.store.access import store_call

        source = self.source
        names = ["lowres", "image", *(n for n in source.array_names if n not in ("lowres", "image"))]
        out = {}
        for name in names:
            value = store_call(self.config.retry, f"read rows {rows[0]}..{rows[-1]} of", f"{source.url}/{name}",
                               lambda a: np.asarray(a.oindex[rows]), source.array(name), writing=False)
            out["guidance" if name == "image" else name] = value
        if self.config.save_image:
            out["image"] = out["guidance"]
        return out

    @torch.inference_mode()
    def _upsample(self, lowres: np.ndarray, image: np.ndarray) -> np.ndarray:
        """(B, K, h, w) lowres and (B, S, S, 3) uint8 images -> (B, K, H, W) features in the storage dtype."""
        lr = torch.from_numpy(lowres).to(self.device)
        guide = torch.from_numpy(np.ascontiguousarray(image.transpose(0, 3, 1, 2))).to(self.device)
        feats = self.upsampler(lr, guide).to(TORCH_DTYPES[self.config.dtype])  # rounded to the dtype, as precompute does
        return feats.to(TORCH_DTYPES[self.config.storage_dtype], memory_format=torch.contiguous_format).cpu().numpy()

    def _zero_failed(self, store: Any, rows: list[int], result: ShardResult) -> None:
        """Zero-fills failed rows an earlier attempt may have written (rows never written read as zeros already)."""
        t = time.perf_counter()
        for row in rows:
            store.write_rows(row, {name: np.zeros((1, *store.array(name).shape[1:]), dtype=store.array(name).dtype)
                                   for name in store.array_names})
        result.write_s += time.perf_counter() - t

    def _check_lock(self, store: Any) -> None:
        from pipeline.store.features import StoreLockedError

        if self.run_id is not None and store.lock_holder() != self.run_id:
            raise StoreLockedError(f"store {store.url}: expected the lock of run {self.run_id} to commit, got run "
                                   f"{store.lock_holder()}")
