"""Eager JBU training step: the kernels' hand-written backward against autograd of their forward, side by side.

CPU training runs the JBU kernels eager (``train-jbu --kernel-backend eager``, the default). Each row is one stack
forward and backward (``sum of squares`` of the output) on the same inputs, timed in interleaved rounds (one run of each
row per round, so machine noise hits both alike) and reported as the median:

1. yardstick: autograd through the eager forward (the 56 broadcast products of the compose step, the in-place
   ``addcmul_`` taps and the window similarities of the range kernel, which autograd turns into a source-sized
   gradient per shifted view)
2. featup: the eager kernels as shipped (``einsum`` compose; taps and window similarities with an in-place,
   tap-by-tap backward)

The gradients of the two rows are compared (largest difference relative to the gradient's largest entry) so the speed is not bought with a wrong answer.

    python bench/bench_eager_backward.py [--channels 64] [--low 14] [--batch 4] [--stages 4] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator

import torch

from featup.ops import adaptive_conv as ac
from featup.ops import upsample_filter as uf
from featup.upsamplers.reference import random_jbu_stack


@contextlib.contextmanager
def autograd_of_forward() -> Iterator[None]:
    """Row 1: the kernels' eager forward functions, differentiated by autograd (what ran before the hand-written backward)."""
    compose, taps, range_kernel = uf._COMPOSE._make_eager, uf._COMPOSED_TAPS._make_eager, ac._RANGE_KERNEL._make_eager
    uf._COMPOSE._make_eager = uf._make_compose
    uf._COMPOSED_TAPS._make_eager = lambda width: lambda source, kernel: uf._taps_forward(source, kernel, width)
    ac._RANGE_KERNEL._make_eager = ac._make_range_kernel  # window similarities stacked from D*D sums, autograd through them
    try:
        yield
    finally:
        uf._COMPOSE._make_eager, uf._COMPOSED_TAPS._make_eager, ac._RANGE_KERNEL._make_eager = compose, taps, range_kernel


def step(stack, lr_feats: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One forward and backward; the gradients of the input features and of every parameter."""
    params = [lr_feats, *stack.parameters()]
    return torch.autograd.grad(stack(lr_feats, image).square().sum(), params)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--low", type=int, default=14, help="low-resolution side; the output is low * 2**stages")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    stack = random_jbu_stack(args.channels, args.stages, method="composed").train()
    stack.backend = "eager"
    for module in stack.modules():  # dropout off: both rows compute the same deterministic gradients
        if isinstance(module, torch.nn.Dropout2d):
            module.p = 0.0
    side = args.low * 2**args.stages
    lr_feats = torch.randn(args.batch, args.channels, args.low, args.low, requires_grad=True)
    image = torch.randn(args.batch, 3, side, side)

    def yardstick() -> tuple[torch.Tensor, ...]:
        with autograd_of_forward():
            return step(stack, lr_feats, image)

    rows = {"yardstick: autograd of the eager forward": yardstick, "featup: hand-written eager backward": lambda: step(stack, lr_feats, image)}
    grads = {name: run() for name, run in rows.items()}  # warm-up, and the answers compared below
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.repeats):
        for name, run in rows.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    (base_name, base), (_, ours) = grads.items()
    diff = max(float((a - b).abs().max() / a.abs().max().clamp(min=1e-30)) for a, b in zip(base, ours))
    print(f"JBU stack forward + backward, eager kernels: batch {args.batch}, {args.channels} channels, {args.low}x{args.low} "
          f"-> {side}x{side} ({args.stages} stages), {args.threads} threads, median of {args.repeats}")
    yard = statistics.median(times[base_name])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:45s} {median * 1e3:9.1f} ms   {yard / median:5.2f}x")
    print(f"  largest difference of a gradient, relative to its largest entry: {diff:.1e}")


if __name__ == "__main__":
    main()
