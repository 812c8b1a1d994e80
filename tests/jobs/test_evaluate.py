"""``featup evaluate``: the ground-truth quality benchmark at a tiny size passes its targets (a quality regression fails CI).

The tiny run (64-pixel images, stride-16 teacher, 32 training images, 150 JBU steps, 3 held-out images at three
aspect ratios, 100 implicit steps each) takes about 1.5 minutes on one busy CPU core and is deterministic (every
seed fixed, one torch thread). Measured with these settings: JBU about 0.65 x bilinear's relative error (target
0.75), implicit about 0.5 x (target: below the JBU).
"""

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from jobs.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, SUBCOMMANDS, main
from pipeline.evaluate.scoring import JBU_TARGET

TINY = ["--image-size", "64", "--train-images", "32", "--test-images", "3", "--jbu-steps", "100", "--batch-size", "4",
        "--n-jitters", "3", "--implicit-steps", "100", "--implicit-views", "64", "--threads", "1", "--seed", "0"]


def test_tiny_benchmark_meets_the_quality_targets_on_held_out_images(tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", "--out", str(out), *TINY, "--check"]) == EXIT_OK
    printed = capsys.readouterr()
    results = json.loads((out / "results.json").read_text())
    means = results["means"]
    assert means["jbu"]["rel"] <= JBU_TARGET * means["bilinear"]["rel"]
    assert means["implicit"]["rel"] < means["jbu"]["rel"]
    assert results["target_failures"] == []
    # The learned methods win where bilinear is wrong: near edges.
    assert means["jbu"]["rel_edge"] < means["bilinear"]["rel_edge"]
    assert means["implicit"]["cos"] > means["bilinear"]["cos"]
    # Scored on the held-out split only, at its native aspect ratios.
    keys = {row["key"] for row in results["per_image"]}
    assert keys == {"test00000", "test00001", "test00002"}
    assert {tuple(row["size"]) for row in results["per_image"]} == {(64, 64), (64, 96), (80, 64)}
    assert (out / "results.md").read_text() in printed.out
    figure = np.asarray(Image.open(out / "figure.png"))
    assert figure.ndim == 3 and figure.shape[0] > 3 * 96 and figure.shape[1] > 8 * 96


def test_check_exits_non_zero_and_names_the_missed_targets(tmp_path, capsys):
    # Two JBU steps and two implicit steps cannot beat bilinear by 25%.
    args = ["--image-size", "48", "--train-images", "4", "--test-images", "1", "--jbu-steps", "2", "--implicit-steps", "2",
            "--implicit-views", "4", "--threads", "1"]
    assert main(["evaluate", "--out", str(tmp_path / "eval"), *args, "--check"]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "target missed: JBU relative error" in err and f"expected at most {JBU_TARGET}" in err
    # Without --check the same run reports but succeeds.
    assert main(["evaluate", "--out", str(tmp_path / "again"), *args]) == EXIT_OK


def test_bad_settings_give_one_clear_error(tmp_path, capsys):
    assert main(["evaluate", "--out", str(tmp_path), "--max-pad", "80"]) == EXIT_USAGE
    assert "featup: error: --max-pad: expected less than the image side 64, got 80" in capsys.readouterr().err
    assert main(["evaluate", "--out", str(tmp_path), "--image-size", "20"]) == EXIT_USAGE
    assert "--image-size: expected at least twice the stride (32), got 20" in capsys.readouterr().err
    assert main(["evaluate", "--out", str(tmp_path), "--teacher-stride", "15"]) == EXIT_USAGE
    assert "invalid choice: 15" in capsys.readouterr().err


def test_evaluate_is_a_subcommand_and_its_help_stays_light():
    assert SUBCOMMANDS["evaluate"] == "jobs.evaluate"
    code = ("import argparse, sys; import jobs.evaluate as e; e.add_arguments(argparse.ArgumentParser()); "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
