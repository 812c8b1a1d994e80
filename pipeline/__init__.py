"""The batch pipeline around the FeatUp method: shards in, Zarr feature stores out, and the jobs that use them.

Subpackages, each importing only from those before it (and from ``featup``), never from ``jobs``:

1. ``runtime``  - shared by every job: storage locations and atomic writes, the Ray session, seeded backbones, progress.
2. ``sources``  - WebDataset shards: URLs and patterns, scanning, reading, sample decoding, image preprocessing.
3. ``store``    - the Zarr feature store (arrays, index, commits, lock, report) and reading it back.
4. ``precompute``, ``train``, ``analysis`` - the jobs (siblings: none imports another).
5. ``evaluate`` - the ground-truth benchmark; it may use ``train`` and ``analysis``.

``tests/test_layers.py`` enforces this order and the absence of import circles.
"""
