"""Secrets kept out of everything a job stores, reports or prints: one masking, reused everywhere.

A command line may carry credentials: ``--storage-option secret=...``, ``featup submit --env AWS_SECRET_ACCESS_KEY=...``,
a pre-signed URL (``...?X-Amz-Signature=...``) or a URL with a user and password (``https://user:pw@host/...``).
Stores are shared with colleagues and reports are pasted into issues, so every such value becomes ``***``:

- ``mask_argv`` masks a command line (every ``--storage-option`` and ``--env`` value, any option whose name looks
  like a credential, and the credential parts of every URL) and remembers the credential values among them;
- ``mask_text`` masks the credential parts of the URLs and ``key=value`` / ``'key': 'value'`` pairs in free text,
  and every value remembered; ``mask_json`` applies it to every string of a JSON-ready value;
- ``masking(argv)`` does both for one CLI command: its values are remembered, and ``sys.stdout`` / ``sys.stderr``
  mask everything written to them (progress, warnings, errors, the logs Ray forwards) until the command ends.

A key "looks like a credential" when one of its words is key, secret, token, password, session, signature,
credential or auth (``aws_secret_access_key``, ``X-Amz-Security-Token``, ``sig``), except the project's own
options that merely contain such a word (``--image-key``, ``--key-dim``).
"""

from __future__ import annotations

import re
import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterator, Sequence, TextIO

MASK = "***"
# Words of a key (split at punctuation and camelCase) that make it a credential, and fragments that do anywhere in it.
CREDENTIAL_WORDS = frozenset({"key", "secret", "token", "password", "passwd", "pwd", "session", "signature", "sig",
                              "credential", "credentials", "auth", "authorization", "cookie"})
CREDENTIAL_FRAGMENTS = ("secret", "token", "passw", "credential", "signature", "apikey", "accesskey", "session")
SAFE_KEYS = frozenset({"image_key", "key_dim"})  # options of this project that name no secret
# Options whose every value is masked (KEY=VALUE: the key is kept), with the abbreviations argparse accepts.
VALUE_OPTIONS = ("--storage-option", "--env")
MIN_REMEMBERED = 6  # shorter values are masked where they stand but not searched for in free text

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")
_PAIR = re.compile(r"(?<![\w.\-/])([A-Za-z_][\w.\-]*)=([^\s&'\",;)]+)")
_QUOTED_PAIR = re.compile(r"""(['"])([A-Za-z_][\w.\-]*)\1(\s*:\s*)(['"])(.*?)(?<!\\)\4""")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
# Values of key=value pairs in text that are no secret: already masked, or a placeholder of a message (KEY=VALUE, key=...).
_PLACEHOLDER = re.compile(r"^(\*\*\*|\.\.\.|<[^>]*>|[A-Z][A-Z_]*)(?![A-Za-z0-9])")

_lock = threading.Lock()
_remembered: set[str] = set()
_pattern: tuple[frozenset[str], re.Pattern | None] = (frozenset(), None)  # the regex of the remembered values


def is_credential_key(key: str) -> bool:
    """Whether an option, query parameter or variable named ``key`` holds a credential (``aws_secret_access_key``...)."""
    name = key.lstrip("-")
    if name.lower().replace("-", "_") in SAFE_KEYS:
        return False
    words = [w.lower() for w in re.split(r"[^A-Za-z0-9]+", _CAMEL.sub("_", name)) if w]
    joined = name.lower()
    return any(w in CREDENTIAL_WORDS for w in words) or any(f in joined for f in CREDENTIAL_FRAGMENTS)


def mask_url(url: str) -> str:
    """``url`` with its user-info part and the values of its credential query parameters masked (remembered)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        userinfo, host = authority.rsplit("@", 1)
        for part in userinfo.split(":"):
            remember(part)
        authority = f"{MASK}@{host}"
    path, qmark, query = tail.partition("?")
    if qmark:
        query, hash_, fragment = query.partition("#")
        query = "&".join(_mask_query_item(item) for item in query.split("&")) + hash_ + fragment
    return f"{scheme}://{authority}{path}{qmark}{query}"


def _mask_query_item(item: str) -> str:
    name, eq, value = item.partition("=")
    if eq and is_credential_key(_unquote(name)):
        remember(value)
        remember(_unquote(value))
        return f"{name}={MASK}"
    return item


def _unquote(text: str) -> str:
    from urllib.parse import unquote_plus

    return unquote_plus(text)


def mask_text(text: str) -> str:
    """``text`` with every URL's credential parts, credential ``key=value`` and ``'key': 'value'`` pairs and every
    remembered secret masked; the fast path returns it unchanged when it can hold none of them."""
    if not text or not isinstance(text, str):
        return text
    remembered = _remembered_pattern()
    if remembered is not None:
        text = remembered.sub(MASK, text)
    if "://" in text:
        text = _URL.sub(_mask_url_match, text)
    if "=" in text:
        text = _PAIR.sub(_mask_pair, text)
    if ":" in text and ("'" in text or '"' in text):
        text = _QUOTED_PAIR.sub(_mask_quoted_pair, text)
    return text


def _mask_pair(match: re.Match) -> str:
    """``key=value`` in text: the value masked when the key names a credential and the value is not a placeholder."""
    key, value = match[1], match[2]
    return f"{key}={MASK}" if is_credential_key(key) and not _PLACEHOLDER.match(value) else match[0]


def _mask_quoted_pair(match: re.Match) -> str:
    """``'key': 'value'`` (a dict's repr, JSON) in text: the value masked when the key names a credential."""
    quote, key, colon, value_quote = match[1], match[2], match[3], match[4]
    return f"{quote}{key}{quote}{colon}{value_quote}{MASK}{value_quote}" if is_credential_key(key) else match[0]


def _mask_url_match(match: re.Match) -> str:
    """A URL found in text, masked; punctuation that ends the sentence around it (``.,:;)``) stays outside it."""
    url = match.group(0)
    core = url.rstrip(".,:;!?)]}'")
    return mask_url(core) + url[len(core):]


def _remembered_pattern() -> re.Pattern | None:
    """One regex of every remembered value, longest first, each standing alone (not inside a longer word)."""
    global _pattern
    with _lock:
        if _pattern[0] != _remembered:
            values = sorted(_remembered, key=len, reverse=True)
            alternatives = "|".join(map(re.escape, values))
            regex = re.compile(rf"(?<![A-Za-z0-9])(?:{alternatives})(?![A-Za-z0-9])") if values else None
            _pattern = (frozenset(_remembered), regex)
        return _pattern[1]


def mask_json(value: Any) -> Any:
    """A JSON-ready value (dicts, lists, tuples, strings, numbers) with ``mask_text`` applied to every string, keys
    included; containers keep their type."""
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, dict):
        return {mask_text(k) if isinstance(k, str) else k: mask_json(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(mask_json(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(mask_json(v) for v in value)
    return value


def mask_argv(argv: Sequence[str]) -> list[str]:
    """A command line fit to store, report and print: every ``--storage-option`` / ``--env`` value (its key kept),
    the value of any option that looks like a credential, and the credential parts of URLs masked (and remembered)."""
    out: list[str] = []
    pending: str | None = None  # the option whose value is the next argument
    for arg in map(str, argv):
        if pending is not None:
            out.append(_mask_option_value(pending, arg))
            pending = None
        elif arg.startswith("--") and "=" in arg:
            option, _, value = arg.partition("=")
            out.append(f"{option}={_mask_option_value(option, value)}")
        elif arg.startswith("--") and (_value_option(arg) or is_credential_key(arg)):
            out.append(arg)
            pending = arg
        else:
            out.append(mask_text(arg))
    return out


def credential_options(argv: Sequence[str]) -> list[str]:
    """The ``--storage-option`` / ``--env`` entries of a command line whose key looks like a credential, as
    ``--option KEY=***`` (what ``featup submit`` warns about: they are readable on the cluster)."""
    args, found = [str(a) for a in argv], []
    for i, arg in enumerate(args):
        option, eq, value = arg.partition("=")
        name = _value_option(option) if option.startswith("--") else None
        if name is None:
            continue
        key = (value if eq else (args[i + 1] if i + 1 < len(args) else "")).partition("=")[0]
        if is_credential_key(key):
            found.append(f"{name} {key}={MASK}")
    return found


def _value_option(option: str) -> str | None:
    """The option of VALUE_OPTIONS that ``option`` names, abbreviations included (``--storage``, ``--env``)."""
    return next((o for o in VALUE_OPTIONS if o.startswith(option) and len(option) > 2), None)


def _mask_option_value(option: str, value: str) -> str:
    if _value_option(option):
        key, eq, secret = value.partition("=")
        if not eq:
            remember(value)
            return MASK
        if is_credential_key(key):
            remember(secret)
        return f"{key}={MASK}"
    if is_credential_key(option):
        remember(value)
        return MASK
    return mask_text(value)


def remember(value: Any) -> None:
    """Masks ``value`` wherever ``mask_text`` meets it from now on (values shorter than MIN_REMEMBERED excepted)."""
    if isinstance(value, str) and len(value) >= MIN_REMEMBERED and value != MASK:
        with _lock:
            _remembered.add(value)


class MaskedStream:
    """A text stream that masks every write (``mask_text``) and is otherwise the stream it wraps (isatty, fileno...)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(mask_text(text))

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextmanager
def masking(argv: Sequence[str] = ()) -> Iterator[list[str]]:
    """For one command: remembers the secrets of ``argv`` and masks everything written to sys.stdout and sys.stderr;
    yields the masked command line. Afterwards the streams and the remembered values are as before."""
    with _lock:
        saved = set(_remembered)
    streams = sys.stdout, sys.stderr
    wrapped = tuple(s if isinstance(s, MaskedStream) or s is None else MaskedStream(s) for s in streams)
    try:
        masked = mask_argv(argv)
        sys.stdout, sys.stderr = wrapped
        yield masked
    finally:
        if sys.stdout is wrapped[0]:
            sys.stdout = streams[0]
        if sys.stderr is wrapped[1]:
            sys.stderr = streams[1]
        with _lock:
            _remembered.clear()
            _remembered.update(saved)
