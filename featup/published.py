"""The published FeatUp checkpoints: their names, URLs and local cache, and the one download path of ``featup/``.

Kept apart from ``featup.hub`` (the torch.hub-like ``load``), which builds models: backbones and the checkpoint
loader use these names without importing the model code that uses them. Each cached file has its sha256 beside it
(``<file>.sha256``, written at download); a file that no longer matches is downloaded again, or refused offline.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from featup.errors import CheckpointError, ConfigError, WeightsUnavailableError

PREFIX = "featup:"
NO_NORM = "no_norm"
HUB_URL_ENV = "FEATUP_HUB_URL"
# The published README's table (github.com/mhamilton723/FeatUp); the no-LayerNorm files are under no_norm/.
DEFAULT_HUB_URL = "https://marhamilresearch4.blob.core.windows.net/feature-upsampling-public/pretrained/"
FILE_NAME = "{model}_jbu_stack_cocostuff.ckpt"
PROBE_TIMEOUT_S = 3.0  # a HEAD request gets this long to be answered before we call the host unreachable
READ_TIMEOUT_S = 60.0  # longest stall between two chunks of a download that has started
_CHUNK = 1 << 20
SHA256_SUFFIX = ".sha256"  # the digest of each cached file, recorded at its download


@dataclass(frozen=True)
class PublishedModel:
    """One published FeatUp model: the backbone its JBU was trained on and whether a LayerNorm variant exists."""

    backbone: str
    has_norm: bool = True


# model name -> what was published (maskclip was released without the LayerNorm variant only).
PUBLISHED: dict[str, PublishedModel] = {
    "dino16": PublishedModel("dino16"),
    "dinov2": PublishedModel("dinov2"),
    "clip": PublishedModel("clip"),
    "maskclip": PublishedModel("maskclip", has_norm=False),
    "vit": PublishedModel("vit"),
    "resnet50": PublishedModel("resnet50"),
}


@dataclass(frozen=True)
class HubCheckpoint:
    """A published checkpoint: ``model`` (a key of ``PUBLISHED``) and its variant, validated at construction."""

    model: str
    use_norm: bool = True

    def __post_init__(self) -> None:
        if self.model not in PUBLISHED:
            raise ConfigError(
                f"FeatUp hub model: expected one of {', '.join(PUBLISHED)}, got {self.model!r}"
            )
        if self.use_norm and not PUBLISHED[self.model].has_norm:
            raise ConfigError(
                f"{PREFIX}{self.model}: expected {PREFIX}{self.model}:{NO_NORM}, got the LayerNorm variant, "
                f"which was not published for {self.model} (only {PREFIX}{self.model}:{NO_NORM} was)"
            )

    @property
    def name(self) -> str:
        """``featup:<model>`` or ``featup:<model>:no_norm``."""
        return f"{PREFIX}{self.model}" + ("" if self.use_norm else f":{NO_NORM}")

    @property
    def variant(self) -> str:
        return "norm" if self.use_norm else NO_NORM

    @property
    def backbone(self) -> str:
        """The backbone the checkpoint's JBU was trained on (a name of ``featup.backbones.BACKBONES``)."""
        return PUBLISHED[self.model].backbone

    @property
    def file_name(self) -> str:
        return FILE_NAME.format(model=self.model)

    @property
    def url(self) -> str:
        """The published URL, under ``$FEATUP_HUB_URL`` when that is set."""
        base = os.environ.get(HUB_URL_ENV) or DEFAULT_HUB_URL
        folder = "" if self.use_norm else f"{NO_NORM}/"
        return f"{base.rstrip('/')}/{folder}{self.file_name}"

    @property
    def cache_path(self) -> Path:
        """Where the file is kept: variants in separate folders, so one is never taken for the other."""
        return cache_dir() / self.variant / self.file_name


def cache_dir() -> Path:
    """``<torch.hub.get_dir()>/checkpoints/featup`` (``$TORCH_HOME/hub/...``, by default ``~/.cache/torch/hub/...``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / "featup"


def is_hub_name(spec: object) -> bool:
    """Whether ``spec`` is a ``featup:`` checkpoint name (and not a path or URL)."""
    return isinstance(spec, str) and spec.startswith(PREFIX)


def names() -> list[str]:
    """Every valid checkpoint name, LayerNorm variants first."""
    out = [f"{PREFIX}{m}" for m, p in PUBLISHED.items() if p.has_norm]
    return out + [f"{PREFIX}{m}:{NO_NORM}" for m in PUBLISHED]


def parse(name: str) -> HubCheckpoint:
    """``featup:<model>`` (LayerNorm variant, torch.hub's default) or ``featup:<model>:no_norm``."""
    if not is_hub_name(name):
        raise ConfigError(f"FeatUp checkpoint name: expected '{PREFIX}<model>[:{NO_NORM}]', got {name!r}")
    model, sep, variant = name[len(PREFIX):].partition(":")
    if sep and variant != NO_NORM:
        raise ConfigError(f"FeatUp checkpoint name {name!r}: expected the suffix ':{NO_NORM}' or none, got ':{variant}'")
    if model not in PUBLISHED:
        raise ConfigError(f"FeatUp checkpoint name {name!r}: expected one of {', '.join(names())}")
    return HubCheckpoint(model, use_norm=not sep)


def implied_backbone(checkpoint: str | None) -> str | None:
    """The backbone a ``featup:`` checkpoint name implies; None for paths, URLs and no checkpoint."""
    return parse(checkpoint).backbone if is_hub_name(checkpoint) else None


def resolve_backbone(backbone: str | None, checkpoint: str | None) -> str | None:
    """``backbone``, or the one ``checkpoint`` implies when it is None; a different one is refused with both named."""
    implied = implied_backbone(checkpoint)
    if implied is None or backbone is None:
        return backbone if backbone is not None else implied
    if backbone != implied:
        raise ConfigError(
            f"--backbone {backbone}: expected {implied}, the backbone checkpoint {checkpoint} was trained on, "
            f"got {backbone} (leave --backbone out, or give a checkpoint trained for {backbone})"
        )
    return backbone


def fetch(name: str, *, progress: bool = True) -> Path:
    """The local file of checkpoint ``name``: from the cache, or downloaded there first (the only request made).

    A cached file must still match the sha256 recorded beside it at download (``<file>.sha256``): one changed on
    disk since is downloaded again, or refused with its path when the hub cannot be reached.
    """
    ckpt = parse(name)
    path = ckpt.cache_path
    if path.is_file():
        changed = cache_change(path)
        if changed is None:
            return path
        reason = unreachable(ckpt.url)
        if reason is not None:
            raise CheckpointError(
                f"cached checkpoint {path} {changed}, and {ckpt.url} cannot be reached ({reason}) to download it again: "
                f"delete {path} and run again where there is network, or pass --checkpoint PATH"
            )
        if progress:
            print(f"featup: cached checkpoint {path} {changed}; downloading it again", file=sys.stderr)
        download(ckpt.url, path, progress=progress)
        return path
    reason = unreachable(ckpt.url)
    try:
        if reason is not None:
            raise WeightsUnavailableError(f"{ckpt.url} cannot be reached ({reason})")
        download(ckpt.url, path, progress=progress)
    except WeightsUnavailableError as err:
        raise WeightsUnavailableError(
            f"checkpoint {ckpt.name} is not cached and {err}: download {ckpt.url} where there is network "
            f"and put it at {path}, or pass --checkpoint PATH"
        ) from None
    return path


def sidecar_path(path: Path) -> Path:
    """``<file>.sha256``: the digest of a cached checkpoint as downloaded, in ``sha256sum`` format."""
    return path.with_name(path.name + SHA256_SUFFIX)


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def cache_change(path: Path, actual: str | None = None) -> str | None:
    """None when the cached ``path`` matches its sidecar, else how it differs (one phrase); ``actual``: its sha256,
    when the caller has it already.

    A file without a sidecar (put there by hand, as the offline error suggests, or cached by an older version) is
    taken as it is: its digest is recorded now, so a later change is seen.
    """
    sidecar = sidecar_path(path)
    actual = actual or file_sha256(path)
    try:
        recorded = sidecar.read_text().split()[0] if sidecar.is_file() else None
    except (OSError, IndexError):
        recorded = ""
    if recorded is None:
        write_sidecar(path, actual)
        return None
    if recorded == actual:
        return None
    return (f"no longer matches the sha256 recorded at its download in {sidecar} "
            f"({actual[:12]}... instead of {recorded[:12] or 'nothing'}...): it changed on disk")


def write_sidecar(path: Path, digest: str) -> None:
    """Writes ``<file>.sha256`` (a temp file renamed over it, so a reader never sees half of it)."""
    sidecar = sidecar_path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{sidecar.name}.", suffix=".partial")
    with os.fdopen(fd, "w") as f:
        f.write(f"{digest}  {path.name}\n")
    os.replace(tmp, sidecar)


def resolve_checkpoint(spec: str, *, progress: bool = True) -> str:
    """A local path for a ``featup:`` name (fetched now, so offline fails before any work); other specs unchanged."""
    return str(fetch(spec, progress=progress)) if is_hub_name(spec) else spec


def unreachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when a HEAD request to ``url`` gets any HTTP answer within ``timeout`` s, else why not (one phrase).

    The request runs in a daemon thread so that name resolution, which no socket timeout bounds, cannot hold
    the caller longer than ``timeout`` either.
    """
    outcome: list[str | None] = []

    def attempt() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
                outcome.append(None)
        except urllib.error.HTTPError:  # the server answered (404, 403, ...): the host is reachable
            outcome.append(None)
        except (OSError, ValueError, http.client.HTTPException) as err:
            outcome.append(_describe(err))

    thread = threading.Thread(target=attempt, name="featup-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def download(url: str, path: Path, *, progress: bool = True, check: Callable[[Path, str], None] | None = None) -> None:
    """Stream ``url`` to a temporary file next to ``path``, check it is a whole checkpoint, record its sha256 beside
    ``path`` (``<file>.sha256``), then rename it to ``path``.

    ``check(tmp, url)`` raises CheckpointError for a file that must not be cached (default: ``check_checkpoint_file``,
    a FeatUp checkpoint); other kinds of checkpoint pass their own (``featup.upsampler_hub``).
    """
    from tqdm.auto import tqdm

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, _open(url) as response:
            expected = _content_length(response)
            if progress:
                print(f"featup: downloading {url} to {path}", file=sys.stderr)
            with tqdm(total=expected, unit="B", unit_scale=True, unit_divisor=1024, desc=path.name,
                      disable=not progress, file=sys.stderr) as bar:
                received = _copy(response, out, bar.update, url)
        if expected is not None and received != expected:
            raise CheckpointError(
                f"download of {url} is truncated: expected {expected} bytes (Content-Length), got {received}; "
                f"nothing was cached, run again to retry"
            )
        (check or check_checkpoint_file)(tmp, url)
        write_sidecar(path, file_sha256(tmp))  # first: a crash before the rename leaves a mismatch, fetched again
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_checkpoint_file(path: Path, source: str) -> None:
    """Raise CheckpointError unless ``path`` loads with ``torch.load(weights_only=True)`` as a dict with a state_dict."""
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged zip, pickle or tensor storage raises any of several types
        raise CheckpointError(
            f"download of {source} is not a readable PyTorch checkpoint ({type(err).__name__}: {err}); "
            f"nothing was cached, run again to retry"
        ) from err
    if not isinstance(content, dict) or not isinstance(content.get("state_dict"), dict):
        raise CheckpointError(
            f"download of {source} is not a FeatUp checkpoint: expected a dict with a 'state_dict' dict, "
            f"got {type(content).__name__}; nothing was cached"
        )


def _open(url: str):
    """The GET response of ``url``; HTTP and connection errors become WeightsUnavailableError naming the URL."""
    try:
        return urllib.request.urlopen(url, timeout=READ_TIMEOUT_S)
    except urllib.error.HTTPError as err:
        raise WeightsUnavailableError(f"{url} is not there (the server answered {err.code} {err.reason})") from err
    except (OSError, ValueError, http.client.HTTPException) as err:
        raise WeightsUnavailableError(f"{url} cannot be downloaded ({_describe(err)})") from err


def _copy(response, out, advance, url: str) -> int:
    """Copy the body in chunks, calling ``advance(n)`` per chunk; a broken connection counts as a truncated file."""
    received = 0
    try:
        while chunk := response.read(_CHUNK):
            out.write(chunk)
            received += len(chunk)
            advance(len(chunk))
    except http.client.IncompleteRead as err:
        received += len(err.partial)
    except (OSError, http.client.HTTPException) as err:
        raise CheckpointError(
            f"download of {url} broke off after {received} bytes ({_describe(err)}); nothing was cached, run again to retry"
        ) from err
    return received


def _content_length(response) -> int | None:
    value = response.headers.get("Content-Length")
    return int(value) if value is not None and value.isdigit() else None


def _describe(err: BaseException) -> str:
    reason = getattr(err, "reason", None)
    return f"{type(err).__name__}: {reason if reason is not None else err}"
