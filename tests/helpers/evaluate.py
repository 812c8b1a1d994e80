"""Small evaluation results for the scoring and figure tests: a two-image report and scored held-out images."""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.evaluate.groundtruth import GroundTruthImage
from pipeline.evaluate.scoring import EvalReport, Scored, summarise


def small_report() -> EvalReport:
    rows = []
    for key, base in (("a", 1.0), ("b", 3.0)):
        for method, factor in (("bilinear", 1.0), ("jbu", 0.6), ("implicit", 0.5)):
            values = {m: base * factor for m in ("rel", "rel_edge", "rel_flat", "recon")}
            rows.append({"key": key, "method": method, **values, "cos": 0.9, "cos_edge": 0.8, "cos_flat": math.nan})
    return EvalReport({"seed": 0}, rows, summarise(rows, ("bilinear", "jbu", "implicit")))


def scored(h: int, w: int) -> Scored:
    gen = torch.Generator().manual_seed(0)
    truth = torch.randn(1, 8, h, w, generator=gen)
    outputs = {m: truth + 0.1 * k * torch.randn(1, 8, h, w, generator=gen) for k, m in enumerate(("bilinear", "jbu", "implicit"))}
    image = np.zeros((h, w, 3), dtype=np.uint8)
    regions = np.zeros((h, w), dtype=np.uint8)
    return Scored(GroundTruthImage("k", image, regions, regions > 0), truth, outputs, torch.zeros(h, w, dtype=torch.bool))


