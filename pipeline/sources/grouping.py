"""WebDataset's sample rules over tar events: which members count, how they group by key, what a lost region becomes.

The rules are WebDataset's (``tar_file_iterator``'s filters, ``group_by_keys`` with ``base_plus_ext``): regular
files only, metadata names skipped, key = path up to the first dot of the basename, consecutive members of one key
form a sample, extensions lower-cased. Added here: reserved extensions (``__key__``...) are refused, a repeated
extension flags its sample, and damaged tar regions (``tar_reader.Damage``) become error records in place:

- the damaged member's name still readable: its sample (merged with that key's neighbouring members) carries
  ``"__error__"``;
- otherwise: a record ``{"__key__": "<damaged bytes A-B>", "__url__": url, "__error__": reason}``.

The scan and the read run this same code (the scan without loading payloads), so their keys agree exactly.
"""

from __future__ import annotations

import inspect
import re
from typing import Iterator

from webdataset.tariterators import base_plus_ext, tar_file_iterator

from pipeline.sources.streams import TarContentError
from pipeline.sources.tar_reader import Damage, Member, MissingEnd, NotATarError, TarReader, Truncation

# Member names WebDataset's tar iterator skips as metadata (its own default, read so the two never drift apart).
SKIP_META = inspect.signature(tar_file_iterator).parameters["skip_meta"].default
NOT_LOADED = b""  # payload placeholder of a scan (which reads headers only)


def is_sample_member(name: str | None, regular: bool = True) -> bool:
    """Whether WebDataset's tar iterator hands this member on (regular file, not metadata) and we accept it."""
    if not regular or not name:
        return False
    if "/" not in name and name.startswith("__") and name.endswith("__"):
        return False
    return re.match(SKIP_META, name) is None and accepts(name)


def accepts(name: str) -> bool:
    """Rejects members with a reserved extension (``__key__``, ``__bad__``...): they would clash with sample fields."""
    _, ext = base_plus_ext(name)
    return ext is None or not (ext.startswith("__") and ext.endswith("__"))


def damaged_key(start: int, end: int) -> str:
    """Key of the error record for a damaged region whose member name cannot be read (``end`` exclusive)."""
    return f"<damaged bytes {start}-{end - 1}>"


class SampleGrouper:
    """Raw samples of one tar, in order; after iteration ``truncated`` holds why the tar ended early, if it did, and
    ``missing_end`` whether that was a file cut at a header (no end-of-archive marker) rather than inside a member.

    On truncation or a cut the sample being read at the break is dropped (as it always was: more of its members may
    have followed), the samples before it are kept.
    A damaged region naming no member is held until the next member: if that member continues the sample being
    grouped, the damage is inside that sample and flags it; otherwise it becomes an error record of its own.
    """

    def __init__(self, reader: TarReader, url: str, load: bool = True) -> None:
        self.reader, self.url, self.load = reader, url, load
        self.truncated: str | None = None
        self.missing_end = False
        self.count = 0  # samples (and error records) yielded
        self._current: dict | None = None
        self._pending: Damage | None = None  # a damaged region naming no member, not yet placed
        self._seen = 0  # tar events read
        self._last_key: str | None = None  # key of the last sample member seen (None for a name without a dot)

    def __iter__(self) -> Iterator[dict]:
        try:
            yield from self._records()
        except TarContentError as e:  # a corrupt compressed stream: the tar ends there, like a truncated one
            if self._seen == 0:
                raise NotATarError(f"data that is not a tar archive ({e})") from None
            self.truncated = str(e)
            self._current = self._pending = None
            return
        for record in self._place_pending(None) + self._flush():
            self.count += 1
            yield record

    def _records(self) -> Iterator[dict]:
        """Finished samples and error records as the events come."""
        for event in self.reader:
            self._seen += 1
            if isinstance(event, (Truncation, MissingEnd)):
                records = self._truncation(event)
            elif isinstance(event, Damage):
                records = self._damage(event)
            else:
                records = self._member(event)
            for record in records:
                self.count += 1
                yield record
            if isinstance(event, (Truncation, MissingEnd)):
                return

    def _truncation(self, event: Truncation | MissingEnd) -> list[dict]:
        """The tar ends early: the records still held, less the sample being read at the break."""
        self.truncated, self.missing_end = event.reason(), isinstance(event, MissingEnd)
        done = self._place_pending(None)
        if self._current is not None and self._last_key == self._current["__key__"]:
            self.truncated += f"; sample {self._current['__key__']}, being read there, is left out"
            self._current = None  # the sample being read at the break: incomplete
        return done

    def _member(self, member: Member) -> list[dict]:
        """Adds a member to the sample being grouped; returns the samples and records this finishes."""
        if not is_sample_member(member.name, member.regular):
            return []
        key, ext = base_plus_ext(member.name)
        self._last_key = key
        if key is None:
            return []
        done = self._place_pending(key) + self._start(key)
        ext = ext.lower()
        if ext in self._current:
            self._current.setdefault("__error__", f"sample {key}: expected one member per extension, got {member.name} twice")
            return done
        data = self.reader.read_data(member) if self.load else NOT_LOADED
        if data is not None:
            self._current[ext] = data
        return done

    def _damage(self, damage: Damage) -> list[dict]:
        """A damaged region: flags the sample of the member it names, or is held until the next member places it."""
        name = damage.name if damage.name and is_sample_member(damage.name) else None
        key = base_plus_ext(name)[0] if name else None
        if key is None:
            done = self._place_pending(None)
            self._pending = damage
            return done
        done = self._place_pending(key) + self._start(key)
        self._last_key = key
        reason = (f"sample {key}: damaged tar header of member {name} at byte {damage.start} ({damage.why}) in shard "
                  f"{self.url}; bytes {damage.start}-{damage.end - 1} lost, {_after(damage)}")
        self._current.setdefault("__error__", reason)
        return done

    def _place_pending(self, next_key: str | None) -> list[dict]:
        """Places the held damaged region: inside the current sample if ``next_key`` continues it, else as a record."""
        damage, self._pending = self._pending, None
        if damage is None:
            return []
        span = f"bytes {damage.start}-{damage.end - 1}"
        if next_key is not None and self._current is not None and self._current["__key__"] == next_key:
            reason = f"sample {next_key}: damaged tar data at {span} inside it ({damage.why}) in shard {self.url}; {_after(damage)}"
            self._current.setdefault("__error__", reason)
            return []
        reason = f"shard {self.url}: damaged tar data at {span} ({damage.why}); {_after(damage)}"
        record = {"__key__": damaged_key(damage.start, damage.end), "__url__": self.url, "__error__": reason}
        return self._flush() + [record]

    def _start(self, key: str) -> list[dict]:
        """Makes ``key`` the sample being grouped; returns the previous sample if it was another one."""
        if self._current is not None and self._current["__key__"] == key:
            return []
        done = self._flush()
        self._current = {"__key__": key, "__url__": self.url}
        return done

    def _flush(self) -> list[dict]:
        """The sample being grouped (if any), which is finished."""
        done, self._current = ([self._current] if self._current is not None else []), None
        return done


def _after(damage: Damage) -> str:
    """What followed a damaged region, in words."""
    return "read on from the next valid header" if damage.resynced else "no valid tar header after it"
