"""Kept for users' code: ``from pipeline.reader import open_features``. The reader lives in ``pipeline.store.reader``."""

from pipeline.store.reader import FeatureReader, open_features

__all__ = ["FeatureReader", "open_features"]
