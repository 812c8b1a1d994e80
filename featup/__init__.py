"""FeatUp: model-agnostic high-resolution deep features (Fu, Hamilton et al., ICLR 2024), in pure PyTorch.

This package holds the method only: backbones, upsamplers, downsamplers, losses and checkpoint
loading. It does no data I/O beyond reading checkpoints and knows nothing of Ray or Zarr.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("featup-pipeline")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
