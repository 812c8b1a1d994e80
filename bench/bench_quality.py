"""Quality against ground truth at a meaningful size: bilinear vs trained JBU vs fitted implicit upsampler.

Runs ``featup evaluate``'s library function (``pipeline.evaluate_run.run_evaluation``) on generated
piecewise-textured images and the known-truth teacher, prints the results table, each method's
errors as ratios to bilinear's (overall, near edges, flat), whether the targets are met, and the
wall time of each part. The figure and JSON are left in --out.

    python bench/bench_quality.py [--out DIR] [--image-size 96] [--jbu-steps 400] [--implicit-steps 600] [--teacher-stride 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from pipeline.evaluate.scoring import METHODS, EvalConfig, markdown_table
from pipeline.evaluate.run import run_evaluation


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output folder (default: a new temporary folder)")
    parser.add_argument("--teacher-stride", type=int, choices=(14, 16), default=16)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--train-images", type=int, default=64)
    parser.add_argument("--test-images", type=int, default=6)
    parser.add_argument("--jbu-steps", type=int, default=400)
    parser.add_argument("--implicit-steps", type=int, default=600)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: fastest on 2 busy cores)")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark and prints the table, the ratios to bilinear and the timings."""
    args = parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="featup-bench-quality-")
    config = EvalConfig(out=out, teacher_stride=args.teacher_stride, image_size=args.image_size,
                        train_images=args.train_images, test_images=args.test_images, jbu_steps=args.jbu_steps,
                        implicit_steps=args.implicit_steps, threads=args.threads, device=args.device)
    report = run_evaluation(config)
    print(markdown_table(report), end="")
    print("\nratio to bilinear (relative L2 error; lower is better)")
    print(f"{'method':10s} {'all':>7s} {'edges':>7s} {'flat':>7s}")
    for method in METHODS:
        ratios = [report.ratio(method, metric) for metric in ("rel", "rel_edge", "rel_flat")]
        print(f"{method:10s} " + " ".join(f"{r:7.3f}" for r in ratios))
    failures = report.target_failures()
    print("targets: " + ("met (JBU <= 0.75 x bilinear, implicit < JBU)" if not failures else "; ".join(failures)))
    print(f"table, JSON and figure in {out}")
    print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in report.timings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
