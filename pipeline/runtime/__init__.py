"""What every job shares: storage locations with their options, atomic writes, the Ray session, seeded backbones, progress.

The bottom of ``pipeline``: imports ``featup`` only, never another ``pipeline`` subpackage.
"""
