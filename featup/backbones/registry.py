"""The registry of named backbones; ``vit.py`` and ``cnn.py`` add to it, ``build_backbone`` reads it."""

from __future__ import annotations

from featup.backbones.base import Backbone
from featup.registry import Registry

# Each factory takes the ``weights`` argument of ``build_backbone`` ("auto", "random" or a file) and
# returns a Backbone on the CPU in float32; nothing is created or downloaded until it is called.
BACKBONES: Registry[Backbone] = Registry("backbone")
