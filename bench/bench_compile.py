"""What the first call of the compiled JBU kernels costs: cold (an empty inductor cache, a fresh machine) and warm (the
same cache again, a later process on that machine), each in a fresh process.

The JBU (384 channels, 14x14 -> 224x224, batch 1, ``backend="compiled"``, which waits for its kernels) is called
twice under ``torch.inference_mode()``: the first call's seconds include tracing and compiling (cold) or tracing and
loading the compiled code from inductor's on-disk cache (warm); the second call is the kernels' own time. Under the
default ``backend="auto"`` an inference call never waits for this: it runs the eager kernels meanwhile.

    python bench/bench_compile.py [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_upsamplers, when run from anywhere


def first_calls(device: str, threads: int | None) -> dict[str, float]:
    """Seconds of the first and the second call, in this process (model and inputs as bench_upsamplers builds them)."""
    import torch

    from bench_upsamplers import build, inputs, sync

    if threads is not None:
        torch.set_num_threads(threads)
    where = torch.device(device)
    model = build("jbu", 384, where, "compiled")
    lr_feats, image = inputs(1, 224, 14, 384, where)  # (B, C, h, w), (B, 3, H, W)
    seconds = []
    with torch.inference_mode():
        for _ in range(2):
            start = time.perf_counter()
            model(lr_feats, image)
            sync(where)
            seconds.append(time.perf_counter() - start)
    return {"first_s": seconds[0], "second_s": seconds[1], "threads": torch.get_num_threads()}


def in_child(cache: str, args: argparse.Namespace) -> dict[str, float]:
    """``first_calls`` in a fresh Python process whose inductor cache is ``cache``."""
    command = [sys.executable, __file__, "--child", "--device", args.device]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(first_calls(args.device, args.threads)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-compile-") as cache:
        runs = {run: in_child(cache, args) for run in ("cold", "warm")}
    print(f"JBU 384 channels, 14x14 -> 224, batch 1, {args.device}, {runs['cold']['threads']} threads, compiled kernels:")
    for run, figures in runs.items():
        print(f"  {run}: first call {figures['first_s']:.1f} s, second call {figures['second_s'] * 1000:.0f} ms")


if __name__ == "__main__":
    main()
