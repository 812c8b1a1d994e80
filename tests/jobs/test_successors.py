"""``--upsampler KIND --checkpoint ...`` of FeatUp's successors in ``featup upsample``, ``featup show`` and the refusals of
``featup evaluate`` (which come before its JBU is trained), through ``jobs.cli.main``."""

import re

import numpy as np
import pytest
from PIL import Image

from tests.helpers import precompute as helpers
from tests.helpers import store as sh
from tests.helpers import successors

from jobs.cli import main  # noqa: E402
from pipeline.analysis.pictures import plan_panel  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_upsample_runs_a_successor_from_a_checkpoint_file(tmp_path, capsys, monkeypatch, one_torch_thread):
    monkeypatch.syspath_prepend(str(helpers.write_tiny_module(tmp_path / "mods")))
    image = tmp_path / "in" / "noise.png"
    image.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(image)
    ckpt = successors.save_successor("anyup", tmp_path / "anyup.pth")
    args = ["upsample", str(image), "--backbone", helpers.TINY_BACKBONE, "--weights", "random", "--image-size", "32",
            "--upsampler", "anyup", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out")]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"upsampler anyup from {ckpt}" in err and "untrained JBU" not in err
    assert Image.open(tmp_path / "out" / "noise.png").size[0] > 3 * 32


def test_show_draws_a_successors_upsampling_of_the_stored_low_res_as_a_fourth_tile(tmp_path, capsys):
    url = str(tmp_path / "features.zarr")
    sh.coordinate_store(url, shards=((0, 1),), errors=())
    ckpt = successors.save_successor("anyup", tmp_path / "anyup.pth")
    out = tmp_path / "rows.png"
    assert main(["show", url, "--rows", "1", "--upsampler", "anyup", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    png = np.asarray(Image.open(out).convert("RGB"))
    layout, _ = plan_panel(Image.new("RGB", (sh.IMAGE_W, sh.IMAGE_H)), ["RANDOM WEIGHTS - these features are not meaningful"], 4)
    assert png.shape[1] == layout.size[0]
    left, top, right, bottom = layout.tile_box(3)
    assert len(np.unique(png[top:bottom, left:right].reshape(-1, 3), axis=0)) > 10  # the upsampled features' colours

    bare = str(tmp_path / "bare.zarr")
    sh.label_store(bare, np.zeros((2, 4, 6, 10), np.float32), np.zeros((2, 6, 10), np.uint8))
    assert main(["show", bare, "--upsampler", "anyup", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x.png")]) == 2
    assert "expected a store with 'lowres' and 'image' arrays" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--upsampler", "naf", "--checkpoint", "{naf}"], "NAF: output height 64 does not fit a 9-wide window"),
    (["--upsampler", "jafar", "--checkpoint", "{jafar}"], "expected a backbone with 384 channels"),
    (["--checkpoint", "{naf}"], "--checkpoint .*naf.pth: expected --upsampler KIND with it"),
])
def test_evaluate_refuses_a_successor_it_cannot_score_before_training(args, message, tmp_path, capsys):
    paths = {"naf": successors.save_successor("naf", tmp_path / "naf.pth"),
             "jafar": successors.save_successor("jafar", tmp_path / "jafar.pth", dim=384)}
    args = [a.format(**paths) for a in args]
    assert main(["evaluate", "--out", str(tmp_path / "eval"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("featup: error: ") and "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "eval" / "data").exists()  # nothing generated, nothing trained
