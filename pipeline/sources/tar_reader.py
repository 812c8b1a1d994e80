"""A streaming tar reader (512-byte blocks) that survives damage: it resynchronises on the next valid header.

Python's ``tarfile`` in stream mode reads any invalid header after the first member as the end of the archive,
silently dropping the rest. This reader yields, in tar order:

- ``Member`` for each header (ustar, GNU long names ``././@LongLink``, pax ``path``/``size`` records); its data can
  be read once with ``read_data`` right after it is yielded, or it is skipped (by seeking where the store allows);
- ``Damage`` for each region that is not a tar where a header was expected (bad checksum, unparsable fields,
  zeroed blocks followed by more members, garbage): the bytes up to the next 512-aligned block with a valid
  checksum and the ``ustar`` magic, and the damaged member's name when its header still names one;
- ``Truncation`` last, when a member's data or padding runs past the end of the file;
- ``MissingEnd`` last, when the file ends where a header or the end-of-archive marker belongs.

Every writer closes a tar with the end-of-archive marker, two zero blocks (``tarfile``, GNU tar and bsdtar then pad
with zeros to a 10240-byte record; webdataset's ``TarWriter`` is ``tarfile``), so a file that ends at a header
boundary, inside a header or after a single zero block was cut: ``tarfile`` and GNU tar read it as a shorter,
complete tar, this reader says it ends without the marker. Zero blocks not followed by any valid header are the end
of the archive: padding or appended bytes after them are ignored. Header fields are parsed by
``tarfile.TarInfo.frombuf``.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from typing import Iterator, Union

from pipeline.sources.streams import TarBytes

BLOCK = tarfile.BLOCKSIZE  # 512
MAX_META_SIZE = 1 << 20  # GNU long names and pax records above this size are treated as damage, not read
_RESYNC_CHUNK = 128 * BLOCK  # bytes searched per step for the next valid header
_MAGIC_AT = 257  # offset of the ``ustar`` magic in a header block
_ENCODING, _ERRORS = tarfile.ENCODING, "surrogateescape"  # as tarfile.open decodes names


class NotATarError(Exception):
    """The shard's first block is not a tar header: the file is not a tar archive at all."""


@dataclass(frozen=True)
class Member:
    """One member header: its name (long names applied), data size, offset of its header and of its data."""

    name: str
    size: int
    offset: int
    offset_data: int
    regular: bool  # a regular file (what WebDataset hands on); other types are skipped


@dataclass(frozen=True)
class Damage:
    """Bytes ``start``..``end - 1`` where a header was expected but none could be read; ``name`` if still readable."""

    start: int
    end: int
    name: str | None
    why: str
    resynced: bool  # whether a valid header follows (False: the damage runs to the end of the file)


@dataclass(frozen=True)
class Truncation:
    """The file ends inside the data (or padding) of ``name``, whose data should have ended at ``expected``."""

    name: str
    offset: int
    expected: int
    end: int

    def reason(self) -> str:
        """In words, with tarfile's wording first (``unexpected end of data``)."""
        return (f"unexpected end of data: the tar ends at byte {self.end} inside member {self.name}, "
                f"whose data runs to byte {self.expected}")


@dataclass(frozen=True)
class MissingEnd:
    """The file ends at byte ``end`` without the end-of-archive marker: ``where`` says what the cut fell on."""

    end: int
    where: str

    def reason(self) -> str:
        """In words: what is missing, where the file ends, and what that means."""
        return (f"no end-of-archive marker (two zero blocks): the file ends at byte {self.end}, {self.where}, "
                "so it was cut there")


Event = Union[Member, Damage, Truncation, MissingEnd]


@dataclass
class _Pending:
    """Long-name and pax records read for the next header."""

    name: str | None = None
    size: int | None = None


class TarReader:
    """Iterates a tar stream as Member / Damage / Truncation / MissingEnd events; see the module docstring."""

    def __init__(self, source: TarBytes) -> None:
        self.source = source
        self._ahead = bytearray()  # bytes read past the reader's position (after a resync)
        self.pos = 0
        self._data_end: int | None = None  # where the last yielded member's padded data ends
        self._member: Member | None = None
        self._short: Truncation | None = None  # set when read_data ran out of bytes

    def read_data(self, member: Member) -> bytes | None:
        """The data of the member just yielded, or None if the file ends inside it (a Truncation follows)."""
        if member is not self._member or self.pos != member.offset_data:
            raise RuntimeError(f"tar member {member.name}: data can only be read right after its header")
        data = self._read(member.size)
        if len(data) < member.size:
            self._short = Truncation(member.name, member.offset, member.offset_data + member.size, self.pos)
            return None
        return data

    def __iter__(self) -> Iterator[Event]:
        pending, first = _Pending(), True
        while True:
            if not self._skip_to_data_end():
                yield self._short
                return
            start = self.pos
            block = self._read(BLOCK)
            if len(block) < BLOCK:
                if first:
                    raise NotATarError(_not_a_tar(block, "a truncated header"))
                yield MissingEnd(self.pos, "inside a header" if block else "where the next header belongs")
                return
            event, pending = self._event(block, start, pending, first)
            first = False
            if event is _END:
                return
            if event is not None:
                yield event
            if isinstance(event, (Truncation, MissingEnd)) or (isinstance(event, Damage) and not event.resynced):
                return

    def _event(self, block: bytes, start: int, pending: _Pending, first: bool) -> tuple[Event | None, _Pending]:
        """The event of the block at ``start`` (None for long-name/pax headers, consumed into ``pending``)."""
        if block.count(0) == BLOCK:
            return self._after_zeros(start, pending), _Pending()
        try:
            info = tarfile.TarInfo.frombuf(block, _ENCODING, _ERRORS)
        except tarfile.HeaderError as e:
            if first and block[_MAGIC_AT : _MAGIC_AT + 5] != b"ustar":
                raise NotATarError(_not_a_tar(block, f"no tar header ({e})")) from None
            return self._damage(start, _readable_name(block, pending), _why(e)), _Pending()
        if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE):
            return self._meta(info, start, pending)
        name = pending.name if pending.name is not None else info.name
        size = pending.size if pending.size is not None else info.size
        skips_data = info.type in tarfile.REGULAR_TYPES or info.type not in tarfile.SUPPORTED_TYPES
        member = Member(name, size, start, start + BLOCK, info.type in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE))
        self._member = member
        self._data_end = start + BLOCK + (_padded(size) if skips_data else 0)
        return member, _Pending()

    def _meta(self, info: tarfile.TarInfo, start: int, pending: _Pending) -> tuple[Event | None, _Pending]:
        """Reads a GNU long-name or pax header's data into ``pending``; oversized or unparsable ones are damage."""
        if info.size > MAX_META_SIZE:
            return self._damage(start, pending.name, f"{info.type!r} header of {info.size} bytes"), _Pending()
        data = self._read(_padded(info.size))
        if len(data) < _padded(info.size):
            return Truncation(info.name, start, start + BLOCK + _padded(info.size), self.pos), pending
        data = data[: info.size]
        if info.type == tarfile.GNUTYPE_LONGNAME:
            pending.name = data.split(b"\0", 1)[0].decode(_ENCODING, _ERRORS)
        elif info.type == tarfile.XHDTYPE:  # global headers (XGLTYPE) and long link names name no member: ignored
            try:
                records = _pax_records(data)
                if "path" in records:
                    pending.name = records["path"]
                if "size" in records:
                    pending.size = int(records["size"])
            except ValueError as e:
                return self._damage(start, pending.name, f"unparsable pax header ({e})"), _Pending()
        return None, pending

    def _after_zeros(self, start: int, pending: _Pending) -> Event | None:
        """Zero blocks: the end of the archive, unless a valid header follows (then they are a damaged region);
        a file that ends before a second whole block has no end-of-archive marker."""
        following = self._read(BLOCK)
        self._unread(following)
        if len(following) < BLOCK:
            return MissingEnd(self.pos + len(following), "inside the end-of-archive marker (one zero block of two)")
        found = self._resync()
        if found is None:
            return _END
        return Damage(start, found, pending.name, "zeroed header block", True)

    def _damage(self, start: int, name: str | None, why: str) -> Damage:
        """A damaged region from ``start`` to the next valid header (or the end of the file)."""
        found = self._resync()
        end = found if found is not None else self.pos
        return Damage(start, end, name, why, found is not None)

    def _resync(self) -> int | None:
        """Searches from ``self.pos`` for the next 512-aligned valid header with the ``ustar`` magic; returns its offset.

        Leaves the reader positioned at that header (the bytes read past it are kept), or at the end of the file.
        """
        while True:
            chunk = self._read(_RESYNC_CHUNK)
            base = self.pos - len(chunk)
            at = chunk.find(b"ustar", _MAGIC_AT)
            while at != -1:
                offset = at - _MAGIC_AT
                if offset % BLOCK == 0 and offset + BLOCK <= len(chunk) and _valid_header(chunk[offset : offset + BLOCK]):
                    self._unread(chunk[offset:])
                    return base + offset
                at = chunk.find(b"ustar", at + 1)
            if len(chunk) < _RESYNC_CHUNK:
                return None

    def _skip_to_data_end(self) -> bool:
        """Moves past the last yielded member's data and padding; False (and ``_short`` set) if the file ends first."""
        if self._short is not None:
            return False
        if self._data_end is None or self.pos >= self._data_end:
            return True
        need = self._data_end - self.pos
        skipped = self._skip(need)
        if skipped < need:
            member = self._member
            self._short = Truncation(member.name, member.offset, self._data_end, self.pos)
            return False
        return True

    def _read(self, n: int) -> bytes:
        """Up to ``n`` bytes from the reader's position."""
        head = bytes(self._ahead[:n])
        del self._ahead[:n]
        data = head + self.source.read(n - len(head)) if len(head) < n else head
        self.pos += len(data)
        return data

    def _skip(self, n: int) -> int:
        """Skips up to ``n`` bytes; returns how many."""
        head = min(n, len(self._ahead))
        del self._ahead[:head]
        skipped = head + (self.source.skip(n - head) if head < n else 0)
        self.pos += skipped
        return skipped

    def _unread(self, data: bytes) -> None:
        """Puts ``data`` back in front of the stream (it was read past the position being returned to)."""
        self._ahead[:0] = data
        self.pos -= len(data)


_END = Damage(-1, -1, None, "end of archive", False)  # sentinel: never yielded to callers


def _padded(size: int) -> int:
    """``size`` rounded up to whole blocks."""
    return -(-size // BLOCK) * BLOCK


def _valid_header(block: bytes) -> bool:
    """Whether ``block`` is a header to resynchronise on: ``ustar`` magic and fields tarfile accepts (checksum)."""
    if block[_MAGIC_AT : _MAGIC_AT + 5] != b"ustar":
        return False
    try:
        tarfile.TarInfo.frombuf(block, _ENCODING, _ERRORS)
    except tarfile.HeaderError:
        return False
    return True


def _readable_name(block: bytes, pending: _Pending) -> str | None:
    """The member name a damaged header still holds (its ``ustar`` magic intact, the name printable UTF-8), or None."""
    if pending.name is not None:
        return pending.name
    if block[_MAGIC_AT : _MAGIC_AT + 5] != b"ustar":
        return None
    try:
        name = block[:100].split(b"\0", 1)[0].decode("utf-8")
        prefix = block[345:500].split(b"\0", 1)[0].decode("utf-8") if block[_MAGIC_AT : _MAGIC_AT + 8] == b"ustar\x0000" else ""
    except UnicodeDecodeError:
        return None
    name = f"{prefix}/{name}" if prefix else name
    return name if name and name.isprintable() else None


def _pax_records(data: bytes) -> dict[str, str]:
    """``length key=value\\n`` records of a pax extended header (raises ValueError if they do not parse)."""
    records, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        record = data[pos : pos + length]
        if length <= space - pos or not record.endswith(b"\n") or b"=" not in record:
            raise ValueError(f"bad record at byte {pos}")
        key, value = record[space - pos + 1 : -1].split(b"=", 1)
        records[key.decode("utf-8", _ERRORS)] = value.decode("utf-8", _ERRORS)
        pos += length
    return records


def _why(error: tarfile.HeaderError) -> str:
    """Why a header block was refused, in words."""
    text = str(error) or type(error).__name__
    return "bad checksum" if "checksum" in text else f"invalid header ({text})"


def _not_a_tar(block: bytes, what: str) -> str:
    """Why a shard is not a tar at all."""
    if not block:
        return "an empty file (0 bytes)"
    return f"data that is not a tar archive ({what})"
