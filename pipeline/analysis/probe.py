"""Linear probes on stored features: a 1x1 conv head trained with Adam against a stored label array, and its scores.

The head is trained and scored at the feature resolution: a label array of another size is resized to the features'
size by nearest neighbour at pixel centres (labels are never interpolated). Classification pixels equal to
``ignore_index`` are left out of the loss and the scores; regression pixels that are not finite are left out.
The split is by key (a hash), so stores made from the same images (``--compare``) share it exactly.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from featup.errors import ConfigError, InputError
from pipeline.store.reader import FeatureReader

IGNORED = -100  # class id of pixels left out (cross_entropy's ignore_index)


@dataclass(frozen=True)
class ProbeConfig:
    """How a probe is trained: the label array, the task, the split and the optimiser."""

    target: str
    classes: int | None = None  # classification: labels in [0, classes) (or ignore_index)
    regression: bool = False  # regression: one output per label channel, RMSE
    val_fraction: float = 0.2
    epochs: int = 20
    lr: float = 0.01
    batch_size: int = 8
    workers: int = 0  # DataLoader workers reading the store
    ignore_index: int = 255
    seed: int = 0  # the shuffling order; the head starts at zero, so nothing else is random
    cache_bytes: int = 2 << 30  # the training split is kept in memory after the first epoch when it fits

    def __post_init__(self) -> None:
        if self.regression == (self.classes is not None):
            raise ConfigError(f"probe task: expected --classes K or --regression (exactly one), got classes={self.classes} "
                              f"and regression={self.regression}")
        if self.classes is not None and self.classes < 2:
            raise ConfigError(f"--classes: expected at least 2, got {self.classes}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction: expected a fraction strictly between 0 and 1, got {self.val_fraction}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"--lr: expected a positive learning rate, got {self.lr}")


class LinearProbe(nn.Module):
    """A linear head: fixed per-channel standardisation of the features, then a 1x1 conv (targets de-standardised)."""

    def __init__(self, channels: int, outputs: int, *, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(channels, outputs, 1, **kw)
        nn.init.zeros_(self.conv.weight)  # a convex problem: zero is a fine, deterministic start
        nn.init.zeros_(self.conv.bias)
        self.register_buffer("feature_mean", torch.zeros(channels, **kw))
        self.register_buffer("feature_std", torch.ones(channels, **kw))
        self.register_buffer("target_mean", torch.zeros(outputs, **kw))
        self.register_buffer("target_std", torch.ones(outputs, **kw))

    def standardized(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) features -> (B, O, H, W) logits, or standardised regression outputs.

        The standardisation is folded into the weights (``conv((x - m) / s)`` computed as ``(W / s) x + b - (W / s) m``),
        which spares two passes over the features.
        """
        w = self.conv.weight.flatten(1) / self.feature_std  # (O, C)
        b = self.conv.bias - w @ self.feature_mean  # (O,)
        out = torch.bmm(w.expand(x.shape[0], -1, -1), x.flatten(2)) + b.view(1, -1, 1)  # (B, O, H*W); x is not copied
        return out.view(x.shape[0], -1, *x.shape[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) features -> (B, O, H, W) logits or regression outputs in the label's units."""
        return self.standardized(x) * self.target_std.view(1, -1, 1, 1) + self.target_mean.view(1, -1, 1, 1)


@dataclass
class ProbeResult:
    """A trained head, its scores on the held-out split and how fast it trained."""

    head: LinearProbe
    metrics: dict[str, Any]


def split_positions(keys: Sequence[str], val_fraction: float) -> tuple[list[int], list[int]]:
    """(train, val) positions: the ``val_fraction`` of samples whose key hashes lowest are held out."""
    n_val = min(len(keys) - 1, max(1, round(len(keys) * val_fraction)))
    if n_val < 1:
        raise InputError(f"store samples: expected at least 2 valid samples to split, got {len(keys)}")
    order = sorted(range(len(keys)), key=lambda i: hashlib.sha256(keys[i].encode()).digest())
    return sorted(order[n_val:]), sorted(order[:n_val])


def train_probe(reader: FeatureReader, config: ProbeConfig, device: torch.device = torch.device("cpu")) -> ProbeResult:
    """Trains a LinearProbe on the training split of ``reader`` and scores it on the held-out split."""
    outputs = _check_target(reader, config)
    train, val = split_positions(reader.keys, config.val_fraction)
    dataset = reader.torch_dataset(arrays=[config.target])
    head = LinearProbe(reader.shapes["features"][0][0], outputs, device=device)
    data = _TrainingData(dataset, train, config, device)
    _fit_standardizers(head, data, config)
    optimizer = torch.optim.Adam(head.parameters(), lr=config.lr)  # its first construction imports torch._dynamo (~1.5 s)
    start, seen = time.perf_counter(), 0
    generator = torch.Generator().manual_seed(config.seed)
    for _ in range(config.epochs):
        for x, y, valid in data.batches(generator):
            loss = _loss(head, x, y, valid, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(x)
    elapsed = time.perf_counter() - start
    metrics = evaluate(head, dataset, val, config, device)
    pixels = math.prod(reader.shapes["features"][0][1:])
    held_out = "\n".join(sorted(reader.keys[i] for i in val))
    metrics.update(train_samples=len(train), val_samples=len(val), split_sha256=hashlib.sha256(held_out.encode()).hexdigest(),
                   epochs=config.epochs, train_seconds=elapsed,
                   train_samples_per_s=seen / elapsed, train_pixels_per_s=seen * pixels / elapsed,
                   cached=data.cache is not None, config=asdict(config))
    return ProbeResult(head.eval(), metrics)


@torch.no_grad()
def evaluate(head: LinearProbe, dataset, positions: Sequence[int], config: ProbeConfig, device: torch.device) -> dict[str, Any]:
    """Pixel accuracy, per-class IoU and mIoU (classification) or RMSE and MAE (regression) on ``positions``."""
    loader = DataLoader(Subset(dataset, list(positions)), batch_size=config.batch_size, num_workers=config.workers)
    outputs = head.conv.out_channels
    confusion = torch.zeros(outputs, outputs, dtype=torch.int64)
    sq, ab, count = torch.zeros(outputs, dtype=torch.float64), torch.zeros(outputs, dtype=torch.float64), 0
    for batch in loader:
        x = batch["features"].to(device)  # (B, C, H, W)
        y, valid = prepare_target(batch[config.target], batch["key"], x.shape[-2:], config)
        y, valid = y.to(device), valid.to(device)
        out = head(x)  # (B, O, H, W)
        if config.regression:
            err = (out - y).masked_fill(~valid.unsqueeze(1), 0.0).double()
            sq, ab, count = sq + err.square().sum((0, 2, 3)).cpu(), ab + err.abs().sum((0, 2, 3)).cpu(), count + int(valid.sum())
        else:
            confusion += confusion_matrix(out.argmax(1)[valid], y[valid], outputs).cpu()
    if config.regression:
        return regression_metrics(sq, ab, count)
    return segmentation_metrics(confusion)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    """(K, K) counts: entry [t, p] is the number of pixels of class t predicted as p."""
    return torch.bincount(target * classes + pred, minlength=classes * classes).view(classes, classes)


def segmentation_metrics(confusion: torch.Tensor) -> dict[str, Any]:
    """Pixel accuracy, IoU per class (None for a class neither present nor predicted) and their mean."""
    c = confusion.double()
    tp = c.diag()
    union = c.sum(0) + c.sum(1) - tp
    iou = [float(t / u) if u > 0 else None for t, u in zip(tp, union)]
    present = [v for v in iou if v is not None]
    total = float(c.sum())
    return {"accuracy": float(tp.sum()) / total if total else float("nan"),
            "miou": sum(present) / len(present) if present else float("nan"),
            "iou": iou, "val_pixels": int(total), "class_pixels": c.sum(1).long().tolist()}


def regression_metrics(sq: torch.Tensor, ab: torch.Tensor, count: int) -> dict[str, Any]:
    """RMSE and MAE over all valid pixels and channels, and RMSE per channel."""
    channels = len(sq)
    n = max(count, 1)
    return {"rmse": math.sqrt(float(sq.sum()) / (n * channels)), "mae": float(ab.sum()) / (n * channels),
            "rmse_per_channel": [math.sqrt(float(v) / n) for v in sq], "val_pixels": count}


def prepare_target(labels: torch.Tensor, keys: Sequence[str], size: Sequence[int], config: ProbeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels at the feature size and their valid mask: (B, H, W) long classes (IGNORED where not valid) or
    (B, D, H, W) floats (0 where not valid), and the mask (B, H, W)."""
    if config.regression:
        y = labels.float().unsqueeze(1) if labels.ndim == 3 else labels.float().permute(0, 3, 1, 2)  # (B, D, h, w)
        y = _resize_nearest(y, size)
        valid = torch.isfinite(y).all(1)
        return y.nan_to_num(0.0, 0.0, 0.0), valid
    if labels.ndim != 3:
        raise InputError(f"label array {config.target}: expected (H, W) class ids per sample, got {tuple(labels.shape[1:])}")
    if labels.is_floating_point():
        raise InputError(f"label array {config.target}: expected integer class ids, got {labels.dtype}; use --regression")
    labels = labels.long()
    bad = (labels != config.ignore_index) & ((labels < 0) | (labels >= config.classes))  # checked before resizing drops any
    if bad.any():
        b = int(bad.nonzero()[0, 0])
        raise InputError(f"label array {config.target} of sample {keys[b]}: expected classes in [0, {config.classes}) or "
                         f"{config.ignore_index} (ignored), got {int(labels[bad][0])}; check --classes")
    y = _resize_nearest(labels.unsqueeze(1), size).squeeze(1)  # (B, H, W)
    valid = y != config.ignore_index
    return y.masked_fill(~valid, IGNORED), valid


def _resize_nearest(y: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, D, h, w) -> (B, D, H, W) by nearest neighbour at pixel centres; unchanged when the size already matches."""
    if tuple(y.shape[-2:]) == tuple(size):
        return y
    dtype = y.dtype
    return F.interpolate(y.double(), size=tuple(size), mode="nearest-exact").to(dtype)


def _check_target(reader: FeatureReader, config: ProbeConfig) -> int:
    """The head's number of outputs, after checking the target array exists and fits the task."""
    if config.target not in reader.shapes or config.target in ("features", "lowres", "image"):
        labels = [n for n in reader.shapes if n not in ("features", "lowres", "image")]
        raise ConfigError(f"--target: expected a label array of the store ({', '.join(labels) or 'none stored'}), got {config.target!r}")
    shape, dtype = reader.shapes[config.target]
    if not config.regression:
        return config.classes
    if dtype.kind not in "fiu" or len(shape) not in (2, 3):
        raise ConfigError(f"--target {config.target}: expected a numeric (H, W) or (H, W, D) array for --regression, got {dtype} {shape}")
    return 1 if len(shape) == 2 else shape[2]


def _loss(head: LinearProbe, x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, config: ProbeConfig) -> torch.Tensor:
    """Mean cross-entropy over valid pixels, or mean squared error of standardised targets over valid pixels."""
    out = head.standardized(x)  # (B, O, H, W)
    if not config.regression:
        return F.cross_entropy(out, y, ignore_index=IGNORED)  # y holds IGNORED wherever it is not valid
    z = (y - head.target_mean.view(1, -1, 1, 1)) / head.target_std.view(1, -1, 1, 1)
    err = (out - z).square().mean(1)  # (B, H, W)
    return err[valid].mean() if valid.any() else err.sum() * 0.0


class _TrainingData:
    """Batches of the training split: read through a DataLoader, kept in memory after the first pass when they fit."""

    def __init__(self, dataset, positions: Sequence[int], config: ProbeConfig, device: torch.device) -> None:
        self.dataset, self.positions, self.config, self.device = dataset, list(positions), config, device
        shapes = dataset.reader.shapes
        feature_values = math.prod(shapes["features"][0]) * len(self.positions)
        target_bytes = (math.prod(shapes[config.target][0]) * 8 + math.prod(shapes["features"][0][1:])) * len(self.positions)
        # float32 when it fits (no conversion per step), else float16 (the stored values when they are float16)
        self.cache_dtype = next((dt for dt, size in ((torch.float32, 4), (torch.float16, 2))
                                 if feature_values * size + target_bytes <= config.cache_bytes), None)
        self.fits = self.cache_dtype is not None
        self.cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._parts, self._filled = None, 0

    def read(self, generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """One pass through the store: (features (B, C, H, W) on the device, target, valid mask)."""
        loader = DataLoader(Subset(self.dataset, self.positions), batch_size=self.config.batch_size,
                            shuffle=generator is not None, generator=generator, num_workers=self.config.workers)
        for batch in loader:
            x = batch["features"]
            y, valid = prepare_target(batch[self.config.target], batch["key"], x.shape[-2:], self.config)
            yield x.to(self.device), y.to(self.device), valid.to(self.device)

    def keep(self, x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor) -> None:
        """Copies one batch of the first pass into the cache (allocated once); float16 only while that is exact."""
        if not self.fits:
            return
        if self._filled == 0:
            n = len(self.positions)
            self._parts = (x.new_empty((n, *x.shape[1:]), dtype=self.cache_dtype), y.new_empty((n, *y.shape[1:])),
                           valid.new_empty((n, *valid.shape[1:])))
        if self.cache_dtype == torch.float16 and not torch.equal(x.half().float(), x):
            self.fits, self._parts = False, None  # not float16 values: streaming keeps them exact
            return
        for part, value in zip(self._parts, (x, y, valid)):
            part[self._filled : self._filled + len(x)] = value
        self._filled += len(x)
        if self._filled == len(self.positions):
            self.cache, self._parts = self._parts, None

    def batches(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """One shuffled epoch of batches, from memory when cached."""
        if self.cache is None:
            yield from self.read(generator)
            return
        x, y, valid = self.cache
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), self.config.batch_size):
            idx = order[i : i + self.config.batch_size].to(x.device)
            yield x[idx].float(), y[idx], valid[idx]  # .float() is free for a float32 cache


def _fit_standardizers(head: LinearProbe, data: _TrainingData, config: ProbeConfig) -> None:
    """Sets the head's feature (and regression target) mean and std from one pass over the training split."""
    stats = {"x": _Moments(), "y": _Moments()}
    for x, y, valid in data.read():
        stats["x"].add(x.transpose(0, 1).flatten(1))  # (C, B*H*W)
        if config.regression:
            stats["y"].add(y.transpose(0, 1)[:, valid])  # (D, valid pixels)
        data.keep(x, y, valid)
    head.feature_mean.copy_(stats["x"].mean())
    head.feature_std.copy_(stats["x"].std())
    if config.regression:
        head.target_mean.copy_(stats["y"].mean())
        head.target_std.copy_(stats["y"].std())


class _Moments:
    """Running per-row count, sum and sum of squares in float64."""

    def __init__(self) -> None:
        self.n, self.s, self.s2 = 0, 0.0, 0.0

    def add(self, rows: torch.Tensor) -> None:
        """Adds (D, n) values: n more samples of D variables."""
        self.n += rows.shape[1]
        self.s = self.s + rows.sum(1, dtype=torch.float64)
        self.s2 = self.s2 + rows.square().sum(1, dtype=torch.float64)

    def mean(self) -> torch.Tensor:
        return (self.s / max(self.n, 1)).float()

    def std(self) -> torch.Tensor:
        var = self.s2 / max(self.n, 1) - (self.s / max(self.n, 1)) ** 2
        return torch.as_tensor(var).clamp_min(0).sqrt().clamp_min(1e-6).float()


def save_head(result: ProbeResult, path: str) -> None:
    """Writes the head's weights and what it was trained on (loadable with ``torch.load(weights_only=True)``)."""
    head = result.head
    torch.save({"state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()},
                "channels": head.conv.in_channels, "outputs": head.conv.out_channels,
                "target": result.metrics["config"]["target"], "regression": result.metrics["config"]["regression"]}, path)


def load_head(path: str) -> LinearProbe:
    """A head written by ``save_head``, loaded strictly."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    head = LinearProbe(int(saved["channels"]), int(saved["outputs"]))
    head.load_state_dict(saved["state_dict"])
    return head.eval()
