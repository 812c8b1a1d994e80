"""``train_jbu``: train the JBU upsampler on any backbone and WebDataset shards; checkpoints, resume, loss log, Ray Train.

One worker trains in this process; ``workers > 1`` trains data-parallel with Ray Train's ``TorchTrainer`` (gloo on
CPU, nccl on GPU): each worker reads its own shards (or samples), DDP averages the gradients, rank 0 writes the
checkpoint and the logs. Rerunning with an existing ``output`` resumes from its last checkpoint: same weights,
optimizer, random states and data position, so the result equals an uninterrupted run's.
"""

from __future__ import annotations

import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch
from torch import nn

from featup import __version__
from featup.errors import ConfigError, FeatUpError
from featup.objective import MultiViewConfig
from featup.training import JBUTrainingModel, TrainingSettings, make_optimizer, num_stages_for, training_step
from pipeline.train import checkpoint as ckpt
from pipeline.runtime.models import quiet_cpu_only_warnings
from pipeline.runtime.ray_session import ray_session
from pipeline.runtime.storage import Location
from pipeline.train.log import LOSS_TERMS, TrainProgress, csv_bytes, log_paths, plot_png
from pipeline.train.stream import ImageBatches, StreamPosition

# TrainConfig fields recorded in the checkpoint's settings that a resumed run must match.
SETTINGS_FIELDS = (
    "batch_size", "lr", "n_jitters", "max_pad", "max_zoom", "projection_dim", "crf_weight", "tv_weight", "downsampler",
    "predicted_uncertainty", "channel_norm", "clip_steps", "clip_norm", "key_dim", "seed", "workers", "image_key", "max_pixels",
)


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a ``train-jbu`` run; defaults are the published JBU training's. Validated at construction."""

    inputs: tuple[str, ...]
    backbone: str
    output: str
    weights: str = "auto"
    steps: int = 2000
    batch_size: int = 4
    image_size: int = 224
    lr: float = 1e-3
    n_jitters: int = 5
    max_pad: int = 20
    max_zoom: float = 2.0
    projection_dim: int | None = 30
    crf_weight: float = 0.001
    tv_weight: float = 0.0
    downsampler: str = "attention"
    predicted_uncertainty: bool = True
    channel_norm: bool = True
    clip_steps: int = 10
    clip_norm: float = 1e-4
    key_dim: int = 32
    stages: int | None = None  # None: the 2x stages closest to stride -> image size
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    workers: int = 1
    cpus_per_worker: float = 1.0
    device: str = "auto"
    address: str | None = None
    kernel_backend: str = "eager"
    decode_threads: int = 2
    image_key: str | None = None
    max_pixels: int = 64_000_000
    overwrite: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)  # may hold credentials: never in a repr
    output_location: Location = field(init=False, repr=False, compare=False)  # resolved once from output + options

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", (self.inputs,) if isinstance(self.inputs, str) else tuple(self.inputs))
        object.__setattr__(self, "storage_options", dict(self.storage_options))
        if not self.inputs or not all(isinstance(s, str) and s for s in self.inputs):
            raise ConfigError(f"inputs: expected one or more shard paths or URLs, got {list(self.inputs)!r}")
        for name in ("backbone", "output", "weights"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"--{name}: expected a non-empty string, got {getattr(self, name)!r}")
        object.__setattr__(self, "output_location", Location.resolve(self.output, self.storage_options))
        for name in ("steps", "batch_size", "image_size", "checkpoint_every", "log_every", "workers", "decode_threads", "max_pixels"):
            _positive_int(name, getattr(self, name))
        if self.stages is not None:
            _positive_int("stages", self.stages)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"--seed: expected an integer >= 0, got {self.seed!r}")
        if not isinstance(self.cpus_per_worker, (int, float)) or self.cpus_per_worker <= 0:
            raise ConfigError(f"--cpus-per-worker: expected a number > 0, got {self.cpus_per_worker!r}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ConfigError(f"--device: expected auto, cpu or cuda[:N], got {self.device!r}")
        _check_objective(self)
        self.settings()  # validates the optimisation settings

    def log_locations(self) -> tuple[Location, Location]:
        """Where the loss log (CSV) and its plot (PNG) are written: beside the checkpoint, reached the same way."""
        csv_path, png_path = log_paths(self.output)
        return Location(csv_path, self.output_location.options), Location(png_path, self.output_location.options)

    def objective(self) -> MultiViewConfig:
        return MultiViewConfig(n_jitters=self.n_jitters, max_pad=self.max_pad, max_zoom=float(self.max_zoom),
                               projection_dim=self.projection_dim, crf_weight=self.crf_weight, tv_weight=self.tv_weight)

    def settings(self) -> TrainingSettings:
        """The model-core settings of this run."""
        return TrainingSettings(
            objective=self.objective(), lr=self.lr, clip_steps=self.clip_steps, clip_norm=self.clip_norm,
            downsampler=self.downsampler, predicted_uncertainty=self.predicted_uncertainty,
            channel_norm=self.channel_norm, key_dim=self.key_dim, kernel_backend=self.kernel_backend,
        )


@dataclass
class TrainResult:
    """The finished run: its checkpoint, the step it reached, the loss log and where the logs are."""

    checkpoint: str
    steps: int
    losses: list[dict[str, float]]
    resumed_from: int = 0
    skipped: int = 0  # bad samples skipped over the whole training (every run and worker)
    loss_csv: str = ""
    loss_plot: str = ""
    wall_s: float = 0.0


@dataclass
class _Setup:
    """What the driver works out before training: backbone (CPU), shard URLs, hyper-parameters, a checkpoint to resume."""

    backbone: nn.Module
    shards: list[Any]  # ShardInfo of every input shard, with its storage options
    hyper_parameters: dict[str, Any]
    saved: dict[str, Any] | None


def train_jbu(config: TrainConfig, *, err: TextIO | None = None) -> TrainResult:
    """Train (or resume training) the JBU of ``config``; the progress line goes to ``err`` (default stderr)."""
    start = time.monotonic()
    err = err if err is not None else sys.stderr
    setup = prepare(config)  # inputs, backbone and sizes checked before anything is deleted
    if config.overwrite:
        ckpt.remove([config.output_location, *config.log_locations()])
    resumed_from = int(setup.saved[ckpt.TRAINING_KEY]["step"]) if setup.saved else 0
    if resumed_from >= config.steps:
        err.write(f"train-jbu: {config.output} is already trained to step {resumed_from} (--steps {config.steps})\n")
    elif config.workers == 1:
        from featup.devices import resolve_device

        _train_worker(config, setup, rank=0, world=1, device=resolve_device(config.device), err=err)
    else:
        _train_with_ray(config, err)
    return _result(config, resumed_from, time.monotonic() - start)


def prepare(config: TrainConfig) -> _Setup:
    """Build the backbone on the CPU, check the inputs and sizes, and check a checkpoint at ``output`` can be resumed."""
    from pipeline.runtime import preflight
    from pipeline.runtime.models import build_seeded_backbone
    from pipeline.runtime.retry import RetryPolicy
    from pipeline.runtime.secrets import mask_text
    from pipeline.sources.shards import expand_inputs, scan_shards

    preflight.check_output(config.output_location, RetryPolicy(), file=True)  # storage problems in one line, first
    preflight.check_inputs(config.inputs, config.storage_options, RetryPolicy())
    backbone = build_seeded_backbone(config.backbone, config.weights, config.seed)
    if config.image_size % backbone.stride:
        raise ConfigError(
            f"--image-size: expected a multiple of the stride {backbone.stride} of backbone {config.backbone!r}, got {config.image_size}"
        )
    urls = expand_inputs(config.inputs, config.storage_options)
    shards = scan_shards(urls, config.storage_options)  # every shard readable before anything starts
    lowres = config.image_size // backbone.stride
    stages = config.stages or num_stages_for(lowres, config.image_size)
    hp = {
        "backbone": config.backbone, "weights": config.weights, "weights_id": backbone.weights_id,
        "stride": backbone.stride, "dim": backbone.dim, "image_size": config.image_size, "lowres_size": lowres,
        "stages": stages, "mean": list(backbone.mean), "std": list(backbone.std), "steps": config.steps,
        "settings": {**{name: getattr(config, name) for name in SETTINGS_FIELDS}, "inputs": [mask_text(u) for u in urls]},
        "featup_version": __version__, "trained_by": "featup train-jbu",
    }
    saved = None if config.overwrite else ckpt.load_training_checkpoint(config.output_location)
    if saved is not None:
        ckpt.check_resume(config.output, saved, hp)
    return _Setup(backbone, shards, hp, saved)


def _check_objective(c: TrainConfig) -> None:
    """The objective's settings, named by their flags (MultiViewConfig checks them again)."""
    checks = (
        ("n_jitters", isinstance(c.n_jitters, int) and c.n_jitters >= 1, "an integer >= 1"),
        ("max_pad", isinstance(c.max_pad, int) and 0 <= c.max_pad < c.image_size, f"an integer >= 0 below --image-size {c.image_size}"),
        ("max_zoom", isinstance(c.max_zoom, (int, float)) and c.max_zoom >= 1, "a number >= 1"),
        ("projection_dim", c.projection_dim is None or (isinstance(c.projection_dim, int) and c.projection_dim >= 1), "none or an integer >= 1"),
        ("crf_weight", isinstance(c.crf_weight, (int, float)) and c.crf_weight >= 0, "a weight >= 0"),
        ("tv_weight", isinstance(c.tv_weight, (int, float)) and c.tv_weight >= 0, "a weight >= 0"),
    )
    for name, ok, expected in checks:
        value = getattr(c, name)
        if not ok or isinstance(value, bool):
            raise ConfigError(f"--{name.replace('_', '-')}: expected {expected}, got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"--{name.replace('_', '-')}: expected a positive integer, got {value!r}")


def _rank_seed(seed: int, rank: int) -> int:
    """The seed of one worker's objective generator and dropout (distinct per worker)."""
    return seed * 1_000_003 + rank


class _Run:
    """One worker's training state: the model (DDP-wrapped with several workers), optimizer, RNGs, step, data, log."""

    def __init__(self, config: TrainConfig, setup: _Setup, rank: int, world: int, device: torch.device) -> None:
        from pipeline.sources.decode import DecodeSpec

        self.config, self.setup, self.rank, self.world, self.device = config, setup, rank, world, device
        hp = setup.hyper_parameters
        self.settings = config.settings()
        self.backbone = setup.backbone.to(device).eval()
        self.model = JBUTrainingModel(hp["dim"], hp["stride"], config.image_size, self.settings, num_stages=hp["stages"],
                                      device=device, generator=torch.Generator().manual_seed(config.seed))
        self.optimizer = make_optimizer(self.model, self.settings)
        self.generator = torch.Generator().manual_seed(_rank_seed(config.seed, rank))
        self.step, self.position, self.losses, self.skipped_before = 0, StreamPosition(), [], 0
        if setup.saved is not None:
            self._restore(setup.saved)
        self.net = self._wrap(self.model)
        spec = DecodeSpec(image_size=config.image_size, stride=hp["stride"], mean=tuple(hp["mean"]), std=tuple(hp["std"]),
                          image_key=config.image_key, max_pixels=config.max_pixels)
        self.stream = ImageBatches(setup.shards, spec, config.batch_size, seed=config.seed, rank=rank, world=world,
                                   start=self.position,
                                   decode_threads=config.decode_threads)

    def _restore(self, saved: dict[str, Any]) -> None:
        state, mine = ckpt.training_state(saved, self.rank, self.world, self.config.output)
        self.model.load_official_state_dict(saved["state_dict"], f"checkpoint {self.config.output}")
        self.optimizer.load_state_dict(state["optimizer"])
        ckpt.restore_rng(mine, self.generator, self.device)
        self.step, self.position = int(state["step"]), StreamPosition.from_tensor(mine["position"])
        self.losses, self.skipped_before = [dict(row) for row in state["losses"]], int(state.get("skipped", 0))

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def train(self, err: TextIO) -> None:
        """Steps until ``config.steps``, logging every ``log_every`` and checkpointing every ``checkpoint_every``."""
        c, window = self.config, []
        progress = TrainProgress(c.steps, self.step, err if self.rank == 0 else None)
        batches = iter(self.stream)
        try:
            while self.step < c.steps:
                batch = next(batches)
                images = batch.images.to(self.device, non_blocking=True)  # (B, 3, S, S)
                window.append(training_step(self.net, self.optimizer, self.backbone, images, self.settings,
                                            step=self.step, generator=self.generator))
                self.step, self.position = self.step + 1, batch.position
                if self.step % c.log_every == 0 or self.step == c.steps:
                    self._log(window)
                    window = []
                progress.update(self.step, window[-1]["total"] if window else self.losses[-1]["total"])
                if self.step % c.checkpoint_every == 0 or self.step == c.steps:
                    self._checkpoint(final=self.step == c.steps)
        finally:
            batches.close()
            progress.update(self.step, self.losses[-1]["total"] if self.losses else math.nan)  # drawn once more by close()
            progress.close()

    def _log(self, window: list[dict[str, float]]) -> None:
        """One loss-log row: each term's mean over the steps since the last row, averaged over the workers."""
        means = torch.tensor([sum(w[t] for w in window) / len(window) for t in LOSS_TERMS], dtype=torch.float64)
        means = self._all_reduce_mean(means)
        self.losses.append({"step": self.step, **{t: float(v) for t, v in zip(LOSS_TERMS, means)}})
        if self.rank == 0:
            ckpt.write_file(self.config.log_locations()[0], csv_bytes(self.losses))

    def _checkpoint(self, final: bool) -> None:
        """Gather every worker's random state and position; rank 0 writes the checkpoint (and the plot)."""
        mine = ckpt.rng_state(self.generator, self.device, self.position.as_tensor())
        ranks = self._gather_states(mine)
        skipped = round(float(self._all_reduce_mean(torch.tensor([float(self.stream.skipped)], dtype=torch.float64))[0]) * self.world)
        if self.rank != 0:
            return
        payload = {
            "state_dict": self.model.official_state_dict(),
            "hyper_parameters": self.setup.hyper_parameters,
            ckpt.TRAINING_KEY: {
                "step": self.step, "optimizer": self.optimizer.state_dict(), "ranks": ranks,
                "losses": list(self.losses), "skipped": self.skipped_before + skipped, "world_size": self.world,
            },
        }
        ckpt.save_checkpoint(self.config.output_location, payload)
        if final or self.losses:
            ckpt.write_file(self.config.log_locations()[1], plot_png(self.losses))

    def _all_reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return values
        import torch.distributed as dist

        on = values.to(self._comm_device())
        dist.all_reduce(on)
        return on.cpu() / self.world

    def _gather_states(self, mine: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Every rank's ``mine`` (same shapes on all ranks), tensor by tensor: nothing is pickled."""
        if self.world == 1:
            return [mine]
        import torch.distributed as dist

        ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(self.world)]
        for key, value in mine.items():
            parts = [torch.empty_like(value, device=self._comm_device()) for _ in range(self.world)]
            dist.all_gather(parts, value.to(self._comm_device()))
            for r, part in enumerate(parts):
                ranks[r][key] = part.cpu()
        return ranks

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def _train_worker(config: TrainConfig, setup: _Setup, *, rank: int, world: int, device: torch.device, err: TextIO) -> None:
    """Train on this process: dropout draws from torch's global RNG, seeded here and restored afterwards."""
    quiet_cpu_only_warnings()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(_rank_seed(config.seed, rank))
        _Run(config, setup, rank, world, device).train(err)


def _ray_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker loop: prepare like the driver did, then train as rank ``world_rank``."""
    import ray.train
    import ray.train.torch

    config: TrainConfig = loop_config["config"]
    context = ray.train.get_context()
    device = ray.train.torch.get_device() if loop_config["use_gpu"] else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _train_worker(config, prepare(config), rank=context.get_world_rank(), world=context.get_world_size(), device=device,
                  err=sys.stderr)


def _train_with_ray(config: TrainConfig, err: TextIO) -> None:
    """Data-parallel training with Ray Train's TorchTrainer on the Ray of ``config.address`` (or a local one)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # Ray Train's own run records: a temp folder on a local Ray; its default (shared) location on a cluster.
    storage = None if config.address else tempfile.mkdtemp(prefix="featup-train-jbu-")
    try:
        with ray_session(config.address, math.ceil(config.workers * config.cpus_per_worker)):
            gpus = ray.cluster_resources().get("GPU", 0)
            use_gpu = config.device.startswith("cuda") or (config.device == "auto" and gpus >= config.workers)
            resources = {"CPU": config.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
            trainer = TorchTrainer(
                _ray_worker,
                train_loop_config={"config": config, "use_gpu": use_gpu},
                scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=use_gpu, resources_per_worker=resources),
                torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
                run_config=RunConfig(name="featup-train-jbu", storage_path=storage),
            )
            err.write(f"train-jbu: {config.workers} Ray Train workers ({'GPU, nccl' if use_gpu else 'CPU, gloo'})\n")
            try:
                trainer.fit()
            except Exception as exc:  # a worker's error arrives wrapped; say it in one line
                raise FeatUpError(f"train-jbu: the Ray Train workers failed: {_first_error_line(exc)}") from exc
    finally:
        if storage is not None:
            shutil.rmtree(storage, ignore_errors=True)


def _first_error_line(exc: BaseException) -> str:
    """The innermost error's message (Ray wraps a worker's exception in its own)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _result(config: TrainConfig, resumed_from: int, wall_s: float) -> TrainResult:
    """The result as recorded in the checkpoint (written by this process or by rank 0 of the Ray workers)."""
    saved = ckpt.load_training_checkpoint(config.output_location)
    if saved is None:
        raise ConfigError(f"--output {config.output}: expected the checkpoint of this run, got no file")
    state = saved[ckpt.TRAINING_KEY]
    csv_path, png_path = log_paths(config.output)
    return TrainResult(
        checkpoint=config.output, steps=int(state["step"]), losses=[dict(r) for r in state["losses"]],
        resumed_from=resumed_from, skipped=int(state.get("skipped", 0)), loss_csv=csv_path, loss_plot=png_path, wall_s=wall_s,
    )
