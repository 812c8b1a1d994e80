"""Backbones every actor and worker builds identically: random initialisation drawn from a seeded generator."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def build_seeded_backbone(name: str, weights: str, seed: int, checkpoint: object = None) -> nn.Module:
    """The backbone on the CPU; random initialisation is drawn from a generator seeded with ``seed``.

    ``checkpoint`` (a loaded FeatUp checkpoint, path or ``featup:`` name) supplies the backbone's weights for
    ``weights="checkpoint"``, and for ``"auto"`` when it carries them (the published checkpoints do).

    Every actor must hold identical weights, so that a store does not depend on which actor computed a row.
    """
    from featup.backbones import build_backbone

    with seeded_global_generator(seed):  # timm initialises from the global generator
        return build_backbone(name, weights, checkpoint=checkpoint)


@contextmanager
def seeded_global_generator(seed: int) -> Iterator[None]:
    """Seeds torch's global CPU generator inside the block and restores its previous state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def quiet_cpu_only_warnings() -> None:
    """Silences torch's "No CUDA runtime is found, using CUDA_HOME=..." notice on machines without a GPU.

    Every process that compiles kernels (each precompute actor, each training worker) would print it once; on a
    CPU-only machine it says nothing the user can act on.
    """
    if not torch.cuda.is_available():
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
