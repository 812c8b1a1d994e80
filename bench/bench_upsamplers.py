"""Every upsampler side by side: bilinear, FeatUp's JBU and its successors (anyup, jafar, loftup, naf, and any other
registered kind such as uplift), with random weights of the published sizes, on CPU and on CUDA when present.

Speed: ms per image for DINOv2-S-like features (384 channels, stride 14) upsampled to the image size, at 224 and 448
(16x16 and 32x32 low-res), batch 1 and 8; the median of ``--repeats`` calls after one warm-up call (which also
compiles the JBU's kernels). Memory: peak resident memory (and peak GPU memory on CUDA) of one 1024x1024 output with
384 channels (64x64 low-res), each upsampler in a fresh process, next to what that process held before the forward
(Python, torch, the weights and the inputs). Inputs are random: ms and bytes do not depend on the values.

    python bench/bench_upsamplers.py                    # everything: several minutes per device on CPU
    python bench/bench_upsamplers.py --sizes 224 --batches 1 --repeats 1 --memory-size 0 --upsamplers bilinear,naf
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

BASELINES = ("bilinear", "jbu")
COMPILE_WAIT_S = 900.0  # a cold inductor cache builds the JBU's kernels in minutes on 2 cores


def all_upsamplers() -> list[str]:
    """bilinear, jbu, then every registered successor."""
    from featup.upsampler_hub import KINDS
    from featup.upsamplers import UPSAMPLERS

    return [*BASELINES, *(name for name in UPSAMPLERS.names() if name in KINDS or name == "uplift")]


def build(name: str, channels: int, device: torch.device, jbu_backend: str) -> torch.nn.Module:
    """Upsampler ``name`` for ``channels``-channel features, random weights, published defaults, eval mode."""
    from featup.upsamplers import build_upsampler

    extra = {"backend": jbu_backend} if name == "jbu" else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_upsampler(name, channels, num_stages=4, device=device, **extra).eval()


def inputs(batch: int, size: int, low: int, channels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (batch, channels, low, low) features and a (batch, 3, size, size) ImageNet-normalised-like image."""
    generator = torch.Generator().manual_seed(1)
    lr_feats = torch.randn(batch, channels, low, low, generator=generator)
    image = torch.randn(batch, 3, size, size, generator=generator)
    return lr_feats.to(device), image.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ms_per_image(model: torch.nn.Module, batch: int, size: int, args: argparse.Namespace, device: torch.device) -> float:
    """Median wall time of one call over ``args.repeats`` calls after a warm-up, per image, in ms."""
    from featup.ops.compiled import wait_for_compiles

    lr_feats, image = inputs(batch, size, size // args.stride, args.channels, device)
    times = []
    with torch.inference_mode():
        model(lr_feats, image, (size, size))  # under "auto" this call runs eager and starts the compile in the background
        wait_for_compiles(COMPILE_WAIT_S)  # the steady state: the compiled kernels a long job runs on
        for i in range(args.repeats + 1):
            sync(device)
            start = time.perf_counter()
            model(lr_feats, image, (size, size))
            sync(device)
            if i:  # the first call warms up (allocations, the JBU's compiled kernels)
                times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000 / batch


def peak_rss_gb() -> float:
    """This process's peak resident memory in GB: ``VmHWM`` (per address space, so a fresh process starts from zero;
    ``ru_maxrss`` survives exec and would report the parent's peak), ``ru_maxrss`` where /proc is missing."""
    try:
        with open(f"/proc/{os.getpid()}/status") as status:
            kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        return kb / 2**20
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_memory(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    """In this (fresh) process: GB resident before and at the peak of one memory-size output, and peak GPU GB."""
    size = args.memory_size
    model = build(name, args.channels, device, args.jbu_backend)
    lr_feats, image = inputs(1, size, size // 16, args.channels, device)
    with torch.inference_mode():
        if name == "jbu" and args.jbu_backend != "eager":
            from featup.ops.compiled import wait_for_compiles

            model(lr_feats[:, :, :4, :4], image[:, :, :64, :64], (64, 64))  # compile first: its memory is not the forward's
            wait_for_compiles(COMPILE_WAIT_S)
        before_gb = peak_rss_gb()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = model(lr_feats, image, (size, size))
        sync(device)
        seconds = time.perf_counter() - start
    peak_gb = peak_rss_gb()
    gpu_gb = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return {"before_gb": before_gb, "peak_gb": peak_gb, "gpu_gb": gpu_gb, "seconds": seconds, "shape": list(out.shape)}


def memory_in_child(name: str, args: argparse.Namespace, device: torch.device) -> dict | str:
    """``peak_memory`` run in a fresh Python process (so no other upsampler's allocations count), or why it failed."""
    command = [sys.executable, __file__, "--child", name, "--device", str(device), "--memory-size", str(args.memory_size),
               "--channels", str(args.channels), "--jbu-backend", args.jbu_backend]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return f"failed: {lines[-1] if lines else f'exit {done.returncode}'}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_device(device: torch.device, args: argparse.Namespace) -> None:
    """Time and measure every chosen upsampler on ``device`` and print its table."""
    columns = [(size, batch) for size in args.sizes for batch in args.batches]
    header = ["upsampler", *(f"{size} b{batch} ms/img" for size, batch in columns)]
    if args.memory_size:
        header.append(f"{args.memory_size}px peak RSS GB (before fwd)")
        if device.type == "cuda":
            header.append(f"{args.memory_size}px peak GPU GB")
    rows = []
    for name in args.upsamplers:
        model = build(name, args.channels, device, args.jbu_backend)
        row = [name]
        for size, batch in columns:
            try:
                row.append(f"{ms_per_image(model, batch, size, args, device):.1f}")
            except Exception as err:  # an upsampler that cannot take this size (or runs out of memory): say so, go on
                row.append(f"- ({type(err).__name__})")
            print(f"  {name} {size} b{batch}: {row[-1]}", file=sys.stderr, flush=True)
        del model
        if args.memory_size:
            memory = memory_in_child(name, args, device)
            if isinstance(memory, str):
                row.append(memory)
                row += [""] if device.type == "cuda" else []
            else:
                row.append(f"{memory['peak_gb']:.2f} ({memory['before_gb']:.2f})")
                row += [f"{memory['gpu_gb']:.2f}"] if device.type == "cuda" else []
        rows.append(row)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{device} ({name}): {args.channels} channels, stride {args.stride} (memory: stride 16), random weights, "
          f"median of {args.repeats} calls after a warm-up")
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upsamplers", default=None, help="comma-separated subset (default: bilinear, jbu and every successor)")
    parser.add_argument("--sizes", type=_ints, default=[224, 448], help="output sides to time (default 224,448)")
    parser.add_argument("--batches", type=_ints, default=[1, 8], help="batch sizes to time (default 1,8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up; the median is shown (default 3)")
    parser.add_argument("--memory-size", type=int, default=1024, help="output side of the memory run; 0 skips it (default 1024)")
    parser.add_argument("--channels", type=int, default=384)
    parser.add_argument("--stride", type=int, default=14, help="feature stride of the timed inputs (default 14, DINOv2)")
    parser.add_argument("--devices", default=None, help="cpu, cuda or both comma-separated (default: cpu, and cuda when present)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--jbu-backend", default="auto", choices=("auto", "compiled", "eager"), help="JBU kernels (default auto)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.child is not None:
        print(json.dumps(peak_memory(args.child, args, torch.device(args.device))))
        return
    known = all_upsamplers()
    args.upsamplers = args.upsamplers.split(",") if args.upsamplers else known
    unknown = [name for name in args.upsamplers if name not in known]
    if unknown:
        parser.error(f"--upsamplers: expected names among {', '.join(known)}, got {', '.join(unknown)}")
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        run_device(torch.device(device), args)


if __name__ == "__main__":
    main()
