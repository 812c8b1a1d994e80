"""The ground-truth benchmark (``featup evaluate``): generated images, scoring, the run and its figure.

The top of ``pipeline``: may import ``train``, ``analysis`` and everything below them, never ``precompute`` or ``jobs``.
"""
