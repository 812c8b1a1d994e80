"""The ``featup precompute`` job: its config, the plan, the driver, the actor pool (or the in-process one), the shard worker
and the model step.

Imports ``featup``, ``pipeline.runtime``, ``pipeline.sources`` and ``pipeline.store``; never ``train``, ``analysis`` or ``evaluate``.
"""
