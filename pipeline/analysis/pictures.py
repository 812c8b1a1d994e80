"""Side-by-side PNG panels of an image, its low-res features and its upsampled features through one shared PCA."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from featup.errors import InputError
from featup.pca import fit_pca, flatten_pixels

PAD = 6  # pixels around and between tiles
MIN_TILE = 192  # small crops are shown at an integer scale of at least this many pixels
FONT_SIZE = 13
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
BANNER_BACKGROUND = (200, 0, 0)
BANNER_TEXT = (255, 255, 255)


def pca_rgb(
    lr_feats: torch.Tensor,
    hr_feats: torch.Tensor,
    *,
    max_samples: int | None = 8192,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both (1, C, h, w) and (1, C, H, W) maps as (3, h, w) and (3, H, W) RGB in [0, 1] through one PCA.

    The 3-component PCA is fit on the pixels of both maps together and each component is
    min-max scaled with the same range for both maps, so their colours are comparable.
    """
    rows = torch.cat([flatten_pixels(hr_feats), flatten_pixels(lr_feats)]).float()  # (H*W + h*w, C)
    pca = fit_pca(rows, 3, max_samples=max_samples, generator=generator)
    lr_rgb, hr_rgb = joint_minmax([pca.transform(lr_feats.float()), pca.transform(hr_feats.float())])
    return lr_rgb[0], hr_rgb[0]


def joint_minmax(maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Scales each channel of (B, K, H, W) maps to [0, 1] with one min and max taken over all of them."""
    k = maps[0].shape[1]
    rows = torch.cat([m.transpose(0, 1).reshape(k, -1) for m in maps], dim=1)  # (K, total pixels)
    low = rows.min(dim=1).values.view(1, k, 1, 1)
    span = (rows.max(dim=1).values.view(1, k, 1, 1) - low).clamp_min(1e-12)
    return [((m - low) / span).clamp(0.0, 1.0) for m in maps]


def rgb_to_pil(rgb: torch.Tensor) -> Image.Image:
    """A (3, H, W) tensor in [0, 1] as an 8-bit RGB PIL image."""
    if rgb.ndim != 3 or rgb.shape[0] != 3:
        raise InputError(f"RGB map: expected shape (3, H, W), got {tuple(rgb.shape)}")
    array = (rgb.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)  # (3, H, W)
    return Image.fromarray(array.permute(1, 2, 0).numpy(), mode="RGB")


@dataclass(frozen=True)
class PanelLayout:
    """Pixel geometry of a panel: an optional banner, a caption row, then tiles side by side."""

    tile_w: int
    tile_h: int
    n_tiles: int
    banner_h: int
    caption_h: int

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the whole panel."""
        width = self.n_tiles * self.tile_w + (self.n_tiles + 1) * PAD
        return width, self.banner_h + self.caption_h + self.tile_h + PAD

    def tile_box(self, i: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of tile ``i``."""
        left = PAD + i * (self.tile_w + PAD)
        top = self.banner_h + self.caption_h
        return left, top, left + self.tile_w, top + self.tile_h


def display_scale(width: int, height: int) -> int:
    """Integer upscale so the longer side is at least ``MIN_TILE`` (nearest-neighbour keeps pixels crisp)."""
    return max(1, math.ceil(MIN_TILE / max(width, height)))


def render_panel(
    image: Image.Image,
    lr_rgb: torch.Tensor,
    hr_rgb: torch.Tensor,
    *,
    banner: Sequence[str] = (),
    captions: Sequence[str] | None = None,
    extra: Sequence[torch.Tensor] = (),
) -> Image.Image:
    """The panel [image | low-res PCA | upsampled PCA | ``extra`` (3, H, W) maps...] with captions and a red banner of
    warnings on top (pass a caption for each extra tile)."""
    layout, lines = plan_panel(image, banner, 3 + len(extra))
    font = ImageFont.load_default(size=FONT_SIZE)
    if captions is None:
        captions = default_captions(image, lr_rgb, hr_rgb)
    panel = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(panel)
    line_h = _line_height(font)
    if lines:
        draw.rectangle((0, 0, layout.size[0] - 1, layout.banner_h - 1), fill=BANNER_BACKGROUND)
        for j, line in enumerate(lines):
            draw.text((PAD, PAD + j * line_h), line, fill=BANNER_TEXT, font=font)
    tiles = [image.convert("RGB"), rgb_to_pil(lr_rgb), rgb_to_pil(hr_rgb), *map(rgb_to_pil, extra)]
    for i, (tile, caption) in enumerate(zip(tiles, captions)):
        left, top, _, _ = layout.tile_box(i)
        panel.paste(tile.resize((layout.tile_w, layout.tile_h), Image.Resampling.NEAREST), (left, top))
        draw.text((left, layout.banner_h + PAD // 2), _fit(caption, font, layout.tile_w), fill=TEXT, font=font)
    return panel


def plan_panel(image: Image.Image, banner: Sequence[str] = (), n_tiles: int = 3) -> tuple[PanelLayout, list[str]]:
    """The layout of the panel of ``n_tiles`` tiles for ``image`` and the banner text wrapped to its width."""
    scale = display_scale(*image.size)
    tile_w, tile_h = image.width * scale, image.height * scale
    font = ImageFont.load_default(size=FONT_SIZE)
    line_h = _line_height(font)
    width = PanelLayout(tile_w, tile_h, n_tiles, 0, 0).size[0]
    lines = [line for text in banner for line in _wrap(text, font, width - 2 * PAD)]
    banner_h = len(lines) * line_h + 2 * PAD if lines else 0
    return PanelLayout(tile_w, tile_h, n_tiles, banner_h, line_h + PAD), lines


def default_captions(image: Image.Image, lr_rgb: torch.Tensor, hr_rgb: torch.Tensor) -> list[str]:
    """Tile captions giving each tile's true resolution."""
    return [
        f"image {image.width}x{image.height}",
        f"low-res {lr_rgb.shape[2]}x{lr_rgb.shape[1]} (PCA)",
        f"upsampled {hr_rgb.shape[2]}x{hr_rgb.shape[1]} (PCA)",
    ]


def save_panel(panel: Image.Image, path: str | os.PathLike) -> None:
    """Writes the panel as a PNG, creating the parent folder."""
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    panel.save(path, format="PNG")


def _line_height(font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    """Height of one text line in ``font`` plus a little leading."""
    return int(font.getbbox("Ag|")[3]) + 4


def _wrap(text: str, font, max_width: int) -> list[str]:
    """Greedy word wrap of ``text`` to lines no wider than ``max_width`` pixels (long words stay whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= max_width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def _fit(text: str, font, max_width: int) -> str:
    """``text`` shortened with an ellipsis until it fits ``max_width`` pixels."""
    if font.getlength(text) <= max_width:
        return text
    while text and font.getlength(text + "...") > max_width:
        text = text[:-1]
    return text + "..."

