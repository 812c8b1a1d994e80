"""The ``featup train-jbu`` job: the training loop (local or Ray Train), its image stream, checkpoints and loss log.

Imports ``featup``, ``pipeline.runtime``, ``pipeline.sources`` and ``pipeline.store``; never ``precompute``, ``analysis`` or
``evaluate``. ``pipeline.train.train_jbu(TrainConfig(...))`` is the documented entry point.
"""

from pipeline.train.loop import TrainConfig, TrainResult, train_jbu

__all__ = ["TrainConfig", "TrainResult", "train_jbu"]
