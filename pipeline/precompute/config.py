"""``PrecomputeConfig``: every setting of a ``featup precompute`` job, validated once, frozen, picklable to Ray actors."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from featup.errors import ConfigError
from featup.upsampler_hub import KINDS as SUCCESSORS
from featup.upsampler_hub import resolve as resolve_upsampler
from pipeline.runtime.retry import DEFAULT_BUDGET_S, RetryPolicy
from pipeline.runtime.storage import Location
from pipeline.store.codecs import StorageCodec

DTYPES = ("float16", "bfloat16", "float32")
DEFAULT_MAX_ERRORS = 0.05  # --max-errors: 5% of all samples
# implicit: a network fitted to each image (slow); the successors (anyup, jafar, loftup, naf, uplift) run published weights
UPSAMPLERS = ("jbu", "bilinear", "implicit", *SUCCESSORS)
FEED_FORWARD = tuple(u for u in UPSAMPLERS if u != "implicit")  # one module for every image: what --compact stores
# --compact --channels K stores the K projected inputs: only where the projection commutes with the upsampler (the
# JBU's spatial stages, bilinear resizing, a successor whose kind says so)
PROJECTABLE = ("jbu", "bilinear", *(name for name, kind in SUCCESSORS.items() if kind.commutes_with_projection))
KERNEL_BACKENDS = ("auto", "compiled", "eager")  # JBU kernels: torch.compile'd or eager, same results
# zarr and numpy have no bfloat16: bfloat16 results are stored exactly as float32.
STORAGE_DTYPES = {"float16": "float16", "bfloat16": "float32", "float32": "float32"}

# Settings that decide what the store holds; a rerun must match them all to resume (resources do not count).
FINGERPRINT_FIELDS = (
    "backbone",
    "weights",
    "checkpoint",
    "upsampler",
    "image_size",
    "scale",
    "output_size",
    "dtype",
    "channels",
    "labels",
    "image_key",
    "save_image",
    "save_lowres",
    "max_pixels",
    "seed",
    "pca_images",
    "implicit",
    "codec",
    "quantize",
    "keep_bits",
    "compact",
)


@dataclass(frozen=True)
class PrecomputeConfig:
    """The settings of one precompute job; construction raises ConfigError naming the first bad setting."""

    inputs: tuple[str, ...]
    output: str
    backbone: str
    weights: str = "auto"
    checkpoint: str | None = None  # a successor without one gets its published weights (the name is filled in)
    upsampler: str = "jbu"
    image_size: int = 224
    scale: int | None = None
    output_size: int | None = None
    dtype: str = "float16"
    channels: int | None = None
    labels: tuple[str, ...] = ()
    image_key: str | None = None
    save_image: bool = False
    save_lowres: bool = False
    actors: int | str = 1  # or "auto": the actors that fit on the cluster's live nodes, growing as nodes join
    device: str = "auto"
    gpus_per_actor: float | None = None  # None: 1 when the actors' device is CUDA (auto on a GPU cluster), else 0
    cpus_per_actor: float | None = None  # None: resolved by with_machine_resources (the driver does it once)
    batch_size: int = 8
    decode_threads: int | None = 2  # None: sized per actor from its node (pipeline.precompute.pool.decode_threads_for)
    write_threads: int | None = None  # None: sized per actor (pool.write_threads_for); 0: rows written in the model's thread
    kernel_backend: str = "auto"  # "eager" skips the per-process torch.compile (seconds): best for tiny jobs
    address: str | None = None
    in_process: bool = False  # one worker in this process, no Ray (debugging, notebooks, small jobs); not with address
    # int: a count of failed samples; float in [0, 1]: a fraction of all samples; None: no limit. The default stops a
    # job whose failures point at a systematic problem (a wrong --labels or image key, a damaged shard set) rather
    # than the usual tail of unreadable files; a job in which no sample succeeded always fails.
    max_errors: int | float | None = DEFAULT_MAX_ERRORS
    io_retry_seconds: float = DEFAULT_BUDGET_S  # how long transient storage faults are retried before the job stops
    codec: str = "auto"  # lossless codec of the stored arrays (pipeline.store.codecs: auto = blosc-zstd for floats)
    quantize: str | None = None  # "int8": per sample and channel affine 8-bit feature codes (lossy, ~4x smaller)
    keep_bits: int | None = None  # float16 mantissa bits kept (1..10) before the lossless codec (lossy)
    tile: int | None = 64  # side of the spatial inner chunks of each sample's shard (crops read only their tiles)
    compact: bool = False  # store the upsampler's input (lowres + image) and the upsampler, not the features
    materialize_from: str | None = None  # featup materialize: the compact store whose features this job computes
    max_pixels: int = 64_000_000
    overwrite: bool = False
    dry_run: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)  # may hold credentials: never in a repr
    seed: int = 0  # random weights and the PCA sample are drawn from generators seeded with it
    pca_images: int = 32  # images whose low-res features the --channels PCA is fitted on
    implicit: Any = None  # ImplicitFitConfig (published defaults filled in) with --upsampler implicit, else None
    # Resolved once from ``output`` / ``checkpoint`` and ``storage_options``; every module reads these.
    output_location: Location = field(init=False, repr=False, compare=False)
    checkpoint_location: Location | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "storage_options", dict(self.storage_options))
        _check_inputs(self)
        # A successor's published weights by name (recorded in the store), a name of another kind refused.
        object.__setattr__(self, "checkpoint", resolve_upsampler(self.upsampler, self.checkpoint, self.backbone)[1])
        object.__setattr__(self, "output_location", Location.resolve(self.output, self.storage_options))
        checkpoint = None if self.checkpoint is None else Location.resolve(self.checkpoint, self.storage_options)
        object.__setattr__(self, "checkpoint_location", checkpoint)
        _check_model(self)
        _check_codec(self)
        _check_compact(self)
        _check_resources(self)
        _check_errors(self)

    def with_machine_resources(self, machine_cpus: int) -> PrecomputeConfig:
        """This config with ``cpus_per_actor`` resolved: an explicit value wins; a local run with ``--actors N`` gives
        each actor its share of the machine's CPUs (its torch threads equal that share); cluster runs and
        ``--actors auto`` keep 1 CPU per actor (GPU-based placement decides)."""
        if self.cpus_per_actor is not None:
            return self
        local_share = self.address is None and self.actors != "auto"
        cpus = max(1, machine_cpus // int(self.actors)) if local_share else 1
        return replace(self, cpus_per_actor=float(cpus))

    @property
    def storage_codec(self) -> StorageCodec:
        """How the store encodes its arrays: ``--codec``, ``--quantize``, ``--keep-bits`` and the crop tiles."""
        return StorageCodec(codec=self.codec, quantize=self.quantize, keep_bits=self.keep_bits, tile=self.tile)

    @property
    def retry(self) -> RetryPolicy:
        """How transient storage faults are retried (``--io-retry-seconds``), for every read and write of the job."""
        return RetryPolicy(budget_s=float(self.io_retry_seconds))

    @property
    def storage_dtype(self) -> str:
        """The numpy dtype name the features are stored in (bfloat16 is stored as float32, exactly)."""
        return STORAGE_DTYPES[self.dtype]

    def store_fingerprint(self) -> dict[str, Any]:
        """The settings that define the store's content (JSON-ready); a resumed run must match every one."""
        values = asdict(self)
        values["compact"] = True if self.compact else None  # None when unused, as in stores made before it existed
        return {name: list(values[name]) if isinstance(values[name], tuple) else values[name] for name in FINGERPRINT_FIELDS}

    def error_limit(self, total_samples: int) -> int | None:
        """The number of failed samples the job tolerates out of ``total_samples`` (None: no limit)."""
        if self.max_errors is None:
            return None
        if isinstance(self.max_errors, float):
            return math.floor(self.max_errors * total_samples)
        return self.max_errors

    def describe(self) -> dict[str, Any]:
        """The config as a JSON-ready dict for reports, with storage option values hidden (they may be secrets)."""
        values = {k: v for k, v in asdict(self).items() if not k.endswith("_location")}
        values["storage_options"] = {key: "***" for key in self.storage_options}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def parse_max_errors(text: str) -> int | float | None:
    """``--max-errors``: ``"10"`` (a count), ``"0.05"`` or ``"5%"`` (a fraction of all samples), ``"none"`` (no limit)."""
    value = text.strip()
    if value.lower() == "none":
        return None
    try:
        if value.endswith("%"):
            return _fraction(float(value[:-1]) / 100.0, text)
        if any(c in value for c in ".eE"):
            return _fraction(float(value), text)
        count = int(value)
    except ValueError:
        raise ConfigError(f"--max-errors: expected a count (10), a fraction (0.05) or a percentage (5%), got {text!r}") from None
    if count < 0:
        raise ConfigError(f"--max-errors: expected a count >= 0, got {count}")
    return count


def _fraction(value: float, text: str) -> float:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"--max-errors: expected a fraction between 0 and 1, got {text!r}")
    return float(value)


def _check_inputs(c: PrecomputeConfig) -> None:
    if not c.inputs or not all(isinstance(s, str) and s for s in c.inputs):
        raise ConfigError(f"inputs: expected one or more shard paths or URLs, got {list(c.inputs)!r}")
    if not isinstance(c.output, str) or not c.output:
        raise ConfigError(f"--output: expected a store path or URL, got {c.output!r}")


def _check_model(c: PrecomputeConfig) -> None:
    if c.upsampler not in UPSAMPLERS:
        raise ConfigError(f"--upsampler: expected one of {', '.join(UPSAMPLERS)}, got {c.upsampler!r}")
    if c.checkpoint is not None and c.upsampler not in ("jbu", *SUCCESSORS):
        raise ConfigError(f"--upsampler: expected jbu or one of {', '.join(SUCCESSORS)} with --checkpoint, got {c.upsampler!r}")
    _check_implicit(c)
    if c.kernel_backend not in KERNEL_BACKENDS:
        raise ConfigError(f"--kernel-backend: expected one of {', '.join(KERNEL_BACKENDS)}, got {c.kernel_backend!r}")
    if c.dtype not in DTYPES:
        raise ConfigError(f"--dtype: expected one of {', '.join(DTYPES)}, got {c.dtype!r}")
    if c.scale is not None and c.output_size is not None:
        raise ConfigError(f"--scale/--output-size: expected at most one of them, got --scale {c.scale} and --output-size {c.output_size}")
    for name in ("image_size", "scale", "output_size", "channels", "max_pixels", "pca_images"):
        _positive(name, getattr(c, name), optional=name in ("scale", "output_size", "channels"))
    for label in c.labels:
        if not label or label.startswith(".") or "/" in label:
            raise ConfigError(f"--labels: expected WebDataset extensions such as seg.png or depth.npy, got {label!r}")
    if len(set(c.labels)) != len(c.labels):
        raise ConfigError(f"--labels: expected distinct extensions, got {list(c.labels)}")
    reserved = {"features", "lowres", "image"}.intersection(c.labels)
    if reserved or (c.image_key is not None and c.image_key in c.labels):
        raise ConfigError(f"--labels: expected names other than the image and the stored arrays, got {sorted(reserved) or [c.image_key]}")


def _check_codec(c: PrecomputeConfig) -> None:
    """The storage codec settings, validated by building them (errors name the flag)."""
    codec = c.storage_codec
    if c.keep_bits is not None and c.storage_dtype != "float16":
        raise ConfigError(f"--keep-bits: expected --dtype float16 (it rounds float16 mantissas), got --dtype {c.dtype}")
    codec.check_features_dtype(c.storage_dtype)


def _check_compact(c: PrecomputeConfig) -> None:
    """--compact keeps the upsampler's input losslessly and the one upsampler that turns it into the features: any
    feed-forward upsampler, with a --channels projection only where the projection commutes with it."""
    if not c.compact:
        return
    if c.upsampler == "implicit":
        raise ConfigError(f"--compact: expected an upsampler shared by every image ({', '.join(FEED_FORWARD)}), got "
                          "--upsampler implicit: it fits a network to each image, so there is no one upsampler to store "
                          "with the inputs")
    if c.channels is not None and c.upsampler not in PROJECTABLE:
        raise ConfigError(f"--channels: expected it left out with --compact --upsampler {c.upsampler} (a projection commutes "
                          f"only with an upsampler linear in the features with weights shared by every channel: "
                          f"{', '.join(PROJECTABLE)}), got --channels {c.channels}")
    lossy = [flag for flag, value in (("--quantize", c.quantize), ("--keep-bits", c.keep_bits)) if value is not None]
    if lossy:
        raise ConfigError(f"--compact: expected no lossy option (it stores the upsampler's input exactly), got {' and '.join(lossy)}")
    if c.save_lowres:
        raise ConfigError("--save-lowres: expected it left out with --compact, got both: a compact store's lowres array "
                          "holds the upsampler's input already")


def _check_implicit(c: PrecomputeConfig) -> None:
    """The per-image fit settings: an ImplicitFitConfig (or its dict) with --upsampler implicit, None otherwise."""
    if c.upsampler != "implicit":
        if c.implicit is not None:
            raise ConfigError(f"--implicit-*: expected --upsampler implicit with implicit fit settings, got --upsampler {c.upsampler}")
        return
    from featup.upsamplers.implicit_fit import ImplicitFitConfig  # torch: only for implicit jobs

    value = c.implicit if c.implicit is not None else ImplicitFitConfig()
    if isinstance(value, dict):
        value = ImplicitFitConfig(**value)
    if not isinstance(value, ImplicitFitConfig):
        raise ConfigError(f"implicit: expected an ImplicitFitConfig or None, got {type(value).__name__}")
    object.__setattr__(c, "implicit", value)


def _check_resources(c: PrecomputeConfig) -> None:
    if isinstance(c.actors, str):
        if c.actors != "auto":
            raise ConfigError(f"actors: expected a positive integer or auto, got {c.actors!r}")
    else:
        _positive("actors", c.actors)
    _check_in_process(c)
    _positive("batch_size", c.batch_size)
    _positive("decode_threads", c.decode_threads, optional=True)
    w = c.write_threads
    if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 0):
        raise ConfigError(f"--write-threads: expected an integer >= 0, got {w!r}")
    g = c.gpus_per_actor
    if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or g < 0):
        raise ConfigError(f"--gpus-per-actor: expected a number >= 0, got {g!r}")
    r = c.io_retry_seconds
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < math.inf:
        raise ConfigError(f"--io-retry-seconds: expected a number of seconds >= 0, got {r!r}")
    if c.cpus_per_actor is not None and (isinstance(c.cpus_per_actor, bool) or not isinstance(c.cpus_per_actor, (int, float))
                                         or c.cpus_per_actor <= 0):
        raise ConfigError(f"--cpus-per-actor: expected a number > 0, got {c.cpus_per_actor!r}")
    if c.device != "auto" and c.device != "cpu" and not c.device.startswith("cuda"):
        raise ConfigError(f"--device: expected auto, cpu or cuda[:N], got {c.device!r}")
    if c.device.startswith("cuda") and g == 0:
        raise ConfigError(f"--gpus-per-actor: expected a number > 0 with --device {c.device}, got 0")


def _check_in_process(c: PrecomputeConfig) -> None:
    """``in_process`` computes in the driver's process with one worker: no cluster, no more actors."""
    if not isinstance(c.in_process, bool):
        raise ConfigError(f"--in-process: expected True or False, got {c.in_process!r}")
    if not c.in_process:
        return
    if c.address is not None:
        raise ConfigError(
            f"--in-process: expected no --address (it computes in this process, without Ray), got --address {c.address}")
    if c.actors != 1:
        raise ConfigError(f"--in-process: expected --actors 1 (one worker in this process), got --actors {c.actors}")


def _check_errors(c: PrecomputeConfig) -> None:
    m = c.max_errors
    if m is None:
        return
    if isinstance(m, bool) or not isinstance(m, (int, float)):
        raise ConfigError(f"--max-errors: expected a count or a fraction, got {m!r}")
    if isinstance(m, int) and m < 0:
        raise ConfigError(f"--max-errors: expected a count >= 0, got {m}")
    if isinstance(m, float) and not 0.0 <= m <= 1.0:
        raise ConfigError(f"--max-errors: expected a fraction between 0 and 1, got {m}")


def _positive(name: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name.replace('_', '-')}: expected a positive integer, got {value!r}")
