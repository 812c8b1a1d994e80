"""WebDataset shards through fsspec: expand input patterns, count samples from tar headers, stream raw samples.

Counting and iteration apply the same member filters and the same key rule (WebDataset's ``base_plus_ext``), and
treat a broken tar the same way: the samples before the sample being read at the break are kept, the rest are not.
So ``scan_shard(url).keys`` is exactly the ``__key__`` sequence ``iter_shard_samples(url)`` yields, and rows can be
laid out before anything runs. Payloads stay raw bytes: nothing here decodes, and nothing is ever unpickled.
A tar has no length field: one cut exactly at (or inside) a member header reads as a complete, shorter tar in both.
"""

from __future__ import annotations

import inspect
import os
import re
import tarfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import braceexpand
import fsspec
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander, tar_file_iterator

from featup.errors import InputError

# Member names WebDataset's tar iterator skips as metadata (its own default, read so the two never drift apart).
_SKIP_META = inspect.signature(tar_file_iterator).parameters["skip_meta"].default
# Errors of the tar format itself (a truncated or corrupt archive), as opposed to I/O errors of the storage.
_TAR_FORMAT_ERRORS = (tarfile.TarError, EOFError, zlib.error)


@dataclass(frozen=True)
class ShardInfo:
    """One shard as counted before the run: its samples' keys in tar order, and why the count stopped early if it did."""

    url: str
    index: int
    num_samples: int
    keys: tuple[str, ...]
    error: str | None = None  # set when the tar ends in a truncated or corrupt member; keys are the samples before it
    options: dict = field(default_factory=dict, compare=False, repr=False)  # the storage options that reach ``url``


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Brace-expands each input pattern, keeping order and dropping repeats; local paths are made absolute."""
    urls: dict[str, None] = {}  # an ordered set
    for pattern in patterns:
        try:
            expanded = list(braceexpand.braceexpand(pattern))
        except braceexpand.UnbalancedBracesError as e:
            raise InputError(f"input {pattern}: expected a valid brace pattern, got {e}") from None
        urls.update((_absolute(url), None) for url in expanded)
    if not urls:
        raise InputError("inputs: expected at least one shard path or URL, got none")
    return list(urls)


def _absolute(url: str) -> str:
    """``url`` unchanged when it names a protocol (``s3://``, ``file://``, ``simplecache::``), else an absolute local path."""
    if "://" in url or "::" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))


def scan_shard(url: str, index: int, storage_options: dict | None = None) -> ShardInfo:
    """Counts the samples of one shard from its tar headers, or raises an InputError if it cannot be read at all."""
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as stream:
            names, error = _member_names(stream, url)
    except InputError:
        raise
    except Exception as e:  # missing, a directory, permission denied, network: any storage error
        raise InputError(f"shard {url}: expected a readable tar file, got {_describe(e)}") from None
    keys = _sample_keys(names, broken=error is not None)
    return ShardInfo(url=url, index=index, num_samples=len(keys), keys=tuple(keys), error=error, options=dict(storage_options or {}))


def _member_names(stream, url: str) -> tuple[list[str], str | None]:
    """Names of the sample members in tar order (data skipped), and the format error that ended the tar early."""
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")  # streaming: headers in order, no seeking
    except _TAR_FORMAT_ERRORS as e:
        raise InputError(f"shard {url}: expected a tar archive, got {_not_a_tar(e)}") from None
    names = []
    try:
        for info in tar:  # skipping a member's data checks it is all there ("unexpected end of data" otherwise)
            if _is_sample_member(info):
                names.append(info.name)
    except _TAR_FORMAT_ERRORS as e:
        return names, _describe(e)
    return names, None


def _not_a_tar(error: Exception) -> str:
    """Why ``tarfile`` could not open a shard at all, in words."""
    if str(error) == "empty file":
        return "an empty file (0 bytes)"
    return f"data that is not a tar archive ({_describe(error)})"


def _is_sample_member(info: tarfile.TarInfo) -> bool:
    """Whether WebDataset's tar iterator hands this member on (regular file, not metadata) and we accept it."""
    name = info.name
    if not info.isreg() or name is None:
        return False
    if "/" not in name and name.startswith("__") and name.endswith("__"):
        return False
    return re.match(_SKIP_META, name) is None and _accepts(name)


def _accepts(name: str) -> bool:
    """Rejects members with a reserved extension (``__key__``, ``__bad__``...): they would clash with sample fields."""
    _, ext = base_plus_ext(name)
    return ext is None or not (ext.startswith("__") and ext.endswith("__"))


def _sample_keys(names: Sequence[str], broken: bool) -> list[str]:
    """Groups consecutive member names by key as ``group_by_keys`` does; on a broken tar the sample being read is dropped."""
    keys: list[str] = []
    for name in names:
        key, _ = base_plus_ext(name)
        if key is not None and (not keys or keys[-1] != key):
            keys.append(key)
    if broken and names and keys and base_plus_ext(names[-1])[0] == keys[-1]:
        keys.pop()
    return keys


def scan_shards(
    urls: Sequence[str], storage_options: dict | None = None, max_workers: int = 8
) -> list[ShardInfo]:
    """Scans shards in threads; raises one InputError listing every shard that cannot be read."""
    urls = list(urls)
    workers = max(1, min(max_workers, len(urls)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scan-shard") as pool:
        futures = [pool.submit(_scan_or_reason, url, i, storage_options) for i, url in enumerate(urls)]
        results = [future.result() for future in futures]
    failures = [r for r in results if isinstance(r, str)]
    if failures:
        listing = "\n".join(f"  {reason}" for reason in failures)
        count = f"got {len(failures)} that cannot be read"
        raise InputError(f"shards: expected {len(urls)} readable tar files, {count}:\n{listing}")
    return results


def _scan_or_reason(url: str, index: int, storage_options: dict | None) -> ShardInfo | str:
    """``scan_shard``, with an unreadable shard's InputError returned as its message."""
    try:
        return scan_shard(url, index, storage_options)
    except InputError as e:
        return str(e)


def iter_shard_samples(url: str, storage_options: dict | None = None) -> Iterator[dict]:
    """Yields the shard's raw samples (``__key__``, ``__url__``, ``ext: bytes``); a broken read ends with an error marker.

    The marker is ``{"__key__": None, "__url__": url, "__error__": reason}``; nothing is raised for bad data. A sample
    with two members of one extension carries ``"__error__"`` too (its payloads are ambiguous).
    """
    reader = _ShardReader()
    try:
        stream = fsspec.open(url, "rb", **(storage_options or {})).open()
    except Exception as e:
        yield _error_marker(url, f"shard {url}: expected a readable tar file, got {_describe(e)}")
        return
    count = 0
    with stream:
        files = tar_file_expander([{"url": url, "stream": stream}], handler=reader.on_read_error, select_files=reader.select)
        for sample in group_by_keys(files, handler=reader.on_group_error):
            if reader.error is not None and sample["__key__"] == reader.last_key():
                continue  # the sample being read when the tar broke: incomplete, and not counted by scan_shard
            if sample["__key__"] in reader.flagged:
                sample["__error__"] = reader.flagged.pop(sample["__key__"])
            count += 1
            yield sample
    if reader.error is not None:
        reason = f"expected a complete tar archive, got a read error after {count} samples ({reader.error})"
        yield _error_marker(url, f"shard {url}: {reason}")


def _error_marker(url: str, reason: str) -> dict:
    """The last item of a shard whose read broke: no key, and the reason."""
    return {"__key__": None, "__url__": url, "__error__": reason}


class _ShardReader:
    """What one shard's iteration has seen: the last member it started to read, why it stopped, flagged samples."""

    def __init__(self) -> None:
        self.last_name: str | None = None
        self.error: str | None = None
        self.flagged: dict[str, str] = {}  # key -> reason, for samples found malformed while grouping

    def select(self, name: str) -> bool:
        """``select_files`` hook: called just before a member's data is read; applies our extra filter."""
        if not _accepts(name):
            return False
        self.last_name = name
        return True

    def last_key(self) -> str | None:
        """Key of the last member whose read started."""
        return None if self.last_name is None else base_plus_ext(self.last_name)[0]

    def on_read_error(self, error: Exception) -> bool:
        """Tar-level error (truncation, corruption, I/O): remember why and stop the shard."""
        self.error = _describe(error)
        return False

    def on_group_error(self, error: Exception) -> bool:
        """Grouping error (a member repeats an extension): flag the sample being grouped and go on."""
        key = self.last_key()
        if key is not None:
            self.flagged.setdefault(key, f"sample {key}: expected one member per extension, got {self.last_name} twice")
        return True


def _describe(error: BaseException) -> str:
    """``Type: message`` of an error, without the stream and URL WebDataset appends to its arguments."""
    if isinstance(error, OSError) and error.strerror:
        message = error.strerror
    else:
        message = error.args[0] if error.args and isinstance(error.args[0], str) else ""
        message = message.split(" @ ")[0]  # tar_file_iterator appends " @ <stream repr>"
    return f"{type(error).__name__}: {message}" if message else type(error).__name__
