"""Where data lives: URLs with the fsspec options that reach them, resolved once, and whole-object atomic writes."""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from featup.errors import ConfigError


@dataclass(frozen=True)
class Location:
    """A path or URL together with the storage options that reach it (none for local paths); picklable to actors."""

    url: str
    options: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def resolve(cls, url: str, storage_options: dict[str, Any] | None = None) -> Location:
        """``url`` with the options of ``--storage-option`` that apply to it (local paths take none)."""
        return cls(url, options_for(url, storage_options or {}))

    def filesystem(self) -> tuple[fsspec.AbstractFileSystem, str]:
        """(filesystem, path inside it)."""
        return fsspec.core.url_to_fs(self.url, **self.options)

    def __str__(self) -> str:
        return self.url


def options_for(url: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """The storage options for ``url``: none for local paths (local files take no remote options)."""
    protocol, sep, _ = url.partition("://")
    return dict(storage_options) if sep and protocol not in ("file", "local") else {}


def parse_storage_options(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``KEY=VALUE`` strings as fsspec storage options; dotted keys nest (``client_kwargs.endpoint_url=...``)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:  # the whole text may be a secret given without its key: never echoed
            raise ConfigError(
                "--storage-option: expected KEY=VALUE, got a value without a key and '=' (not shown: it may be a secret)")
        *parents, leaf = key.split(".")
        target = options
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--storage-option {key}=***: expected {parent!r} to be a group of options, got a value")
        target[leaf] = _option_value(value)
    return options


def _option_value(value: str) -> Any:
    """``true``/``false``/``none`` and numbers become Python values; anything else stays a string."""
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def put_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Writes a whole object atomically: rename of a synced temp file locally, one PUT on object stores."""
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        return
    tmp = write_temp(path, data)
    os.replace(tmp, path)


def write_temp(path: str, data: bytes) -> str:
    """A synced hidden temp file next to ``path`` holding ``data`` (local files only)."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


class _AbandonedRequestFilter(logging.Filter):
    """Drops asyncio's "exception was never retrieved" reports for connection errors of aiohttp's own helper tasks.

    When an object store drops connections, aiohttp leaves a body-writing task per failed request whose exception
    nobody awaits; the request itself already failed and went through the retry budget, which reports it once.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if "exception was never retrieved" not in str(record.msg) or not record.exc_info:
            return True
        error = record.exc_info[1]
        return not isinstance(error, (ConnectionError, _client_error_types()))


def _client_error_types() -> tuple[type[BaseException], ...]:
    try:
        import aiohttp
    except ImportError:  # no HTTP object-store client installed: nothing of its to quiet
        return ()
    return (aiohttp.ClientError,)


_ABANDONED_REQUEST_FILTER = _AbandonedRequestFilter()


def quiet_abandoned_request_errors() -> None:
    """Installs the filter above on asyncio's logger, once per process (each actor and the driver call it)."""
    logger = logging.getLogger("asyncio")
    if _ABANDONED_REQUEST_FILTER not in logger.filters:
        logger.addFilter(_ABANDONED_REQUEST_FILTER)
