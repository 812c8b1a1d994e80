"""What every command that builds a model does first: checkpoint names resolved before any work."""

from __future__ import annotations

import argparse

from featup.errors import ConfigError
from featup.upsampler_hub import KINDS

UPSAMPLER_HELP = (f"jbu (default: FeatUp's JBU), bilinear, or one of FeatUp's successors with published weights: "
                  f"{', '.join(KINDS)} (see --checkpoint)")
CHECKPOINT_HELP = (
    "the upsampler's weights: a published name, downloaded once to $TORCH_HOME/hub/checkpoints (jbu: "
    "featup:<model>[:no_norm]; anyup, anyup:multi_backbone, jafar:<backbone>, loftup:<backbone>, uplift:<backbone>, naf; a successor's "
    "name implies --upsampler, and a per-backbone one --backbone), a path or a URL (default: none for jbu, a random "
    "JBU; a successor's published weights for the backbone)"
)


def resolve_names(args: argparse.Namespace) -> None:
    """Without the network: ``--upsampler`` from a successor's checkpoint name (``anyup``, ``jafar:<backbone>``, ...),
    a successor's ``--checkpoint`` from its published weights when none is given, and ``args.backbone`` from a name
    that implies one (``featup:<model>``, a per-backbone successor name) when it is left out. A name of another kind,
    or a different backbone than a ``featup:`` name's, is refused with both named."""
    from featup import published, upsampler_hub

    upsampler = getattr(args, "upsampler", None)
    if upsampler is not None or upsampler_hub.is_name(args.checkpoint):
        upsampler, args.checkpoint = upsampler_hub.resolve(upsampler, args.checkpoint, args.backbone)
        if hasattr(args, "upsampler"):
            args.upsampler = upsampler
    args.backbone = published.resolve_backbone(args.backbone, args.checkpoint) or upsampler_hub.implied_backbone(args.checkpoint)
    if args.backbone is None:
        raise ConfigError(
            "--backbone: expected a backbone name, or a --checkpoint that implies one (featup:<model>, "
            "jafar:<backbone>, loftup:<backbone>, uplift:<backbone>), got neither"
        )


def resolve_model_names(args: argparse.Namespace) -> None:
    """``resolve_names``, then makes sure a named checkpoint is in the cache: downloaded once now, or one clear error
    within seconds when offline."""
    from featup import hub, upsampler_hub

    resolve_names(args)
    if upsampler_hub.is_name(args.checkpoint):
        upsampler_hub.fetch(args.checkpoint)
    elif args.checkpoint is not None:
        hub.resolve_checkpoint(args.checkpoint)
