"""Backbone test helpers: seeded image batches sized to a backbone's stride (random backbones: ../conftest.py)."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from featup.backbones import Backbone


def images_for(backbone: Backbone, batch: int, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """A (batch, 3, rows * stride, cols * stride) batch of normal noise from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    s = backbone.stride
    return torch.randn(batch, 3, rows * s, cols * s, generator=generator)


@pytest.fixture
def make_images() -> Callable[..., torch.Tensor]:
    """The ``images_for`` helper as a fixture (tests have no package to import it from)."""
    return images_for
