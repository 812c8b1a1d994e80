"""Looking at stores: linear probes (``featup probe``) and PCA pictures of features (``show``, ``upsample``, the demo).

Imports ``featup``, ``pipeline.runtime``, ``pipeline.sources`` and ``pipeline.store``; never ``precompute`` or ``train``.
"""
