"""The plan of a precompute job, made on the driver before any actor starts: shards, row layout, arrays, attributes, PCA."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import fsspec
import numpy as np
import torch

from featup import __version__
from featup.errors import ConfigError, InputError
from pipeline.precompute.config import FINGERPRINT_FIELDS, PrecomputeConfig
from pipeline.precompute.extract import FeatureExtractor, Projection
from pipeline.precompute.inputs import shards_sha256
from pipeline.runtime.progress import format_duration, human_bytes
from pipeline.runtime.secrets import mask_argv, mask_json
from pipeline.runtime.storage import Location

if TYPE_CHECKING:
    from featup.upsamplers.implicit_fit import FitTiming

# Attributes a resumed run must match besides the config fingerprint: the inputs' layout and the exact model (the
# shards themselves, ``shards_sha256``, are checked by ``pipeline.precompute.inputs.check_inputs``, which names them).
LAYOUT_KEYS = ("num_shards", "num_rows", "backbone_weights", "checkpoint_sha256", "feature_channels")
COMPAT_KEYS = (*FINGERPRINT_FIELDS, *LAYOUT_KEYS)
BROKEN_KEY = ""  # key of the placeholder row that records an unreadable or truncated shard in the index
QUICK_FIT_STEPS = 2  # implicit fits in the plan's measurements (bytes on disk) are this short
MAX_SCANNED_FACTOR = 10  # sampling for labels/PCA reads at most this many raw samples per image it needs (+100)


@dataclass
class Plan:
    """Everything fixed before the run: shards in order, the first row of each, the arrays and the store attributes."""

    config: PrecomputeConfig
    shards: list  # list[pipeline.shards.ShardInfo], in input order
    offsets: list[int]  # first row of each shard: prefix sums of the sample counts
    arrays: list  # list[pipeline.store.ArraySpec]
    attrs: dict[str, Any]
    extractor: FeatureExtractor  # the driver's own copy, on the CPU: shapes, PCA fitting, the dry-run estimate
    spec: Any  # pipeline.decode.DecodeSpec
    # shard index -> {position in the shard: reason} for the second and later occurrences of a key
    duplicates: dict[int, dict[int, str]] = field(default_factory=dict)
    encode_rate: float | None = None  # MB/s of raw arrays one core encodes (measured by estimate_bytes)
    projection: Projection | None = None  # a --channels projection known before the run (materialize: the source's)
    rows: int | None = None  # rows of the store when the shards do not cover them all (materialize: committed ones only)
    row_keys: list[str] | None = None  # the key of every row in that case

    @property
    def num_duplicates(self) -> int:
        return sum(len(found) for found in self.duplicates.values())

    @property
    def num_rows(self) -> int:
        if self.rows is not None:
            return self.rows
        return self.offsets[-1] + self.shards[-1].num_samples if self.shards else 0


def make_plan(config: PrecomputeConfig, command_line: Sequence[str] = ()) -> Plan:
    """Expands and scans the inputs (missing shards fail here), loads the model on the CPU and lays out the store."""
    from pipeline.sources.shards import expand_inputs

    urls = expand_inputs(config.inputs, config.storage_options, retry=config.retry)
    shards = scan_inputs(urls, config.storage_options, retry=config.retry)
    offsets = np.concatenate([[0], np.cumsum([s.num_samples for s in shards])[:-1]]).astype(int).tolist() if shards else []
    extractor = FeatureExtractor(replace(config, kernel_backend="eager"), device="cpu")  # runs once at most: no compile
    extractor.check_sizes()  # a successor refuses sizes it cannot take here, not once per sample
    if config.channels is not None and config.channels > extractor.backbone.dim:
        raise ConfigError(f"--channels: expected at most the backbone's {extractor.backbone.dim} channels, got {config.channels}")
    spec = decode_spec(config, extractor)
    plan = Plan(config, shards, offsets, [], {}, extractor, spec, find_duplicates(shards))
    plan.arrays = array_specs(plan, label_shapes(plan))
    plan.attrs = store_attrs(plan, command_line)
    return plan


def plan_keys(plan: Plan) -> list[str]:
    """Every row's sample key in row order (a broken shard's placeholder row has the empty key)."""
    if plan.row_keys is not None:
        return list(plan.row_keys)
    return [key for shard in plan.shards for key in shard.keys]


def find_duplicates(shards: Sequence[Any]) -> dict[int, dict[int, str]]:
    """The second and later occurrences of every key, in input order, as error reasons naming the first shard.

    They become error rows (never served), so that one key names one stored sample whatever the input holds.
    """
    first: dict[str, str] = {}
    found: dict[int, dict[int, str]] = {}
    for shard in shards:
        for position, key in enumerate(shard.keys):
            if key == BROKEN_KEY:
                continue
            if key in first:
                found.setdefault(shard.index, {})[position] = f"duplicate key, first seen in shard {first[key]}"
            else:
                first[key] = shard.url
    return found


def scan_inputs(urls: Sequence[str], storage_options: dict[str, Any], max_workers: int = 8, retry: Any = None) -> list:
    """Counts every shard's samples in threads; refuses missing shards (all listed), keeps unreadable ones as errors.

    A shard that exists but cannot be read, or whose tar breaks, gets one extra placeholder row (key "") so that
    the index records it with its reason; its samples before the break keep their rows. Missing shards and shards
    this job may not read (access denied: credentials, not data) stop the job before anything starts; transient
    faults are retried by the scan and raise TransientIOError once the budget is spent.
    """
    with ThreadPoolExecutor(max(1, min(max_workers, len(urls))), thread_name_prefix="scan") as pool:
        locations = [Location.resolve(url, storage_options) for url in urls]
        results = list(pool.map(lambda il: _scan_one(il[1].url, il[0], il[1].options, retry), enumerate(locations)))
    missing = [r for r in results if isinstance(r, str)]
    if missing:
        listing = "\n".join(f"  {m}" for m in missing)
        raise InputError(f"inputs: expected {len(urls)} existing, readable shards, got {len(missing)} missing or unreadable:\n{listing}")
    return results


def _scan_one(url: str, index: int, options: dict[str, Any], retry: Any = None):
    """The ShardInfo of one shard (with a placeholder row if it is broken), or a message if it does not exist."""
    from pipeline.sources.shards import ShardInfo, scan_shard

    try:
        info = scan_shard(url, index, options, retry=retry)
    except InputError as e:
        refusal = str(e) if "access denied" in str(e) else _refusal(url, options)
        if refusal is not None:
            return refusal
        return ShardInfo(url, index, 1, (BROKEN_KEY,), error=str(e), options=options)
    if info.error is not None:
        return replace(info, num_samples=info.num_samples + 1, keys=(*info.keys, BROKEN_KEY))
    return info


def _refusal(url: str, options: dict[str, Any]) -> str | None:
    """Why a shard that failed its scan stops the job (missing, or access denied), or None if it is just broken."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
        if fs.exists(path):
            fs.info(path)  # existence can be listed where reading is denied
            return None
        return f"shard {url}: no such file or object"
    except PermissionError as e:
        return f"shard {url}: access denied ({type(e).__name__}: {e})"
    except Exception as e:  # no access at all: the job must not start
        return f"shard {url}: cannot be reached ({type(e).__name__}: {e})"


def decode_spec(config: PrecomputeConfig, extractor: FeatureExtractor):
    """How samples are decoded for this config and backbone (the workers build the same one)."""
    from pipeline.sources.decode import DecodeSpec

    backbone = extractor.backbone
    return DecodeSpec(
        image_size=config.image_size,
        stride=backbone.stride,
        mean=tuple(backbone.mean),
        std=tuple(backbone.std),
        image_key=config.image_key,
        labels=tuple(config.labels),
        max_pixels=config.max_pixels,
        keep_image=config.save_image or config.compact,
    )


def label_shapes(plan: Plan) -> dict[str, tuple[tuple[int, ...], str]]:
    """Per-row shape and dtype of each ``--labels`` array, taken from the first sample that decodes with all labels."""
    if not plan.config.labels:
        return {}
    found = sample_decoded(plan, 1)
    if not found:
        raise ConfigError(
            f"--labels {','.join(plan.config.labels)}: expected a sample with a decodable image and every label, "
            "got none in the samples read"
        )
    return {name: (tuple(value.shape), value.dtype.name) for name, value in found[0].labels.items()}


def array_specs(plan: Plan, labels: dict[str, tuple[tuple[int, ...], str]]) -> list:
    """The stored arrays; dimension names are shared only between axes of equal size (so xarray opens the store)."""
    from pipeline.store.features import ArraySpec

    from pipeline.store.quantize import quant_attrs

    dims = {"features": ("channel", "y", "x"), "lowres": ("channel", "lowres_y", "lowres_x")}
    quantized = plan.config.quantize is not None
    specs = []
    for name, (shape, dtype) in plan.extractor.array_shapes().items():
        if name in dims:  # features / lowres: (C, H, W), int8 codes with their per-channel scale and offset if quantized
            specs.append(ArraySpec(name, shape, dtype, dims[name], spatial_axes=(1, 2), codes=quantized,
                                   attributes=quant_attrs(name) if quantized else None))
        else:  # f"{name}_scale" / f"{name}_offset": (C,) float32 per row
            specs.append(ArraySpec(name, shape, dtype, ("channel",)))
    s = plan.config.image_size
    if plan.config.save_image or plan.config.compact:  # compact: the guidance image, stored losslessly
        # A compact row's image is one chunk: a crop is upsampled from a window of it anyway, and one chunk writes in a
        # quarter of the time of 16 tiles and their shard index (1.9 against 8.1 ms per 224 image on one core).
        tiles = None if plan.config.compact else (0, 1)
        specs.append(ArraySpec("image", (s, s, 3), "uint8", ("image_y", "image_x", "rgb"), spatial_axes=tiles))
    for name, (shape, dtype) in labels.items():
        extra = tuple(f"{name.replace('.', '_')}_{i}" for i in range(2, len(shape)))
        specs.append(ArraySpec(name, shape, dtype, ("image_y", "image_x", *extra), spatial_axes=(0, 1)))
    return specs


def store_attrs(plan: Plan, command_line: Sequence[str]) -> dict[str, Any]:
    """The store's provenance attributes: the config fingerprint, the inputs' layout and the model that made it.

    Credentials never reach them: the command line and every URL are masked (``pipeline.runtime.secrets``).
    """
    provenance = plan.extractor.provenance()
    return mask_json({
        **plan.config.store_fingerprint(),
        "num_shards": len(plan.shards),
        "num_rows": plan.num_rows,
        "shards_sha256": shards_sha256(plan.shards),  # URLs, sample counts and content identities (size, ETag or mtime)
        **provenance,
        "output_size": list(plan.extractor.output_size),
        "lowres_size": list(plan.extractor.lowres_size),
        "feature_channels": plan.config.channels or provenance["backbone_dim"],
        "storage_dtype": plan.config.storage_dtype,
        "featup_version": __version__,
        "command_line": mask_argv(command_line),
        "created_at": datetime.now(timezone.utc).isoformat(),
        "pca": None,
    })


def sample_decoded(plan: Plan, count: int) -> list:
    """Up to ``count`` good decoded samples spread evenly over the shards (the first ones of evenly spaced shards)."""
    from pipeline.sources.decode import decode_sample
    from pipeline.sources.shards import iter_shard_samples

    shards = [s for s in plan.shards if s.num_samples]
    picks = sorted({round(i * (len(shards) - 1) / max(count - 1, 1)) for i in range(min(count, len(shards)))})
    order = [shards[i] for i in picks] + [s for i, s in enumerate(shards) if i not in picks]
    quota, budget, found = math.ceil(count / max(len(picks), 1)), MAX_SCANNED_FACTOR * count + 100, []
    for shard in order:
        taken = 0
        for raw in iter_shard_samples(shard.url, shard.options, retry=plan.config.retry):
            budget -= 1
            if raw.get("__key__") is None or budget < 0:
                break
            sample = decode_sample(raw, plan.spec)
            if hasattr(sample, "image"):
                found.append(sample)
                taken += 1
            if taken == quota or len(found) == count:
                break
        if len(found) == count or budget < 0:
            break
    return found


def fit_projection(plan: Plan) -> Projection:
    """The ``--channels`` PCA, fitted on the low-res features of ``pca_images`` samples with a seeded generator."""
    from featup.pca import fit_pca

    samples = sample_decoded(plan, plan.config.pca_images)
    if not samples:
        raise ConfigError("--channels: expected decodable images to fit the PCA on, got none in the samples read")
    feats = [plan.extractor.lowres(torch.stack([s.image for s in samples[i : i + 8]])) for i in range(0, len(samples), 8)]
    generator = torch.Generator().manual_seed(plan.config.seed)
    pca = fit_pca(torch.cat(feats), plan.config.channels, max_samples=100_000, generator=generator)
    return Projection.from_pca(pca)


def estimate_bytes(plan: Plan) -> dict[str, tuple[int, float | None]]:
    """Per array: (uncompressed bytes, stored/raw ratio measured on one real sample with the store's own codec and
    layout, or None without a decodable sample); ``plan.encode_rate`` gets the encode speed of one core in MB/s."""
    found = sample_decoded(plan, 1)
    measured: dict[str, np.ndarray] = {}
    if found:
        with _quick_implicit(plan.extractor):  # an implicit fit's compression, measured on a short fit
            measured = plan.extractor(found[0].image.unsqueeze(0))
        if plan.config.save_image or plan.config.compact:
            measured["image"] = found[0].image_uint8[None]
        measured.update({name: value[None] for name, value in found[0].labels.items()})
    out, encoded_bytes, encode_s = {}, 0, 0.0
    for spec in plan.arrays:
        raw = plan.num_rows * math.prod(spec.shape_per_row) * np.dtype(spec.dtype).itemsize
        ratio = None
        if spec.name in measured:
            row = np.ascontiguousarray(measured[spec.name][:1].astype(spec.dtype))  # (1, ...)
            stored, seconds = _encoded_size(spec, row, plan.config.storage_codec)
            ratio = stored / max(row.nbytes, 1)
            encoded_bytes, encode_s = encoded_bytes + row.nbytes, encode_s + seconds
        out[spec.name] = (raw, ratio)
    plan.encode_rate = encoded_bytes / encode_s / 1e6 if encode_s > 0 else None
    return out


def _encoding(c: PrecomputeConfig) -> str:
    return ", ".join(filter(None, [f"codec {c.codec}", c.quantize and f"quantize {c.quantize}",
                                   c.keep_bits and f"keep {c.keep_bits} bits", c.tile and f"tiles of {c.tile}"]))


def _raw_per_sample(plan: Plan) -> float:
    return sum(math.prod(spec.shape_per_row) * np.dtype(spec.dtype).itemsize for spec in plan.arrays)


def _encoded_size(spec: Any, row: np.ndarray, codec: Any) -> tuple[int, float]:
    """Bytes one row takes in an in-memory Zarr array laid out and encoded as the store will, and the seconds it took."""
    import time

    import numcodecs.blosc
    import zarr

    layout = codec.array_kwargs(spec.dtype, spec.shape_per_row, spec.spatial_axes, codes=spec.codes)
    memory = zarr.storage.MemoryStore()
    array = zarr.create_array(memory, shape=row.shape, dtype=spec.dtype, fill_value=0, **layout)
    threads = numcodecs.blosc.get_nthreads()
    numcodecs.blosc.set_nthreads(1)  # one core's rate: what one encoding thread of an actor does
    try:
        with zarr.config.set({"async.concurrency": 1, "threading.max_workers": 1}):
            start = time.perf_counter()
            array[...] = row
            seconds = time.perf_counter() - start
    finally:
        numcodecs.blosc.set_nthreads(threads)
    stored = sum(len(v.to_bytes()) for k, v in memory._store_dict.items() if not k.endswith("zarr.json"))
    return stored, seconds


def format_plan(plan: Plan, estimate: dict[str, tuple[int, float | None]], committed: set[int] | None = None) -> str:
    """The dry-run report: shards, samples, arrays with shapes and dtypes, and the estimated bytes on disk."""
    c, e = plan.config, plan.extractor
    todo = [s for s in plan.shards if not committed or s.index not in committed]
    state = "(new store)" if committed is None else f"(existing store: {len(committed)} shards committed, {len(todo)} to compute)"
    lines = [
        "featup precompute plan (dry run: nothing is computed or written)",
        f"  inputs: {len(plan.shards)} shards, {plan.num_rows} samples"
        + (f" ({plan.num_duplicates} duplicate keys, recorded as failed samples)" if plan.num_duplicates else ""),
        f"  output: {c.output} {state}",
        f"  model: backbone {c.backbone} ({e.backbone.weights_id}, stride {e.stride}, dim {e.backbone.dim}), "
        f"upsampler {c.upsampler}{' from ' + c.checkpoint if c.checkpoint else ''}, image {c.image_size}x{c.image_size}, "
        f"dtype {c.dtype}" + (f", PCA to {c.channels} channels" if c.channels else "")
        + (", compact (lowres + image stored, features upsampled where read)" if c.compact else ""),
        f"  resources: {c.actors} actor(s), device {c.device}, batch size {c.batch_size}, "
        f"Ray {'at ' + c.address if c.address else 'started locally'}",
        "  arrays:",
    ]
    total = 0.0
    for spec in plan.arrays:
        raw, ratio = estimate[spec.name]
        disk = raw * (ratio if ratio is not None else 1.0)
        total += disk
        how = f"{c.codec} ratio {ratio:.2f} on a sample" if ratio is not None else "uncompressed"
        lines.append(f"    {spec.name:<10} {str((plan.num_rows, *spec.shape_per_row)):<28} {spec.dtype:<8} ~{human_bytes(disk)} ({how})")
    lines.append(f"  estimated bytes on disk: ~{human_bytes(total)} ({int(total)} bytes)")
    per_sample = total / max(plan.num_rows, 1)
    lines.append(f"  per sample: ~{human_bytes(per_sample)} stored; encoding ({_encoding(c)})"
                 + (f" runs at ~{plan.encode_rate:.0f} MB/s of raw arrays per core here, ~{plan.encode_rate * 1e6 / max(_raw_per_sample(plan), 1):.1f} samples/s per core"
                    if getattr(plan, "encode_rate", None) else ""))
    if c.upsampler == "implicit":
        lines.extend(implicit_time_lines(plan, sum(s.num_samples for s in todo)))
    return "\n".join(lines)


@contextmanager
def _quick_implicit(extractor: FeatureExtractor, steps: int = QUICK_FIT_STEPS) -> Iterator[None]:
    """Inside the block an implicit extractor fits with ``steps`` steps and one chunk of views (a no-op otherwise)."""
    upsampler = extractor.upsampler
    if extractor.config.upsampler != "implicit":
        yield
        return
    cfg = upsampler.config
    views = min(cfg.n_views, cfg.featurize_batch)
    extractor.upsampler = upsampler.with_config(replace(cfg, steps=steps, n_views=views))
    try:
        yield
    finally:
        extractor.upsampler = upsampler


def measure_fit(plan: Plan) -> FitTiming | None:
    """A FitTiming of one image's implicit fit on the driver's device (one chunk of views, a few steps), or None."""
    from featup.upsamplers.implicit_fit import time_fit

    found = sample_decoded(plan, 1)
    if not found:
        return None
    upsampler = plan.extractor.upsampler
    image = found[0].image.unsqueeze(0).to(plan.extractor.device)  # (1, 3, S, S)
    generator = torch.Generator().manual_seed(plan.config.seed)
    return time_fit(upsampler.featurize, image, upsampler.config, generator=generator)


def implicit_time_lines(plan: Plan, images: int) -> list[str]:
    """The dry run's time estimate of an implicit job: measured per view and per step here, per image, in total."""

    cfg = plan.config.implicit
    timing = measure_fit(plan)
    dim = plan.extractor.backbone.dim
    pca = f"PCA to {cfg.pca_dim} channels" if cfg.pca_dim is not None and cfg.pca_dim < dim else f"all {dim} channels"
    head = (f"  implicit upsampler: SLOW, one network fitted per image ({cfg.steps} steps, {cfg.n_views} jittered views, "
            f"{pca}); the paper's setting takes about a minute per image on an A100")
    if timing is None:
        return [head, "  time: not measured (no decodable sample)"]
    actors = plan.config.actors if isinstance(plan.config.actors, int) else 1
    total = timing.per_image_s * images / actors
    return [
        head,
        f"  time measured on this machine ({timing.device}): {timing.view_s * 1e3:.1f} ms per view, "
        f"{timing.step_s * 1e3:.1f} ms per step -> ~{format_duration(timing.per_image_s)} per image",
        f"  estimated time for {images} images on {actors} such actor(s): ~{format_duration(total)}"
        + (" (GPU actors are much faster)" if timing.device == "cpu" else ""),
    ]


def implicit_notice(plan: Plan) -> str:
    """One line before an implicit run starts: what it does and that it is slow."""
    cfg = plan.config.implicit
    return (f"featup: --upsampler implicit fits one network per image ({cfg.steps} steps, {cfg.n_views} views): slow by nature, "
            "about a minute per image on an A100 in the paper's setting; --dry-run measures it on this machine")
