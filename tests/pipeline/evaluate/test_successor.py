"""A successor of FeatUp (``EvalConfig.upsampler``) scored on the ground-truth benchmark next to the other methods:
its scores are those of the module applied to the teacher's features and image, and it gets its own table row and
figure columns (the JBU training and implicit fits of a whole run are left out here)."""

from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn.functional as F

from featup.backbones import build_backbone
from featup.upsamplers.base import IMAGENET_NORM
from pipeline.evaluate.figure import build_figure
from pipeline.evaluate.groundtruth import read_groundtruth
from pipeline.evaluate.run import make_data, score_images, successor_method, to_input
from pipeline.evaluate.scoring import EvalConfig, EvalReport, markdown_table, near_edges, score, summarise
from tests.helpers import successors


def test_a_successor_is_scored_like_the_other_methods_and_gets_its_row_and_columns(tmp_path, one_torch_thread):
    ckpt = successors.save_successor("anyup", tmp_path / "anyup.pth")
    config = EvalConfig(out=str(tmp_path / "eval"), image_size=32, train_images=1, test_images=1, eval_views=1, max_pad=4,
                        upsampler="anyup", checkpoint=str(ckpt))
    assert config.methods == ("bilinear", "jbu", "implicit", "anyup")
    _, test_shards = make_data(config)
    teacher = build_backbone(config.teacher, "auto")
    methods = {"bilinear": lambda image, lr, i: F.interpolate(lr, size=image.shape[2:], mode="bilinear"),
               "anyup": successor_method(config, teacher, torch.device("cpu"))}
    rows, kept = score_images(config, test_shards, teacher, methods, torch.device("cpu"), None)

    sample = next(iter(read_groundtruth(test_shards)))
    image = to_input(sample, teacher, torch.device("cpu"))
    assert (teacher.mean, teacher.std) == (IMAGENET_NORM.mean, IMAGENET_NORM.std)  # AnyUp's own: no conversion
    with torch.no_grad():
        direct = successors.small_successor("anyup")(teacher(image), image)
        truth = teacher.model.true_features(image)
    expected = score(direct, truth, near_edges(torch.from_numpy(sample.edges), config.edge_radius))
    anyup_row = next(r for r in rows if r["method"] == "anyup")
    assert abs(anyup_row["rel"] - expected["rel"]) < 1e-6 and abs(anyup_row["cos"] - expected["cos"]) < 1e-6

    report = EvalReport(asdict(config), rows, summarise(rows, ("truth", "bilinear", "anyup")))
    assert "| anyup | " in markdown_table(report)
    titles = [a.get_title() for a in build_figure(kept, report).get_axes() if a.get_images()]
    assert titles == ["image", "truth (PCA)", "bilinear", "anyup", "error bilinear", "error anyup"]
