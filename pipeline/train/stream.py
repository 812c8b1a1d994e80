"""Endless batches of training images from WebDataset shards, with a resumable position; decoded as ``precompute`` does.

Each epoch visits this worker's shards in an order drawn from ``(seed, epoch)``, samples in tar order. With more
workers than shards every worker reads every shard and keeps every ``world``-th sample; otherwise it takes every
``world``-th shard: either way the workers' data are disjoint. Each batch carries the position just after its last
sample, so a run resumed from a checkpoint reads exactly the batches the interrupted run would have read next.
Bad samples are skipped and counted (their payloads are never unpickled: see ``pipeline.sources.decode``).
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from featup.errors import InputError
from pipeline.runtime.storage import Location

@dataclass(frozen=True)
class StreamPosition:
    """Where a stream is: ``sample`` raw samples of the ``shard``-th shard of epoch ``epoch``'s order are consumed."""

    epoch: int = 0
    shard: int = 0
    sample: int = 0

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.epoch, self.shard, self.sample], dtype=torch.int64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> StreamPosition:
        epoch, shard, sample = (int(v) for v in t.tolist())
        return cls(epoch, shard, sample)


@dataclass
class ImageBatch:
    """``batch_size`` normalised images (B, 3, S, S), their keys, the stream position after them, samples skipped so far."""

    images: torch.Tensor
    keys: list[str]
    position: StreamPosition
    skipped: int


def worker_split(urls: Sequence[Any], rank: int, world: int) -> tuple[list[Any], int, int]:
    """This worker's shards and its sample split (keep sample i of a shard when ``i % every == offset``)."""
    if world <= len(urls):
        return list(urls[rank::world]), 0, 1
    return list(urls), rank, world


def epoch_order(num_shards: int, epoch: int, seed: int) -> list[int]:
    """The shard order of an epoch: a permutation drawn from ``(seed, epoch)``."""
    return np.random.default_rng([seed, epoch]).permutation(num_shards).tolist()


class ImageBatches:
    """Iterates ``ImageBatch``es forever from ``start``; a background thread reads and decodes ahead (``prefetch`` batches)."""

    def __init__(
        self,
        shards: Sequence[Any],  # URLs (no storage options) or ShardInfo / Location (url + resolved options), in order
        spec: Any,  # pipeline.decode.DecodeSpec
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world: int = 1,
        start: StreamPosition = StreamPosition(),
        decode_threads: int = 2,
        prefetch: int = 2,
    ) -> None:
        located = [Location(s) if isinstance(s, str) else s for s in shards]
        self.shards, self.offset, self.every = worker_split(located, rank, world)
        self.spec, self.batch_size, self.seed = spec, batch_size, seed
        self.start = start
        self.decode_threads, self.prefetch = decode_threads, prefetch
        self.skipped = 0  # bad samples (and broken shard ends) seen by this stream
        self.good = 0
        self.reasons: dict[str, int] = {}

    def __iter__(self) -> Iterator[ImageBatch]:
        out: queue.Queue = queue.Queue(self.prefetch)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(out, stop), name="train-images", daemon=True)
        thread.start()
        try:
            while True:
                item = out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    out.get_nowait()
                except queue.Empty:
                    thread.join(0.05)

    def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
        from pipeline.sources.decode import decode_sample

        try:
            pending: list[tuple[Any, StreamPosition]] = []  # decoded samples waiting for a batch
            with ThreadPoolExecutor(self.decode_threads, thread_name_prefix="train-decode") as pool:
                for chunk in self._raw_chunks():
                    decoded = pool.map(lambda raw: decode_sample(raw, self.spec), [raw for raw, _ in chunk])
                    for sample, (_, pos) in zip(decoded, chunk):
                        if hasattr(sample, "image"):
                            pending.append((sample, pos))
                            self.good += 1
                        else:
                            self._skip(sample.reason)
                    while len(pending) >= self.batch_size:
                        batch, pending = pending[: self.batch_size], pending[self.batch_size :]
                        images = torch.stack([sample.image for sample, _ in batch])  # (B, 3, S, S)
                        item = ImageBatch(images, [sample.key for sample, _ in batch], batch[-1][1], self.skipped)
                        if not _put(out, item, stop):
                            return
        except BaseException as exc:  # handed to the consumer, which raises it
            _put(out, exc, stop)

    def _skip(self, reason: str) -> None:
        """Count a bad sample (or the rest of a broken shard) under its reason."""
        self.skipped += 1
        key = reason if reason in self.reasons or len(self.reasons) < 20 else "other reasons"
        self.reasons[key] = self.reasons.get(key, 0) + 1

    def _raw_chunks(self) -> Iterator[list[tuple[dict, StreamPosition]]]:
        """This worker's raw samples with the position after each, in chunks of ``batch_size``, epoch after epoch."""
        chunk: list[tuple[dict, StreamPosition]] = []
        position = self.start
        while True:
            whole_epoch, good_before, produced = position.shard == 0 and position.sample == 0, self.good, False
            order = epoch_order(len(self.shards), position.epoch, self.seed)
            for shard_pos in range(position.shard, len(order)):
                skip = position.sample if shard_pos == position.shard else 0
                for raw, pos in self._shard_samples(self.shards[order[shard_pos]], position.epoch, shard_pos, skip):
                    chunk.append((raw, pos))
                    produced = True
                    if len(chunk) == self.batch_size:
                        yield chunk
                        chunk = []
            if chunk:
                yield chunk  # the producer decodes it before asking for more, so the check below sees it
                chunk = []
            if whole_epoch and self.good == good_before:
                self._refuse(produced)
            position = StreamPosition(position.epoch + 1, 0, 0)

    def _refuse(self, produced: bool) -> None:
        """A whole epoch gave no usable image: stop instead of looping forever."""
        if not produced:
            raise InputError(f"inputs: expected samples in the {len(self.shards)} shard(s) of this worker, got none")
        listing = "; ".join(f"{n} x {reason}" for reason, n in list(self.reasons.items())[:5])
        raise InputError(f"inputs: expected decodable images, got {self.skipped} bad samples and none usable ({listing})")

    def _shard_samples(self, shard: Any, epoch: int, shard_pos: int, skip: int) -> Iterator[tuple[dict, StreamPosition]]:
        """Raw samples of one shard after the first ``skip``, this worker's only, with the position after each."""
        from pipeline.sources.shards import iter_shard_samples

        for i, raw in enumerate(iter_shard_samples(shard.url, shard.options)):
            if raw.get("__key__") is None:  # the shard broke: its remaining samples cannot be read
                self._skip(str(raw.get("__error__", "unreadable shard")))
                return
            if i < skip or i % self.every != self.offset:
                continue
            yield raw, StreamPosition(epoch, shard_pos, i + 1)


def _put(out: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put ``item`` unless the consumer has stopped; False when it has."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False
