"""``train-jbu`` checkpoints: one file that ``precompute --checkpoint`` loads and an interrupted run resumes from.

Layout (everything loads with ``torch.load(weights_only=True)``)::

    {"state_dict": {"upsampler.*", "downsampler.*", "scale_net.*", "model.1.norm.*"},   # the official layout
     "hyper_parameters": {"backbone", "weights", "weights_id", "stride", "dim", "image_size", "lowres_size",
                          "stages", "settings": {...}, "featup_version", "trained_by"},
     "featup_training": {"step", "optimizer", "ranks": [{"generator", "torch_rng", "cuda_rng", "position"}...],
                         "losses": [{"step", "total", "reconstruction", "crf", "tv"}...], "skipped", "world_size"}}
"""

from __future__ import annotations

import io
from typing import Any

import torch

from featup.checkpoint import read_checkpoint
from featup.errors import CheckpointError, ConfigError
from pipeline.runtime.storage import Location, put_atomic

TRAINING_KEY = "featup_training"
# hyper_parameters a resumed run must match (``settings`` is compared entry by entry).
RESUME_KEYS = ("backbone", "weights_id", "stride", "dim", "image_size", "stages")


def save_checkpoint(location: Location, payload: dict[str, Any]) -> None:
    """Write ``payload`` whole: a temp file renamed over ``url`` locally, one PUT on object stores."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    fs, path = location.filesystem()
    put_atomic(fs, path, buf.getvalue())


def write_file(location: Location, data: bytes) -> None:
    """Write a small side file (loss log, plot) next to the checkpoint, atomically as the checkpoint is."""
    fs, path = location.filesystem()
    put_atomic(fs, path, data)


def exists(location: Location) -> bool:
    fs, path = location.filesystem()
    return fs.exists(path)


def remove(locations: list[Location]) -> None:
    """Delete the files that exist among ``urls`` (``--overwrite``)."""
    for location in locations:
        fs, path = location.filesystem()
        if fs.exists(path):
            fs.rm(path)


def load_training_checkpoint(location: Location) -> dict[str, Any] | None:
    """The checkpoint at ``url`` if there is one (None otherwise); refuses a file that is not a train-jbu checkpoint."""
    if not exists(location):
        return None
    url = location.url
    content, _ = read_checkpoint(url, **location.options)
    if not isinstance(content, dict) or not isinstance(content.get(TRAINING_KEY), dict):
        keys = list(content)[:5] if isinstance(content, dict) else type(content).__name__
        raise ConfigError(
            f"--output {url}: expected a new path or a checkpoint of featup train-jbu to resume, got a file with {keys} "
            "(nothing was changed; pass --overwrite to replace it)"
        )
    return content


def check_resume(url: str, saved: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Refuse to resume a run whose settings differ from this one's, naming each difference."""
    old, new = saved.get("hyper_parameters") or {}, wanted
    diffs = [f"{k}: {old.get(k)!r} there, {new.get(k)!r} here" for k in RESUME_KEYS if old.get(k) != new.get(k)]
    old_s, new_s = old.get("settings") or {}, new.get("settings") or {}
    diffs += [f"{k}: {old_s.get(k)!r} there, {new_s.get(k)!r} here" for k in sorted(set(old_s) | set(new_s)) if old_s.get(k) != new_s.get(k)]
    if diffs:
        raise ConfigError(
            f"--output {url}: expected a checkpoint of the same training to resume, got other settings "
            f"({'; '.join(diffs)}); rerun with its settings or pass --overwrite to start over"
        )


def training_state(saved: dict[str, Any], rank: int, world: int, url: str) -> tuple[dict, dict]:
    """The saved training state and this rank's part of it (RNG states, stream position)."""
    state = saved[TRAINING_KEY]
    ranks = state.get("ranks") or []
    if len(ranks) != world or rank >= len(ranks):
        raise CheckpointError(f"checkpoint {url}: expected the states of {world} worker(s), got {len(ranks)}")
    return state, ranks[rank]


def rng_state(generator: torch.Generator, device: torch.device, position: torch.Tensor) -> dict[str, torch.Tensor]:
    """This process's random state (objective generator, torch's global RNGs) and stream position, as tensors."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0, dtype=torch.uint8)
    return {"generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "cuda_rng": cuda, "position": position}


def restore_rng(state: dict[str, torch.Tensor], generator: torch.Generator, device: torch.device) -> None:
    """Put back what ``rng_state`` saved (the CUDA state only on a CUDA device)."""
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and state["cuda_rng"].numel():
        torch.cuda.set_rng_state(state["cuda_rng"], device)
