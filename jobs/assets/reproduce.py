"""Remakes ``teacher16_jbu.ckpt``: ``python -m jobs.assets.reproduce [--work DIR]`` (about 10 minutes on 2 CPU cores).

It runs ``featup evaluate`` (96-pixel generated images, 64 training images, 400 JBU steps: the JBU is trained with
``train-jbu`` on the ground-truth teacher and scored against the known features), then keeps what inference needs:
the ``upsampler.*`` weights and the hyper-parameters (no optimizer state, no training-only modules, no local paths).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Sequence

EVALUATE_ARGS = ["--image-size", "96", "--train-images", "64", "--test-images", "3", "--jbu-steps", "400",
                 "--implicit-steps", "2", "--implicit-views", "4", "--threads", "1"]


def strip_checkpoint(trained: Path, shipped: Path) -> None:
    """Copies the inference part of a train-jbu checkpoint: upsampler weights and hyper-parameters without local paths."""
    import torch

    content = torch.load(trained, map_location="cpu", weights_only=True)
    state = {k: v for k, v in content["state_dict"].items() if k.startswith("upsampler.")}
    hyper = dict(content["hyper_parameters"])
    hyper["settings"] = {k: v for k, v in hyper["settings"].items() if k != "inputs"}
    hyper["trained_by"] = "featup evaluate " + " ".join(EVALUATE_ARGS) + " (python -m jobs.assets.reproduce)"
    buf = io.BytesIO()
    torch.save({"state_dict": state, "hyper_parameters": hyper}, buf)
    shipped.write_bytes(buf.getvalue())


def main(argv: Sequence[str] | None = None) -> int:
    from jobs.assets import TEACHER_JBU
    from jobs.cli import main as featup

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("teacher-jbu"), help="folder for the evaluation run (default ./teacher-jbu)")
    parser.add_argument("--out", type=Path, default=TEACHER_JBU, help=f"checkpoint to write (default {TEACHER_JBU})")
    args = parser.parse_args(argv)
    code = featup(["evaluate", "--out", str(args.work), *EVALUATE_ARGS])
    if code != 0:
        return code
    strip_checkpoint(args.work / "jbu.ckpt", args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
