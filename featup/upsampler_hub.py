"""FeatUp's successors by name: their published weights, downloaded once and cached, and the loader of any of their checkpoints.

Names are a kind and a key of that upsampler module's ``PUBLISHED`` table: ``anyup`` (the paper model),
``anyup:multi_backbone``, ``jafar:<backbone>``, ``loftup:<backbone>``, ``uplift:<backbone>``, ``naf`` (a bare kind is its ``default``
entry; ``names()`` lists them all). A kind is registered by one line of ``KINDS``. Files are downloaded with
``featup.published``'s download (progress bar, temporary name, checked, renamed) after its fast offline probe, to
``$TORCH_HOME/hub/checkpoints/<kind>/<key>/<file name>``, with a ``<file name>.sha256`` sidecar (``sha256sum``
format) written on download and checked on every use: a cached file that no longer matches it is downloaded
again, or refused naming its path when the host cannot be reached. ``FEATUP_<KIND>_URL`` replaces the base URL
that a kind's published URLs share (a mirror with the same layout below it; tests use one on 127.0.0.1).

Checkpoints are read with ``torch.load(weights_only=True)`` or as safetensors: a pickle that holds other Python
objects is refused, never unpickled. Loading is strict: each module's ``from_state_dict`` names every missing,
unexpected or misshaped key. No torch import at module level, so command-line parsers can list the kinds.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import struct
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Mapping

from featup.errors import CheckpointError, ConfigError, WeightsUnavailableError

if TYPE_CHECKING:
    from torch import nn

DEFAULT_KEY = "default"  # the PUBLISHED entry a bare kind names (backbone-agnostic kinds have one)
FEATUP_PREFIX = "featup:"


@dataclass(frozen=True)
class Kind:
    """A successor upsampler: its module (``PUBLISHED``, ``state_dict_from_checkpoint``, ``from_state_dict``) and how
    the pipeline runs it."""

    name: str
    module: str
    default: str  # the PUBLISHED key loaded when no checkpoint is named
    feature_dim: str | None = None  # attribute holding the channel count a checkpoint fixes; None: any backbone
    full_precision: bool = False  # computed in float32 whatever the job's dtype
    per_image: bool = False  # its published forward mixes the images of a batch: run one image at a time
    patch_attr: str | None = None  # attribute (and from_state_dict argument) holding the backbone's patch size, which
    # the weights do not record: a published name's, else the backbone's stride (``featup.hub.for_backbone``)
    # How a compact store's reader may run it (``featup.upsamplers.window``, ``pipeline.store.compact``); the defaults
    # are the conservative answers, so a new kind is read exactly before it is read cheaply.
    whole_map: bool = True  # an output pixel may depend on every low-res cell and guidance pixel: a crop is cut from
    # the whole map's output instead of being computed from a window of the low-res map
    all_channels: bool = True  # a channel's output depends on the other channels (keys computed from them, heads that
    # weigh channel groups): a channel subset is cut from the output of every channel, not computed from itself alone
    commutes_with_projection: bool = False  # linear in the features with the same weights for every channel: a
    # ``--channels`` PCA of its input is the PCA of its output (what ``--compact --channels`` stores)

    @property
    def env_var(self) -> str:
        """The environment variable that replaces the kind's published base URL."""
        return f"FEATUP_{self.name.upper()}_URL"

    @property
    def any_backbone(self) -> bool:
        return self.feature_dim is None

    def implementation(self) -> ModuleType:
        return importlib.import_module(self.module)

    def published(self) -> Mapping[str, Any]:
        """key -> PublishedWeights (url, file_name, backbone, dim, patch, sha256)."""
        return self.implementation().PUBLISHED


# Every successor is read from the whole map and from every channel (the Kind defaults), and refuses a --channels
# projection of its input, each for its own reasons:
#   anyup   keys unify every feature channel; GroupNorm over the whole image; windows of +-10 % of the map
#   jafar   global attention; keys from every (L2-normalised) channel
#   loftup  a transformer over every low-res token; LayerNorm over the channels; colours min-max scaled per image
#   naf     attention weights from the image only, but GroupNorm over the whole image and keys pooled from the whole
#           map; each head weighs its own group of channels, so a channel's weights depend on where it sits
#   uplift  every 2x step's weights come from a conv over all channels; a final resize over the whole map
KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind("anyup", "featup.upsamplers.anyup", DEFAULT_KEY),
        Kind("jafar", "featup.upsamplers.jafar", "dinov2_vits14", feature_dim="v_dim"),
        # LoftUp: its sine encoding needs float32, and its colour min-max scaling runs over the whole batch.
        Kind("loftup", "featup.upsamplers.loftup", "dinov2s", feature_dim="dim", full_precision=True, per_image=True),
        Kind("naf", "featup.upsamplers.naf", DEFAULT_KEY),
        Kind("uplift", "featup.upsamplers.uplift", "dinov2_vits14", feature_dim="dim", patch_attr="patch_size"),
    )
}


def module_kind(upsampler: object) -> Kind | None:
    """The successor kind an upsampler module belongs to (None for jbu, bilinear and others)."""
    module = type(upsampler).__module__
    return next((k for k in KINDS.values() if k.module == module), None)


def kind_of(name: str) -> Kind:
    """The registered kind ``name``, or a ConfigError listing them."""
    if name not in KINDS:
        raise ConfigError(f"upsampler kind: expected one of {', '.join(KINDS)}, got {name!r}")
    return KINDS[name]


class ChecksumMismatchError(CheckpointError):
    """A file's bytes differ from the sha256 recorded for it."""


# --- names --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishedCheckpoint:
    """One published checkpoint: ``kind`` and its ``PUBLISHED`` ``key``, validated at construction."""

    kind: str
    key: str

    def __post_init__(self) -> None:
        table = kind_of(self.kind).published()
        if self.key not in table:
            raise ConfigError(f"{self.kind} checkpoint name {self.kind}:{self.key}: expected one of {', '.join(names(self.kind))}")

    @property
    def name(self) -> str:
        """The canonical name: ``<kind>`` for the default entry, else ``<kind>:<key>``."""
        return self.kind if self.key == DEFAULT_KEY else f"{self.kind}:{self.key}"

    @property
    def entry(self) -> Any:
        """The module's PublishedWeights: url, file_name, backbone (a project backbone or None), dim, patch, sha256."""
        return kind_of(self.kind).published()[self.key]

    @property
    def url(self) -> str:
        """The published URL, under ``$FEATUP_<KIND>_URL`` when that is set (the same path below the base)."""
        kind = kind_of(self.kind)
        override = os.environ.get(kind.env_var)
        if not override:
            return self.entry.url
        return f"{override.rstrip('/')}/{self.entry.url[len(published_base(kind)):]}"

    @property
    def cache_path(self) -> Path:
        """``<torch hub dir>/checkpoints/<kind>/<key>/<file name>`` (LoftUp's files all have one name)."""
        import torch

        return Path(torch.hub.get_dir()) / "checkpoints" / self.kind / self.key / self.entry.file_name


def published_base(kind: Kind) -> str:
    """The part of the kind's published URLs they all share, up to a ``/``: what ``$FEATUP_<KIND>_URL`` replaces."""
    urls = [entry.url for entry in kind.published().values()]
    common = os.path.commonprefix(urls)
    return common[: common.rfind("/") + 1]


def is_name(spec: object) -> bool:
    """Whether ``spec`` is a successor's checkpoint name (``<kind>`` or ``<kind>:<key>``), not a path or URL.

    Names win over same-named relative paths: write ``./naf`` for a file called ``naf``.
    """
    return isinstance(spec, str) and "/" not in spec and spec.partition(":")[0] in KINDS


def parse(name: str) -> PublishedCheckpoint:
    """``<kind>`` (its default entry) or ``<kind>:<key>`` -> the PublishedCheckpoint."""
    if not is_name(name):
        raise ConfigError(f"upsampler checkpoint name: expected '<kind>[:<key>]' with a kind of {', '.join(KINDS)}, got {name!r}")
    kind, sep, key = name.partition(":")
    if not sep and DEFAULT_KEY not in kind_of(kind).published():
        raise ConfigError(f"{kind} checkpoint name {name!r}: expected {kind}:<backbone>, one of {', '.join(names(kind))}")
    return PublishedCheckpoint(kind, key if sep else DEFAULT_KEY)


def names(kind: str | None = None) -> list[str]:
    """Every valid name (of one kind, or of all), in the tables' order."""
    kinds = [kind_of(kind)] if kind is not None else list(KINDS.values())
    return [PublishedCheckpoint(k.name, key).name for k in kinds for key in k.published()]


def implied_backbone(checkpoint: str | None) -> str | None:
    """The project backbone a per-backbone published name was trained on; None for other names, paths and None."""
    return parse(checkpoint).entry.backbone if is_name(checkpoint) else None


def default_name(kind: str, backbone: str | None = None) -> str:
    """The published weights a kind runs without ``--checkpoint``: its default, or the entry trained on ``backbone``."""
    k = kind_of(kind)
    if k.any_backbone or backbone is None:
        return PublishedCheckpoint(kind, k.default).name
    for key, entry in k.published().items():
        if entry.backbone == backbone:
            return PublishedCheckpoint(kind, key).name
    trained = sorted({e.backbone for e in k.published().values() if e.backbone})
    raise ConfigError(
        f"--upsampler {kind}: expected a --checkpoint for backbone {backbone!r} ({kind} has published weights for "
        f"the project's {', '.join(trained) or 'none'}); pass one of {', '.join(names(kind))}, a path or a URL"
    )


def resolve(upsampler: str | None, checkpoint: str | None, backbone: str | None) -> tuple[str | None, str | None]:
    """The (upsampler, checkpoint) a command runs, without touching the network.

    A successor's name implies its kind; a successor without a checkpoint gets its published weights (for
    ``backbone`` when the weights are per backbone); a checkpoint name of another kind is refused with both named.
    Other kinds pass through unchanged (``upsampler`` None stays None: the command's own default).
    """
    named = parse(checkpoint) if is_name(checkpoint) else None
    if upsampler is None and named is not None:
        upsampler = named.kind
    if upsampler not in KINDS:
        if named is not None:
            raise ConfigError(
                f"--checkpoint {checkpoint}: expected a checkpoint of --upsampler {upsampler or 'jbu'} (featup:<model>, a "
                f"path or a URL), got a {named.kind} name (use --upsampler {named.kind})"
            )
        return upsampler, checkpoint
    expected = f"expected {upsampler} weights ({', '.join(names(upsampler)[:3])}, ..., a path or a URL)"
    if isinstance(checkpoint, str) and checkpoint.startswith(FEATUP_PREFIX):
        raise ConfigError(f"--checkpoint {checkpoint}: {expected}, got a FeatUp JBU name (use --upsampler jbu)")
    if named is not None and named.kind != upsampler:
        raise ConfigError(f"--checkpoint {checkpoint}: {expected}, got a {named.kind} name")
    return upsampler, (checkpoint if checkpoint is not None else default_name(upsampler, backbone))


# --- the sha256 sidecar (featup.published's: one format and one rule for every cached checkpoint) ------------------


def checked_sha256(path: Path, published_digest: str | None = None) -> str:
    """The sha256 of ``path``'s bytes, checked against the ``published_digest`` (when known) and its sidecar.

    ChecksumMismatchError when either differs; a file without a sidecar (put there by hand, as the offline error
    suggests) is accepted and gets one.
    """
    from featup import published

    digest = published.file_sha256(path)
    if published_digest is not None and digest != published_digest:
        raise ChecksumMismatchError(f"has sha256 {digest}, expected the published {published_digest}")
    change = published.cache_change(path, digest)
    if change is not None:
        raise ChecksumMismatchError(change)
    return digest


# --- download and cache --------------------------------------------------------------------------------------------


def fetch(name: str, *, progress: bool = True) -> tuple[Path, str]:
    """The cached file of published checkpoint ``name`` and its sha256; downloaded first when it is not cached (or
    no longer matches its sidecar). Offline, a missing or damaged cache is one error within seconds naming the path."""
    from featup import published

    ref = parse(name)
    path = ref.cache_path
    stale: ChecksumMismatchError | None = None
    if path.is_file():
        try:
            return path, checked_sha256(path, ref.entry.sha256)
        except ChecksumMismatchError as err:
            stale = err
    reason = published.unreachable(ref.url)
    if reason is not None and stale is not None:
        raise CheckpointError(
            f"checkpoint {ref.name}: the cached file {path} {stale}, and {ref.url} cannot be reached to download it "
            f"again ({reason}): put a good copy there (and delete {published.sidecar_path(path).name}), or pass --checkpoint PATH"
        )
    if stale is not None and progress:
        print(f"featup: the cached {path} {stale}; downloading it again", file=sys.stderr)
    try:
        if reason is not None:
            raise WeightsUnavailableError(f"{ref.url} cannot be reached ({reason})")
        published.download(ref.url, path, progress=progress, check=partial(_check_download, ref))
    except WeightsUnavailableError as err:
        raise WeightsUnavailableError(
            f"checkpoint {ref.name} is not cached and {err}: download {ref.url} where there is network "
            f"and put it at {path}, or pass --checkpoint PATH"
        ) from None
    return path, checked_sha256(path, ref.entry.sha256)


def _check_download(ref: PublishedCheckpoint, tmp: Path, url: str) -> None:
    """A downloaded file is kept only when it has the published sha256 (if known) and holds a checkpoint of its kind
    (``published.download`` then writes its sidecar before the file takes its place)."""
    data = tmp.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if ref.entry.sha256 is not None and digest != ref.entry.sha256:
        raise CheckpointError(f"download of {url} has sha256 {digest}, expected the published {ref.entry.sha256}; nothing was cached")
    try:
        kind_of(ref.kind).implementation().state_dict_from_checkpoint(load_weights_bytes(data, url))
    except CheckpointError as err:
        raise CheckpointError(f"download of {url} is not a usable {ref.kind} checkpoint ({err}); nothing was cached") from None


# --- reading and loading -------------------------------------------------------------------------------------------


def load_weights_bytes(data: bytes, source: str) -> Any:
    """The content of a checkpoint file: a safetensors file, or a torch file read with ``weights_only=True``."""
    import pickle

    import torch

    if _is_safetensors(data):
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(data)
        except Exception as err:  # a damaged header or buffer raises one of several types
            raise CheckpointError(f"checkpoint {source}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        found = ", ".join(_unsafe_globals(data)[:4]) or "objects torch does not allow"
        raise CheckpointError(
            f"checkpoint {source}: holds Python objects besides tensors ({found}), which are never unpickled here "
            f"(torch.load weights_only=True); save its state dict alone with torch.save where you trust the file, "
            f"and pass that file"
        ) from None
    except Exception as err:  # not a zip / torch file, truncated, damaged storage
        raise CheckpointError(f"checkpoint {source}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None


def _is_safetensors(data: bytes) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON header."""
    if len(data) < 10:
        return False
    (length,) = struct.unpack("<Q", data[:8])
    return data[8:9] == b"{" and 8 + length <= len(data)


def _unsafe_globals(data: bytes) -> list[str]:
    import torch

    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data)))
    except Exception:  # only used to name them in the message
        return []


def read_checkpoint_bytes(spec: str, **storage_options: Any) -> bytes:
    """The bytes of a checkpoint path or fsspec URL."""
    import fsspec

    try:
        with fsspec.open(spec, "rb", **storage_options) as f:
            return f.read()
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {spec}: cannot be read ({type(err).__name__}: {err})") from None


def load(kind: str, checkpoint: str | None = None, *, device=None, dtype=None, progress: bool = True,
         **storage_options: Any) -> nn.Module:
    """The ``kind`` upsampler with ``checkpoint``'s weights in eval mode (a published name, a path or an fsspec URL;
    None: the kind's default published weights).

    The module gets ``source`` (the checkpoint as given), ``sha256`` (of the file's bytes) and ``trained_for`` (the
    PublishedWeights of a published name, None otherwise).
    """
    k = kind_of(kind)
    _, spec = resolve(kind, checkpoint, None)
    trained_for = None
    if is_name(spec):
        ref = parse(spec)
        path, digest = fetch(spec, progress=progress)
        data, trained_for = path.read_bytes(), ref.entry
    else:
        data = read_checkpoint_bytes(spec, **storage_options)
        digest = hashlib.sha256(data).hexdigest()
    module = k.implementation()
    try:
        state = module.state_dict_from_checkpoint(load_weights_bytes(data, spec))
        patch = {k.patch_attr: trained_for.patch} if k.patch_attr and trained_for and trained_for.patch else {}
        model = module.from_state_dict(state, device=device, dtype=dtype, **patch)
    except CheckpointError as err:
        message = str(err)
        raise CheckpointError(message if spec in message else f"checkpoint {spec}: {message}") from None
    model.eval()
    model.source, model.sha256, model.trained_for = spec, digest, trained_for
    return model
