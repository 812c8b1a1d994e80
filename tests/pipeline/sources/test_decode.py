"""Tests of pipeline.sources.decode: images of every mode, the bad-input corpus, the pixel limit, labels aligned with the image."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import corpus

from featup.errors import ConfigError  # noqa: E402
from pipeline.sources import decode
from pipeline.sources.decode import DecodedSample, DecodeSpec, FailedSample, decode_sample  # noqa: E402
from pipeline.sources.shards import iter_shard_samples  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _spec(size: int = 32, stride: int = 8, **kw) -> DecodeSpec:
    return DecodeSpec(image_size=size, stride=stride, mean=MEAN, std=STD, **kw)


def _npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def _noise(h: int, w: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)


def _reference_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(x / 255 - mean) / std of an (S, S, 3) uint8 array, as a (3, S, S) tensor, computed in numpy."""
    x = (rgb.astype(np.float64) / 255.0 - np.array(MEAN)) / np.array(STD)
    return torch.from_numpy(x.transpose(2, 0, 1).astype(np.float32))


def test_good_shards_decode_to_model_inputs_with_their_labels(tmp_path):
    path = corpus.make_good_shards(tmp_path, n_shards=1, per_shard=3)[0]
    spec = _spec(32, 8, labels=("seg.png",), keep_image=True)
    for sample in iter_shard_samples(path):
        out = decode_sample(sample, spec)
        assert isinstance(out, DecodedSample) and out.key == sample["__key__"]
        assert (out.width, out.height) == (56, 40)
        assert out.image.shape == (3, 32, 32) and out.image.dtype == torch.float32
        assert torch.allclose(out.image, _reference_tensor(out.image_uint8), atol=1e-5)
        seg = out.labels["seg.png"]
        assert seg.shape == (32, 32) and seg.dtype == np.uint8
        source = np.asarray(Image.open(io.BytesIO(sample["seg.png"])))
        assert set(np.unique(seg)) <= set(np.unique(source))  # nearest neighbour: no blended class ids


def test_image_already_at_size_passes_through_unchanged():
    rgb, label = _noise(32, 32, seed=1), _noise(32, 32, seed=2, channels=1)[..., 0]
    sample = {"__key__": "s", "png": corpus.png_bytes(rgb), "seg.png": corpus.png_bytes(label)}
    out = decode_sample(sample, _spec(32, 8, labels=("seg.png",), keep_image=True))
    np.testing.assert_array_equal(out.image_uint8, rgb)
    np.testing.assert_array_equal(out.labels["seg.png"], label)
    torch.testing.assert_close(out.image, _reference_tensor(rgb), atol=1e-5, rtol=0)


@pytest.mark.parametrize("size, stride", [(32, 8), (30, 8), (50, 7)])
def test_output_is_cropped_to_a_multiple_of_the_stride_for_image_and_labels(size, stride):
    sample = {"__key__": "s", "jpg": corpus.jpeg_bytes(_noise(45, 70)), "d.npy": _npy(np.ones((45, 70, 2), np.float32))}
    out = decode_sample(sample, _spec(size, stride, labels=("d.npy",), keep_image=True))
    side = size - size % stride
    assert out.image.shape == (3, side, side) and out.image_uint8.shape == (side, side, 3)
    assert out.labels["d.npy"].shape == (side, side, 2) and out.labels["d.npy"].dtype == np.float32


def _coordinate_ramp(width: int, height: int) -> np.ndarray:
    """RGB image whose R is the column and G the row of each pixel (both < 256): bicubic keeps such ramps linear."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs, ys, np.zeros_like(xs)], axis=-1).astype(np.uint8)  # (H, W, 3)


@pytest.mark.parametrize("label_format", ["npy", "png"])
@pytest.mark.parametrize("width, height, size", [(237, 181, 50), (150, 223, 48), (201, 199, 40)])
def test_labels_sample_the_source_pixel_under_each_output_pixel(width, height, size, label_format):
    """The image's own resize (PIL bicubic on coordinate ramps) says where each output pixel comes from; the label agrees."""
    ys, xs = np.mgrid[0:height, 0:width]
    coords = ys * width + xs  # (H, W) each pixel's flat index
    payload = _npy(coords.astype(np.int32)) if label_format == "npy" else corpus.png_bytes(coords.astype(np.uint16))
    sample = {"__key__": "s", "png": corpus.png_bytes(_coordinate_ramp(width, height)), f"c.{label_format}": payload}
    out = decode_sample(sample, _spec(size, 8, labels=(f"c.{label_format}",), keep_image=True))
    label = out.labels[f"c.{label_format}"].astype(np.int64)
    src_y, src_x = np.divmod(label, width)  # the source pixel each output pixel took its label from
    inner = (slice(2, -2), slice(2, -2))  # bicubic ramps bend at the image border
    ramp_x = out.image_uint8[..., 0][inner].astype(int)
    ramp_y = out.image_uint8[..., 1][inner].astype(int)
    assert np.abs(src_x[inner] - ramp_x).max() <= 1 and np.abs(src_y[inner] - ramp_y).max() <= 1


def test_bad_corpus_each_sample_gets_its_expected_status_and_reason(tmp_path):
    path, expected = corpus.make_bad_shard(tmp_path)
    results = {}
    for sample in iter_shard_samples(path):
        out = decode_sample(sample, _spec())
        results[out.key] = out
    assert {k: "ok" if isinstance(v, DecodedSample) else "error" for k, v in results.items()} == expected
    for key, fragment in corpus.BAD_REASONS.items():
        assert isinstance(results[key], FailedSample) and fragment in results[key].reason, (key, results[key].reason)
    assert (results["bad-huge"].width, results["bad-huge"].height) == corpus.HUGE_SIZE
    assert (results["bad-corrupt"].width, results["bad-corrupt"].height) == (56, 40)  # header read, pixels not
    assert (results["ok-1x1"].width, results["ok-1x1"].height) == (1, 1)
    assert not corpus.pickle_marker(tmp_path).exists()


def _decode_png(img: Image.Image, fmt: str = "png") -> np.ndarray:
    """The (32, 32, 3) uint8 crop of an image already at 32 x 32 (so no resampling is involved)."""
    data = corpus.png_bytes(img) if fmt == "png" else corpus.jpeg_bytes(img)
    out = decode_sample({"__key__": "m", fmt: data}, _spec(32, 8, keep_image=True))
    assert isinstance(out, DecodedSample), out
    return out.image_uint8.astype(int)


def test_gray_rgba_16bit_and_palette_images_become_the_right_rgb():
    gray = _noise(32, 32, seed=3, channels=1)[..., 0]
    assert (_decode_png(Image.fromarray(gray)) == gray[..., None]).all()
    rgba = _noise(32, 32, seed=4, channels=4)
    assert (_decode_png(Image.fromarray(rgba)) == rgba[..., :3]).all()  # alpha dropped, colour kept
    deep = np.random.default_rng(5).integers(0, 65536, (32, 32), dtype=np.uint16)
    assert (_decode_png(Image.fromarray(deep)) == np.rint(deep / 257.0)[..., None]).all()  # full 16-bit range
    palette = Image.fromarray(_noise(32, 32, seed=6)).quantize(8)
    assert (_decode_png(palette) == np.asarray(palette.convert("RGB"))).all()


def test_cmyk_jpeg_decodes_to_its_colours():
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[:, :16], rgb[:, 16:] = (200, 40, 40), (30, 90, 220)
    got = _decode_png(Image.fromarray(rgb).convert("CMYK"), fmt="jpg")
    assert np.abs(got[:, 4:12] - rgb[:, 4:12]).max() <= 8 and np.abs(got[:, 20:28] - rgb[:, 20:28]).max() <= 8


def test_one_pixel_image_becomes_a_constant_image():
    pixel = corpus.png_bytes(np.array([[[200, 10, 30]]], np.uint8))
    out = decode_sample({"__key__": "p", "png": pixel}, _spec(32, 8, keep_image=True))
    assert (out.width, out.height) == (1, 1)
    assert (out.image_uint8 == np.array([200, 10, 30], np.uint8)).all()


def test_pixel_limit_refuses_before_decoding(monkeypatch):
    def no_decode(*args, **kwargs):
        raise AssertionError("decoded an image above the pixel limit")

    monkeypatch.setattr(decode, "decode_image", no_decode)
    out = decode_sample({"__key__": "h", "png": corpus.huge_png()}, _spec())
    assert isinstance(out, FailedSample) and (out.width, out.height) == corpus.HUGE_SIZE
    assert out.reason.startswith("image 8200x8200 is above the pixel limit")


def test_pixel_limit_is_configurable():
    sample = {"__key__": "k", "jpg": corpus.jpeg_bytes(_noise(40, 56))}
    assert isinstance(decode_sample(sample, _spec(max_pixels=40 * 56)), DecodedSample)
    out = decode_sample(sample, _spec(max_pixels=40 * 56 - 1))
    assert isinstance(out, FailedSample) and "above the pixel limit" in out.reason and (out.width, out.height) == (56, 40)


def test_the_image_is_the_image_extension_never_a_label():
    jpg, png = corpus.jpeg_bytes(_noise(40, 56)), corpus.png_bytes(_noise(40, 56, seed=9))
    label = corpus.png_bytes(np.zeros((40, 56), np.uint8))
    assert isinstance(decode_sample({"__key__": "a", "seg.png": label, "jpg": jpg}, _spec()), DecodedSample)
    only_label = decode_sample({"__key__": "b", "seg.png": label, "cls": b"1"}, _spec())
    assert isinstance(only_label, FailedSample) and "got extensions seg.png, cls" in only_label.reason
    both = decode_sample({"__key__": "c", "jpg": jpg, "png": png}, _spec())
    assert isinstance(both, FailedSample) and "jpg, png" in both.reason
    chosen = decode_sample({"__key__": "c", "jpg": jpg, "png": png}, _spec(32, 8, image_key="png", keep_image=True))
    assert (chosen.image_uint8 == decode_sample({"__key__": "d", "png": png}, _spec(32, 8, keep_image=True)).image_uint8).all()
    as_label = decode_sample({"__key__": "e", "jpg": jpg, "png": label}, _spec(labels=("png",)))
    assert isinstance(as_label, DecodedSample) and as_label.labels["png"].shape == (32, 32)
    missing_key = decode_sample({"__key__": "f", "jpg": jpg}, _spec(image_key="webp"))
    assert isinstance(missing_key, FailedSample) and "expected an image webp" in missing_key.reason


def test_png_labels_keep_their_mode_values():
    rng = np.random.default_rng(11)
    indexes = rng.integers(0, 5, (32, 32), dtype=np.uint8)
    palette_label = Image.fromarray(indexes, mode="L").convert("P")  # palette image whose indexes are the class ids
    palette_label.putpalette([v for i in range(256) for v in (i * 40 % 256, 255 - i, i)])
    depth = rng.integers(0, 65536, (32, 32), dtype=np.uint16)
    sample = {"__key__": "l", "jpg": corpus.jpeg_bytes(_noise(32, 32)), "seg.png": corpus.png_bytes(palette_label),
              "depth.png": corpus.png_bytes(depth)}
    out = decode_sample(sample, _spec(labels=("seg.png", "depth.png")))
    np.testing.assert_array_equal(out.labels["seg.png"], np.asarray(palette_label))  # indexes, not palette colours
    assert out.labels["depth.png"].dtype == np.uint16
    np.testing.assert_array_equal(out.labels["depth.png"], depth)


def test_label_problems_fail_the_sample(tmp_path):
    jpg = corpus.jpeg_bytes(_noise(40, 56))
    spec = _spec(labels=("seg.png",))
    cases = {
        "missing": ({}, "expected in the sample"),
        "wrong size": ({"seg.png": corpus.png_bytes(np.zeros((20, 28), np.uint8))}, "expected the image size 56x40, got 28x20"),
        "corrupt": ({"seg.png": b"not a png"}, "unrecognised data"),
    }
    for name, (extra, fragment) in cases.items():
        out = decode_sample({"__key__": "x", "jpg": jpg, **extra}, spec)
        assert isinstance(out, FailedSample) and fragment in out.reason, (name, out)
        assert (out.width, out.height) == (56, 40)


def test_npy_labels_are_never_unpickled(tmp_path):
    marker = tmp_path / "npy-marker"
    poisoned = np.empty((40, 56), dtype=object)
    poisoned[0, 0] = corpus._CreatesFile(str(marker))
    jpg = corpus.jpeg_bytes(_noise(40, 56))
    spec = _spec(labels=("d.npy",))
    out = decode_sample({"__key__": "x", "jpg": jpg, "d.npy": _npy(poisoned, allow_pickle=True)}, spec)
    assert isinstance(out, FailedSample) and "no pickled objects" in out.reason
    assert not marker.exists()
    flat = decode_sample({"__key__": "y", "jpg": jpg, "d.npy": _npy(np.zeros(7))}, spec)
    assert isinstance(flat, FailedSample) and "(H, W) or (H, W, C)" in flat.reason


def test_shard_errors_and_flagged_samples_are_failures():
    jpg = corpus.jpeg_bytes(_noise(40, 56))
    marker = decode_sample({"__key__": None, "__url__": "u", "__error__": "shard u: expected a complete tar archive"}, _spec())
    assert isinstance(marker, FailedSample) and marker.key == "" and "complete tar archive" in marker.reason
    flagged = decode_sample({"__key__": "d", "jpg": jpg, "__error__": "sample d: got d.jpg twice"}, _spec())
    assert isinstance(flagged, FailedSample) and flagged.reason == "sample d: got d.jpg twice"


def test_decode_never_raises_on_hostile_payloads():
    rng = np.random.default_rng(0)
    valid = [corpus.jpeg_bytes(_noise(40, 56)), corpus.png_bytes(_noise(40, 56)), corpus.huge_png()]
    spec = _spec(labels=("seg.png", "d.npy"))
    for i in range(150):
        source = valid[i % len(valid)]
        cut = int(rng.integers(0, len(source)))
        flips = rng.integers(0, len(source), 4)
        data = bytearray(source)
        for f in flips:
            data[f] ^= 0xFF
        payloads = [bytes(data), source[:cut], rng.integers(0, 256, 64, dtype=np.uint8).tobytes()]
        for payload in payloads:
            sample = {"__key__": "z", "jpg": payload, "seg.png": payload, "d.npy": payload}
            assert isinstance(decode_sample(sample, spec), (DecodedSample, FailedSample))


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"image_size": 8, "stride": 14}, "at least the backbone stride 14"),
        ({"labels": ("seg.txt",)}, "label seg.txt"),
        ({"labels": ("seg.png", "seg.png")}, "distinct"),
        ({"image_key": "png", "labels": ("png",)}, "other than the image key"),
        ({"mean": (0.5, 0.5)}, "3 values"),
        ({"max_pixels": 0}, "positive pixel count"),
    ],
)
def test_decode_spec_refuses_bad_settings(kwargs, fragment):
    settings = {"image_size": 32, "stride": 8, "mean": MEAN, "std": STD, **kwargs}
    with pytest.raises(ConfigError, match=fragment):
        DecodeSpec(**settings)


def test_decode_spec_normalises_sequences_to_tuples():
    spec = DecodeSpec(32, 8, mean=[0.5, 0.5, 0.5], std=np.array([0.2, 0.2, 0.2]), labels=["seg.png"])
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.2, 0.2, 0.2) and spec.labels == ("seg.png",)
    assert hash(spec) == hash(DecodeSpec(32, 8, (0.5,) * 3, (0.2,) * 3, labels=("seg.png",)))
