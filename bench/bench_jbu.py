"""JBU speed: the fast stack against plain eager transcriptions of the published math, side by side.

Default case is the issue's target: 16x upsampling of a 384-channel 14x14 map to 224x224, batch 1.
Rows, timed in interleaved rounds (one run of each row per round, so machine noise hits all rows
alike) and reported as the median over rounds:

1. yardstick, in place: the published math in eager PyTorch, taps accumulated with ``addcmul_``
2. yardstick, allocating: the same, a new full-size tensor per tap (``tests``' reference)
3. fast JBU, method "upsample" (bicubic upsample, reflect pad, fused taps), compiled: the kernel
   before the composed one
4. fast JBU, method "composed" (bicubic and taps composed over the source), compiled
5. eager fallbacks of 4 and 3

Ratios are against row 1; differences against row 2 (the published math).

    python bench/bench_jbu.py [--channels 384] [--low 14] [--repeats 5] [--threads 2] [--device cpu] [--dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from featup.upsamplers.reference import random_jbu_stack, reference_stack


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def fast_row(stack, lr_feats, image, method: str, backend: str) -> Callable[[], torch.Tensor]:
    """The stack's forward with one kernel method and backend."""

    def run() -> torch.Tensor:
        stack.method, stack.backend = method, backend
        return stack(lr_feats, image)

    return run


def time_rounds(rows: dict[str, Callable[[], torch.Tensor]], repeats: int, device: torch.device) -> tuple[dict, dict]:
    """Median seconds of each row over ``repeats`` interleaved rounds, and each row's last output."""
    times: dict[str, list[float]] = {name: [] for name in rows}
    outputs: dict[str, torch.Tensor] = {}
    for _ in range(repeats):
        for name, fn in rows.items():
            sync(device)
            start = time.perf_counter()
            outputs[name] = fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, outputs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=384)
    parser.add_argument("--low", type=int, default=14, help="low-resolution side; output is 16x that")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds; each row reports its median")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(1)
    lr_feats = torch.randn(1, args.channels, args.low, args.low, generator=generator).to(device)
    image = torch.randn(1, 3, 16 * args.low, 16 * args.low, generator=generator).to(device)
    stack = random_jbu_stack(args.channels, device=device)
    fast_in = (lr_feats.to(dtype), image.to(dtype))

    rows = {
        "yardstick, in place (addcmul_)": lambda: reference_stack(stack, lr_feats, image, in_place=True)[-1],
        "yardstick, allocating per tap": lambda: reference_stack(stack, lr_feats, image)[-1],
        "fast JBU before: upsample, compiled": fast_row(stack, *fast_in, "upsample", "compiled"),
        "fast JBU after: composed, compiled": fast_row(stack, *fast_in, "composed", "compiled"),
        "eager fallback: composed": fast_row(stack, *fast_in, "composed", "eager"),
        "eager fallback: upsample": fast_row(stack, *fast_in, "upsample", "eager"),
    }
    with torch.inference_mode():
        compile_s = {}
        for name in ("fast JBU before: upsample, compiled", "fast JBU after: composed, compiled"):
            start = time.perf_counter()
            rows[name]()  # the first call compiles the kernels
            compile_s[name] = time.perf_counter() - start
        seconds, outputs = time_rounds(rows, args.repeats, device)

    published = outputs["yardstick, allocating per tap"].float()
    base = seconds["yardstick, in place (addcmul_)"]
    print(
        f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} channels={args.channels} "
        f"{args.low}x{args.low} -> {16 * args.low}x{16 * args.low}, median of {args.repeats} interleaved rounds"
    )
    print(f"{'row':38s} {'ms':>9s} {'vs in-place':>12s} {'max |diff|':>11s}")
    for name, t in seconds.items():
        diff = (outputs[name].float() - published).abs().max().item()
        note = f"   (first call incl. compile {compile_s[name]:.1f} s)" if name in compile_s else ""
        print(f"{name:38s} {t * 1000:9.1f} {base / t:11.1f}x {diff:11.2e}{note}")


if __name__ == "__main__":
    main()
