"""JBU peak memory on a large image: row-banded (default) against one band, each in a fresh process.

Default case is the issue's target: a 1024x1024 image, 384 channels (64x64 low-res, 16x), CPU,
within 8 GB peak resident memory. Also checks that the banded output equals the unbanded one.

    python bench/bench_jbu_memory.py [--size 1024] [--channels 384] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from featup.upsamplers.reference import random_jbu_stack


def run_one(size: int, channels: int, band_pixels: int, device: str, out_path: str | None) -> dict:
    """Upsample one random image in this process; report wall time and peak RSS (and save the output)."""
    stack = random_jbu_stack(channels, device=device)
    stack.max_band_pixels = band_pixels
    generator = torch.Generator().manual_seed(3)
    lr_feats = torch.randn(1, channels, size // 16, size // 16, generator=generator).to(device)
    image = torch.randn(1, 3, size, size, generator=generator).to(device)
    with torch.inference_mode():
        start = time.perf_counter()
        out = stack(lr_feats, image)
        seconds = time.perf_counter() - start
    if out_path:
        torch.save(out[:, :8].cpu().clone(), out_path)  # a channel slice is enough to compare
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    gpu_gb = torch.cuda.max_memory_allocated() / 2**30 if out.is_cuda else 0.0
    return {"band_pixels": band_pixels, "seconds": seconds, "peak_rss_gb": peak_gb, "peak_gpu_gb": gpu_gb, "shape": list(out.shape)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--channels", type=int, default=384)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budget-gb", type=float, default=8.0)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(run_one(args.size, args.channels, args.child, args.device, args.save)))
        return

    results = {}
    for label, band_pixels in [("banded (default)", 1 << 18), ("one band", 1 << 40)]:
        cmd = [sys.executable, __file__, "--size", str(args.size), "--channels", str(args.channels), "--device", args.device,
               "--child", str(band_pixels), "--save", f"/tmp/featup-bench-{band_pixels}.pt"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            print(f"{label}: failed (exit {result.returncode}): {result.stderr.strip()[-500:]}")
            continue
        results[label] = json.loads(result.stdout.strip().splitlines()[-1])
        r = results[label]
        gpu = f"   peak GPU {r['peak_gpu_gb']:6.2f} GB" if r["peak_gpu_gb"] else ""
        print(f"{label:18s} peak RSS {r['peak_rss_gb']:6.2f} GB{gpu}   time {r['seconds']:6.1f} s   output {r['shape']}")
    if len(results) == 2:
        a, b = (torch.load(f"/tmp/featup-bench-{p}.pt", weights_only=True) for p in (1 << 18, 1 << 40))
        ratio = results["one band"]["peak_rss_gb"] / results["banded (default)"]["peak_rss_gb"]
        print(f"memory ratio one band / banded: {ratio:.2f}x   max |banded - one band|: {(a - b).abs().max().item():.2e}")
    if "banded (default)" in results:
        ok = results["banded (default)"]["peak_rss_gb"] <= args.budget_gb
        print(f"target {args.budget_gb:.0f} GB peak: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
