"""EXIF orientation and pixel modes in pipeline.sources.decode: labels turned with their image, lossy modes refused."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from tests.helpers import corpus

from featup.errors import InputError
from pipeline.sources.decode import DecodedSample, DecodeSpec, FailedSample, decode_sample, orient
from pipeline.sources.images import decode_image

SIZE = 48  # DecodeSpec image size: the shorter displayed side, so nothing is resized and pixels compare exactly


def _spec(**kw) -> DecodeSpec:
    return DecodeSpec(image_size=SIZE, stride=8, mean=(0.5,) * 3, std=(0.5,) * 3, labels=("seg.png",), keep_image=True, **kw)


def _centre(displayed: np.ndarray) -> np.ndarray:
    """The centred SIZE x SIZE window of a displayed grid (what the crop keeps)."""
    top, left = (displayed.shape[0] - SIZE) // 2, (displayed.shape[1] - SIZE) // 2
    return displayed[top : top + SIZE, left : left + SIZE]


@pytest.mark.parametrize("shape", [(48, 48), (48, 80)], ids=["square", "wide"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_labels_turn_with_their_image_pixel_for_pixel(orientation, shape):
    sample, displayed = corpus.exif_sample("k", orientation, shape, seed=orientation)
    out = decode_sample(sample, _spec())
    assert isinstance(out, DecodedSample), getattr(out, "reason", None)
    assert out.orientation == orientation and (out.height, out.width) == shape
    seg = out.labels["seg.png"]
    assert np.array_equal(seg, _centre(displayed))  # the label, turned like the image, is the displayed grid
    assert np.array_equal(corpus.palette_ids(out.image_uint8), seg)  # and the image agrees with it on every pixel


def test_orient_is_exif_transpose_for_every_orientation():
    raw = np.random.default_rng(0).integers(0, 256, (5, 7), dtype=np.uint8)
    for orientation in range(1, 9):
        img = Image.fromarray(raw)
        exif = img.getexif()
        exif[corpus.EXIF_ORIENTATION] = orientation
        buf = io.BytesIO()
        img.save(buf, "PNG", exif=exif.tobytes())
        expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))))
        assert np.array_equal(orient(raw, orientation), expected), orientation
        assert np.array_equal(orient(np.dstack([raw, raw]), orientation)[..., 1], expected), orientation


def test_a_label_on_the_turned_grid_fails_naming_the_exif_orientation():
    sample, displayed = corpus.exif_sample("k", 6, (48, 80))
    sample["seg.png"] = corpus.png_bytes(displayed)  # drawn on the displayed grid, not the stored one
    out = decode_sample(sample, _spec())
    assert isinstance(out, FailedSample) and out.orientation == 6
    assert "EXIF orientation 6" in out.reason and "k.seg.png" in out.reason and "stored in the image file" in out.reason


def test_orientation_is_one_without_exif_and_unknown_for_early_failures():
    rgb = np.zeros((48, 48, 3), np.uint8)
    sample = {"__key__": "k", "jpg": corpus.jpeg_bytes(rgb), "seg.png": corpus.png_bytes(rgb[..., 0])}
    assert decode_sample(sample, _spec()).orientation == 1
    failed = decode_sample({"__key__": "k", "jpg": b"not an image"}, _spec())
    assert isinstance(failed, FailedSample) and failed.orientation == 0
    assert FailedSample("k", "why").orientation == 0


def _tiff(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, "TIFF")
    return buf.getvalue()


def test_float_tiff_image_is_refused_naming_its_mode():
    data = _tiff(np.random.default_rng(0).random((40, 56)).astype(np.float32))
    assert Image.open(io.BytesIO(data)).mode == "F"
    out = decode_sample({"__key__": "k", "tif": data}, DecodeSpec(image_size=32, stride=8, mean=(0.5,) * 3, std=(0.5,) * 3))
    assert isinstance(out, FailedSample) and "mode F" in out.reason and "k.tif" in out.reason
    with pytest.raises(InputError, match="mode F"):
        decode_image(data, "x.tif")


def test_32_bit_integer_image_is_refused_only_beyond_the_16_bit_range():
    small = np.arange(40 * 56, dtype=np.int32).reshape(40, 56) * 20  # 0..44780: fits 16 bits
    assert Image.open(io.BytesIO(_tiff(small))).mode == "I"
    rgb = np.asarray(decode_image(_tiff(small), "small.tif"))
    assert rgb[..., 0].max() == round(small.max() / 257)
    with pytest.raises(InputError, match="mode I with values 0..100000"):
        decode_image(_tiff(np.full((4, 4), 100000, np.int32) * np.eye(4, dtype=np.int32)), "big.tif")


def test_float_tiff_labels_keep_their_values():
    depth = np.random.default_rng(1).random((32, 32)).astype(np.float32)
    rgb = np.zeros((32, 32, 3), np.uint8)
    sample = {"__key__": "k", "png": corpus.png_bytes(rgb), "depth.tif": _tiff(depth)}
    out = decode_sample(sample, DecodeSpec(image_size=32, stride=8, mean=(0.5,) * 3, std=(0.5,) * 3, labels=("depth.tif",)))
    assert isinstance(out, DecodedSample) and out.labels["depth.tif"].dtype == np.float32
    assert np.array_equal(out.labels["depth.tif"], depth)
