"""Upsamplers: ``jbu`` (FeatUp's learned joint bilateral stack), ``bilinear`` (baseline), the implicit network, and
FeatUp's feed-forward successors ``anyup``, ``jafar``, ``loftup``, ``uplift`` and ``naf`` (each reproducing its
published code)."""

from featup.upsamplers import anyup, bilinear, jafar, jbu, loftup, naf, uplift  # noqa: F401  (registers the upsamplers)
from featup.upsamplers.anyup import AnyUp
from featup.upsamplers.base import UPSAMPLERS, ImageNorm, build_upsampler
from featup.upsamplers.bilinear import BilinearUpsampler
from featup.upsamplers.jafar import JAFAR
from featup.upsamplers.jbu import JBUStack, JBUStage
from featup.upsamplers.loftup import LoftUp
from featup.upsamplers.naf import NAF
from featup.upsamplers.uplift import UPLiFT

__all__ = ["UPSAMPLERS", "build_upsampler", "ImageNorm", "BilinearUpsampler", "JBUStack", "JBUStage", "AnyUp", "JAFAR",
           "LoftUp", "NAF", "UPLiFT"]
