"""Image loading and FeatUp preprocessing: any PIL-readable file -> RGB -> resize + centre crop -> normalised tensor."""

from __future__ import annotations

import io
import os
from typing import Sequence

import fsspec
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from featup.errors import ConfigError, InputError

_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # integer modes read with a 16-bit range
# Modes whose values have no defined RGB range: converting them clips (a 0..1 float image turns black).
_UNDEFINED_RANGE_MODES = {"F": "32-bit floating point"}
EXIF_ORIENTATION = 0x0112


def read_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of a local path or fsspec URL, or an InputError saying why they cannot be read."""
    name = os.fspath(path)
    try:
        with fsspec.open(name, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise InputError(f"image {name}: expected an existing file, got no such file") from None
    except IsADirectoryError:
        raise InputError(f"image {name}: expected a file, got a directory") from None
    except PermissionError:
        raise InputError(f"image {name}: expected a readable file, got permission denied") from None
    if not data:
        raise InputError(f"image {name}: expected an image file, got an empty file (0 bytes)")
    return data


def decode_image(data: bytes, name: str) -> Image.Image:
    """Decodes encoded image bytes fully (so truncation is caught here) into an RGB image named ``name`` in errors.

    The EXIF orientation is applied (``ImageOps.exif_transpose``); ``exif_orientation`` tells which one it was."""
    if not data:
        raise InputError(f"image {name}: expected an image file, got an empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except UnidentifiedImageError:
        raise InputError(f"image {name}: expected an image file PIL can decode, got unrecognised data") from None
    except Image.DecompressionBombError as e:
        raise InputError(f"image {name}: expected an image of a safe size, got {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(f"image {name}: expected a complete, valid image, got a truncated or corrupt file ({e})") from None
    return to_rgb(ImageOps.exif_transpose(img), name)


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation ``ImageOps.exif_transpose`` applies to ``img`` (an opened file, read from its header):
    1-8, 1 when absent or out of range (then nothing is turned)."""
    value = img.getexif().get(EXIF_ORIENTATION, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def load_image(path: str | os.PathLike) -> Image.Image:
    """Reads and decodes the image at a local path or fsspec URL as RGB, or raises an InputError naming it."""
    return decode_image(read_bytes(path), os.fspath(path))


def to_rgb(img: Image.Image, name: str = "<image>") -> Image.Image:
    """Converts PIL modes (L, LA, P, RGBA, CMYK, 16-bit) to 8-bit RGB; alpha is dropped.

    Refused, naming the mode: float images (``F``: no defined range, PIL's conversion clips them to black) and
    32-bit integer images (``I``) with values outside the 16-bit range, which the 16-bit rescaling would clip.
    """
    if img.mode in _UNDEFINED_RANGE_MODES:
        raise InputError(f"image {name}: expected 8- or 16-bit integer pixels, got mode {img.mode} "
                         f"({_UNDEFINED_RANGE_MODES[img.mode]}, whose range cannot be mapped to RGB without losing it)")
    if img.mode == "I":
        low, high = img.getextrema()
        if low < 0 or high > 65535:
            raise InputError(f"image {name}: expected 8- or 16-bit integer pixels, got mode I with values {low}..{high} "
                             "(outside 0..65535, converting them to RGB would clip them)")
    if img.mode in _HIGH_BIT_DEPTH_MODES:
        # PIL's own convert clips 16-bit values at 255; rescale the 0..65535 range instead.
        values = np.asarray(img, dtype=np.float64) / 257.0  # (H, W)
        img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # palette transparency goes through RGBA, as PIL recommends
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise InputError(f"image {name}: expected a mode convertible to RGB, got {img.mode} ({e})") from None


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resizes the shorter side to ``size`` (bicubic, antialiased) then centre crops ``size`` x ``size``.

    Rounding follows torchvision's ``Resize(size)`` + ``CenterCrop(size)`` as used by the published FeatUp.
    """
    if size < 1:
        raise ConfigError(f"image size: expected a positive integer, got {size}")
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    return center_crop(img, size, size)


def center_crop(img: Image.Image, height: int, width: int) -> Image.Image:
    """The centred ``height`` x ``width`` window of ``img`` (torchvision's rounding of the offsets)."""
    w, h = img.size
    top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    return img.crop((left, top, left + width, top + height))


def crop_to_multiple(img: Image.Image, stride: int) -> Image.Image:
    """Centre crops so both sides are multiples of ``stride``, as the backbone's patch grid requires."""
    w, h = img.size
    if w < stride or h < stride:
        raise ConfigError(f"image size: expected at least the backbone stride {stride}, got {w}x{h}")
    return center_crop(img, h - h % stride, w - w % stride)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a float32 (3, H, W) tensor in [0, 1]."""
    array = np.asarray(img.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)  # (3, H, W)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-channel ``(x - mean) / std`` of a (3, H, W) or (B, 3, H, W) tensor."""
    shape = (-1, 1, 1)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return (x - m) / s


def preprocess(
    img: Image.Image, image_size: int, stride: int, mean: Sequence[float], std: Sequence[float]
) -> tuple[Image.Image, torch.Tensor]:
    """The cropped RGB image (for display) and its normalised (3, S, S) tensor, S a multiple of ``stride``."""
    cropped = crop_to_multiple(resize_center_crop(to_rgb(img), image_size), stride)
    return cropped, normalize(to_tensor(cropped), mean, std)


def load_and_preprocess(
    path: str | os.PathLike, image_size: int, stride: int, mean: Sequence[float], std: Sequence[float]
) -> tuple[Image.Image, torch.Tensor]:
    """``load_image`` then ``preprocess``: the display crop and its normalised (3, S, S) tensor."""
    return preprocess(load_image(path), image_size, stride, mean, std)
