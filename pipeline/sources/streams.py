"""Shard bytes through fsspec that ride out transient storage faults, and the tar byte stream on top of them.

``ShardFile`` opens a URL lazily and counts the bytes it hands out; a transient error (``is_transient``) while opening
or reading drops the file, reopens it and seeks back to the offset already consumed, within the ``RetryPolicy``
budget, so a stream that breaks mid-shard resumes with no byte lost or read twice. ``TarBytes`` sits on top: it
decompresses gzip/bz2/xz shards incrementally (the raw offsets stay with ``ShardFile``, so resuming still works) and
skips bytes by seeking where the store allows it (local files; object stores through fsspec's range reads).
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from typing import Any

import fsspec

from pipeline.runtime.retry import RetryPolicy, is_transient

READAHEAD_MIN = 64 << 10  # a scan's first range read after a skip
READAHEAD_MAX = 8 << 20  # a scan's largest range read (when members are small, so headers are close together)
SKIP_CHUNK = 1 << 20  # bytes read per step when a skip must read through (compressed or unseekable streams)
INFLATE_CHUNK = 1 << 14  # compressed bytes fed to a decompressor per step (bounds one step's output to ~16 MiB)


class TarContentError(Exception):
    """The bytes themselves are broken (corrupt compressed stream): a content error, never retried."""


class ShardFile:
    """A read-only, resumable view of one fsspec URL: ``read``, ``skip`` and ``tell`` over the raw bytes."""

    def __init__(self, url: str, storage_options: dict | None = None, retry: RetryPolicy | None = None,
                 exact_reads: bool = False) -> None:
        self.url, self.options = url, dict(storage_options or {})
        self.retry = retry or RetryPolicy()
        self.exact_reads = exact_reads  # no fsspec read-ahead: each read is one range request of its size
        self.pos = 0
        self.size: int | None = None  # known once opened, when the file is seekable
        self.seekable = False
        self.opens = 0  # how many times the file was (re)opened
        self.identity: dict | None = None  # content identity of the object first opened (see content_identity)
        self._file: Any = None

    def open(self) -> ShardFile:
        """Opens the file now (transient errors retried), so a missing or forbidden object is reported up front."""
        self.retry.call("open", f"shard {self.url}", self._ensure_open)
        return self

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer only at the end of the file); transient errors reopen and resume at ``tell()``."""
        return self.retry.call("read", f"shard {self.url}", self._read_once, n)

    def skip(self, n: int) -> int:
        """Advances ``n`` bytes (by seeking when the file allows it); returns how many were skipped (fewer at the end)."""
        if self.seekable and self.size is not None:
            target = min(self.pos + n, self.size)
            skipped, self.pos = target - self.pos, target
            if self._file is not None:
                self._seek_or_drop(self.pos)
            return skipped
        skipped = 0
        while skipped < n:
            data = self.read(min(SKIP_CHUNK, n - skipped))
            if not data:
                break
            skipped += len(data)
        return skipped

    def tell(self) -> int:
        """Offset of the next raw byte."""
        return self.pos

    def close(self) -> None:
        """Closes the underlying file (reading again would reopen it)."""
        self._drop()

    def __enter__(self) -> ShardFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _ensure_open(self) -> Any:
        """The open fsspec file positioned at ``self.pos``, opening (or reopening) it if needed."""
        if self._file is None:
            fs, path = fsspec.core.url_to_fs(self.url, **self.options)
            f = _open_exact(fs, path) if self.exact_reads else fs.open(path, "rb")
            try:
                if self.identity is None:
                    details = getattr(f, "details", None)  # what a buffered file (s3fs, gcsfs...) learnt when opening
                    self.identity = content_identity(details if isinstance(details, dict) else fs.info(path))
                self.seekable = bool(f.seekable())
                if self.seekable and self.size is None:
                    self.size = f.seek(0, 2)
                if self.seekable:
                    f.seek(self.pos)
            except BaseException:
                f.close()
                raise
            self._file, self.opens = f, self.opens + 1
        return self._file

    def _read_once(self, n: int) -> bytes:
        """One attempt at ``read``: a failure drops the file, so the next attempt reopens it at ``self.pos``."""
        f = self._ensure_open()
        try:
            data = f.read(n)
        except BaseException:
            self._drop()
            raise
        self.pos += len(data)
        return data

    def _seek_or_drop(self, pos: int) -> None:
        """Seeks the open file; if that fails (a transient fault), drops it to reopen at ``pos`` on the next read."""
        try:
            self._file.seek(pos)
        except Exception as e:
            if not is_transient(e):
                raise
            self._drop()

    def _drop(self) -> None:
        """Closes and forgets the file, ignoring errors (a broken connection may fail to close)."""
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except Exception:
                pass


ETAG_KEYS = ("ETag", "etag", "e_tag")  # s3fs, gcsfs / adlfs / http, others
MTIME_KEYS = ("mtime", "LastModified", "last_modified", "updated", "created")  # local first; object stores; memory


def content_identity(info: dict) -> dict:
    """What tells one version of a file from another without reading it: its size and ETag where the store gives one
    (object stores: a rewrite gives a new ETag), else its size and modification time (files), as JSON values.

    Taken from the object the scan opens, so it costs no request of its own; a store that gives neither has only the
    size."""
    identity: dict = {"size": info.get("size")}
    etag = next((info[k] for k in ETAG_KEYS if info.get(k)), None)
    if etag is not None:
        identity["etag"] = str(etag)
        return identity
    mtime = next((info[k] for k in MTIME_KEYS if info.get(k) is not None), None)
    if mtime is not None:
        identity["mtime"] = mtime if isinstance(mtime, (int, float)) else (
            mtime.isoformat() if hasattr(mtime, "isoformat") else str(mtime))
    return identity


def _open_exact(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    """``fs.open(path)`` without read-ahead cache where the filesystem takes ``cache_type`` (the buffered ones do)."""
    try:
        return fs.open(path, "rb", cache_type="none")
    except TypeError:  # a filesystem whose open takes no cache options
        return fs.open(path, "rb")


class _Inflater:
    """Incremental decompression of gzip (several members allowed), bz2 or xz; trailing non-stream bytes are ignored."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.done = False
        self._d = self._new()

    def _new(self) -> Any:
        """A fresh decompressor of this kind."""
        return {"gz": lambda: zlib.decompressobj(16 + zlib.MAX_WBITS), "bz2": bz2.BZ2Decompressor,
                "xz": lzma.LZMADecompressor}[self.kind]()

    def feed(self, data: bytes) -> bytes:
        """The decompressed bytes of ``data``; a corrupt stream is a TarContentError."""
        out = []
        while data and not self.done:
            try:
                out.append(self._d.decompress(data))
            except (zlib.error, OSError, lzma.LZMAError, EOFError) as e:
                raise TarContentError(f"corrupt {self.kind} stream ({type(e).__name__}: {e})") from None
            if not self._d.eof:
                break
            data = self._d.unused_data
            if data.startswith(_MAGICS["gz"]) and self.kind == "gz":
                self._d = self._new()  # the next member of a multi-member gzip file
            else:
                self.done = True  # end of the compressed stream: whatever follows is not part of it
        return b"".join(out)


_MAGICS = {"gz": b"\x1f\x8b", "bz2": b"BZh", "xz": b"\xfd7zXZ\x00"}


class TarBytes:
    """The tar byte stream of a shard: ``read``/``skip``/``tell`` in tar offsets, decompressing when the shard is.

    With ``readahead`` (for a scan over a file opened with ``exact_reads``), plain reads fetch at least that many
    bytes: it starts at READAHEAD_MIN, doubles with each fetch (small members are read through in ever larger range
    reads) up to READAHEAD_MAX, and falls back to the minimum after a skip past it (large members cost one small read
    each). So a scan never makes more requests than a whole read in READAHEAD_MAX blocks, and moves far fewer bytes
    when members are large.
    """

    def __init__(self, raw: ShardFile, readahead: bool = False) -> None:
        self.raw = raw
        self._ahead = READAHEAD_MIN if readahead else 0
        self.pos = 0
        self.compression: str | None = None
        self._buf = bytearray()  # bytes already read (or decompressed) beyond ``pos``; deleting its front is cheap
        self._inflater: _Inflater | None = None
        self._raw_head = b""
        self._started = False

    def read(self, n: int) -> bytes:
        """Up to ``n`` tar bytes (fewer only at the end)."""
        self._start()
        if self._inflater is None:
            self._fetch(n - len(self._buf))
        else:
            while len(self._buf) < n and self._inflate():
                pass
        data = bytes(self._buf[:n])
        del self._buf[:n]
        self.pos += len(data)
        return data

    def skip(self, n: int) -> int:
        """Advances ``n`` tar bytes without keeping them (a seek on plain, seekable shards); returns how many."""
        self._start()
        skipped = min(n, len(self._buf))
        del self._buf[:skipped]
        self.pos += skipped
        if self._inflater is None and skipped < n:
            more = self.raw.skip(n - skipped)
            self.pos += more
            if n - skipped >= self._ahead > 0:
                self._ahead = READAHEAD_MIN  # a skip past the read-ahead: members are large, fetch little
            return skipped + more
        while skipped < n:
            data = self.read(min(SKIP_CHUNK, n - skipped))
            if not data:
                break
            skipped += len(data)
        return skipped

    def tell(self) -> int:
        """Offset of the next tar byte."""
        return self.pos

    def _start(self) -> None:
        """Reads the first bytes once to tell a compressed shard from a plain tar."""
        if self._started:
            return
        self._started = True
        head = self.raw.read(max(6, self._ahead))  # the first fetch of a scan also tells the compression
        self.compression = next((kind for kind, magic in _MAGICS.items() if head.startswith(magic)), None)
        if self.compression is None:
            self._buf += head
        else:
            self._inflater = _Inflater(self.compression)
            self._raw_head = head  # compressed bytes read with the magic, inflated step by step like the rest

    def _fetch(self, need: int) -> None:
        """Appends at least ``need`` plain bytes to the buffer (fewer at the end), read-ahead included."""
        if need <= 0:
            return
        want = max(need, self._ahead)
        while need > 0:
            data = self.raw.read(want)
            if not data:
                break
            self._buf += data
            need -= len(data)
            want -= len(data)
        if self._ahead:
            self._ahead = min(2 * self._ahead, READAHEAD_MAX)

    def _inflate(self) -> bool:
        """Appends more decompressed bytes to the buffer; False at the end of the stream."""
        while not self._inflater.done:
            chunk, self._raw_head = self._raw_head[:INFLATE_CHUNK], self._raw_head[INFLATE_CHUNK:]
            chunk = chunk or self.raw.read(INFLATE_CHUNK)
            if not chunk:
                return False
            out = self._inflater.feed(chunk)
            if out:
                self._buf += out
                return True
        return False
