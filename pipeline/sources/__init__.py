"""Image sources: shard URLs, brace patterns and globs, scanning and reading WebDataset tars, decoding and preprocessing samples.

Imports ``featup`` and ``pipeline.runtime`` only; knows nothing of stores or jobs.
"""
