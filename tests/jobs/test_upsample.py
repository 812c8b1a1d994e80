"""End-to-end tests of ``featup upsample`` through ``jobs.cli.main`` and the installed console script."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featup.upsamplers import build_upsampler
from jobs.cli import main
from jobs.upsample import RANDOM_WEIGHTS_NOTICE, UNTRAINED_JBU_NOTICE, model_notices, output_paths
from pipeline.analysis.pictures import BANNER_BACKGROUND, plan_panel

BACKBONE = "timm:vit_tiny_patch16_224"  # stride 16, dim 192
DIM, SIZE, STRIDE = 192, 64, 16


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def images(tmp_path):
    """Three good images of different formats, modes and aspect ratios."""
    folder = tmp_path / "in"
    folder.mkdir()
    yy, xx = np.mgrid[0:60, 0:80]
    gradient = np.stack([xx * 3, yy * 4, (xx + yy) * 2], axis=-1).astype(np.uint8)
    Image.fromarray(gradient, mode="RGB").save(folder / "gradient.png")
    noise = np.random.default_rng(0).integers(0, 256, (70, 50, 3), dtype=np.uint8)
    Image.fromarray(noise, mode="RGB").save(folder / "noise.jpg", quality=90)
    Image.fromarray(gradient[..., 0], mode="L").save(folder / "gray.png")
    return [folder / "gradient.png", folder / "noise.jpg", folder / "gray.png"]


def _run(args, out):
    return main(["upsample", *map(str, args), "--backbone", BACKBONE, "--image-size", str(SIZE), "--out", str(out)])


def _banner_rows(panel: np.ndarray) -> int:
    """Number of rows from the top whose first pixel is the banner red."""
    red = np.all(panel[:, 0] == np.array(BANNER_BACKGROUND, dtype=np.uint8), axis=-1)
    return int(np.argmin(red)) if not red.all() else len(red)


def _expected_layout(notices):
    return plan_panel(Image.new("RGB", (SIZE, SIZE)), notices)[0]


def test_bilinear_random_weights_writes_one_panel_per_image(images, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run([*images, "--weights", "random", "--upsampler", "bilinear"], out) == 0
    captured = capsys.readouterr()
    assert RANDOM_WEIGHTS_NOTICE in captured.err and UNTRAINED_JBU_NOTICE not in captured.err
    expected_device = "cuda" if torch.cuda.is_available() else "cpu"
    assert f"backbone {BACKBONE} (random), upsampler bilinear, device {expected_device}" in captured.err
    layout = _expected_layout([RANDOM_WEIGHTS_NOTICE])
    for image in images:
        path = out / f"{image.stem}.png"
        assert f"wrote {path}" in captured.out
        with Image.open(path) as panel:
            assert panel.format == "PNG" and panel.size == layout.size
            pixels = np.asarray(panel.convert("RGB"))
        assert _banner_rows(pixels) == layout.banner_h > 0


def test_low_res_tile_shows_feature_grid_and_bilinear_tile_is_smooth(images, tmp_path):
    out = tmp_path / "out"
    assert _run([images[0], "--weights", "random", "--upsampler", "bilinear"], out) == 0
    layout = _expected_layout([RANDOM_WEIGHTS_NOTICE])
    pixels = np.asarray(Image.open(out / "gradient.png").convert("RGB")).astype(int)
    block = layout.tile_w // (SIZE // STRIDE)  # display pixels per low-res feature
    left, top, right, bottom = layout.tile_box(1)
    lr_tile = pixels[top:bottom, left:right]
    grid = lr_tile[::block, ::block]  # one pixel per low-res feature
    np.testing.assert_array_equal(lr_tile, grid.repeat(block, 0).repeat(block, 1))
    assert len(np.unique(grid.reshape(-1, 3), axis=0)) > 1
    left, top, right, bottom = layout.tile_box(2)
    hr_tile = pixels[top:bottom, left:right]
    assert len(np.unique(hr_tile.reshape(-1, 3), axis=0)) > 4 * len(np.unique(grid.reshape(-1, 3), axis=0))


@pytest.mark.slow  # the JBU compiles its kernels on first use
def test_untrained_jbu_is_announced_on_screen_and_in_the_panel(images, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run([images[1], "--weights", "random"], out) == 0
    err = capsys.readouterr().err
    assert RANDOM_WEIGHTS_NOTICE in err and UNTRAINED_JBU_NOTICE in err
    layout = _expected_layout([RANDOM_WEIGHTS_NOTICE, UNTRAINED_JBU_NOTICE])
    assert layout.banner_h > _expected_layout([RANDOM_WEIGHTS_NOTICE]).banner_h
    pixels = np.asarray(Image.open(out / "noise.png").convert("RGB"))
    assert pixels.shape[:2] == layout.size[::-1] and _banner_rows(pixels) == layout.banner_h


def _save_checkpoint(path: Path, dim: int) -> Path:
    """A checkpoint in the published layout: ``upsampler.*`` JBU weights plus the ``model.1.norm.*`` channel norm."""
    jbu = build_upsampler("jbu", dim)
    state = {f"upsampler.{k}": v for k, v in jbu.state_dict().items()}
    state["model.1.norm.weight"] = torch.ones(dim)
    state["model.1.norm.bias"] = torch.zeros(dim)
    torch.save({"state_dict": state}, path)
    return path


@pytest.mark.slow  # the JBU compiles its kernels on first use
def test_jbu_checkpoint_is_used_and_not_called_untrained(images, tmp_path, capsys):
    ckpt = _save_checkpoint(tmp_path / "jbu.ckpt", DIM)
    out = tmp_path / "out"
    assert _run([images[0], "--weights", "random", "--checkpoint", ckpt], out) == 0
    err = capsys.readouterr().err
    assert RANDOM_WEIGHTS_NOTICE in err and UNTRAINED_JBU_NOTICE not in err
    assert Image.open(out / "gradient.png").size == _expected_layout([RANDOM_WEIGHTS_NOTICE]).size


def test_checkpoint_with_wrong_channel_count_exits_2_naming_it(images, tmp_path, capsys):
    ckpt = _save_checkpoint(tmp_path / "small.ckpt", 8)
    assert _run([images[0], "--weights", "random", "--checkpoint", ckpt], tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "featup: error: checkpoint" in err and str(ckpt) in err and "192" in err
    assert not (tmp_path / "out" / "gradient.png").exists()


def test_checkpoint_with_bilinear_upsampler_is_a_config_error(images, tmp_path, capsys):
    ckpt = tmp_path / "unused.ckpt"
    assert _run([images[0], "--weights", "random", "--checkpoint", ckpt, "--upsampler", "bilinear"], tmp_path) == 2
    assert "--upsampler" in capsys.readouterr().err


def test_bad_image_among_good_fails_but_good_panels_are_written(images, tmp_path, capsys):
    bad = images[0].parent / "broken.png"
    bad.write_bytes(b"definitely not a png")
    out = tmp_path / "out"
    code = _run([images[0], bad, images[1], "--weights", "random", "--upsampler", "bilinear"], out)
    assert code != 0
    err = capsys.readouterr().err
    assert f"featup: error: image {bad}" in err and "2 of 3 images written" in err
    assert (out / "gradient.png").exists() and (out / "noise.png").exists()
    assert not (out / "broken.png").exists()


def test_unknown_backbone_exits_2_with_message_naming_it(images, tmp_path, capsys):
    code = main(["upsample", str(images[0]), "--backbone", "no_such_backbone", "--weights", "random", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("featup: error:") and "no_such_backbone" in err and "Traceback" not in err


def test_installed_console_script_runs_upsample(images, tmp_path):
    script = Path(sys.executable).parent / "featup"
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [str(script), "upsample", str(images[2]), "--backbone", BACKBONE, "--weights", "random"]
    cmd += ["--upsampler", "bilinear", "--image-size", str(SIZE), "--device", "cpu", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert RANDOM_WEIGHTS_NOTICE in result.stderr
    assert (out / "gray.png").exists()


def test_output_paths_are_named_after_stems_and_made_unique(tmp_path):
    pairs = output_paths(["a/cat.jpg", "b/cat.png", "dog.webp", "s3://bucket/x/cat.jpeg"], tmp_path)
    assert [p.name for _, p in pairs] == ["cat.png", "cat-2.png", "dog.png", "cat-3.png"]
    assert all(p.parent == tmp_path for _, p in pairs)


def test_model_notices():
    assert model_notices("random", None, "jbu") == [RANDOM_WEIGHTS_NOTICE, UNTRAINED_JBU_NOTICE]
    assert model_notices("random", None, None) == [RANDOM_WEIGHTS_NOTICE, UNTRAINED_JBU_NOTICE]
    assert model_notices("pretrained:vit_tiny_patch16_224", None, "bilinear") == []
    assert model_notices("sha256:abc", "ckpt.pt", None) == []
