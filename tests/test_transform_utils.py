"""Tests for snaplook.transform_utils: aspect-preserving resizes, crops, preprocessing."""

from __future__ import annotations

import numpy as np
import pytest

from snaplook.transform_utils import (
    CAFFE_BGR_MEAN,
    crop_box,
    l2_normalize,
    preprocess_caffe,
    preprocess_tf,
    preprocess_torch,
    resize_to_square,
    resize_to_width,
)

RED = (255, 0, 0)
BLUE = (0, 0, 255)


def _two_halves(h: int, w: int) -> np.ndarray:
    """Left half red, right half blue."""
    image = np.zeros((h, w, 3), dtype=np.uint8)
    image[:, : w // 2] = RED
    image[:, w // 2 :] = BLUE
    return image


# --- resize_to_square --------------------------------------------------------------------


def test_resize_to_square_pad_wide_letterboxes_top_and_bottom() -> None:
    image = np.full((50, 100, 3), RED, dtype=np.uint8)

    out = resize_to_square(image, 224, mode="pad")

    assert out.shape == (224, 224, 3)
    assert out.dtype == np.uint8
    # Scaled to 224x112, centred: rows 56..167 are content, the rest white padding.
    assert np.all(out[56:168] == RED)
    assert np.all(out[:56] == 255)
    assert np.all(out[168:] == 255)


def test_resize_to_square_pad_tall_pads_left_and_right() -> None:
    image = np.full((90, 30, 3), BLUE, dtype=np.uint8)

    out = resize_to_square(image, 60, mode="pad", pad_value=0)

    # Scaled to 20 wide x 60 high, centred at columns 20..39; padding is pad_value.
    assert out.shape == (60, 60, 3)
    assert np.all(out[:, 20:40] == BLUE)
    assert np.all(out[:, :20] == 0)
    assert np.all(out[:, 40:] == 0)


def test_resize_to_square_crop_keeps_centre() -> None:
    image = _two_halves(50, 100)

    out = resize_to_square(image, 224, mode="crop")

    # Scaled to 448x224 and the centre 224 columns kept: half red, half blue, no padding.
    assert out.shape == (224, 224, 3)
    assert np.all(out[:, :110] == RED)
    assert np.all(out[:, 114:] == BLUE)
    assert not np.any(np.all(out == 255, axis=2))


def test_resize_to_square_square_input_fills_output() -> None:
    image = np.full((10, 10, 3), (12, 34, 56), dtype=np.uint8)

    for mode in ("pad", "crop"):
        out = resize_to_square(image, 32, mode=mode)
        assert out.shape == (32, 32, 3)
        assert np.all(out == (12, 34, 56))


def test_resize_to_square_extreme_aspect_keeps_one_row() -> None:
    out = resize_to_square(np.zeros((1, 2000, 3), dtype=np.uint8), 224, mode="pad")

    assert out.shape == (224, 224, 3)
    assert int(np.all(out == 0, axis=2).sum()) == 224  # one content row of black


def test_resize_to_square_unknown_mode_raises() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        resize_to_square(np.zeros((4, 4, 3), dtype=np.uint8), 8, mode="stretch")


# --- resize_to_width ---------------------------------------------------------------------


def test_resize_to_width_keeps_aspect_and_dtype() -> None:
    image = _two_halves(720, 1280)

    for interpolation in ("area", "linear"):
        small = resize_to_width(image, 160, interpolation=interpolation)
        assert small.shape == (90, 160, 3) and small.dtype == np.uint8
        assert tuple(small[45, 10]) == RED and tuple(small[45, 150]) == BLUE


def test_resize_to_width_narrow_image_is_returned_as_is() -> None:
    image = _two_halves(40, 100)

    assert resize_to_width(image, 100) is image
    assert resize_to_width(image, 160) is image


def test_resize_to_width_extreme_aspect_keeps_one_row() -> None:
    assert resize_to_width(np.zeros((2, 1000, 3), dtype=np.uint8), 100).shape == (1, 100, 3)


def test_resize_to_width_unknown_filter_raises() -> None:
    with pytest.raises(ValueError, match="interpolation"):
        resize_to_width(np.zeros((4, 4, 3), dtype=np.uint8), 2, interpolation="cubic")


# --- crop_box ----------------------------------------------------------------------------


def test_crop_box_clips_to_image() -> None:
    image = np.arange(10 * 20 * 3, dtype=np.uint8).reshape(10, 20, 3)

    assert crop_box(image, (2, 3, 5, 4)).shape == (4, 5, 3)
    assert crop_box(image, (-5, -5, 10, 10)).shape == (5, 5, 3)
    assert crop_box(image, (15, 8, 100, 100)).shape == (2, 5, 3)
    np.testing.assert_array_equal(crop_box(image, (2, 3, 5, 4)), image[3:7, 2:7])


def test_crop_box_outside_raises() -> None:
    with pytest.raises(ValueError, match="outside"):
        crop_box(np.zeros((10, 10, 3), dtype=np.uint8), (20, 20, 5, 5))


# --- preprocessing -----------------------------------------------------------------------


def test_preprocess_caffe_known_pixel() -> None:
    pixel = np.array([[[255, 0, 10]]], dtype=np.uint8)  # RGB

    out = preprocess_caffe(pixel)

    # RGB -> BGR, then the ImageNet BGR means subtracted; no division by 255.
    assert out.dtype == np.float32
    np.testing.assert_allclose(
        out[0, 0], (10 - 103.939, 0 - 116.779, 255 - 123.68), rtol=0, atol=1e-4
    )
    assert CAFFE_BGR_MEAN == (103.939, 116.779, 123.68)


def test_preprocess_caffe_equals_keras_resnet50() -> None:
    keras = pytest.importorskip("keras")
    batch = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3)).astype(np.float32)

    ours = preprocess_caffe(batch.astype(np.uint8))
    theirs = keras.applications.resnet50.preprocess_input(batch.copy())

    np.testing.assert_allclose(ours, np.asarray(theirs), rtol=0, atol=1e-4)


def test_preprocess_torch_and_tf_equal_keras() -> None:
    keras = pytest.importorskip("keras")
    batch = np.random.default_rng(1).integers(0, 256, (2, 5, 5, 3)).astype(np.float32)

    np.testing.assert_allclose(
        preprocess_torch(batch),
        np.asarray(keras.applications.densenet.preprocess_input(batch.copy())),
        atol=1e-5,
    )
    np.testing.assert_allclose(
        preprocess_tf(batch),
        np.asarray(keras.applications.mobilenet_v2.preprocess_input(batch.copy())),
        atol=1e-5,
    )


def test_l2_normalize_unit_rows_and_zero_rows() -> None:
    features = np.array([[3.0, 4.0], [0.0, 0.0], [-1.0, 0.0]])

    out = l2_normalize(features)

    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]], atol=1e-7)
