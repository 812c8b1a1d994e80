"""Tests of pipeline.analysis.pictures: shared PCA colouring, panel geometry, tile contents and the warning banner."""

import numpy as np
import torch
from PIL import Image

from featup.pca import fit_pca
from pipeline.analysis.pictures import (
    BANNER_BACKGROUND,
    MIN_TILE,
    PAD,
    display_scale,
    joint_minmax,
    pca_rgb,
    plan_panel,
    render_panel,
    save_panel,
)

RANDOM_BANNER = "RANDOM WEIGHTS - features are not meaningful"


def _inputs(size: int = 32, lr: int = 4, channels: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rgb = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(rgb, mode="RGB")
    lr_feats = torch.randn(1, channels, lr, lr, generator=g)  # (1, C, h, w)
    hr_feats = torch.nn.functional.interpolate(lr_feats, size=(size, size), mode="bilinear")  # (1, C, H, W)
    return image, lr_feats, hr_feats


def test_joint_minmax_uses_one_range_for_all_maps():
    a = torch.tensor([0.0, 2.0]).view(1, 1, 1, 2)
    b = torch.tensor([4.0, 1.0]).view(1, 1, 2, 1)
    sa, sb = joint_minmax([a, b])
    torch.testing.assert_close(sa.flatten(), torch.tensor([0.0, 0.5]))
    torch.testing.assert_close(sb.flatten(), torch.tensor([1.0, 0.25]))


def test_pca_rgb_is_one_shared_projection_scaled_jointly():
    _, lr_feats, hr_feats = _inputs()
    lr_rgb, hr_rgb = pca_rgb(lr_feats, hr_feats, max_samples=None)
    assert lr_rgb.shape == (3, 4, 4) and hr_rgb.shape == (3, 32, 32)
    both = torch.cat([lr_rgb.flatten(1), hr_rgb.flatten(1)], dim=1)  # (3, all pixels)
    torch.testing.assert_close(both.min(dim=1).values, torch.zeros(3))
    torch.testing.assert_close(both.max(dim=1).values, torch.ones(3))
    # Reference: fit on the joint pixel rows, project, min-max over both maps together.
    rows = torch.cat([hr_feats.permute(0, 2, 3, 1).reshape(-1, 10), lr_feats.permute(0, 2, 3, 1).reshape(-1, 10)])
    pca = fit_pca(rows, 3)
    z_lr, z_hr = pca.transform(lr_feats)[0], pca.transform(hr_feats)[0]
    all_z = torch.cat([z_lr.flatten(1), z_hr.flatten(1)], dim=1)
    low, high = all_z.min(dim=1).values.view(3, 1, 1), all_z.max(dim=1).values.view(3, 1, 1)
    torch.testing.assert_close(lr_rgb, (z_lr - low) / (high - low))
    torch.testing.assert_close(hr_rgb, (z_hr - low) / (high - low))


def test_panel_has_expected_size_without_banner():
    image, lr_feats, hr_feats = _inputs(size=32)
    panel = render_panel(image, *pca_rgb(lr_feats, hr_feats))
    scale = display_scale(32, 32)
    assert scale * 32 >= MIN_TILE and (scale - 1) * 32 < MIN_TILE
    layout, lines = plan_panel(image)
    assert lines == [] and layout.banner_h == 0
    assert panel.size == (3 * 32 * scale + 4 * PAD, layout.caption_h + 32 * scale + PAD)
    big, _, _ = _inputs(size=224)
    assert plan_panel(big)[0].size[0] == 3 * 224 + 4 * PAD


def test_tiles_show_image_and_nearest_upscaled_feature_maps():
    image, lr_feats, hr_feats = _inputs(size=32)
    lr_rgb, hr_rgb = pca_rgb(lr_feats, hr_feats)
    panel = np.asarray(render_panel(image, lr_rgb, hr_rgb))
    layout, _ = plan_panel(image)
    scale = layout.tile_w // 32
    expected = [
        np.asarray(image),
        (lr_rgb * 255).round().to(torch.uint8).permute(1, 2, 0).numpy(),
        (hr_rgb * 255).round().to(torch.uint8).permute(1, 2, 0).numpy(),
    ]
    for i, small in enumerate(expected):
        left, top, right, bottom = layout.tile_box(i)
        rep = layout.tile_h // small.shape[0]
        np.testing.assert_array_equal(panel[top:bottom, left:right], small.repeat(rep, 0).repeat(rep, 1))
    assert layout.tile_w == 32 * scale


def test_banner_is_present_at_top_only_when_asked(tmp_path):
    image, lr_feats, hr_feats = _inputs(size=32)
    rgb = pca_rgb(lr_feats, hr_feats)
    plain = render_panel(image, *rgb)
    warned = render_panel(image, *rgb, banner=[RANDOM_BANNER, "untrained JBU (no --checkpoint)"])
    layout, lines = plan_panel(image, [RANDOM_BANNER, "untrained JBU (no --checkpoint)"])
    assert warned.size == (plain.width, plain.height + layout.banner_h) and layout.banner_h > 0
    assert " ".join(lines) == f"{RANDOM_BANNER} untrained JBU (no --checkpoint)"
    top_plain = np.asarray(plain)[: layout.banner_h]
    top_warned = np.asarray(warned)[: layout.banner_h]
    assert not np.array_equal(top_plain, top_warned)
    is_banner_red = np.all(top_warned == np.array(BANNER_BACKGROUND, dtype=np.uint8), axis=-1)
    assert is_banner_red.mean() > 0.5
    assert (~is_banner_red).sum() > 50  # white text drawn over the red
    assert not np.any(np.all(top_plain == np.array(BANNER_BACKGROUND, dtype=np.uint8), axis=-1))
    # Below the banner the warned panel is the plain panel shifted down.
    np.testing.assert_array_equal(np.asarray(warned)[layout.banner_h :], np.asarray(plain))
    path = tmp_path / "sub" / "panel.png"
    save_panel(warned, path)
    with Image.open(path) as reread:
        assert reread.format == "PNG" and reread.size == warned.size
