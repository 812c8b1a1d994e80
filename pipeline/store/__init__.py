"""The feature store: Zarr arrays, the Parquet index, commit markers, the lock and the run report, and reading it back.

Imports ``featup``, ``pipeline.runtime`` and ``pipeline.sources`` only; knows nothing of Ray or of the jobs that write it.
"""
