"""Body landmarks: BlazePose (33 points and a person mask) on a person box, run by OpenVINO,
and what they give: a full-shot check and garment regions (upper and lower body, footwear,
eyewear). The model comes from ``snaplook models fetch pose``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snaplook import models

if TYPE_CHECKING:
    import numpy as np

POSE_INPUT = 256
N_LANDMARKS = 33
#: The person box is widened to a square this much larger (BlazePose's own ROI scale).
ROI_SCALE = 1.25
#: BlazePose's landmark numbers (mediapipe's PoseLandmark).
LEFT_EYE_INNER, LEFT_EYE, LEFT_EYE_OUTER = 1, 2, 3
RIGHT_EYE_INNER, RIGHT_EYE, RIGHT_EYE_OUTER = 4, 5, 6
LEFT_SHOULDER, RIGHT_SHOULDER = 11, 12
LEFT_ELBOW, RIGHT_ELBOW = 13, 14
LEFT_HIP, RIGHT_HIP = 23, 24
LEFT_KNEE, RIGHT_KNEE = 25, 26
LEFT_ANKLE, RIGHT_ANKLE = 27, 28
LEFT_HEEL, RIGHT_HEEL = 29, 30
LEFT_TOE, RIGHT_TOE = 31, 32
#: A landmark counts when its visibility is at least this.
MIN_VISIBILITY = 0.5
#: Below this person-presence score the landmarks are not used (an occluded cyclist: 0.13).
MIN_POSE_SCORE = 0.5
#: Full shot: hip-to-heel at least this times shoulder-to-hip. The landmark model also
#: places heels on a portrait cut at the waist, with short legs: measured leg / torso on
#: the test photos, 1.38-1.55 for standing and skiing people, 1.03 on the astronaut portrait.
MIN_LEG_TO_TORSO = 1.2
#: The five regions of Buy-me-that-look, handbags left out.
REGIONS = ("upper", "lower", "footwear", "eyewear")


@dataclass
class Pose:
    """Landmarks of one person.

    Attributes:
        points: ndarray of shape (33, 2) float32, (x, y) in frame pixels.
        visibility: ndarray of shape (33,) float32 in [0, 1].
        score: the model's person-presence score in [0, 1].
        mask: ndarray of shape (h, w) float32 in [0, 1], the person mask over ``mask_box``.
        mask_box: (x, y, w, h) of the square region the mask covers, in frame pixels.
    """

    points: np.ndarray
    visibility: np.ndarray
    score: float
    mask: np.ndarray
    mask_box: tuple[int, int, int, int]


class PoseLandmarker(models.CompiledModel):
    """BlazePose GHUM full (33 landmarks and a segmentation mask) on a person box.

    Args:
        model: the converted ``.xml``; None takes it from the models cache.
        threads: OpenVINO inference threads; None lets OpenVINO choose.
    """

    model_name, label = "pose", "pose"

    def __init__(self, model: str | Path | None = None, *, threads: int | None = None) -> None:
        self.model = model
        self.threads = threads
        self.compiled_: Any = None

    def estimate(self, image: np.ndarray, box: Sequence[float]) -> Pose:
        """Landmarks of the person in ``box``.

        Args:
            image: ndarray of shape (h, w, 3), RGB uint8.
            box: (x, y, w, h) of the person in frame pixels.

        Returns:
            The :class:`Pose`, in frame pixels.
        """
        import cv2
        import numpy as np

        self.load()
        x, y, w, h = (float(v) for v in box)
        side = max(w, h, 1.0) * ROI_SCALE
        scale = POSE_INPUT / side
        left, top = x + w / 2 - side / 2, y + h / 2 - side / 2
        warp = np.float32([[scale, 0, -left * scale], [0, scale, -top * scale]])
        crop = cv2.warpAffine(image, warp, (POSE_INPUT, POSE_INPUT), flags=cv2.INTER_LINEAR)
        result = self.compiled_((crop.astype(np.float32) / 255.0)[None])
        outputs = {tuple(out.shape): result[out] for out in self.compiled_.outputs}
        raw = outputs[(1, 195)].reshape(-1, 5)[:N_LANDMARKS]
        points = raw[:, :2] / scale + np.float32([left, top])
        mask = _sigmoid(outputs[(1, POSE_INPUT, POSE_INPUT, 1)][0, ..., 0])
        return Pose(
            points=points.astype(np.float32),
            visibility=_sigmoid(raw[:, 3]),
            score=float(np.ravel(outputs[(1, 1)])[0]),
            mask=mask,
            mask_box=(round(left), round(top), round(side), round(side)),
        )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    import numpy as np

    return (1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))).astype(np.float32)


def _seen(pose: Pose, idx: Sequence[int], shape: Sequence[int]) -> bool:
    """All of ``idx`` visible and inside the frame."""
    height, width = shape[:2]
    for i in idx:
        px, py = pose.points[i]
        if pose.visibility[i] < MIN_VISIBILITY or not (0 <= px < width and 0 <= py < height):
            return False
    return True


def _mid(pose: Pose, a: int, b: int) -> tuple[float, float]:
    return tuple(float(v) for v in (pose.points[a] + pose.points[b]) / 2)  # type: ignore[return-value]


def is_full_shot_pose(pose: Pose, shape: Sequence[int]) -> bool:
    """Fashion-AI-Stylist's rule: the inner eyes (1, 4) and the heels (29, 30) are inside
    the frame, and far enough apart: hip-to-heel at least :data:`MIN_LEG_TO_TORSO` times
    shoulder-to-hip (a portrait's invented legs are short).

    Args:
        pose: landmarks from :meth:`PoseLandmarker.estimate`.
        shape: the frame's (height, width[, channels]).
    """
    if pose.score < MIN_POSE_SCORE:
        return False
    if not _seen(pose, (LEFT_EYE_INNER, RIGHT_EYE_INNER, LEFT_HEEL, RIGHT_HEEL), shape):
        return False
    shoulders = _mid(pose, LEFT_SHOULDER, RIGHT_SHOULDER)
    hips = _mid(pose, LEFT_HIP, RIGHT_HIP)
    heels = _mid(pose, LEFT_HEEL, RIGHT_HEEL)
    torso = math.dist(shoulders, hips)
    return torso > 0 and math.dist(hips, heels) >= MIN_LEG_TO_TORSO * torso


def _bounds(pose: Pose, idx: Sequence[int], *, pad_x: float, pad_top: float, pad_bottom: float):
    pts = pose.points[list(idx)]
    x0, y0 = pts.min(axis=0)
    x1, y1 = pts.max(axis=0)
    return (float(x0 - pad_x), float(y0 - pad_top), float(x1 + pad_x), float(y1 + pad_bottom))


def garment_regions(pose: Pose, shape: Sequence[int]) -> dict[str, tuple[int, int, int, int]]:
    """Boxes of the garment regions the landmarks show, clipped to the frame.

    upper: shoulders to hips (elbows included, the shoulders' width as margin);
    lower: hips to ankles (knees included); footwear: ankles, heels and toes; eyewear: the
    six eye points, on a face turned to the camera. A region is left out when its landmarks
    are not all visible in the frame,
    all of them when the person-presence score is under :data:`MIN_POSE_SCORE`.

    Args:
        pose: landmarks from :meth:`PoseLandmarker.estimate`.
        shape: the frame's (height, width[, channels]).

    Returns:
        region name -> (x, y, w, h) in frame pixels, for the regions of :data:`REGIONS`
        that are seen.
    """
    if pose.score < MIN_POSE_SCORE:
        return {}
    height, width = shape[:2]
    shoulder_w = math.dist(pose.points[LEFT_SHOULDER], pose.points[RIGHT_SHOULDER])
    hips = (LEFT_HIP, RIGHT_HIP)
    found: dict[str, tuple[float, float, float, float]] = {}
    if _seen(pose, (LEFT_SHOULDER, RIGHT_SHOULDER, *hips), shape):
        idx = (LEFT_SHOULDER, RIGHT_SHOULDER, LEFT_ELBOW, RIGHT_ELBOW, *hips)
        pad = 0.15 * shoulder_w
        found["upper"] = _bounds(pose, idx, pad_x=pad, pad_top=pad, pad_bottom=pad)
    if _seen(pose, (*hips, LEFT_ANKLE, RIGHT_ANKLE), shape):
        idx = (*hips, LEFT_KNEE, RIGHT_KNEE, LEFT_ANKLE, RIGHT_ANKLE)
        pad = 0.2 * shoulder_w
        found["lower"] = _bounds(pose, idx, pad_x=pad, pad_top=0.1 * pad, pad_bottom=0.3 * pad)
    feet = (LEFT_ANKLE, RIGHT_ANKLE, LEFT_HEEL, RIGHT_HEEL, LEFT_TOE, RIGHT_TOE)
    if _seen(pose, feet, shape):
        foot = max(
            math.dist(pose.points[LEFT_HEEL], pose.points[LEFT_TOE]),
            math.dist(pose.points[RIGHT_HEEL], pose.points[RIGHT_TOE]),
        )
        found["footwear"] = _bounds(
            pose, feet, pad_x=0.4 * foot, pad_top=0.3 * foot, pad_bottom=0.4 * foot
        )
    eyes = (LEFT_EYE_INNER, LEFT_EYE, LEFT_EYE_OUTER, RIGHT_EYE_INNER, RIGHT_EYE, RIGHT_EYE_OUTER)
    # Eyewear only on a face turned to the camera: seen from behind, the model still places
    # the eyes (on the hair: the real video's people walk away), but mirrored, the left eye
    # on the image's left.
    facing = pose.points[LEFT_EYE_OUTER][0] > pose.points[RIGHT_EYE_OUTER][0]
    if facing and _seen(pose, eyes, shape):
        span = math.dist(pose.points[LEFT_EYE_OUTER], pose.points[RIGHT_EYE_OUTER])
        found["eyewear"] = _bounds(
            pose, eyes, pad_x=0.3 * span, pad_top=0.25 * span, pad_bottom=0.25 * span
        )
    out = {}
    for name, (x0, y0, x1, y1) in found.items():
        x0, y0 = max(0, round(x0)), max(0, round(y0))
        x1, y1 = min(width, round(x1)), min(height, round(y1))
        if x1 - x0 >= 2 and y1 - y0 >= 2:
            out[name] = (x0, y0, x1 - x0, y1 - y0)
    return out


def person_mask(pose: Pose, shape: Sequence[int], *, threshold: float = 0.5) -> np.ndarray:
    """The landmark model's person mask in frame pixels.

    Args:
        pose: from :meth:`PoseLandmarker.estimate`.
        shape: the frame's (height, width[, channels]).
        threshold: mask probability counted as the person.

    Returns:
        ndarray of shape (height, width) bool; False outside the region the model saw.
    """
    import cv2
    import numpy as np

    height, width = shape[:2]
    x, y, side, _ = pose.mask_box
    full = cv2.resize(pose.mask, (max(1, side), max(1, side)), interpolation=cv2.INTER_LINEAR)
    out = np.zeros((height, width), dtype=bool)
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(width, x + side), min(height, y + side)
    if x1 > x0 and y1 > y0:
        out[y0:y1, x0:x1] = full[y0 - y : y1 - y, x0 - x : x1 - x] >= threshold
    return out
