"""Backbones: frozen feature extractors mapping (B, 3, H, W) images to (B, dim, H / stride, W / stride) features.

Named backbones (``BACKBONES``: dino16, dino8, dinov2, clip, vit, resnet50) wrap timm models; ``build_backbone``
also accepts ``timm:<any timm model>`` and ``<package.module>:<callable>``. Nothing is downloaded at import.
"""

from featup.backbones import cnn, vit  # noqa: F401  (register the named backbones)
from featup.backbones.base import Backbone
from featup.backbones.build import build_backbone
from featup.backbones.registry import BACKBONES
from featup.backbones.weights import load_state_dict_file

__all__ = ["BACKBONES", "Backbone", "build_backbone", "load_state_dict_file"]
