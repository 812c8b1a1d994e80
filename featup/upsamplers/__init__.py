"""Upsamplers: ``jbu`` (learned joint bilateral stack), ``bilinear`` (baseline) and the implicit network."""

from featup.upsamplers import bilinear, jbu  # noqa: F401  (registers the upsamplers)
from featup.upsamplers.base import UPSAMPLERS, build_upsampler
from featup.upsamplers.bilinear import BilinearUpsampler
from featup.upsamplers.jbu import JBUStack, JBUStage

__all__ = ["UPSAMPLERS", "build_upsampler", "BilinearUpsampler", "JBUStack", "JBUStage"]
