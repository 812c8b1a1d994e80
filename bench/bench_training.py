"""Cost of the two ways to get FeatUp features, side by side with plain JBU inference on the same image.

- JBU inference: backbone + JBU stack forward (eager kernels), per image.
- JBU training: one ``train-jbu`` step (multi-view objective, backward, NAdam update), per image of the batch.
- Implicit: the estimated time to fit one image's implicit network with the published defaults (1200 steps,
  3000 views), from a timed chunk of views and a few steps (``featup.upsamplers.implicit_fit.time_fit``).

Prints each time and its ratio to JBU inference. Random weights: the cost does not depend on them.

    python bench/bench_training.py [--backbone timm:vit_small_patch16_224] [--image-size 224] [--batch-size 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from typing import Callable

import torch

from featup.backbones import build_backbone
from featup.training import JBUTrainingModel, TrainingSettings, make_optimizer, training_step
from featup.upsamplers.implicit_fit import ImplicitFitConfig, time_fit


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="timm:vit_small_patch16_224")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=1, help="images per training step")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)

    backbone = build_backbone(args.backbone, "random").to(device).eval()
    settings = TrainingSettings()
    model = JBUTrainingModel(backbone.dim, backbone.stride, args.image_size, settings, generator=generator).to(device)
    optimizer = make_optimizer(model, settings)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator).to(device)
    image = images[:1]

    @torch.inference_mode()
    def infer() -> torch.Tensor:
        return model.upsampler(backbone(image), image)

    def train() -> None:
        training_step(model, optimizer, backbone, images, settings, step=settings.clip_steps, generator=generator)

    infer_s = timed(infer, args.repeats, device)
    train_s = timed(train, args.repeats, device) / args.batch_size
    fit = time_fit(backbone, image, ImplicitFitConfig(), generator=torch.Generator().manual_seed(0))
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"{args.backbone} (random weights), {args.image_size}x{args.image_size}, {device}, {torch.get_num_threads()} threads")
    print(f"{'what':<38} {'seconds per image':>18} {'x JBU inference':>16}")
    rows = [
        ("JBU inference (backbone + stack)", infer_s),
        (f"JBU training step (batch {args.batch_size})", train_s),
        ("implicit fit, one training step", fit.step_s),
        ("implicit fit, whole image (estimate)", fit.per_image_s),
    ]
    for name, seconds in rows:
        print(f"{name:<38} {seconds:>18.3f} {seconds / infer_s:>16.1f}")
    print(f"peak RSS {peak_gb:.2f} GB")


if __name__ == "__main__":
    main()
