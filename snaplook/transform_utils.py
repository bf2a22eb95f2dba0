"""Pure array transforms: aspect-preserving resizes, crops, backbone preprocessing.

Images are ndarrays of shape (height, width, 3), dtype uint8, RGB.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from snaplook.options import DEFAULT_RESIZE_MODE, RESIZE_MODES

if TYPE_CHECKING:
    import numpy as np

#: Padding colour: white, the background of shop photos, so padding looks like backdrop.
PAD_VALUE = 255

#: Channel means (B, G, R) that the Caffe-style ResNet50 ImageNet weights were trained with.
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


def resize_to_square(
    image: np.ndarray, size: int, *, mode: str = DEFAULT_RESIZE_MODE, pad_value: int = PAD_VALUE
) -> np.ndarray:
    """Fit an image into ``size`` x ``size`` keeping its aspect ratio.

    Args:
        image: ndarray of shape (h, w, 3), uint8.
        size: side of the square output in pixels.
        mode: "pad" (letterbox, centred, ``pad_value`` around) or "crop" (centre crop).
        pad_value: grey level of the padding, default=255 (white).

    Returns:
        ndarray of shape (size, size, 3), uint8.
    """
    import cv2
    import numpy as np

    if mode not in RESIZE_MODES:
        raise ValueError(f"mode must be one of {RESIZE_MODES}, got {mode!r}")
    h, w = image.shape[:2]
    scale = size / max(h, w) if mode == "pad" else size / min(h, w)
    new_w = max(1, round(w * scale))
    new_h = max(1, round(h * scale))
    # INTER_AREA is the right filter for shrinking (no aliasing); INTER_LINEAR for growing.
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(np.ascontiguousarray(image), (new_w, new_h), interpolation=interp)
    if mode == "crop":
        top = (new_h - size) // 2
        left = (new_w - size) // 2
        return np.ascontiguousarray(resized[top : top + size, left : left + size])
    out = np.full((size, size, 3), pad_value, dtype=np.uint8)
    top = (size - new_h) // 2
    left = (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = resized
    return out


#: Filters :func:`resize_to_width` offers, by name (cv2 loads only when an image is resized).
RESIZE_FILTERS = ("area", "linear")


def resize_to_width(image: np.ndarray, width: int, *, interpolation: str = "area") -> np.ndarray:
    """Shrink an image to ``width`` pixels wide, keeping its aspect ratio.

    Args:
        image: ndarray of shape (h, w, c) or (h, w).
        width: the widest the result may be, in pixels.
        interpolation: "area" (averages, no aliasing: thumbnails, detection) or "linear"
            (samples, several times faster: colour histograms of video frames).

    Returns:
        ndarray of shape (max(1, round(h * width / w)), width, ...) of the same dtype, or
        ``image`` itself (not a copy) when it is no wider than ``width``.
    """
    if interpolation not in RESIZE_FILTERS:
        raise ValueError(f"interpolation must be one of {RESIZE_FILTERS}, got {interpolation!r}")
    h, w = image.shape[:2]
    if w <= width:
        return image
    import cv2

    flag = cv2.INTER_AREA if interpolation == "area" else cv2.INTER_LINEAR
    return cv2.resize(image, (width, max(1, round(h * width / w))), interpolation=flag)


def crop_box(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Cut ``box`` = (x, y, w, h) out of ``image``, clipped to the image bounds.

    Returns:
        ndarray of shape (h', w', 3) with h' <= h, w' <= w (a view, not a copy).
    """
    x, y, w, h = (int(round(v)) for v in box)
    height, width = image.shape[:2]
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(width, x + w), min(height, y + h)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"box {box} lies outside the {width}x{height} image")
    return image[y0:y1, x0:x1]


def preprocess_caffe(images: np.ndarray) -> np.ndarray:
    """ResNet50 (Caffe-style) preprocessing: RGB to BGR, subtract the ImageNet BGR means.

    Identical to ``keras.applications.resnet50.preprocess_input`` on RGB 0..255 input
    (no scaling to 0..1: these weights expect raw 0..255 values minus the means).

    Args:
        images: ndarray of shape (..., 3), RGB, values 0..255 (any numeric dtype).

    Returns:
        ndarray of the same shape, float32, BGR, mean-subtracted.
    """
    import numpy as np

    out = np.asarray(images, dtype=np.float32)[..., ::-1]
    return out - np.asarray(CAFFE_BGR_MEAN, dtype=np.float32)


def preprocess_torch(images: np.ndarray) -> np.ndarray:
    """Torch-style preprocessing (DenseNet): scale to 0..1, subtract mean, divide by std, RGB."""
    import numpy as np

    out = np.asarray(images, dtype=np.float32) / 255.0
    mean = np.asarray((0.485, 0.456, 0.406), dtype=np.float32)
    std = np.asarray((0.229, 0.224, 0.225), dtype=np.float32)
    return (out - mean) / std


def preprocess_tf(images: np.ndarray) -> np.ndarray:
    """TF-style preprocessing (MobileNetV2, Xception): scale to -1..1, RGB."""
    import numpy as np

    return np.asarray(images, dtype=np.float32) / 127.5 - 1.0


def preprocess_none(images: np.ndarray) -> np.ndarray:
    """No preprocessing beyond float32 (EfficientNet rescales inside the model)."""
    import numpy as np

    return np.asarray(images, dtype=np.float32)


def preprocess_lite(images: np.ndarray) -> np.ndarray:
    """EfficientNet-Lite preprocessing: ``(x - 127) / 128``, RGB, about -1..1.

    The TF-Lite EfficientNet-Lite checkpoints (and the PyTorch port of Lite0) were trained
    with mean 127 and scale 128, not ImageNet channel statistics.
    """
    import numpy as np

    return (np.asarray(images, dtype=np.float32) - 127.0) / 128.0


PREPROCESSORS = {
    "caffe": preprocess_caffe,
    "torch": preprocess_torch,
    "tf": preprocess_tf,
    "none": preprocess_none,
    "lite": preprocess_lite,
}


def l2_normalize(features: np.ndarray, *, eps: float = 1e-12) -> np.ndarray:
    """Scale each row to unit L2 norm (rows of zeros stay zero).

    Args:
        features: ndarray of shape (n, d).

    Returns:
        ndarray of shape (n, d), float32.
    """
    import numpy as np

    features = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, eps)
