"""The inputs a store was made from, by content identity: what a resume checks before it adds rows to a store.

Each shard is recorded as ``[url, samples, identity]``, the identity being its size and ETag (object stores) or its size
and modification time (files), taken from the object the scan opened (``ShardInfo.identity``). The store's
``shards_sha256`` attribute hashes these records; the records themselves go to ``_featup/run/inputs.json`` so a
refused resume can name the shards that changed. A shard rewritten with other images and the same sample count gets a
new ETag or modification time, so a resume cannot mix rows computed from two versions of it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

from featup.errors import ConfigError
from pipeline.runtime.secrets import mask_url

MAX_NAMED = 5  # changed shards named in a refusal; the others are counted


def shard_records(shards: Sequence[Any]) -> list[list]:
    """``[url, samples, identity]`` of each shard (``ShardInfo``), in input order: what ``shards_sha256`` hashes.

    URLs are masked (a signed URL's signature or a token in its query is never stored, and its rotation is no change)."""
    return [[mask_url(s.url), s.num_samples, dict(s.identity)] for s in shards]


def shards_sha256(shards: Sequence[Any]) -> str:
    """The hash of the shards' records (URL, sample count, content identity)."""
    return hashlib.sha256(json.dumps(shard_records(shards), sort_keys=True).encode()).hexdigest()


def legacy_shards_sha256(shards: Sequence[Any]) -> str:
    """The hash stores made before content identities recorded: URL and sample count only."""
    return hashlib.sha256(json.dumps([[s.url, s.num_samples] for s in shards]).encode()).hexdigest()


def write_inputs(store: Any, shards: Sequence[Any]) -> None:
    """Records the shards' records beside a new store (``_featup/run/inputs.json``)."""
    store.write_inputs({"shards": shard_records(shards)})


def check_inputs(store: Any, shards: Sequence[Any]) -> str | None:
    """Refuses (ConfigError) a resume whose shards differ from those the store was made from, naming them; returns a
    warning to show for a store made before content identities were recorded (only URLs and counts are checked)."""
    stored = store.attrs.get("shards_sha256")
    if stored == shards_sha256(shards):
        return None
    if stored == legacy_shards_sha256(shards):
        return (f"featup: warning: store {store.url} was made before shards were fingerprinted by their content: "
                "their URLs and sample counts match, their size and ETag or modification time are not checked")
    recorded = store.read_inputs()
    old = recorded.get("shards") if isinstance(recorded, dict) else None
    changes = describe_changes(old, shard_records(shards)) if isinstance(old, list) else []
    if not changes:
        changes = ["the shards' hash (shards_sha256) differs and the store records no per-shard list to name them"]
    shown = "; ".join(changes[:MAX_NAMED]) + (f"; and {len(changes) - MAX_NAMED} more" if len(changes) > MAX_NAMED else "")
    raise ConfigError(f"inputs: expected the shards store {store.url} was made from, got {len(changes)} changed since: "
                      f"{shown}. Its rows were computed from the shards as they were: restore them, or pass --overwrite "
                      "to start over")


def describe_changes(old: list[list], new: list[list]) -> list[str]:
    """One phrase per shard position whose record differs (added, gone, other URL, other count, other identity)."""
    changes = []
    for i in range(max(len(old), len(new))):
        if i >= len(old):
            changes.append(f"shard {new[i][0]} is new (input {i})")
        elif i >= len(new):
            changes.append(f"shard {old[i][0]} (input {i}) is no longer among the inputs")
        elif old[i][0] != new[i][0]:
            changes.append(f"input {i} was {old[i][0]}, is {new[i][0]}")
        elif old[i][1] != new[i][1]:
            changes.append(f"shard {old[i][0]} held {old[i][1]} samples, holds {new[i][1]}")
        elif old[i][2] != new[i][2]:
            changes.append(f"shard {old[i][0]} was rewritten ({_identity_change(old[i][2], new[i][2])})")
    return changes


def _identity_change(old: dict, new: dict) -> str:
    """``size 10 -> 12, etag "a" -> "b"``: the identity fields that differ."""
    keys = list(dict.fromkeys([*old, *new]))
    return ", ".join(f"{k} {json.dumps(old.get(k))} -> {json.dumps(new.get(k))}" for k in keys if old.get(k) != new.get(k))
