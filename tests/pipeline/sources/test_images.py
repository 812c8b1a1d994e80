"""Tests of pipeline.sources.images: RGB loading of all PIL modes, FeatUp preprocessing, and InputErrors for bad files."""

import io

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from featup.errors import ConfigError, InputError
from pipeline.sources.images import (
    crop_to_multiple,
    decode_image,
    load_and_preprocess,
    load_image,
    normalize,
    preprocess,
    resize_center_crop,
    to_tensor,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _noise_rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB")


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("size", [(100, 60), (60, 100), (64, 64), (225, 97)])
def test_resize_center_crop_matches_torchvision_reference(size):
    img = _noise_rgb(*size)
    reference = T.Compose([T.Resize(48, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(48)])
    ours = resize_center_crop(img, 48)
    assert ours.size == (48, 48)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(reference(img)))


def test_preprocess_shape_and_normalisation_match_torchvision():
    img = _noise_rgb(90, 70)
    display, x = preprocess(img, 64, 16, MEAN, STD)
    reference = T.Compose(
        [
            T.Resize(64, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(64),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )(img)
    assert display.size == (64, 64) and x.shape == (3, 64, 64) and x.dtype == torch.float32
    torch.testing.assert_close(x, reference)
    unnormalised = x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    torch.testing.assert_close(unnormalised, to_tensor(display))


def test_crop_is_rounded_down_to_stride_multiple_around_centre():
    img = _noise_rgb(100, 100)
    display, x = preprocess(img, 100, 14, MEAN, STD)
    assert display.size == (98, 98) and x.shape == (3, 98, 98)
    full = np.asarray(resize_center_crop(img, 100))
    np.testing.assert_array_equal(np.asarray(display), full[1:99, 1:99])
    assert crop_to_multiple(_noise_rgb(33, 20), 8).size == (32, 16)
    with pytest.raises(ConfigError, match="stride 16"):
        crop_to_multiple(_noise_rgb(10, 10), 16)


def test_to_tensor_and_normalize_values():
    img = Image.new("RGB", (2, 2), (255, 0, 51))
    x = to_tensor(img)
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([1.0, 0.0, 0.2]))
    y = normalize(x, MEAN, STD)
    torch.testing.assert_close(y[:, 1, 1], (torch.tensor([1.0, 0.0, 0.2]) - torch.tensor(MEAN)) / torch.tensor(STD))
    batched = normalize(x.unsqueeze(0), MEAN, STD)
    torch.testing.assert_close(batched[0], y)


def test_grayscale_loads_as_rgb_with_equal_channels(tmp_path):
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, mode="L")
    path = tmp_path / "gray.png"
    gray.save(path)
    rgb = np.asarray(load_image(path))
    assert rgb.shape == (8, 8, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], np.asarray(gray))


def test_rgba_loads_as_rgb_dropping_alpha(tmp_path):
    rgba = Image.new("RGBA", (6, 5), (10, 20, 30, 0))
    path = tmp_path / "rgba.png"
    rgba.save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (6, 5)
    assert img.getpixel((0, 0)) == (10, 20, 30)


def test_palette_with_transparency_loads_as_rgb(tmp_path):
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * (254 * 3))
    path = tmp_path / "pal.png"
    pal.save(path, transparency=0)
    img = load_image(path)
    assert img.mode == "RGB" and img.getpixel((2, 2)) == (200, 100, 50)


def test_cmyk_jpeg_loads_as_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(path)
    img = load_image(path)
    assert img.mode == "RGB" and all(v > 240 for v in img.getpixel((4, 4)))


def test_16bit_grayscale_is_rescaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100], [65535, 257 * 7]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(load_image(path))
    np.testing.assert_array_equal(rgb[..., 0], (values // 257).astype(np.uint8))
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


def test_load_and_preprocess_reads_jpeg_file(tmp_path):
    path = tmp_path / "photo.jpg"
    _noise_rgb(80, 50).save(path)
    display, x = load_and_preprocess(path, 32, 16, MEAN, STD)
    assert display.size == (32, 32) and x.shape == (3, 32, 32)


def _bad_files(tmp_path):
    good = _encode(_noise_rgb(64, 64), "PNG")
    jpeg = _encode(_noise_rgb(64, 64), "JPEG")
    files = {
        "empty.png": (b"", "empty"),
        "notes.png": (b"this is not an image at all\n" * 10, "PIL can decode"),
        "cut.png": (good[: len(good) // 2], "truncated or corrupt"),
        "cut.jpg": (jpeg[: len(jpeg) // 2], "truncated or corrupt"),
    }
    for name, (data, _) in files.items():
        (tmp_path / name).write_bytes(data)
    return {name: why for name, (_, why) in files.items()}


def test_each_bad_file_kind_raises_input_error_naming_file(tmp_path):
    for name, why in _bad_files(tmp_path).items():
        path = tmp_path / name
        with pytest.raises(InputError, match=why) as info:
            load_image(path)
        assert str(path) in str(info.value)


def test_missing_file_and_directory_raise_input_error_naming_path(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(InputError, match="no such file") as info:
        load_image(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(InputError, match="directory") as info:
        load_image(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_decode_image_names_the_source_in_errors():
    with pytest.raises(InputError, match="shard-3/img.jpg"):
        decode_image(b"garbage", "shard-3/img.jpg")
    with pytest.raises(InputError, match="empty"):
        decode_image(b"", "x")
