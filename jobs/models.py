"""What every command that builds a model does first: ``featup:`` checkpoint names resolved before any work."""

from __future__ import annotations

import argparse

from featup.errors import ConfigError


def resolve_model_names(args: argparse.Namespace) -> None:
    """Fills ``args.backbone`` from a ``featup:<model>`` checkpoint (a different one is refused, both named) and makes
    sure a named checkpoint is in the cache: downloaded once now, or one clear error within seconds when offline."""
    from featup import hub

    args.backbone = hub.resolve_backbone(args.backbone, args.checkpoint)
    if args.backbone is None:
        raise ConfigError("--backbone: expected a backbone name, or a --checkpoint featup:<model> that implies one, got neither")
    if args.checkpoint is not None:
        hub.resolve_checkpoint(args.checkpoint)
