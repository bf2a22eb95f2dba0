"""Lead artists: person detection in frames, grouping people across frames, crops and clothes.

Detection (``snaplook.detection``) is NanoDet when ``snaplook models fetch nanodet`` has run,
else what ships with opencv-python (HOG people detector, Haar face and upper-body cascades),
or a user-supplied YOLO-style ONNX model.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snaplook import detection as _detection
from snaplook.errors import SnaplookError
from snaplook.options import (
    DEFAULT_DETECTOR,
    DEFAULT_LEAD_ARTIST_ROOT,
    DEFAULT_MAX_ARTISTS,
    DEFAULT_MIN_SIZE,
)

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

Box = tuple[int, int, int, int]  # x, y, w, h in frame pixels

#: Names of the built-in OpenCV fallback ("builtin" is its name before issue 23).
BUILTIN_DETECTORS = ("hog", "builtin")
DEFAULT_CROPS_PER_ARTIST = 3
DEFAULT_DETECT_WIDTH = _detection.DEFAULT_HOG_WIDTH
#: Cascades look for faces and shoulders at this width (3x faster than 480 px); a lead
#: artist's face in a close or half shot stays over 20 px there.
CASCADE_WIDTH = 320
#: Detections whose centre differs from their surroundings in less than this fraction of
#: pixels are background (floorboards, a wall with a speck). Measured on every detection in
#: the real video at 1 frame/s and on the photos: floorboards, a pole and a car 0.00-0.01,
#: whole people 0.32 and up (benchmarks/bench_look.py, tests/data/video_boxes.csv).
DEFAULT_MIN_FOREGROUND = 0.2
#: A person seen for the first time must score at least this; weaker detections only
#: continue someone already followed. Real people in the test video start at 0.40-0.65
#: (one at 0.29 is picked up a frame later); a flag in the astronaut photo scores 0.28.
DEFAULT_MIN_TRACK_SCORE = 0.4
#: Height/width range of a plausible person box (a crouching child to a thin full figure).
PERSON_ASPECT = (0.5, 6.0)

ARTISTS_HEADER = (
    "artist",
    "frame",
    "time_s",
    "x",
    "y",
    "w",
    "h",
    "score",
    "full_shot",
    "kind",
    "path",
    "source",
    "detector",
)
DETECTIONS_HEADER = (
    "frame",
    "time_s",
    "n_people",
    "x",
    "y",
    "w",
    "h",
    "score",
    "detector",
    "track",
    "artist",
    "source",
)
#: Sidecar of ``artists.csv`` when the pose model is fetched: per view (crop stem) the 33
#: BlazePose landmarks in frame pixels, their visibility, the garment regions and the
#: landmark full-shot check (see snaplook.pose).
LANDMARKS_JSON = "landmarks.json"
#: Crops cut from landmark regions, beside person/upper/lower.
LANDMARK_KINDS = ("footwear", "eyewear")
#: A landmark region crop smaller than this on a side shows nothing to search with.
MIN_REGION_PX = 12
#: Longest part of a crop's file name taken from its photo's name (file systems allow 255).
_MAX_STEM = 100

#: Body height in head heights (the classical 7.5-head figure).
_HEADS_PER_BODY = 7.5
#: A Haar face box spans brow to chin; the head is about 1.3 times taller.
_HEAD_PER_FACE = 1.3


@dataclass
class Detection:
    """One person found in a frame.

    Attributes:
        box: (x, y, w, h) of the whole person in frame pixels, clipped to the frame.
        score: detector confidence in [0, 1].
        source: which detector found it: "nanodet", "hog", "face", "upperbody", "onnx" or
            "given".
        face: (x, y, w, h) of the face when a face detector saw it, else None.
        whole_body: True when the detector saw the whole body (HOG, ONNX), False when the
            body box was extended from a face or head-and-shoulders box.
        full_shot: whole standing person: head and feet inside the frame, plausible
            aspect and size.
        foreground: fraction of the box centre unlike its surroundings (see
            :func:`foreground_fraction`), set by :func:`drop_false_people`.
    """

    box: Box
    score: float
    source: str
    face: Box | None = None
    whole_body: bool = True
    full_shot: bool = False
    foreground: float | None = None


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x, y, w, h) boxes."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def _overlap_small(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over the smaller box's area (1.0 when one box holds the other)."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    small = min(a[2] * a[3], b[2] * b[3])
    return ix * iy / small if small > 0 else 0.0


def _clip_box(box: Sequence[float], shape: Sequence[int]) -> Box:
    height, width = shape[:2]
    x0 = max(0, int(round(box[0])))
    y0 = max(0, int(round(box[1])))
    x1 = min(width, int(round(box[0] + box[2])))
    y1 = min(height, int(round(box[1] + box[3])))
    return (x0, y0, max(0, x1 - x0), max(0, y1 - y0))


def is_full_shot(
    raw_box: Sequence[float], shape: Sequence[int], *, whole_body: bool = True
) -> bool:
    """Whether a person box shows a whole standing person.

    Args:
        raw_box: (x, y, w, h) as the detector saw it, before clipping to the frame.
        shape: the frame's (height, width[, channels]).
        whole_body: False for boxes extended from a face or head-and-shoulders box: their
            feet were never seen, so they are not full shots.

    Returns:
        True when head and feet are inside the frame (a box touching the top or bottom
        edge may be cut there), the box is between 1.4 and 5 times taller than wide and at
        least a fifth of the frame high.
    """
    if not whole_body:
        return False
    height = shape[0]
    x, y, w, h = raw_box
    if w <= 0 or h <= 0:
        return False
    # No tolerance outwards: HOG boxes of a head and shoulders at the top edge reach 4%
    # above the frame, and were taken for full shots (issue 15).
    return y >= 0 and y + h <= height and 1.4 <= h / w <= 5.0 and h >= 0.2 * height


def _resize_width(image: np.ndarray, width: int) -> tuple[np.ndarray, float]:
    from snaplook.transform_utils import resize_to_width

    return resize_to_width(image, width), min(1.0, width / image.shape[1])


def foreground_fraction(image: np.ndarray, box: Sequence[int]) -> float:
    """How much of a box's centre is unlike its surroundings: 0 background, 1 all new.

    The centre is the middle half of the box's width over 90% of its height (where a
    person's body is). The surroundings are a band a quarter of the box's longer side wide
    around it, beginning 35% of the box's width beside it (a HOG box holds the torso;
    arms and loose clothes reach past its sides). A centre pixel is foreground when its
    colour (HSV, 8 x 4 x 4 bins) is at least 10 times more common in the centre than
    around it. Floorboards, road or a wall with a speck score near 0: their colours are
    all around them; a person in front of them scores 0.3 or more.

    Args:
        image: ndarray of shape (h, w, 3), RGB uint8.
        box: (x, y, w, h) in ``image`` pixels.

    Returns:
        float in [0, 1]; 1.0 when the box leaves too little of the image around it to tell.
    """
    import cv2
    import numpy as np

    height, width = image.shape[:2]
    x, y, w, h = (int(v) for v in box)
    if w < 4 or h < 4:
        return 0.0
    gap = int(0.35 * w)
    m = int(0.25 * max(w, h)) + gap
    x0, y0 = max(0, x - m), max(0, y - m)
    x1, y1 = min(width, x + w + m), min(height, y + h + m)
    hsv = cv2.cvtColor(np.ascontiguousarray(image[y0:y1, x0:x1]), cv2.COLOR_RGB2HSV)
    ring = np.ones(hsv.shape[:2], np.uint8)
    ring[max(0, y - y0) : y - y0 + h, max(0, x - x0 - gap) : x - x0 + w + gap] = 0
    centre = np.zeros_like(ring)
    cy0, cy1 = y - y0 + int(0.05 * h), y - y0 + h - int(0.05 * h)
    cx0, cx1 = x - x0 + int(0.25 * w), x - x0 + w - int(0.25 * w)
    centre[max(0, cy0) : max(0, cy1), max(0, cx0) : max(0, cx1)] = 1
    if int(ring.sum()) < max(50, int(0.1 * centre.sum())) or not centre.any():
        return 1.0
    bins, ranges = [8, 4, 4], [0, 180, 0, 256, 0, 256]
    around = cv2.calcHist([hsv], [0, 1, 2], ring, bins, ranges)
    inside = cv2.calcHist([hsv], [0, 1, 2], centre, bins, ranges)
    around /= around.sum()
    inside /= inside.sum()
    return float(inside[around < 0.1 * inside].sum())


def is_plausible_person(box: Sequence[float], shape: Sequence[int]) -> bool:
    """Whether a box could hold a person: big enough to see, not a sliver or a band.

    Args:
        box: (x, y, w, h) in frame pixels, clipped to the frame.
        shape: the frame's (height, width[, channels]).

    Returns:
        True when the box is at least 8 x 16 pixels, its height is between
        ``PERSON_ASPECT`` (0.5 and 6) times its width, and it is not wider than the frame
        while shorter than a third of it (a band of floor or sky).
    """
    height, width = shape[:2]
    _, _, w, h = box
    if w < 8 or h < 16:
        return False
    if not PERSON_ASPECT[0] <= h / w <= PERSON_ASPECT[1]:
        return False
    return not (w >= 0.95 * width and h < height / 3)


def drop_false_people(
    image: np.ndarray,
    detections: Iterable[Detection],
    *,
    min_foreground: float = DEFAULT_MIN_FOREGROUND,
) -> list[Detection]:
    """Drop detections that cannot be a person or are mostly background.

    A box is dropped when :func:`is_plausible_person` says no, or when less than
    ``min_foreground`` of its centre is foreground (:func:`foreground_fraction`): HOG
    fires on floorboards, road markings and poles, whose colours are all around them.
    Kept detections get ``foreground`` set.

    Args:
        image: ndarray of shape (h, w, 3), RGB uint8: the frame the boxes are in.
        detections: the candidates.
        min_foreground: float in [0, 1], default=0.2; 0 keeps every plausible box.

    Returns:
        The kept detections, in their order.
    """
    kept = []
    for det in detections:
        if not is_plausible_person(det.box, image.shape):
            logger.debug("dropped %s box %s: not a person's shape", det.source, det.box)
            continue
        det.foreground = foreground_fraction(image, det.box)
        if det.foreground < min_foreground:
            logger.debug(
                "dropped %s box %s: mostly background (%.2f)", det.source, det.box, det.foreground
            )
            continue
        kept.append(det)
    return kept


def _nms(dets: list[Detection], iou_threshold: float) -> list[Detection]:
    """Greedy non-maximum suppression; a box mostly inside a kept one is dropped too."""
    kept: list[Detection] = []
    for det in sorted(dets, key=lambda d: -d.score):
        if all(
            iou(det.box, k.box) < iou_threshold and _overlap_small(det.box, k.box) < 0.8
            for k in kept
        ):
            kept.append(det)
    return kept


class PersonDetector:
    """Finds people in an RGB frame.

    ``auto`` (the default) runs NanoDet when ``snaplook models fetch nanodet`` has run,
    else SSDLite when fetched, else the built-in detector, saying so once in the log.
    ``nanodet`` runs :class:`snaplook.detection.NanoDetDetector` (two passes merged by
    NMS), ``ssdlite`` :class:`snaplook.detection.SSDLiteDetector`. The built-in
    detector (``hog``, formerly ``builtin``) runs OpenCV's HOG people detector for whole
    bodies and the Haar frontal-face and upper-body cascades for close and half shots; face
    and shoulder boxes are extended to body boxes by human proportions, and all boxes are
    merged by non-maximum suppression. With ``model`` a path to an ``.onnx`` file, a
    YOLO-style detector runs through ``cv2.dnn`` instead (class 0 = person). Models load on
    the first :meth:`detect`.

    Args:
        model: "auto", "nanodet", "ssdlite", "hog" ("builtin"), or the path of a YOLO-style
            ONNX model.
        min_size: people shorter than this fraction of the frame height are dropped.
        detect_width: frames wider than this are downscaled before HOG.
        confidence: minimum detector confidence in [0, 1].
        min_foreground: drop boxes whose centre is mostly background (see
            :func:`drop_false_people`); 0 keeps them.
        nms_iou: boxes overlapping a stronger one by more than this IoU are merged.
        input_size: ONNX model input side in pixels.
    """

    def __init__(
        self,
        model: str | Path = DEFAULT_DETECTOR,
        *,
        min_size: float = DEFAULT_MIN_SIZE,
        detect_width: int = DEFAULT_DETECT_WIDTH,
        confidence: float = 0.25,
        min_foreground: float = DEFAULT_MIN_FOREGROUND,
        nms_iou: float = 0.45,
        input_size: int = 640,
    ) -> None:
        self.model = model
        self.min_size = min_size
        self.detect_width = detect_width
        self.confidence = confidence
        self.min_foreground = min_foreground
        self.nms_iou = nms_iou
        self.input_size = input_size
        self.resolved_: str | None = None
        self.engine_: Any = None
        self.face_: Any = None
        self.upper_: Any = None
        self.net_: Any = None

    @property
    def builtin(self) -> bool:
        """True when the OpenCV HOG + Haar fallback runs (after ``auto`` is resolved)."""
        self._resolve()
        return self.resolved_ == "hog"

    @property
    def label(self) -> str:
        """What ``artists.csv`` names this detector: nanodet, ssdlite, hog (fallback), onnx."""
        self._resolve()
        return _detection.HOG_FALLBACK if self.resolved_ == "hog" else str(self.resolved_)

    def _resolve(self) -> None:
        if self.resolved_ is not None:
            return
        name = str(self.model)
        if name in BUILTIN_DETECTORS:
            self.resolved_ = "hog"
        elif name in _detection.DETECTORS:
            self.resolved_ = _detection.resolve_detector(name)
        else:
            self.resolved_ = "onnx"

    def _load(self) -> None:
        self._resolve()
        if self.resolved_ == "onnx":
            if self.net_ is None:
                self.net_ = load_onnx_detector(self.model)
        elif self.engine_ is None and self.resolved_ in _detection.NEURAL_DETECTORS:
            self.engine_ = _detection.make_detector(str(self.resolved_))
        elif self.engine_ is None:
            self.engine_ = _detection.HogDetector(detect_width=self.detect_width)
            self.engine_.load()
            self.face_ = _cascade("haarcascade_frontalface_alt2.xml")
            self.upper_ = _cascade("haarcascade_upperbody.xml")

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Find the people in one frame.

        Args:
            image: ndarray of shape (h, w, 3), RGB uint8.

        Returns:
            Detections, strongest first, each at least ``min_size`` of the frame high,
            without the boxes :func:`drop_false_people` rejects.

        Raises:
            SnaplookError: the ONNX or NanoDet model cannot be loaded (or is not fetched),
                or an ONNX model gives an unknown output.
        """
        self._load()
        if self.resolved_ == "hog":
            found = self._detect_engine(image) + self._detect_cascades(image)
            merged = _merge_parts(found, self.nms_iou)
        elif self.resolved_ in _detection.NEURAL_DETECTORS:
            merged = self._detect_engine(image)  # NMS (and NanoDet's parts) done there
        else:
            merged = _nms(self._detect_onnx(image), self.nms_iou)
        height = image.shape[0]
        kept = [
            d for d in merged if d.box[3] >= self.min_size * height and d.score >= self.confidence
        ]
        # The foreground test catches HOG on floorboards and poles; NanoDet does not fire
        # there, and in crowds the test rejects real people whose surroundings are people
        # too (foreground 0.00-0.03 for 7 of 24 found, benchmarks/bench_detect.py).
        neural = self.resolved_ in _detection.NEURAL_DETECTORS
        min_foreground = 0.0 if neural else self.min_foreground
        kept = drop_false_people(image, kept, min_foreground=min_foreground)
        return sorted(kept, key=lambda d: -d.score)

    def _detect_engine(self, image: np.ndarray) -> list[Detection]:
        boxes, scores = self.engine_.detect(image)
        out = [
            Detection(
                box=_clip_box(raw, image.shape),
                score=float(score),
                source=self.engine_.name,
                whole_body=True,
                full_shot=is_full_shot(raw, image.shape),
            )
            for raw, score in zip(boxes.tolist(), scores.tolist())
        ]
        return [d for d in out if d.box[2] > 0 and d.box[3] > 0]

    def _detect_cascades(self, image: np.ndarray) -> list[Detection]:
        import cv2
        import numpy as np

        small, scale = _resize_width(image, CASCADE_WIDTH)
        grey = cv2.equalizeHist(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY))
        side = max(20, int(0.05 * grey.shape[0]))
        out: list[Detection] = []
        faces, _, face_w = self.face_.detectMultiScale3(
            grey, scaleFactor=1.1, minNeighbors=5, minSize=(side, side), outputRejectLevels=True
        )
        for (x, y, w, h), weight in zip(faces, np.ravel(face_w)):
            face = (x / scale, y / scale, w / scale, h / scale)
            raw = body_from_face(face)
            out.append(
                Detection(
                    box=_clip_box(raw, image.shape),
                    score=float(weight / (weight + 20.0)),
                    source="face",
                    face=_clip_box(face, image.shape),
                    whole_body=False,
                )
            )
        uppers, _, upper_w = self.upper_.detectMultiScale3(
            grey,
            scaleFactor=1.1,
            minNeighbors=5,
            minSize=(2 * side, 2 * side),
            outputRejectLevels=True,
        )
        for (x, y, w, h), weight in zip(uppers, np.ravel(upper_w)):
            # The cascade's window holds head and shoulders: about 2.3 heads of a body.
            head = h / scale / 2.3
            cx = (x + w / 2) / scale
            raw = (cx - w / scale / 2, y / scale, w / scale, head * _HEADS_PER_BODY)
            out.append(
                Detection(
                    box=_clip_box(raw, image.shape),
                    score=float(weight / (weight + 20.0)),
                    source="upperbody",
                    whole_body=False,
                )
            )
        return out

    def _detect_onnx(self, image: np.ndarray) -> list[Detection]:
        import cv2

        size = self.input_size
        h, w = image.shape[:2]
        scale = min(size / w, size / h)
        resized = cv2.resize(image, (round(w * scale), round(h * scale)))
        canvas = cv2.copyMakeBorder(
            resized,
            0,
            size - resized.shape[0],
            0,
            size - resized.shape[1],
            cv2.BORDER_CONSTANT,
            value=(114, 114, 114),
        )
        blob = cv2.dnn.blobFromImage(canvas, 1 / 255.0, (size, size), swapRB=False, crop=False)
        self.net_.setInput(blob)
        try:
            output = self.net_.forward()
        except cv2.error as exc:
            raise SnaplookError(
                f"{self.model}: the ONNX detector failed on a {w}x{h} frame ({exc}); it must take "
                f"a 1x3x{size}x{size} image. Use --detector auto or another model."
            ) from exc
        boxes, scores = parse_yolo_output(output, conf=self.confidence, model=self.model)
        out = []
        for (cx, cy, bw, bh), score in zip(boxes, scores):
            raw = ((cx - bw / 2) / scale, (cy - bh / 2) / scale, bw / scale, bh / scale)
            out.append(
                Detection(
                    box=_clip_box(raw, image.shape),
                    score=float(score),
                    source="onnx",
                    whole_body=True,
                    full_shot=is_full_shot(raw, image.shape),
                )
            )
        return [d for d in out if d.box[2] > 0 and d.box[3] > 0]


def make_detector(
    detector: PersonDetector | str | Path = DEFAULT_DETECTOR, *, min_size: float = DEFAULT_MIN_SIZE
) -> PersonDetector:
    """A :class:`PersonDetector` with its models loaded now, so a bad one fails early.

    Args:
        detector: a :class:`PersonDetector` (returned as is, loaded), "auto", "nanodet",
            "hog" or the
            path of a YOLO-style ONNX model.
        min_size: minimum person height as a fraction of the frame height.

    Raises:
        SnaplookError: the ONNX model is missing or unreadable.
    """
    if not isinstance(detector, PersonDetector):
        detector = PersonDetector(detector, min_size=min_size)
    detector._load()
    return detector


def _cascade(name: str) -> Any:
    import cv2

    path = Path(cv2.data.haarcascades) / name
    cascade = cv2.CascadeClassifier(str(path))
    if cascade.empty():
        raise SnaplookError(
            f"OpenCV's cascade {path} is missing or unreadable; reinstall opencv-python."
        )
    return cascade


def body_from_face(face: Sequence[float]) -> tuple[float, float, float, float]:
    """Extend a face box to a standing body box by human proportions.

    The head is about 1.3 face-box heights (brow-to-chin box), the body 7.5 heads high and
    about 3.2 face widths across the shoulders.

    Args:
        face: (x, y, w, h) of a frontal face.

    Returns:
        (x, y, w, h) of the body, not clipped to the frame.
    """
    fx, fy, fw, fh = face
    head = _HEAD_PER_FACE * fh
    top = fy - 0.3 * fh
    width = 3.2 * fw
    return (fx + fw / 2 - width / 2, top, width, head * _HEADS_PER_BODY)


def _merge_parts(found: list[Detection], nms_iou: float) -> list[Detection]:
    """Merge whole-body, face and upper-body boxes of the same people."""
    bodies = _nms([d for d in found if d.whole_body], nms_iou)
    faces = _nms([d for d in found if d.source == "face"], nms_iou)
    uppers = _nms([d for d in found if d.source == "upperbody"], nms_iou)
    merged = list(bodies)
    for face in faces:
        owner = _owner_of_head(face.face, merged)
        if owner is not None:
            if owner.face is None:
                owner.face = face.face
            continue
        merged.append(face)
    for upper in uppers:
        x, y, w, _ = upper.box
        head = (x + w * 0.3, y, w * 0.4, w * 0.4)
        if _owner_of_head(head, merged) is None:
            merged.append(upper)
    return merged


def _owner_of_head(head: Sequence[float] | None, people: list[Detection]) -> Detection | None:
    """The person whose top third holds the centre of ``head``, if any."""
    if head is None:
        return None
    cx, cy = head[0] + head[2] / 2, head[1] + head[3] / 2
    for person in people:
        x, y, w, h = person.box
        if x <= cx <= x + w and y - 0.1 * h <= cy <= y + h / 3:
            return person
    return None


def load_onnx_detector(path: str | Path) -> Any:
    """Load a YOLO-style ONNX person detector with ``cv2.dnn``.

    Raises:
        SnaplookError: the file is missing or is not a model OpenCV can read.
    """
    import cv2

    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise SnaplookError(
            f"--detector {path}: expected auto, nanodet, ssdlite, hog or the path of a YOLO-style "
            ".onnx model."
        )
    if not path.is_file():
        raise SnaplookError(
            f"{path}: detector model not found; pass an existing .onnx file or use "
            "--detector hog (needs nothing extra)."
        )
    try:
        net = cv2.dnn.readNetFromONNX(str(path))
    except cv2.error as exc:
        raise SnaplookError(
            f"{path}: not an ONNX model OpenCV can load ({str(exc).strip().splitlines()[-1]}); "
            "export a YOLO detector to ONNX or use --detector auto."
        ) from exc
    if net.empty():
        raise SnaplookError(f"{path}: the ONNX model is empty; use --detector auto.")
    return net


def parse_yolo_output(
    output: np.ndarray, *, conf: float = 0.25, person_class: int = 0, model: Any = "model"
) -> tuple[np.ndarray, np.ndarray]:
    """Read person boxes from a YOLO-style output tensor.

    Two layouts are understood: YOLOv5-style (1, n, 5 + classes) rows of
    (cx, cy, w, h, objectness, class scores...), and YOLOv8-style (1, 4 + classes, n)
    columns of (cx, cy, w, h, class scores...). The layout is told by which axis is longer.

    Args:
        output: the network output.
        conf: minimum person confidence.
        person_class: index of the person class.
        model: the model's name for error messages.

    Returns:
        (boxes, scores): ndarray of shape (m, 4) of (cx, cy, w, h) in input pixels and
        ndarray of shape (m,).

    Raises:
        SnaplookError: the output has another shape.
    """
    import numpy as np

    out = np.asarray(output, dtype=np.float32)
    if out.ndim == 3 and out.shape[0] == 1:
        out = out[0]
    if out.ndim != 2 or min(out.shape) < 5 + person_class:
        raise SnaplookError(
            f"{model}: unexpected detector output of shape {np.shape(output)}; expected a "
            "YOLO-style (1, n, 5+classes) or (1, 4+classes, n) tensor. Use --detector auto."
        )
    if out.shape[0] < out.shape[1]:  # (4 + classes, n): YOLOv8, no objectness
        rows = out.T
        scores = rows[:, 4 + person_class]
    else:  # (n, 5 + classes): YOLOv5
        rows = out
        scores = rows[:, 4] * (rows[:, 5 + person_class] if rows.shape[1] > 5 else 1.0)
    keep = scores >= conf
    return rows[keep, :4].astype(np.float32), scores[keep].astype(np.float32)


def detect_people(
    image: np.ndarray,
    *,
    detector: PersonDetector | str | Path = DEFAULT_DETECTOR,
    min_size: float = DEFAULT_MIN_SIZE,
) -> list[Detection]:
    """Find the people in one RGB frame.

    Args:
        image: ndarray of shape (h, w, 3), RGB uint8 (grey (h, w) is accepted).
        detector: a :class:`PersonDetector`, "auto", "nanodet", "hog", or the path of an
            ONNX model.
        min_size: minimum person height as a fraction of the frame height (ignored when
            ``detector`` is already a :class:`PersonDetector`).

    Returns:
        Detections, strongest first.
    """
    import numpy as np

    if not isinstance(detector, PersonDetector):
        detector = PersonDetector(detector, min_size=min_size)
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return detector.detect(image)


# --- lead artists across frames ------------------------------------------------------------


@dataclass
class FrameDetections:
    """A frame and the people found in it, the input of :func:`select_lead_artists`.

    Attributes:
        frame: frame number in the video (or position in a folder of images).
        time_s: time in the video in seconds, None for plain images.
        image: ndarray of shape (h, w, 3), RGB uint8.
        detections: the people in it (from :func:`detect_people` or given).
        source: where the frame comes from: the image file, or the video file.
        still: True when ``source`` is this frame's own image file (a photo or an
            extracted frame), False when it is a video.
    """

    frame: int
    time_s: float | None
    image: np.ndarray
    detections: list[Detection]
    source: str = ""
    still: bool = False


@dataclass
class ArtistCrop:
    """One kept view of a lead artist: the frame region around the person box.

    Attributes:
        frame, time_s: where it comes from.
        source, still: the frame's file or video (see :class:`FrameDetections`).
        box: person (x, y, w, h) in frame pixels.
        face: face box in frame pixels, or None.
        patch: ndarray (ph, pw, 3) RGB uint8, the frame around ``box`` (with margin).
        offset: (x, y) of ``patch``'s top-left corner in the frame.
        frame_shape: (height, width) of the frame.
        full_shot: whole standing person.
        sharpness: variance of the Laplacian of the person at 128 px high.
        quality: size x sharpness score used to rank crops.
        detector: the :attr:`Detection.source` of the person box.
    """

    frame: int
    time_s: float | None
    source: str
    box: Box
    face: Box | None
    patch: np.ndarray
    offset: tuple[int, int]
    frame_shape: tuple[int, int]
    full_shot: bool
    sharpness: float
    quality: float
    still: bool = False
    detector: str = ""


@dataclass
class LeadArtist:
    """A person followed across frames, ranked by screen time x size x centrality.

    Attributes:
        artist: rank, 1 for the lead.
        score: screen_time * size * centrality.
        screen_time: fraction of the frames the person is in.
        size: mean person height / frame height.
        centrality: mean 1 - (distance of the box centre from the frame centre / half
            diagonal).
        frames: frame numbers the person was seen in.
        boxes: the person box in each of ``frames``.
        crops: best views, best first (largest and sharpest).
        track: the person's number among everyone followed (``track`` in
            ``detections.csv``).
    """

    artist: int
    score: float
    screen_time: float
    size: float
    centrality: float
    frames: list[int]
    boxes: list[Box]
    crops: list[ArtistCrop]
    track: int = -1


@dataclass
class FrameRecord:
    """Who was found in one frame (frames with nobody are recorded too)."""

    frame: int
    time_s: float | None
    detections: list[Detection]
    tracks: list[int]
    source: str = ""


@dataclass
class Selection:
    """What :func:`select_lead_artists` found.

    Attributes:
        artists: the lead artists, best first.
        frames: one record per frame processed, including frames with nobody.
        n_tracks: people told apart across all frames.
    """

    artists: list[LeadArtist]
    frames: list[FrameRecord]
    n_tracks: int

    @property
    def n_frames_with_people(self) -> int:
        return sum(1 for f in self.frames if f.detections)


@dataclass
class _Track:
    id: int
    hist: np.ndarray
    last_pos: int
    last_box: Box
    frames: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)
    heights: list[float] = field(default_factory=list)
    centrality: list[float] = field(default_factory=list)
    best: list[tuple[float, int, ArtistCrop]] = field(default_factory=list)  # min-heap


def torso_histogram(image: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """Colour signature of a person: HSV histogram of the torso (rows 20-50% of the box).

    Returns:
        ndarray of shape (128,), float32, summing to 1 (8 hue x 4 saturation x 4 value).
    """
    import cv2
    import numpy as np

    x, y, w, h = box
    x0, x1 = int(x + 0.25 * w), int(math.ceil(x + 0.75 * w))
    y0, y1 = int(y + 0.2 * h), int(math.ceil(y + 0.5 * h))
    region = image[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)]
    if region.size == 0:
        return np.full(128, 1 / 128, dtype=np.float32)
    hsv = cv2.cvtColor(np.ascontiguousarray(region), cv2.COLOR_RGB2HSV)
    hist = cv2.calcHist([hsv], [0, 1, 2], None, [8, 4, 4], [0, 180, 0, 256, 0, 256]).ravel()
    return (hist / max(hist.sum(), 1.0)).astype(np.float32)


def _similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Bhattacharyya coefficient of two normalised histograms: 1 same colours, 0 disjoint."""
    import numpy as np

    bc = float(np.sum(np.sqrt(np.clip(a, 0, None) * np.clip(b, 0, None))))
    return max(0.0, min(1.0, bc))


def sharpness(image: np.ndarray) -> float:
    """Variance of the Laplacian of ``image`` scaled to 128 px high (higher is sharper)."""
    import cv2
    import numpy as np

    image = np.ascontiguousarray(image)
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    h, w = grey.shape[:2]
    if h < 2 or w < 2:
        return 0.0
    scale = 128 / h
    grey = cv2.resize(grey, (max(2, round(w * scale)), 128), interpolation=cv2.INTER_AREA)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def _make_crop(fd: FrameDetections, det: Detection, *, full_shot: bool) -> ArtistCrop:
    import numpy as np

    from snaplook.transform_utils import crop_box

    height, width = fd.image.shape[:2]
    x, y, w, h = det.box
    margin = int(0.15 * max(w, h))
    x0, y0 = max(0, x - margin), max(0, y - margin)
    x1, y1 = min(width, x + w + margin), min(height, y + h + margin)
    patch = np.array(fd.image[y0:y1, x0:x1], copy=True)
    sharp = sharpness(crop_box(fd.image, det.box))
    size = (w * h) / float(width * height)
    quality = math.sqrt(size) * (sharp / (sharp + 100.0)) * (_FULL_SHOT_BONUS if full_shot else 1.0)
    return ArtistCrop(
        frame=fd.frame,
        time_s=fd.time_s,
        source=fd.source,
        still=fd.still,
        box=det.box,
        face=det.face,
        patch=patch,
        offset=(x0, y0),
        frame_shape=(height, width),
        full_shot=full_shot,
        sharpness=sharp,
        quality=quality,
        detector=det.source,
    )


def _centrality(box: Box, shape: Sequence[int]) -> float:
    height, width = shape[:2]
    cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
    dist = math.hypot(cx - width / 2, cy - height / 2)
    return max(0.0, 1.0 - dist / math.hypot(width / 2, height / 2))


#: Crop quality bonus for a full shot (whole standing person).
_FULL_SHOT_BONUS = 1.5
#: A box this much shorter than the same person's box a few frames away is part of them.
_PART_RATIO = 0.8


def _part_of_person(box: Box, track: _Track, pos: int, max_gap: int) -> bool:
    """Whether the person's box was clearly taller in the frames just before ``pos``."""
    near = [b[3] for p, b in zip(track.positions, track.boxes) if 0 < abs(pos - p) <= max_gap]
    return bool(near) and box[3] < _PART_RATIO * max(near)


def _check_full_shots(track: _Track, max_gap: int) -> None:
    """Take back full shots that the frames after them show to be part of the person."""
    entries = []
    for quality, order, crop in track.best:
        if crop.full_shot:
            pos = track.positions[track.frames.index(crop.frame)]
            if _part_of_person(crop.box, track, pos, max_gap):
                crop.full_shot = False
                quality /= _FULL_SHOT_BONUS
                crop.quality = quality
        entries.append((quality, order, crop))
    track.best = entries


def _match_detections(
    tracks: Sequence[_Track],
    *,
    dets: Sequence[Detection],
    hists: Sequence[np.ndarray],
    pos: int,
    max_gap: int,
    min_iou: float,
    min_similarity: float,
    reid_similarity: float,
) -> dict[int, int]:
    """Greedy best-first pairing of this frame's detections with people: {detection: track}."""
    pairs = []
    for ti, track in enumerate(tracks):
        gap = pos - track.last_pos
        for di, (det, hist) in enumerate(zip(dets, hists)):
            sim = _similarity(track.hist, hist)
            overlap = iou(track.last_box, det.box) if gap <= max_gap else 0.0
            if sim < min_similarity:
                continue
            # Rejoining without overlap also needs a similar size: two people in
            # dark clothes look alike by colour alone (measured on the test video).
            ratio = det.box[3] / max(1, track.last_box[3])
            if overlap >= min_iou or (sim >= reid_similarity and 0.75 <= ratio <= 1.33):
                pairs.append((overlap + sim, -gap, ti, di))
    assigned: dict[int, int] = {}
    used_tracks: set[int] = set()
    for _, _, ti, di in sorted(pairs, reverse=True):
        if ti in used_tracks or di in assigned:
            continue
        assigned[di] = ti
        used_tracks.add(ti)
    return assigned


def _add_view(
    track: _Track,
    *,
    fd: FrameDetections,
    det: Detection,
    pos: int,
    order: int,
    max_gap: int,
    keep: int,
) -> None:
    """Extend ``track`` with ``det`` and keep its crop if it is among the ``keep`` best."""
    full_shot = det.full_shot and not _part_of_person(det.box, track, pos, max_gap)
    track.last_pos, track.last_box = pos, det.box
    track.frames.append(fd.frame)
    track.positions.append(pos)
    track.boxes.append(det.box)
    track.heights.append(det.box[3] / fd.image.shape[0])
    track.centrality.append(_centrality(det.box, fd.image.shape))
    crop = _make_crop(fd, det, full_shot=full_shot)
    entry = (crop.quality, -order, crop)
    if len(track.best) < keep:
        heapq.heappush(track.best, entry)
    elif entry[:2] > track.best[0][:2]:
        heapq.heapreplace(track.best, entry)


def _follow_frame(
    tracks: list[_Track],
    *,
    fd: FrameDetections,
    pos: int,
    first_order: int,
    max_gap: int,
    min_iou: float,
    min_similarity: float,
    reid_similarity: float,
    min_track_score: float,
    keep: int,
) -> tuple[list[int], list[Detection], int]:
    """Add one frame's people to ``tracks``: (track ids, detections kept, weak ones left out)."""
    dets = list(fd.detections)
    hists = [torso_histogram(fd.image, d.box) for d in dets]
    assigned = _match_detections(
        tracks,
        dets=dets,
        hists=hists,
        pos=pos,
        max_gap=max_gap,
        min_iou=min_iou,
        min_similarity=min_similarity,
        reid_similarity=reid_similarity,
    )
    ids, kept = [], []
    n_weak = 0
    for di, (det, hist) in enumerate(zip(dets, hists)):
        if di in assigned:
            track = tracks[assigned[di]]
            track.hist = 0.7 * track.hist + 0.3 * hist
        elif det.score >= min_track_score:
            track = _Track(id=len(tracks), hist=hist, last_pos=pos, last_box=det.box)
            tracks.append(track)
        else:
            n_weak += 1
            continue
        order = first_order + len(kept)
        _add_view(track, fd=fd, det=det, pos=pos, order=order, max_gap=max_gap, keep=keep)
        ids.append(track.id)
        kept.append(det)
    return ids, kept, n_weak


def _rank_artists(
    tracks: Sequence[_Track], *, n_frames: int, max_artists: int, max_gap: int
) -> list[LeadArtist]:
    """Score each person screen time x size x centrality and keep the best ``max_artists``."""
    scored = []
    for track in tracks:
        _check_full_shots(track, max_gap)
        screen = len(track.frames) / n_frames
        size = sum(track.heights) / len(track.heights)
        central = sum(track.centrality) / len(track.centrality)
        scored.append((screen * size * central, screen, size, central, track))
    scored.sort(key=lambda s: (-s[0], s[4].id))
    return [
        LeadArtist(
            artist=rank + 1,
            score=score,
            screen_time=screen,
            size=size,
            centrality=central,
            frames=track.frames,
            boxes=track.boxes,
            crops=[c for _, _, c in sorted(track.best, key=lambda e: (-e[0], -e[1]))],
            track=track.id,
        )
        for rank, (score, screen, size, central, track) in enumerate(scored[:max_artists])
    ]


def select_lead_artists(
    frames: Iterable[FrameDetections],
    *,
    max_artists: int = DEFAULT_MAX_ARTISTS,
    crops_per_artist: int = DEFAULT_CROPS_PER_ARTIST,
    max_gap: int = 3,
    min_iou: float = 0.2,
    min_similarity: float = 0.65,
    reid_similarity: float = 0.8,
    min_track_score: float = DEFAULT_MIN_TRACK_SCORE,
    on_progress: Callable[[int], None] | None = None,
) -> Selection:
    """Follow people across frames and keep the lead artists.

    Detections in neighbouring frames are joined into one person when their boxes
    overlap (IoU >= ``min_iou``) and their torso colours agree (similarity >=
    ``min_similarity``), or, across gaps, when the colours agree strongly (>=
    ``reid_similarity``) and the heights are within a third of each other. A detection
    that joins nobody starts a new person only if it scores at least ``min_track_score``;
    weaker ones are left out. Each person is scored screen time x size x centrality.
    Frames are consumed one at a time and only each person's best views are kept, so
    memory does not grow with the video. A view is a full shot only if the person's box
    is not much shorter than in the frames around it (a box on part of the person).

    Args:
        frames: :class:`FrameDetections` in time order (a generator is fine).
        max_artists: how many people to keep, default=2.
        crops_per_artist: best views kept per artist (largest and sharpest), default=3.
        max_gap: frames a person may be missed before overlap alone cannot rejoin them.
        min_iou: minimum box overlap to continue a person from a neighbouring frame.
        min_similarity: minimum torso-colour similarity in [0, 1] for any join.
        reid_similarity: torso-colour similarity that joins without overlap.
        min_track_score: float, default=0.4. Detector score needed to start a new person.
        on_progress: called with the number of frames done.

    Returns:
        :class:`Selection` with the artists (best first) and a record of every frame.

    Raises:
        SnaplookError: ``max_artists`` or ``crops_per_artist`` below 1.
    """
    if max_artists < 1:
        raise SnaplookError(f"--max-artists must be at least 1, got {max_artists}.")
    if crops_per_artist < 1:
        raise SnaplookError(f"crops_per_artist must be at least 1, got {crops_per_artist}.")
    tracks: list[_Track] = []
    records: list[FrameRecord] = []
    counter = n_weak = 0
    for pos, fd in enumerate(frames):
        ids, kept, weak = _follow_frame(
            tracks,
            fd=fd,
            pos=pos,
            first_order=counter + 1,
            max_gap=max_gap,
            min_iou=min_iou,
            min_similarity=min_similarity,
            reid_similarity=reid_similarity,
            min_track_score=min_track_score,
            keep=crops_per_artist,
        )
        counter += len(kept)
        n_weak += weak
        records.append(FrameRecord(fd.frame, fd.time_s, kept, ids, fd.source))
        if on_progress is not None:
            on_progress(pos + 1)
    if n_weak:
        logger.info("%d weak detection(s) below %.2f started nobody", n_weak, min_track_score)
    artists = _rank_artists(tracks, n_frames=len(records), max_artists=max_artists, max_gap=max_gap)
    return Selection(artists=artists, frames=records, n_tracks=len(tracks))


# --- clothes -------------------------------------------------------------------------------


@dataclass
class Clothes:
    """A person cut out of the frame and split into garments.

    Attributes:
        person: ndarray (h, w, 3) RGB uint8, the person box with background and skin
            painted white.
        mask: ndarray (h, w) bool, garment pixels of ``person``.
        upper, lower: upper- and lower-body garment crops (white background), or None
            when that part is not in the frame or holds almost no garment.
        upper_box, lower_box: their (x, y, w, h) in frame pixels, or None.
    """

    person: np.ndarray
    mask: np.ndarray
    upper: np.ndarray | None
    lower: np.ndarray | None
    upper_box: Box | None
    lower_box: Box | None


def skin_mask(image: np.ndarray) -> np.ndarray:
    """Skin pixels by a YCrCb and HSV rule (both must agree).

    YCrCb: 133 <= Cr <= 173 and 77 <= Cb <= 127 (Chai and Ngan); HSV: hue at most 35
    degrees (or >= 330), saturation 0.1-0.8, value >= 0.2. Requiring both keeps orange
    and red garments mostly out (their Cr is above 173).

    Returns:
        ndarray of shape (h, w), bool.
    """
    import cv2

    ycrcb = cv2.cvtColor(image, cv2.COLOR_RGB2YCrCb)
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)  # H in [0, 180)
    cr, cb = ycrcb[..., 1], ycrcb[..., 2]
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    rule1 = (cr >= 133) & (cr <= 173) & (cb >= 77) & (cb <= 127)
    rule2 = ((hue <= 17) | (hue >= 165)) & (sat >= 25) & (sat <= 204) & (val >= 50)
    return rule1 & rule2


def _garment_rows(box: Box, face: Box | None) -> tuple[tuple[float, float], tuple[float, float]]:
    """Image rows of the upper and lower garments by body proportions."""
    x, y, w, h = box
    if face is not None:
        head = _HEAD_PER_FACE * face[3]
        top = face[1] - 0.3 * face[3]
    else:
        head = h / _HEADS_PER_BODY
        top = y
    # In heads from the top of the head: chin 1, hips 3.5, crotch 4, ankles 7.3.
    upper = (top + 1.1 * head, top + 3.8 * head)
    lower = (top + 3.6 * head, top + 7.4 * head)
    return upper, lower


def extract_clothes(
    image: np.ndarray,
    box: Sequence[int],
    *,
    face: Sequence[int] | None = None,
    iterations: int = 3,
    work_height: int = 200,
    person_mask: np.ndarray | None = None,
    rows: tuple[tuple[float, float], tuple[float, float]] | None = None,
) -> Clothes:
    """Cut a person out with GrabCut, paint skin and background white, split the garments.

    GrabCut starts from the person box (outside = background, a central strip =
    certainly foreground); skin is found with :func:`skin_mask`. The upper garment runs
    from the chin to below the hips, the lower from the waist to the ankles, by body
    proportions measured from the face when it is known, else from the box height
    (7.5 heads). Each garment crop is trimmed to its garment pixels. Body landmarks
    (``snaplook.pose``) replace both where present: their person mask GrabCut, their
    shoulder/hip/ankle rows the proportions.

    Args:
        image: ndarray (h, w, 3), RGB uint8: the frame or a patch of it around ``box``.
        box: (x, y, w, h) of the person in ``image``.
        face: (x, y, w, h) of the face in ``image``, when known.
        iterations: GrabCut iterations.
        work_height: GrabCut runs on a copy scaled to about this height (speed).
        person_mask: ndarray of shape (h, w) bool over ``image``: the person, instead of
            GrabCut's cut-out.
        rows: ((top, bottom) of the upper garment, (top, bottom) of the lower one) in
            ``image`` rows, instead of the proportions.

    Returns:
        :class:`Clothes`; boxes are in ``image`` pixels.

    Raises:
        SnaplookError: the box is empty or outside the image.
    """
    import numpy as np

    height, width = image.shape[:2]
    bx, by, bw, bh = _clip_box(box, image.shape)
    if bw < 4 or bh < 4:
        raise SnaplookError(f"person box {tuple(box)} is empty inside the {width}x{height} image.")
    margin = int(0.1 * max(bw, bh)) + 2
    rx0, ry0 = max(0, bx - margin), max(0, by - margin)
    rx1, ry1 = min(width, bx + bw + margin), min(height, by + bh + margin)
    roi = np.ascontiguousarray(image[ry0:ry1, rx0:rx1])
    if person_mask is not None:
        fg = np.asarray(person_mask, dtype=bool)[ry0:ry1, rx0:rx1]
    else:
        fg = _grabcut(roi, (bx - rx0, by - ry0, bw, bh), iterations, work_height)
    clipped = (bx, by, bw, bh)
    return _cut_garments(image, roi, fg, skin_mask(roi), (rx0, ry0), clipped, face, rows)


def _grabcut(roi: np.ndarray, box: Box, iterations: int, work_height: int) -> np.ndarray:
    """GrabCut's person mask over ``roi`` (bool, roi's shape) from the person ``box`` in it."""
    import cv2
    import numpy as np

    bx, by, bw, bh = box
    scale = min(1.0, work_height / roi.shape[0])
    small = cv2.resize(
        roi,
        (max(8, round(roi.shape[1] * scale)), max(8, round(roi.shape[0] * scale))),
        interpolation=cv2.INTER_AREA,
    )
    pad = 4  # GrabCut needs background samples: a replicated rim guarantees some
    small = cv2.copyMakeBorder(small, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    rect = (
        pad + int(bx * scale),
        pad + int(by * scale),
        max(2, int(bw * scale)),
        max(2, int(bh * scale)),
    )
    mask = np.full(small.shape[:2], cv2.GC_BGD, dtype=np.uint8)
    x, y, w, h = rect
    mask[y : y + h, x : x + w] = cv2.GC_PR_FGD
    mask[y + int(0.2 * h) : y + int(0.8 * h), x + int(0.42 * w) : x + int(0.58 * w) + 1] = (
        cv2.GC_FGD
    )
    try:
        bgd = np.zeros((1, 65), np.float64)
        fgd = np.zeros((1, 65), np.float64)
        bgr = cv2.cvtColor(small, cv2.COLOR_RGB2BGR)
        cv2.grabCut(bgr, mask, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
        fg_small = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
    except cv2.error as exc:  # degenerate colour models (e.g. a flat image)
        logger.info("GrabCut failed (%s); using the person box as the mask", exc)
        fg_small = mask != cv2.GC_BGD
    fg_small = fg_small[pad:-pad, pad:-pad].astype(np.uint8)
    return cv2.resize(fg_small, (roi.shape[1], roi.shape[0]), interpolation=cv2.INTER_NEAREST) > 0


def _cut_garments(
    image: np.ndarray,
    roi: np.ndarray,
    fg: np.ndarray,
    skin: np.ndarray,
    origin: tuple[int, int],
    box: Box,
    face: Sequence[int] | None,
    rows: tuple[tuple[float, float], tuple[float, float]] | None,
) -> Clothes:
    """Garment crops from the person's foreground ``fg`` over ``roi`` (at ``origin``)."""
    import cv2
    import numpy as np

    height = image.shape[0]
    rx0, ry0 = origin
    bx, by, bw, bh = box
    skin = cv2.morphologyEx(skin.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)) > 0
    garment = fg & ~skin
    garment = (
        cv2.morphologyEx(garment.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)) > 0
    )
    cut = np.where(garment[..., None], roi, np.uint8(255)).astype(np.uint8)

    # everything below in frame (image) pixels
    px0, py0 = bx - rx0, by - ry0
    person = np.ascontiguousarray(cut[py0 : py0 + bh, px0 : px0 + bw])
    person_mask = garment[py0 : py0 + bh, px0 : px0 + bw]
    face_box = _clip_box(face, image.shape) if face is not None else None
    upper_rows, lower_rows = rows or _garment_rows((bx, by, bw, bh), face_box)
    upper, upper_box = _garment_crop(cut, garment, (rx0, ry0), (bx, bw), upper_rows)
    lower = lower_box = None
    # The lower garment is only cut when the legs are mostly in the image.
    if min(by + bh, height) >= lower_rows[0] + 0.5 * (lower_rows[1] - lower_rows[0]):
        lower, lower_box = _garment_crop(cut, garment, (rx0, ry0), (bx, bw), lower_rows)
    return Clothes(
        person=person,
        mask=person_mask,
        upper=upper,
        lower=lower,
        upper_box=upper_box,
        lower_box=lower_box,
    )


def _garment_crop(
    cut: np.ndarray,
    garment: np.ndarray,
    origin: tuple[int, int],
    cols: tuple[int, int],
    rows: tuple[float, float],
) -> tuple[np.ndarray | None, Box | None]:
    import numpy as np

    ox, oy = origin
    x0, x1 = cols[0] - ox, cols[0] + cols[1] - ox
    y0 = max(0, int(round(rows[0])) - oy)
    y1 = min(cut.shape[0], int(round(rows[1])) - oy)
    if y1 - y0 < 4:
        return None, None
    region = garment[y0:y1, x0:x1]
    if region.mean() < 0.05:  # almost no garment: skin, background or out of frame
        return None, None
    ys, xs = np.nonzero(region)
    ty0, ty1, tx0, tx1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = np.ascontiguousarray(cut[y0 + ty0 : y0 + ty1, x0 + tx0 : x0 + tx1])
    box = (int(ox + x0 + tx0), int(oy + y0 + ty0), int(tx1 - tx0), int(ty1 - ty0))
    return crop, box


# --- writing and the `crop` command ----------------------------------------------------------


@dataclass
class ArtistRow:
    """One saved crop, one row of ``artists.csv``."""

    artist: int
    frame: int
    time_s: float | None
    box: Box
    score: float
    full_shot: bool
    kind: str
    path: Path
    source: str = ""
    detector: str = ""

    def as_csv(self) -> tuple[Any, ...]:
        return (
            self.artist,
            self.frame,
            "" if self.time_s is None else f"{self.time_s:.3f}",
            *self.box,
            f"{self.score:.6f}",
            int(self.full_shot),
            self.kind,
            self.path.name,
            self.source,
            self.detector,
        )


def check_output_dir(out: str | Path, marker: str) -> None:
    """Refuse to replace ``out`` unless it is missing, empty, or an earlier result.

    Raises:
        SnaplookError: ``out`` is a file, or a non-empty folder without ``marker`` (a
            folder snaplook did not write would be deleted by the atomic replace).
    """
    out = Path(out)
    if out.is_file():
        raise SnaplookError(f"{out} is a file; pass a folder for the results.")
    if out.is_dir() and not (out / marker).is_file() and any(out.iterdir()):
        raise SnaplookError(
            f"{out} holds files but no {marker}: it is not an earlier snaplook result and "
            "would be replaced whole. Pass an empty or new folder."
        )


def write_lead_artists(
    selection: Selection,
    out: str | Path,
    *,
    clothes: bool = True,
    skipped: Sequence[tuple[Path | str, str]] = (),
) -> list[ArtistRow]:
    """Save the lead artists' crops, ``artists.csv`` and ``detections.csv`` into ``out``.

    Per kept view: ``artist<k>_<photo>_person.png`` (``<photo>``: the name of the frame's
    image file without its extension; for a frame of a video, the frame number) and, with
    ``clothes``, ``..._upper.png`` / ``..._lower.png`` (GrabCut cut-outs, skin and
    background white; without ``clothes`` the person crop is the plain frame region).
    ``artists.csv`` has one row per file (``score`` is the artist's lead score; ``x, y, w,
    h`` the file's box in the frame; ``source`` the image or video it comes from;
    ``detector`` what found the person, see :func:`detector_label`); ``detections.csv``
    one row per person followed (``artist`` is empty for those who are not lead artists)
    and one row with ``n_people`` 0 per frame with nobody;
    ``skipped.csv`` the inputs that could not be read. The folder is replaced atomically.

    Args:
        selection: from :func:`select_lead_artists`.
        out: the folder to write.
        clothes: also cut out the clothes.
        skipped: (path, reason) of inputs that could not be read, for ``skipped.csv``.

    Returns:
        The rows of ``artists.csv`` (paths point into ``out``).

    Raises:
        SnaplookError: ``out`` is a file or a folder of something else (see
            :func:`check_output_dir`).
    """
    import shutil

    from snaplook.io_utils import make_temp_dir, replace_dir

    out = Path(out)
    check_output_dir(out, "artists.csv")
    tmp = make_temp_dir(out)
    try:
        rows = write_lead_artists_into(selection, tmp, out, clothes=clothes, skipped=skipped)
        replace_dir(tmp, out, marker="artists.csv")
        logger.info("wrote %d crop(s), artists.csv and detections.csv in %s", len(rows), out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return rows


def write_lead_artists_into(
    selection: Selection,
    folder: Path,
    final: Path,
    *,
    clothes: bool = True,
    skipped: Sequence[tuple[Path | str, str]] = (),
) -> list[ArtistRow]:
    """Write what :func:`write_lead_artists` writes into an existing (temporary) ``folder``.

    For callers that move ``folder`` into place themselves (``snaplook look`` writes the
    crops inside its own results folder); rows' paths point into ``final``.
    """
    from PIL import Image

    from snaplook.io_utils import write_csv_atomic, write_json_atomic, write_skipped
    from snaplook.transform_utils import crop_box

    rows: list[ArtistRow] = []
    used: set[str] = set()
    landmarker = _pose_landmarker()
    landmarks: dict[str, Any] = {}
    for artist in selection.artists:
        for crop in artist.crops:
            ox, oy = crop.offset
            local = (crop.box[0] - ox, crop.box[1] - oy, crop.box[2], crop.box[3])
            stem = _crop_stem(artist.artist, crop, used)
            files: list[tuple[str, Any, Box]] = []
            pose = landmarker.estimate(crop.patch, local) if landmarker is not None else None
            if clothes:
                face = None
                if crop.face is not None:
                    face = (crop.face[0] - ox, crop.face[1] - oy, crop.face[2], crop.face[3])
                try:
                    found = extract_clothes(
                        crop.patch, local, face=face, **_pose_clothes(pose, crop.patch.shape)
                    )
                except SnaplookError as exc:  # a sliver of a box at the frame edge
                    logger.warning("frame %d: no clothes cut-out (%s)", crop.frame, exc)
                    found = None
                if found is not None:
                    files.append(("person", found.person, crop.box))
                    for kind, part, part_box in (
                        ("upper", found.upper, found.upper_box),
                        ("lower", found.lower, found.lower_box),
                    ):
                        if part is not None and part_box is not None:
                            frame_box = (part_box[0] + ox, part_box[1] + oy, *part_box[2:])
                            files.append((kind, part, frame_box))
            if not files:
                if local[2] < 1 or local[3] < 1:
                    continue
                files.append(("person", crop_box(crop.patch, local), crop.box))
            if pose is not None:  # landmarks.json always; region crops are clothes
                regions = _landmark_regions(pose, crop, landmarks, stem)
                files += regions if clothes else []
            for kind, pixels, frame_box in files:
                name = f"{stem}_{kind}.png"
                Image.fromarray(pixels).save(folder / name)
                rows.append(
                    ArtistRow(
                        artist=artist.artist,
                        frame=crop.frame,
                        time_s=crop.time_s,
                        box=tuple(int(v) for v in frame_box),  # type: ignore[arg-type]
                        score=artist.score,
                        full_shot=crop.full_shot if kind == "person" else False,
                        kind=kind,
                        path=final / name,
                        source=crop.source,
                        detector=detector_label(crop.detector),
                    )
                )
    write_csv_atomic(folder / "artists.csv", ARTISTS_HEADER, (r.as_csv() for r in rows))
    write_csv_atomic(folder / "detections.csv", DETECTIONS_HEADER, _detection_rows(selection))
    if landmarker is not None:
        write_json_atomic(folder / LANDMARKS_JSON, landmarks)
    write_skipped(folder / "skipped.csv", skipped)
    return rows


def _pose_landmarker() -> Any:
    """BlazePose when ``snaplook models fetch pose`` has run, else None (no landmarks)."""
    from snaplook.models import model_path
    from snaplook.pose import PoseLandmarker

    path = model_path("pose")
    return None if path is None else PoseLandmarker(path)


def _pose_clothes(pose: Any, shape: Sequence[int]) -> dict[str, Any]:
    """extract_clothes' person mask and garment rows from landmarks, when they show them."""
    from snaplook.pose import MIN_POSE_SCORE, garment_regions, person_mask

    if pose is None or pose.score < MIN_POSE_SCORE:
        return {}
    regions = garment_regions(pose, shape)
    out: dict[str, Any] = {"person_mask": person_mask(pose, shape)}
    if "upper" in regions and "lower" in regions:
        (_, uy, _, uh), (_, ly, _, lh) = regions["upper"], regions["lower"]
        out["rows"] = ((uy, uy + uh), (ly, ly + lh))
    return out


def _landmark_regions(
    pose: Any, crop: ArtistCrop, landmarks: dict[str, Any], stem: str
) -> list[tuple[str, Any, Box]]:
    """Footwear and eyewear crops from the landmarks of one view; its landmarks, garment
    regions and landmark full-shot check go into ``landmarks`` under ``stem``."""
    from snaplook.pose import garment_regions, is_full_shot_pose
    from snaplook.transform_utils import crop_box

    ox, oy = crop.offset
    regions = garment_regions(pose, crop.patch.shape)
    in_frame = {k: (x + ox, y + oy, w, h) for k, (x, y, w, h) in regions.items()}
    landmarks[stem] = {
        "frame": crop.frame,
        "score": round(pose.score, 4),
        "full_shot": is_full_shot_pose(pose, crop.patch.shape),
        "points": [[round(float(x) + ox, 1), round(float(y) + oy, 1)] for x, y in pose.points],
        "visibility": [round(float(v), 3) for v in pose.visibility],
        "regions": in_frame,
    }
    kept = [k for k in LANDMARK_KINDS if k in regions and min(regions[k][2:]) >= MIN_REGION_PX]
    return [(k, crop_box(crop.patch, regions[k]), in_frame[k]) for k in kept]


def detector_label(source: str) -> str:
    """``artists.csv``'s name for a :attr:`Detection.source`: the OpenCV parts are marked
    as the no-download fallback (``snaplook models fetch nanodet`` gets the better one)."""
    return f"{source} (fallback)" if source in ("hog", "face", "upperbody") else source


def _crop_stem(artist: int, crop: ArtistCrop, used: set[str]) -> str:
    """``artist<k>_<photo name>`` (or ``_<frame number>`` for a video), unique in ``used``."""
    if crop.still and crop.source:
        stem = f"artist{artist}_{Path(crop.source).stem[:_MAX_STEM]}"
        if stem in used:  # two photos of one name in different folders
            stem = f"{stem}_{crop.frame:06d}"
    else:
        stem = f"artist{artist}_{crop.frame:06d}"
    used.add(stem)
    return stem


def _detection_rows(selection: Selection) -> Iterable[tuple[Any, ...]]:
    artist_of = {a.track: a.artist for a in selection.artists}
    for rec in selection.frames:
        time_s = "" if rec.time_s is None else f"{rec.time_s:.3f}"
        if not rec.detections:
            yield (rec.frame, time_s, 0, "", "", "", "", "", "", "", "", rec.source)
        for det, track in zip(rec.detections, rec.tracks):
            yield (
                rec.frame,
                time_s,
                len(rec.detections),
                *det.box,
                f"{det.score:.4f}",
                det.source,
                track,
                artist_of.get(track, ""),
                rec.source,
            )


@dataclass
class CropSummary:
    """What :func:`crop_artists` did.

    Attributes:
        out: the folder written.
        selection: the lead artists and the per-frame record.
        rows: the rows of ``artists.csv``.
        n_frames: frames (images) read.
        skipped: (path, reason) of unreadable images.
    """

    out: Path
    selection: Selection
    rows: list[ArtistRow]
    n_frames: int
    skipped: list[tuple[Path, str]]


def list_frames(source: str | Path) -> list[tuple[int, float | None, Path]]:
    """The frames of a folder: from its ``frames.csv`` (``snaplook extract``) or sorted images.

    Returns:
        (frame number, time in seconds or None, path) per frame, in order.

    Raises:
        SnaplookError: missing folder, malformed ``frames.csv``, or no images.
    """
    from snaplook.io_utils import find_images, read_csv

    source = Path(source)
    listing = source / "frames.csv"
    if source.is_dir() and listing.is_file():
        try:
            table = read_csv(listing)
            frames = []
            for i, row in enumerate(table):
                number = row.get("frame") or row.get("index") or str(i)
                time_s = row.get("time_s")
                path = Path(row["path"])
                if not path.is_absolute() and (source / path).exists():
                    path = source / path  # `snaplook extract` writes paths relative to it
                frames.append((int(number), float(time_s) if time_s else None, path))
        except (KeyError, ValueError) as exc:
            raise SnaplookError(
                f"{listing} is malformed ({exc}); it needs a path column (and frame or index, "
                "time_s). Re-run `snaplook extract` or remove it to use the images as they are."
            ) from exc
        if frames:
            return frames
    paths = find_images(source)
    if not paths:
        raise SnaplookError(
            f"{source}: no images found; pass a folder written by `snaplook extract` or a "
            "folder of images."
        )
    return [(i, None, p) for i, p in enumerate(paths)]


def _detect_frames(
    frames: Iterable[tuple[int, float | None, Path]],
    *,
    detector: PersonDetector,
    skipped: list[tuple[Path, str]],
) -> Iterator[FrameDetections]:
    """Read and detect each frame lazily; unreadable ones are logged and added to ``skipped``."""
    from snaplook.io_utils import read_image

    for number, time_s, path in frames:
        try:
            image = read_image(path)
        except SnaplookError as exc:
            logger.warning("skipping %s", exc)
            skipped.append((path, str(exc)))
            continue
        dets = detector.detect(image)
        yield FrameDetections(number, time_s, image, dets, source=str(path), still=True)


def crop_artists(
    source: str | Path,
    *,
    out: str | Path | None = None,
    max_artists: int = DEFAULT_MAX_ARTISTS,
    min_size: float = DEFAULT_MIN_SIZE,
    clothes: bool = True,
    detector: PersonDetector | str | Path = DEFAULT_DETECTOR,
    crops_per_artist: int = DEFAULT_CROPS_PER_ARTIST,
    photos: bool | None = None,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> CropSummary:
    """Find the lead artists in a folder of frames or photos and save their crops and clothes.

    Args:
        source: a folder written by ``snaplook extract`` (its ``frames.csv`` gives frame
            numbers and times; people are followed from frame to frame), any other folder
            of images (searched recursively, sorted) or one image.
        out: folder to write, default ``output/lead_artist/<folder name>``.
        max_artists: people to keep, default=2: per photo for unrelated photos, in all for
            the frames of one video.
        min_size: minimum person height as a fraction of the frame height.
        clothes: also cut out the clothes (GrabCut, skin removed) and upper/lower crops.
        detector: "auto", "nanodet", "hog", the path of a YOLO-style ONNX model, or a configured
            :class:`PersonDetector`.
        crops_per_artist: best views kept per artist.
        photos: True: each image on its own (up to ``max_artists`` people in each, artists
            numbered through the folder); False: the images are frames of one video in
            sorted order. Default: True unless ``source`` holds a ``frames.csv``.
        on_start: called with the number of frames.
        on_progress: called with the number of frames done.

    Returns:
        :class:`CropSummary`. With nobody in any frame the CSVs hold just their headers.
        Unreadable images are skipped, logged and listed in ``skipped.csv``.

    Raises:
        SnaplookError: no frames, a bad detector, bad ``max_artists`` or ``min_size``.
    """
    if not 0.0 <= min_size < 1.0:
        raise SnaplookError(
            f"--min-size must be a fraction of the frame height in [0, 1), got {min_size}."
        )
    if max_artists < 1:
        raise SnaplookError(f"--max-artists must be at least 1, got {max_artists}.")
    source = Path(source)
    frames = list_frames(source)
    if photos is None:
        photos = not (source / "frames.csv").is_file()
    name = source.stem if source.is_file() else source.name
    out = Path(out) if out is not None else DEFAULT_LEAD_ARTIST_ROOT / name
    check_output_dir(out, "artists.csv")
    person_detector = make_detector(detector, min_size=min_size)  # fails before any frame
    skipped: list[tuple[Path, str]] = []
    if on_start is not None:
        on_start(len(frames))
    stream = _detect_frames(frames, detector=person_detector, skipped=skipped)
    options = {"max_artists": max_artists, "crops_per_artist": crops_per_artist}
    if photos:
        parts = []
        for done, frame in enumerate(stream, start=1):
            parts.append(select_lead_artists([frame], **options))
            if on_progress is not None:
                on_progress(done + len(skipped))
        selection = combine_selections(parts)
    else:
        selection = select_lead_artists(stream, on_progress=on_progress, **options)
    rows = write_lead_artists(selection, out, clothes=clothes, skipped=skipped)
    return CropSummary(
        out=out, selection=selection, rows=rows, n_frames=len(selection.frames), skipped=skipped
    )


def combine_selections(parts: Sequence[Selection]) -> Selection:
    """One :class:`Selection` from the selections of unrelated photos (or clips).

    Artists and people keep their order and are numbered on through the parts (the lead
    of the second photo is artist ``k + 1`` when the first has ``k``), so an artist or
    track number names one person in the CSVs.
    """
    artists: list[LeadArtist] = []
    records: list[FrameRecord] = []
    n_tracks = 0
    for part in parts:
        for artist in part.artists:
            artist.artist += len(artists)
            artist.track += n_tracks
        artists.extend(part.artists)
        for rec in part.frames:
            rec.tracks = [t + n_tracks for t in rec.tracks]
        records.extend(part.frames)
        n_tracks += part.n_tracks
    return Selection(artists=artists, frames=records, n_tracks=n_tracks)
