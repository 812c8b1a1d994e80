"""Backbones: frozen feature extractors mapping (B, 3, H, W) images to (B, dim, H / stride, W / stride) features.

Named backbones (``BACKBONES``: dino16, dino8, dinov2, vit, clip, clip-tokens, maskclip, resnet50) wrap timm
models and give the features of the published FeatUp featurizers; ``build_backbone`` also accepts
``timm:<any timm model>`` and ``<package.module>:<callable>``, and takes weights from timm, a file, or the
backbone inside a FeatUp checkpoint (``weights="checkpoint"``). Nothing is downloaded at import.
"""

from featup.backbones import cnn, vit  # noqa: F401  (register the named backbones)
from featup.backbones.base import Backbone
from featup.backbones.build import CHECKPOINT, build_backbone
from featup.backbones.featurizers import FEATURIZER_LAYOUTS
from featup.backbones.registry import BACKBONES
from featup.backbones.weights import load_state_dict_file

__all__ = ["BACKBONES", "CHECKPOINT", "FEATURIZER_LAYOUTS", "Backbone", "build_backbone", "load_state_dict_file"]
