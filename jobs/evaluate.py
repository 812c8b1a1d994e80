"""Measure bilinear, a trained JBU and the implicit upsampler (and one of FeatUp's successors) against known features.

Generates piecewise-textured images (a train and a held-out split) and a teacher backbone whose coarse
features are the area means of a known per-pixel field, trains the JBU with train-jbu on the train
split, fits the implicit upsampler to each held-out image, scores all three on the held-out images
(relative L2 error, cosine similarity, near edges vs flat, reconstruction on held-out jitters) and
writes results.md, results.json and figure.png to --out.
"""

from __future__ import annotations

import argparse
import sys

from featup.upsampler_hub import KINDS
from jobs.cli import EXIT_FAILED, EXIT_OK, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``featup evaluate`` options; defaults are the evaluation's defaults (``EvalConfig``)."""
    parser.add_argument("--out", required=True, help="folder for the data, jbu.ckpt, results.md/.json and figure.png")
    parser.add_argument("--teacher-stride", type=int, choices=(14, 16), default=16, help="teacher stride (default 16)")
    parser.add_argument("--train-images", type=positive_int, default=64, help="images the JBU is trained on (default 64)")
    parser.add_argument("--test-images", type=positive_int, default=6, help="held-out images scored (default 6)")
    parser.add_argument("--image-size", type=positive_int, default=64, help="shorter image side, rounded to the stride (default 64)")
    parser.add_argument("--jbu-steps", type=positive_int, default=300, help="JBU training steps (default 300)")
    parser.add_argument("--jbu-lr", type=float, default=3e-3, help="JBU learning rate (default 3e-3)")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="JBU training batch (default 4)")
    parser.add_argument("--n-jitters", type=positive_int, default=3, help="jittered views per JBU step (default 3)")
    parser.add_argument("--implicit-steps", type=positive_int, default=300, help="implicit fit steps per image (default 300)")
    parser.add_argument("--implicit-views", type=positive_int, default=128, help="jittered views per implicit fit (default 128)")
    parser.add_argument("--eval-views", type=positive_int, default=8, help="held-out jitters for the reconstruction score (default 8)")
    parser.add_argument("--max-pad", type=int, default=16, help="jitter padding in pixels, training and scoring (default 16)")
    parser.add_argument("--edge-radius", type=int, default=3, help="pixels counted as near an edge (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, training and fits (default 0)")
    parser.add_argument("--device", default="cpu", help="cpu (default), auto or cuda[:N]")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--upsampler", default=None, choices=tuple(KINDS),
                        help="also score this successor of FeatUp with published or given weights (see --checkpoint)")
    parser.add_argument("--checkpoint", default=None,
                        help="its weights: a published name (anyup, anyup:multi_backbone, naf; jafar:/loftup:/uplift:<backbone> fit "
                             "only their backbone's channels), a path or a URL (default: its published weights)")
    parser.add_argument("--check", action="store_true", help="exit 1 when the targets are missed (JBU <= 0.75 x bilinear, implicit < JBU)")


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark, prints the table and where the files are; with --check, fails on missed targets."""
    from pipeline.evaluate.scoring import EvalConfig, markdown_table
    from pipeline.evaluate.run import run_evaluation

    config = EvalConfig(
        out=args.out, teacher_stride=args.teacher_stride, train_images=args.train_images, test_images=args.test_images,
        image_size=args.image_size, jbu_steps=args.jbu_steps, jbu_lr=args.jbu_lr, batch_size=args.batch_size,
        n_jitters=args.n_jitters, implicit_steps=args.implicit_steps, implicit_views=args.implicit_views,
        eval_views=args.eval_views, max_pad=args.max_pad, edge_radius=args.edge_radius, seed=args.seed, device=args.device,
        threads=args.threads, upsampler=args.upsampler, checkpoint=args.checkpoint,
    )
    report = run_evaluation(config)
    print(markdown_table(report), end="")
    print(f"featup: results.md, results.json and figure.png written to {args.out}", file=sys.stderr)
    failures = report.target_failures()
    for failure in failures:
        print(f"featup: target missed: {failure}", file=sys.stderr)
    return EXIT_FAILED if args.check and failures else EXIT_OK
