"""Shared fixtures: randomly initialised backbones are built once per session (ViT init dominates test time)."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from featup.backbones import Backbone, build_backbone


@pytest.fixture(scope="session")
def random_backbone() -> Callable[[str], Backbone]:
    """``get(name)``: a cached ``build_backbone(name, "random")``; tests must not modify it."""
    cache: dict[str, Backbone] = {}

    def get(name: str) -> Backbone:
        if name not in cache:
            cache[name] = build_backbone(name, "random")
        return cache[name]

    return get


def images_for(backbone: Backbone, batch: int, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """A (batch, 3, rows * stride, cols * stride) batch of normal noise from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    s = backbone.stride
    return torch.randn(batch, 3, rows * s, cols * s, generator=generator)


@pytest.fixture
def make_images() -> Callable[..., torch.Tensor]:
    """The ``images_for`` helper as a fixture (tests have no package to import it from)."""
    return images_for
