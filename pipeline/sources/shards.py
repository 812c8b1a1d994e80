"""WebDataset shards through fsspec: expand input patterns, count samples from tar headers, stream raw samples.

Counting and iteration run the same reader (``tar_reader``) and the same grouping rules (``grouping``: WebDataset's
filters and ``base_plus_ext`` key rule), so ``scan_shard(url).keys`` is exactly the ``__key__`` sequence
``iter_shard_samples(url)`` yields and rows can be laid out before anything runs. Two kinds of error are kept apart:

- *content* errors are facts about the shard: a missing object, access denied or bytes that are not a tar are an
  InputError at scan time (an error marker when reading); a damaged region inside the tar becomes an error record at
  its place in both; a truncated tar, or one cut at a header (no end-of-archive marker), keeps the samples before the
  break (``ShardInfo.error``, an end marker);
- *transient* errors (connection reset or refused, timeouts, 5xx, SlowDown) are retried within the ``RetryPolicy``
  budget, a broken stream resuming at the byte offset already consumed; once the budget is spent,
  ``TransientIOError`` is raised, never turned into failed samples.

The scan reads headers only: member data is skipped by seeking (local files, range reads on object stores).
Payloads stay raw bytes: nothing here decodes, and nothing is ever unpickled.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import braceexpand
import fsspec

from featup.errors import InputError
from pipeline.runtime.retry import RetryPolicy, TransientIOError, describe
from pipeline.runtime.storage import options_for
from pipeline.sources.grouping import SampleGrouper
from pipeline.sources.streams import ShardFile, TarBytes
from pipeline.sources.tar_reader import NotATarError, TarReader

_GLOB_CHARS = ("*", "?", "[")


@dataclass(frozen=True)
class ShardInfo:
    """One shard as counted before the run: its samples' keys in tar order, and why the count stopped early if it did."""

    url: str
    index: int
    num_samples: int
    keys: tuple[str, ...]
    error: str | None = None  # set when the tar ends early (a truncated or corrupt member, no end-of-archive marker);
    # keys are then the samples before the break
    options: dict = field(default_factory=dict, compare=False, repr=False)  # the storage options that reach ``url``
    # (position in ``keys``, reason) of each entry the read yields with "__error__": damaged tar regions (their own
    # "<damaged bytes A-B>" keys, or the damaged member's key) and samples with a repeated extension.
    flagged: tuple[tuple[int, str], ...] = ()
    # size and ETag (object stores) or size and modification time (files) of the object scanned: what a resume checks
    identity: dict = field(default_factory=dict, compare=False)


def expand_inputs(
    patterns: Sequence[str], storage_options: dict | None = None, retry: RetryPolicy | None = None
) -> list[str]:
    """Brace-expands, then globs (``*``, ``?``, ``[``, sorted, through fsspec) each pattern, keeping order, dropping
    repeats; local paths are made absolute. A glob that matches nothing is an InputError naming it."""
    urls: dict[str, None] = {}  # an ordered set
    for pattern in patterns:
        try:
            expanded = list(braceexpand.braceexpand(pattern))
        except braceexpand.UnbalancedBracesError as e:
            raise InputError(f"input {pattern}: expected a valid brace pattern, got {e}") from None
        for url in expanded:
            found = _glob(url, storage_options or {}, retry or RetryPolicy()) if _is_glob(url) else [_absolute(url)]
            urls.update((u, None) for u in found)
    if not urls:
        raise InputError("inputs: expected at least one shard path or URL, got none")
    return list(urls)


def _is_glob(url: str) -> bool:
    """Whether ``url`` holds glob characters (after its protocol)."""
    return any(c in url.partition("://")[2 if "://" in url else 0] for c in _GLOB_CHARS)


def _glob(url: str, storage_options: dict, retry: RetryPolicy) -> list[str]:
    """The files ``url`` matches, sorted, as URLs of its protocol (absolute paths for local patterns)."""
    if "::" in url:
        raise InputError(f"input {url}: expected a glob on one filesystem, got a chained URL (list its shards instead)")
    local = "://" not in url
    target = _absolute(url) if local else url
    try:
        fs, path = fsspec.core.url_to_fs(target, **options_for(target, storage_options))
        listing = retry.call("list", f"input {url}", fs.glob, path, detail=True)
    except (InputError, TransientIOError):
        raise
    except Exception as e:
        raise InputError(f"input {url}: expected a pattern that can be listed, got {_cause(e)}") from None
    files = sorted(name for name, info in listing.items() if info.get("type") != "directory")
    if not files:
        if local and os.path.isfile(target):  # a literal name holding glob characters
            return [target]
        raise InputError(f"input {url}: expected at least one file matching the pattern, got none")
    return [os.path.abspath(f) if local else fs.unstrip_protocol(f) for f in files]


def _absolute(url: str) -> str:
    """``url`` unchanged when it names a protocol (``s3://``, ``file://``, ``simplecache::``), else an absolute local path."""
    if "://" in url or "::" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))


def scan_shard(url: str, index: int, storage_options: dict | None = None, retry: RetryPolicy | None = None) -> ShardInfo:
    """Counts the samples of one shard from its tar headers (member data skipped by seeking where the store allows).

    Raises an InputError if it cannot be read at all, TransientIOError if storage stays unavailable past the budget.
    """
    options = dict(storage_options or {})
    try:
        with ShardFile(url, options, retry, exact_reads=True) as raw:
            raw.open()
            grouper = SampleGrouper(TarReader(TarBytes(raw, readahead=True)), url, load=False)
            samples = list(grouper)
    except (InputError, TransientIOError):
        raise
    except NotATarError as e:
        raise InputError(f"shard {url}: expected a tar archive, got {e}") from None
    except Exception as e:  # missing, a directory, access denied: content errors of the storage
        raise InputError(f"shard {url}: expected a readable tar file, got {_cause(e)}") from None
    keys = tuple(s["__key__"] for s in samples)
    flagged = tuple((i, s["__error__"]) for i, s in enumerate(samples) if "__error__" in s)
    return ShardInfo(url=url, index=index, num_samples=len(keys), keys=keys, error=grouper.truncated, options=options,
                     flagged=flagged, identity=raw.identity or {})


def scan_shards(
    urls: Sequence[str], storage_options: dict | None = None, max_workers: int = 8, retry: RetryPolicy | None = None
) -> list[ShardInfo]:
    """Scans shards in threads; raises one InputError listing every shard that cannot be read."""
    urls = list(urls)
    workers = max(1, min(max_workers, len(urls)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scan-shard") as pool:
        futures = [pool.submit(_scan_or_reason, url, i, storage_options, retry) for i, url in enumerate(urls)]
        results = [future.result() for future in futures]
    failures = [r for r in results if isinstance(r, str)]
    if failures:
        listing = "\n".join(f"  {reason}" for reason in failures)
        count = f"got {len(failures)} that cannot be read"
        raise InputError(f"shards: expected {len(urls)} readable tar files, {count}:\n{listing}")
    return results


def _scan_or_reason(url: str, index: int, storage_options: dict | None, retry: RetryPolicy | None) -> ShardInfo | str:
    """``scan_shard``, with an unreadable shard's InputError returned as its message."""
    try:
        return scan_shard(url, index, storage_options, retry)
    except InputError as e:
        return str(e)


def iter_shard_samples(url: str, storage_options: dict | None = None, retry: RetryPolicy | None = None) -> Iterator[dict]:
    """Yields the shard's raw samples (``__key__``, ``__url__``, ``ext: bytes``) in the order ``scan_shard`` counts them.

    A raw sample with ``"__error__"`` is a failure at its place: a damaged tar region (key ``<damaged bytes A-B>``,
    or the damaged member's key) or a repeated extension. A shard that cannot be read, or whose read breaks (a
    truncated tar), ends with the marker ``{"__key__": None, "__url__": url, "__error__": reason}``. Transient
    storage faults are retried and resumed; ``TransientIOError`` is raised once the retry budget is spent.
    """
    with ShardFile(url, storage_options, retry) as raw:
        try:
            raw.open()
        except TransientIOError:
            raise
        except Exception as e:
            yield _error_marker(url, f"shard {url}: expected a readable tar file, got {_cause(e)}")
            return
        grouper = SampleGrouper(TarReader(TarBytes(raw)), url)
        try:
            yield from grouper
        except TransientIOError:
            raise
        except NotATarError as e:
            yield _error_marker(url, f"shard {url}: expected a tar archive, got {e}")
            return
        except OSError as e:  # a content error of the storage mid-stream (object gone, access revoked)
            grouper.truncated = _cause(e)
        if grouper.truncated is not None:
            yield _error_marker(url, f"shard {url}: {_early_end(grouper)}")


def _early_end(grouper: SampleGrouper) -> str:
    """Why a read ended early, with the number of entries (samples and error records) kept before the break."""
    if grouper.missing_end:
        return (f"expected a tar archive closed by its end-of-archive marker, got one that ends without it after "
                f"{grouper.count} samples ({grouper.truncated}); the samples after the cut are lost")
    return f"expected a complete tar archive, got a read error after {grouper.count} samples ({grouper.truncated})"


def _error_marker(url: str, reason: str) -> dict:
    """The last item of a shard whose read broke: no key, and the reason."""
    return {"__key__": None, "__url__": url, "__error__": reason}


_CAUSES = ((FileNotFoundError, "no such file"), (PermissionError, "access denied"), (IsADirectoryError, "a directory"),
           (NotADirectoryError, "a path through something that is not a directory"))


def _cause(error: BaseException) -> str:
    """A storage error in words: what it means (no such file, access denied...) and its ``Type: message``."""
    for kind, words in _CAUSES:
        if isinstance(error, kind):
            return f"{words} ({describe(error)})"
    return describe(error)
