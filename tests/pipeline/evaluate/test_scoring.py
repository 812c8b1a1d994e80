"""The ground-truth benchmark's metrics, report files and figure, on tensors whose scores are known by construction."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from featup.backbones.teacher import teacher16
from featup.errors import ConfigError
from pipeline.evaluate.scoring import (
    EvalConfig, EvalReport, held_out_views, markdown_table, near_edges, reconstruction_error, score, summarise, write_report,
)
from pipeline.evaluate.figure import render_figure
from pipeline.evaluate.scoring import Scored
from pipeline.evaluate.groundtruth import GroundTruthImage, GroundTruthSpec, paint, render_regions
from pipeline.sources.images import normalize
from tests.helpers.evaluate import scored, small_report


def _truth_and_edges():
    """A (1, 4, 8, 8) field constant on the left and right halves, and the edge columns 3 and 4."""
    truth = torch.zeros(1, 4, 8, 8)
    truth[:, 0, :, :4], truth[:, 1, :, 4:] = 1.0, 2.0
    edges = torch.zeros(8, 8, dtype=torch.bool)
    edges[:, 3:5] = True
    return truth, edges


def test_scores_of_known_predictions():
    truth, edges = _truth_and_edges()
    exact = score(truth.clone(), truth, edges)
    assert exact == {"rel": 0.0, "cos": 1.0, "rel_edge": 0.0, "cos_edge": 1.0, "rel_flat": 0.0, "cos_flat": 1.0}
    doubled = score(2 * truth, truth, edges)
    assert doubled["rel"] == pytest.approx(1.0) and doubled["cos"] == pytest.approx(1.0)
    swapped = truth.flip(-1)  # every pixel gets the other half's feature: orthogonal
    assert score(swapped, truth, edges)["cos"] == pytest.approx(0.0, abs=1e-6)
    assert score(torch.zeros_like(truth), truth, edges)["rel"] == pytest.approx(1.0)


def test_edge_and_flat_scores_only_see_their_pixels():
    truth, edges = _truth_and_edges()
    wrong_at_edges = truth.clone()
    wrong_at_edges[..., edges] = 0.0
    s = score(wrong_at_edges, truth, edges)
    assert s["rel_edge"] == pytest.approx(1.0) and s["rel_flat"] == 0.0 and s["cos_flat"] == pytest.approx(1.0)
    assert s["rel"] == pytest.approx(math.sqrt((8 * 1 + 8 * 4) / (32 * 1 + 32 * 4)))
    no_edges = score(truth, truth, torch.zeros(8, 8, dtype=torch.bool))
    assert math.isnan(no_edges["rel_edge"]) and no_edges["rel_flat"] == 0.0


def test_near_edges_grows_the_edge_map_by_the_radius():
    edges = torch.zeros(9, 9, dtype=torch.bool)
    edges[4, 4] = True
    grown = near_edges(edges, 2)
    assert int(grown.sum()) == 25 and bool(grown[2:7, 2:7].all())
    assert torch.equal(near_edges(edges, 0), edges)


def test_reconstruction_uses_the_same_views_for_every_method_and_rewards_the_truth():
    teacher = teacher16()
    rng = np.random.default_rng(0)
    rgb = paint(rng, render_regions(rng, 64, 96, GroundTruthSpec()), GroundTruthSpec())  # (64, 96, 3) uint8
    image = normalize(torch.from_numpy(rgb).permute(2, 0, 1).float() / 255, teacher.mean, teacher.std)[None]
    views = held_out_views(64, 96, 4, 16, seed=3)
    assert views == held_out_views(64, 96, 4, 16, seed=3) and views != held_out_views(64, 96, 4, 16, seed=4)
    truth = teacher.true_features(image)
    bilinear = F.interpolate(teacher(image), size=(64, 96), mode="bilinear", align_corners=False)
    on_truth = reconstruction_error(truth, image, teacher, 16, views, 16)
    assert on_truth < 0.5 * reconstruction_error(bilinear, image, teacher, 16, views, 16)
    assert reconstruction_error(truth, image, teacher, 16, views, 16) == on_truth  # deterministic


def test_summary_table_ratios_and_targets():
    report = small_report()
    assert report.means["jbu"]["rel"] == pytest.approx(1.2) and math.isnan(report.means["jbu"]["cos_flat"])
    assert report.ratio("jbu") == pytest.approx(0.6) and report.target_failures() == []
    table = markdown_table(report)
    assert table.splitlines()[0].startswith("| method | rel. L2 error | vs bilinear |")
    assert "| jbu | 1.2000 | 0.600 |" in table
    report.means["jbu"]["rel"] = 1.6  # 0.8 x bilinear's 2.0
    assert report.target_failures() == ["JBU relative error 1.6000 is 0.800 x bilinear's 2.0000; expected at most 0.75"]
    report.means["implicit"]["rel"] = 1.7
    assert report.target_failures()[1] == "implicit relative error 1.7000: expected below the JBU's 1.6000"


def test_report_files_and_figure(tmp_path):
    report = small_report()
    png = render_figure([scored(32, 48), scored(48, 32)], report)
    paths = write_report(report, str(tmp_path / "out"), png)
    saved = json.loads(open(paths["json"]).read())
    assert saved["ratios_to_bilinear"]["implicit"] == pytest.approx(0.5) and saved["target_failures"] == []
    assert open(paths["table"]).read() == markdown_table(report)
    figure = Image.open(io.BytesIO(open(paths["figure"], "rb").read()))
    assert figure.mode == "RGB" and figure.width >= 8 * 96 and figure.height > 2 * 96
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["figure.png", "results.json", "results.md"]


@pytest.mark.parametrize("field, value, message", [
    ("teacher_stride", 8, "--teacher-stride: expected one of 16, 14, got 8"),
    ("train_images", 0, "--train-images: expected an integer >= 1, got 0"),
    ("jbu_lr", 0.0, "--jbu-lr: expected a number > 0, got 0.0"),
    ("threads", 0, "--threads: expected an integer >= 1, got 0"),
])
def test_bad_config_values_are_refused(field, value, message):
    with pytest.raises(ConfigError, match=message):
        EvalConfig(out="x", **{field: value})


def test_short_side_is_rounded_to_the_stride():
    assert EvalConfig(out="x", image_size=64, teacher_stride=14).short_side == 70
    assert EvalConfig(out="x", image_size=100, teacher_stride=16).short_side == 96
