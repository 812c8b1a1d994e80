"""JBU speed: the fast stack against a plain eager transcription of the published math, side by side.

Default case is the issue's target: 16x upsampling of a 384-channel 14x14 map to 224x224, batch 1.
Prints the time of each, the ratio, and the largest output difference.

    python bench/bench_jbu.py [--channels 384] [--low 14] [--repeats 5] [--device cpu] [--dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from featup.upsamplers.reference import random_jbu_stack, reference_stack


def timed(fn, repeats: int, device: torch.device) -> tuple[float, torch.Tensor]:
    """Median wall time of ``fn()`` over ``repeats`` runs, and its last output."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=384)
    parser.add_argument("--low", type=int, default=14, help="low-resolution side; output is 16x that")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(1)
    lr_feats = torch.randn(1, args.channels, args.low, args.low, generator=generator).to(device)
    image = torch.randn(1, 3, 16 * args.low, 16 * args.low, generator=generator).to(device)
    stack = random_jbu_stack(args.channels, device=device)

    with torch.inference_mode():
        reference = lambda: reference_stack(stack, lr_feats, image)[-1]  # noqa: E731
        t_ref, ref_out = timed(reference, max(1, args.repeats // 2), device)
        fast = lambda: stack(lr_feats.to(dtype), image.to(dtype))  # noqa: E731
        start = time.perf_counter()
        fast()  # first call compiles the kernels
        t_first = time.perf_counter() - start
        t_fast, fast_out = timed(fast, args.repeats, device)
        stack.backend = "eager"
        t_eager, eager_out = timed(fast, args.repeats, device)

    diff = (fast_out.float() - ref_out).abs().max().item()
    eager_diff = (eager_out.float() - ref_out).abs().max().item()
    print(f"device={device} dtype={args.dtype} channels={args.channels} {args.low}x{args.low} -> {16 * args.low}x{16 * args.low}")
    print(f"reference (published math, eager): {t_ref * 1000:9.1f} ms")
    print(f"featup JBUStack (fast):            {t_fast * 1000:9.1f} ms   (first call incl. compile {t_first:.1f} s)")
    print(f"featup JBUStack (eager fallback):  {t_eager * 1000:9.1f} ms")
    print(f"speed-up: {t_ref / t_fast:.1f}x   max |difference|: {diff:.2e}")
    print(f"speed-up of the eager fallback: {t_ref / t_eager:.1f}x   max |difference|: {eager_diff:.2e}")


if __name__ == "__main__":
    main()
