"""Raw WebDataset sample -> model-ready image tensor and aligned labels, or a FailedSample saying why; never raises.

The image is the sample's image extension (``jpg``, ``png``, ... or ``DecodeSpec.image_key``), never a label such as
``seg.png``. Its pixel count is checked from the header before anything is decoded. Labels get the image's resize and
centre crop with nearest-neighbour sampling, so class ids and depths stay exact and row ``i`` of every array matches.

EXIF orientation: labels are on the pixel grid stored in the image file (the convention of WebDataset's, timm's and
torchvision's loaders, none of which rotate), so the image's orientation transform (``ImageOps.exif_transpose``) is
applied to the image and to every label alike; a label's own EXIF tag is ignored. ``orientation`` records it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from featup.errors import ConfigError, InputError
from pipeline.sources.images import decode_image, exif_orientation, preprocess

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "pgm", "gif")
# PIL formats payloads may be in: the ones IMAGE_EXTENSIONS name (PIL's JPEG opener also reads MPO camera files).
# Untrusted bytes never reach other plugins (EPS, for one, runs Ghostscript).
_PIL_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "PPM", "GIF")


@dataclass(frozen=True)
class DecodeSpec:
    """How samples become model inputs: output size, backbone stride and normalisation, which payloads to read."""

    image_size: int
    stride: int
    mean: tuple
    std: tuple
    image_key: str | None = None
    labels: tuple[str, ...] = ()
    max_pixels: int = 64_000_000
    keep_image: bool = False

    def __post_init__(self) -> None:
        if self.stride < 1 or self.image_size < self.stride:
            raise ConfigError(f"image size: expected at least the backbone stride {self.stride} (>= 1), got {self.image_size}")
        if self.max_pixels < 1:
            raise ConfigError(f"max pixels: expected a positive pixel count, got {self.max_pixels}")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != 3:
                raise ConfigError(f"normalisation {name}: expected 3 values (RGB), got {len(values)}")
            object.__setattr__(self, name, tuple(float(v) for v in values))
        object.__setattr__(self, "labels", tuple(self.labels))
        for label in self.labels:
            _label_decoder(label)  # raises for an unsupported format
        if self.image_key is not None and self.image_key in self.labels:
            raise ConfigError(f"labels: expected extensions other than the image key {self.image_key}, got {self.image_key}")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"labels: expected distinct extensions, got {', '.join(self.labels)}")


@dataclass
class DecodedSample:
    """A decoded sample: original size, normalised image, optional uint8 crop, and labels aligned with the image."""

    key: str
    width: int
    height: int
    image: torch.Tensor  # (3, S, S) float32, normalised
    image_uint8: np.ndarray | None  # (S, S, 3) uint8 when DecodeSpec.keep_image
    labels: dict[str, np.ndarray]  # ext -> (S, S) or (S, S, C), the label's own dtype
    orientation: int = 1  # EXIF orientation (1-8) applied to the image and its labels; 1 when absent


@dataclass
class FailedSample:
    """A sample that cannot be used, with the reason recorded in the index (and its size when that was known)."""

    key: str
    reason: str
    width: int = 0
    height: int = 0
    orientation: int = 0  # EXIF orientation when the image was decoded that far, else 0 (unknown)


def decode_sample(sample: dict, spec: DecodeSpec) -> DecodedSample | FailedSample:
    """Decodes one raw sample; any bad data becomes a FailedSample with its reason (this function never raises for it)."""
    key = "" if sample.get("__key__") is None else str(sample["__key__"])
    size, orientation = (0, 0), 0
    try:
        if sample.get("__error__"):
            raise InputError(str(sample["__error__"]))
        ext = image_extension(sample, spec)
        name = f"{key}.{ext}"
        size = stored = header_size(sample[ext], name)  # the stored pixel grid, before EXIF orientation
        check_pixels(size, spec.max_pixels)
        orientation = _orientation(sample[ext])
        img = decode_image(sample[ext], name)  # RGB, that EXIF orientation applied
        size = img.size
        cropped, image = preprocess(img, spec.image_size, spec.stride, spec.mean, spec.std)  # (3, S, S)
        grid = _Grid(stored, orientation, size)
        labels = {label: _decode_label(sample, key, label, grid, spec) for label in spec.labels}
    except InputError as e:
        return FailedSample(key, str(e), *size, orientation=orientation)
    except Exception as e:  # anything a hostile payload provokes in a decoder is the sample's failure, not the job's
        reason = f"sample {key}: unexpected {type(e).__name__} while decoding: {e}"
        return FailedSample(key, reason, *size, orientation=orientation)
    keep = np.array(cropped, dtype=np.uint8) if spec.keep_image else None  # (S, S, 3)
    return DecodedSample(key, size[0], size[1], image, keep, labels, orientation)


def _orientation(data: bytes) -> int:
    """The EXIF orientation (1-8) of encoded image bytes whose header is known to be readable."""
    with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as img:
        return exif_orientation(img)


@dataclass(frozen=True)
class _Grid:
    """The image's stored size, its EXIF orientation, and its size once oriented (what every array ends up in)."""

    stored: tuple[int, int]
    orientation: int
    oriented: tuple[int, int]


# ImageOps.exif_transpose's transform for each EXIF orientation, on (H, W) or (H, W, C) arrays.
_ORIENT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # FLIP_LEFT_RIGHT
    3: lambda a: a[::-1, ::-1],  # ROTATE_180
    4: lambda a: a[::-1],  # FLIP_TOP_BOTTOM
    5: lambda a: a.swapaxes(0, 1),  # TRANSPOSE
    6: lambda a: np.rot90(a, -1),  # ROTATE_270 (counter-clockwise), i.e. 90 degrees clockwise
    7: lambda a: np.rot90(a, 2).swapaxes(0, 1),  # TRANSVERSE
    8: lambda a: np.rot90(a, 1),  # ROTATE_90 (counter-clockwise)
}


def orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """``array`` (H, W) or (H, W, C) turned as ``ImageOps.exif_transpose`` turns an image of that EXIF orientation."""
    return np.ascontiguousarray(_ORIENT[orientation](array))


def image_extension(sample: dict, spec: DecodeSpec) -> str:
    """The sample's image extension: ``spec.image_key``, else its one extension listed in IMAGE_EXTENSIONS."""
    what = f"sample {sample.get('__key__')}"
    present = [ext for ext in sample if not ext.startswith("__")]
    if spec.image_key is not None:
        if spec.image_key not in sample:
            raise InputError(f"{what}: expected an image {spec.image_key}, got {_listing(present)}")
        return spec.image_key
    found = [ext for ext in present if ext in IMAGE_EXTENSIONS and ext not in spec.labels]
    if not found:
        raise InputError(f"{what}: expected an image ({', '.join(IMAGE_EXTENSIONS)}), got {_listing(present)}")
    if len(found) > 1:
        raise InputError(f"{what}: expected one image extension, got {', '.join(found)} (set the image key)")
    return found[0]


def _listing(exts: list[str]) -> str:
    """Extensions of a sample in words."""
    return f"extensions {', '.join(exts)}" if exts else "no payloads"


def header_size(data: bytes, name: str) -> tuple[int, int]:
    """Width and height from the image header alone (nothing decoded), or an InputError naming ``name``."""
    if not data:
        raise InputError(f"image {name}: expected an image file, got an empty payload (0 bytes)")
    try:
        with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as img:
            return img.size
    except UnidentifiedImageError:
        formats = ", ".join(_PIL_FORMATS)
        raise InputError(f"image {name}: expected an image in one of {formats}, got unrecognised data") from None
    except Image.DecompressionBombError as e:
        raise InputError(f"image {name}: expected an image of a safe size, got {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(f"image {name}: expected a valid image header, got a corrupt file ({e})") from None


def check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    """Refuses images above the pixel limit before they are decoded (a small file can hold a huge image)."""
    width, height = size
    if width * height > max_pixels:
        raise InputError(f"image {width}x{height} is above the pixel limit ({width * height} > {max_pixels} pixels)")


def _decode_label(sample: dict, key: str, label: str, grid: _Grid, spec: DecodeSpec) -> np.ndarray:
    """One label payload decoded, checked against the image's stored grid, oriented, resized and cropped like it."""
    name = f"{key}.{label}"
    if label not in sample:
        present = [ext for ext in sample if not ext.startswith("__")]
        raise InputError(f"label {name}: expected in the sample, got {_listing(present)}")
    array = _label_decoder(label)(sample[label], name, spec.max_pixels)  # (H, W) or (H, W, C), stored grid
    found = (array.shape[1], array.shape[0])
    if found != grid.stored:
        raise InputError(_size_mismatch(name, found, grid))
    array = orient(array, grid.orientation)  # now on the oriented grid, like the image
    rows, cols = crop_indices(grid.oriented, spec.image_size, spec.stride)
    return np.ascontiguousarray(array[rows][:, cols])  # (S, S) or (S, S, C)


def _size_mismatch(name: str, found: tuple[int, int], grid: _Grid) -> str:
    """Why a label does not fit its image, naming the EXIF orientation when the image has one."""
    w, h = grid.stored
    message = f"label {name}: expected the image size {w}x{h}, got {found[0]}x{found[1]}"
    if grid.orientation == 1:
        return message
    turned = " (the size once turned for display)" if found == grid.oriented and found != grid.stored else ""
    return (f"{message}{turned}; labels must be on the pixel grid stored in the image file, which its EXIF "
            f"orientation {grid.orientation} turns to {grid.oriented[0]}x{grid.oriented[1]} for display")


def _image_label(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """An image label (PNG, TIFF...) as an array in its own mode: L/P give indexes, I;16 uint16, RGB (H, W, 3).

    Read on its stored grid: its own EXIF orientation, if any, is ignored (it is oriented as its image is)."""
    check_pixels(header_size(data, name), max_pixels)
    with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as img:
        img.load()
        return np.array(img)


def _npy_label(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """A ``.npy`` label, loaded without pickle support: object arrays are refused, never unpickled."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"label {name}: expected a .npy array (no pickled objects), got {e}") from None
    if not isinstance(array, np.ndarray) or array.ndim not in (2, 3):
        shape = getattr(array, "shape", type(array).__name__)
        raise InputError(f"label {name}: expected an (H, W) or (H, W, C) array, got {shape}")
    check_pixels((array.shape[1], array.shape[0]), max_pixels)
    return array


def _label_decoder(label: str) -> Callable[[bytes, str, int], np.ndarray]:
    """The decoder for a label extension, chosen by its last suffix (``seg.png`` -> image, ``depth.npy`` -> numpy)."""
    suffix = label.rsplit(".", 1)[-1].lower()
    decoders = {"npy": _npy_label, **{ext: _image_label for ext in IMAGE_EXTENSIONS}}
    if suffix not in decoders:
        raise ConfigError(f"label {label}: expected an extension ending in one of {', '.join(decoders)}, got {suffix}")
    return decoders[suffix]


def crop_indices(size: tuple[int, int], image_size: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Source rows and columns of each output pixel for ``preprocess``'s resize + crops, sampled nearest-neighbour.

    Same geometry as ``pipeline.sources.images``: shorter side to ``image_size`` (torchvision rounding), centre crop, then
    centre crop to a multiple of ``stride``. An image already at ``image_size`` maps onto itself.
    """
    width, height = size
    if width <= height:
        new_w, new_h = image_size, int(image_size * height / width)
    else:
        new_w, new_h = int(image_size * width / height), image_size
    out = image_size - image_size % stride
    left = _crop_offset(new_w, image_size) + _crop_offset(image_size, out)
    top = _crop_offset(new_h, image_size) + _crop_offset(image_size, out)
    return _nearest(height, new_h)[top : top + out], _nearest(width, new_w)[left : left + out]


def _crop_offset(length: int, crop: int) -> int:
    """Start of a centred crop, rounded as ``pipeline.images.center_crop`` (and torchvision) do."""
    return int(round((length - crop) / 2.0))


def _nearest(n_src: int, n_dst: int) -> np.ndarray:
    """For each of ``n_dst`` output pixels, the source pixel whose centre is nearest (exact integer arithmetic)."""
    return ((2 * np.arange(n_dst) + 1) * n_src) // (2 * n_dst)
