"""Person detection you can measure: detectors scored against hand-labelled boxes.

Reads labelled boxes (COCO JSON or a CSV ``image,x,y,w,h[,ignore,note]``), runs detectors
on the labelled images of a folder and scores them: AP@0.5 (pycocotools' COCOeval), recall
at IoU >= 0.5 (all people and tall people), false boxes per image; writes the report.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snaplook.artists import PersonDetector, iou
from snaplook.detection import DETECTORS
from snaplook.errors import SnaplookError
from snaplook.io_utils import (
    display_path,
    find_images,
    open_input,
    read_image,
    read_input_bytes,
    relative_or_absolute,
    timestamp,
    write_json_atomic,
    write_text_atomic,
)
from snaplook.options import DEFAULT_DETECTOR, DEFAULT_EVAL_ROOT, DEFAULT_TALL_PX

logger = logging.getLogger(__name__)

Xywh = tuple[float, float, float, float]
#: Detections of one image: (box (x, y, w, h) in image pixels, score) pairs.
Found = Sequence[tuple[Sequence[float], float]]

#: A detection matches a labelled person at this IoU or more (the 0.5 of AP@0.5).
MATCH_IOU = 0.5
#: A detection matching nobody is not false when at least this fraction of it lies in an
#: ``ignore`` region (COCO's rule for crowd regions: intersection over the detection's area).
IGNORE_INSIDE = 0.5
#: Labelled boxes may reach this many pixels past the image edge (rounding of hand labels);
#: further out, the label is refused.
EDGE_SLACK_PX = 1.0
#: Names of the CSV's required columns, in the order the message gives them.
CSV_COLUMNS = ("image", "x", "y", "w", "h")
_TRUE, _FALSE = ("1", "true", "yes", "y"), ("", "0", "false", "no", "n")


@dataclass(frozen=True)
class LabelBox:
    """One labelled person (or an ignored region) in one image.

    Attributes:
        box: (x, y, w, h) in image pixels.
        ignore: an ignored region (occluded people, a crowd too small to box one by one,
            COCO ``iscrowd``): a detection there is neither found nor false.
        note: the label's free text (the CSV's ``note`` column), for the report.
        where: where the label is written ("boxes.csv line 7"), for messages.
    """

    box: Xywh
    ignore: bool = False
    note: str = ""
    where: str = ""


@dataclass(frozen=True)
class ImageScore:
    """One detector on one image: people found of those labelled, false boxes."""

    image: str
    labelled: int
    found: int
    tall_labelled: int
    tall_found: int
    false_boxes: int
    detections: int
    #: Indices (into the image's labels) of the counted people not found.
    missed: tuple[int, ...] = ()


@dataclass(frozen=True)
class DetectionScore:
    """Scores of one detector's boxes over a labelled set (None: nothing to score).

    Attributes:
        ap50: AP at IoU 0.5 (COCOeval, all sizes, 100 boxes per image).
        recall: share of the labelled people a box matches at IoU >= 0.5.
        recall_tall: the same over people taller than ``tall_px``.
        false_per_image: boxes matching no person and no ignored region, per image.
        images: images scored; people / tall_people: people counted (not ignored).
        per_image: one :class:`ImageScore` per image, in label order.
    """

    ap50: float | None
    recall: float | None
    recall_tall: float | None
    false_per_image: float | None
    images: int
    people: int
    tall_people: int
    tall_px: float
    per_image: tuple[ImageScore, ...] = ()


@dataclass(frozen=True)
class DetectorResult:
    """One detector as asked for (``auto``), what ran (``nanodet``), its scores and speed."""

    detector: str
    label: str
    score: DetectionScore
    ms_per_image: float | None

    @property
    def title(self) -> str:
        """How tables name it: ``hog (fallback)``, ``nanodet``, ``auto (nanodet)``."""
        return (
            self.label
            if self.label.startswith(self.detector)
            else f"{self.detector} ({self.label})"
        )


@dataclass
class DetectorEvaluation:
    """What :func:`evaluate_detectors` scored and wrote."""

    results: list[DetectorResult]
    root: Path
    boxes: Path
    labels: dict[str, list[LabelBox]]
    out: Path
    unlabelled: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)


# --- reading labels ------------------------------------------------------------------------


def read_boxes(path: str | Path) -> dict[str, list[LabelBox]]:
    """Read labelled person boxes: COCO JSON (``.json``) or CSV (any other name).

    CSV: a header naming ``image,x,y,w,h`` (``image`` relative to the image folder, box in
    pixels), optionally ``ignore`` (1: an ignored region) and ``note``; other columns are
    left alone. A row with the image and an empty box marks an image with nobody in it.
    COCO: ``images`` (``file_name``), ``annotations`` of the category named ``person``
    (``bbox`` [x, y, w, h]; ``iscrowd`` or ``ignore`` 1: an ignored region) and
    ``categories``; every listed image counts, with or without people.

    Args:
        path: the labels file.

    Returns:
        image name -> its labels, in file order (an image with nobody: an empty list).

    Raises:
        SnaplookError: an unreadable file, a missing column or key, a malformed line or
            annotation, an annotation of an image not listed; the message names the file
            and line (CSV) or annotation (COCO) and what to fix.
    """
    path = Path(path)
    if path.suffix.lower() == ".json":
        return _read_coco(path)
    return _read_csv(path)


def _read_csv(path: Path) -> dict[str, list[LabelBox]]:
    name = display_path(path)
    with open_input(path, kind="table") as raw:
        try:
            text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="").read()
        except UnicodeDecodeError as exc:
            raise SnaplookError(f"{name}: not UTF-8 text ({exc}); save it as UTF-8 CSV.") from exc
    rows = _csv_rows(text, name)
    header = [h.strip().lower() for h in next(rows, (1, []))[1]]
    missing = [c for c in CSV_COLUMNS if c not in header]
    if missing:
        raise SnaplookError(
            f"{name} line 1: the header lacks {', '.join(missing)}; a box CSV starts with "
            f"image,x,y,w,h (then optional ignore, note), or use COCO JSON (a .json file)."
        )
    labels: dict[str, list[LabelBox]] = {}
    for line, row in rows:
        where = f"{name} line {line}"
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise SnaplookError(
                f"{where}: {len(row)} fields where the header has {len(header)}; "
                "quote cells that hold commas."
            )
        image, label = _csv_label(dict(zip(header, row)), where)
        people = labels.setdefault(image, [])
        if label is not None:
            people.append(label)
    return labels


def _csv_rows(text: str, name: str) -> Iterator[tuple[int, list[str]]]:
    """(line the row starts on, its cells); bad quoting is an error naming that line."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise SnaplookError(f"{name} line {start}: {exc}; fix the quoting.") from exc
        yield start, row
        start = reader.line_num + 1


def _csv_label(row: dict[str, str], where: str) -> tuple[str, LabelBox | None]:
    """The image of one CSV row and its label (None: the row marks an image with nobody)."""
    image = row["image"].strip()
    if not image:
        raise SnaplookError(f"{where}: the image cell is empty; name the image file.")
    cells = [row[c].strip() for c in "xywh"]
    if not any(cells):
        return image, None
    try:
        box = tuple(float(c) for c in cells)
    except ValueError as exc:
        raise SnaplookError(
            f"{where}: x,y,w,h must be numbers (pixels), got {','.join(cells)}; fix the row."
        ) from exc
    ignore = row.get("ignore", "").strip().lower()
    if ignore not in _TRUE + _FALSE:
        raise SnaplookError(f"{where}: ignore must be 0 or 1, got {ignore!r}; fix the row.")
    label = LabelBox(_check_box(box, where), ignore in _TRUE, row.get("note", "").strip(), where)
    return image, label


def _check_box(box: Sequence[float], where: str) -> Xywh:
    x, y, w, h = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        raise SnaplookError(
            f"{where}: box x={x:g}, y={y:g}, w={w:g}, h={h:g} needs a positive width and "
            "height (x, y is the top-left corner, w, h the size in pixels); fix the box."
        )
    return x, y, w, h


def _read_coco(path: Path) -> dict[str, list[LabelBox]]:
    name = display_path(path)
    try:
        data = json.loads(read_input_bytes(path, kind="json"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        line = f" line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise SnaplookError(f"{name}{line}: not valid JSON ({exc}); fix the file.") from exc
    parts = {key: data.get(key) if isinstance(data, dict) else None for key in _COCO_KEYS}
    if not all(isinstance(value, list) for value in parts.values()):
        raise SnaplookError(
            f"{name}: not COCO JSON (needs lists 'images', 'annotations', 'categories'); "
            "use COCO's instances format or a CSV image,x,y,w,h."
        )
    person = {c.get("id") for c in parts["categories"] if _is_person(c)}
    if not person:
        raise SnaplookError(
            f"{name}: no category named 'person' in 'categories'; this scores person boxes."
        )
    files, labels = _coco_images(parts["images"], name)
    for i, ann in enumerate(parts["annotations"]):
        where = f"{name} annotations[{i}]"
        if not isinstance(ann, dict):
            raise SnaplookError(f"{where}: not an object; fix the annotation.")
        where += f" (id {ann.get('id')})"
        if ann.get("category_id") not in person:
            continue
        if ann.get("image_id") not in files:
            raise SnaplookError(
                f"{where}: image_id {ann.get('image_id')!r} is not in 'images'; list that "
                "image or remove the annotation."
            )
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise SnaplookError(f"{where}: bbox must be [x, y, w, h] numbers, got {bbox!r}.")
        ignore = bool(ann.get("iscrowd") or ann.get("ignore"))
        box = LabelBox(_check_box(bbox, where), ignore, str(ann.get("note", "")), where)
        labels[files[ann["image_id"]]].append(box)
    return labels


_COCO_KEYS = ("images", "annotations", "categories")


def _is_person(category: Any) -> bool:
    return isinstance(category, dict) and str(category.get("name", "")).lower() == "person"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _coco_images(images: list[Any], name: str) -> tuple[dict[Any, str], dict[str, list]]:
    """COCO image id -> file name, and an empty label list per image."""
    files: dict[Any, str] = {}
    for i, image in enumerate(images):
        ok = isinstance(image, dict) and isinstance(image.get("file_name"), str)
        if not ok or image.get("id") is None or image["id"] in files:
            raise SnaplookError(
                f"{name} images[{i}]: needs a unique 'id' and a 'file_name'; fix the entry."
            )
        files[image["id"]] = image["file_name"]
    return files, {file: [] for file in files.values()}


# --- scoring -------------------------------------------------------------------------------


def _inside(box: Sequence[float], region: Sequence[float]) -> float:
    """Fraction of ``box`` inside ``region``, both (x, y, w, h)."""
    ix = max(0.0, min(box[0] + box[2], region[0] + region[2]) - max(box[0], region[0]))
    iy = max(0.0, min(box[1] + box[3], region[1] + region[3]) - max(box[1], region[1]))
    return ix * iy / max(box[2] * box[3], 1e-9)


def match_detections(
    found: Found, labels: Sequence[LabelBox], *, iou_threshold: float = MATCH_IOU
) -> tuple[set[int], int]:
    """Match one image's detections to its labelled people, strongest detection first.

    Each detection takes the unmatched, counted person it overlaps most at
    ``iou_threshold`` or more. One matching nobody is false unless at least
    :data:`IGNORE_INSIDE` of it lies in an ignored region.

    Args:
        found: (box (x, y, w, h), score) pairs.
        labels: the image's labels.
        iou_threshold: float, default=0.5.

    Returns:
        (indices into ``labels`` of the people found, number of false boxes).
    """
    matched: set[int] = set()
    false = 0
    for box, _ in sorted(found, key=lambda d: -d[1]):
        best, best_iou = None, iou_threshold
        for i, label in enumerate(labels):
            if i in matched or label.ignore:
                continue
            value = iou(box, label.box)
            if value >= best_iou:
                best, best_iou = i, value
        if best is not None:
            matched.add(best)
        elif not any(lb.ignore and _inside(box, lb.box) >= IGNORE_INSIDE for lb in labels):
            false += 1
    return matched, false


def coco_ap50(
    detections: Mapping[str, Found], labels: Mapping[str, Sequence[LabelBox]]
) -> float | None:
    """AP at IoU 0.5 by pycocotools' COCOeval (all sizes, 100 boxes per image; ignored
    regions are COCO crowd regions).

    Returns:
        AP in [0, 1]; 0.0 when there are people and no detections; None when no person is
        labelled (AP is undefined).
    """
    import numpy as np
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ids = {image: i for i, image in enumerate(labels, start=1)}
    annotations, results = [], []
    for image, people in labels.items():
        for person in people:
            x, y, w, h = person.box
            annotations.append(
                {"id": len(annotations) + 1, "image_id": ids[image], "category_id": 1,
                 "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(person.ignore)}
            )  # fmt: skip
        for box, score in detections.get(image, ()):
            results.append(
                {"image_id": ids[image], "category_id": 1, "bbox": [float(v) for v in box],
                 "score": float(score)}
            )  # fmt: skip
    if not any(not a["iscrowd"] for a in annotations):
        return None
    if not results:
        return 0.0
    truth = COCO()
    truth.dataset = {"images": [{"id": i} for i in ids.values()], "annotations": annotations,
                     "categories": [{"id": 1, "name": "person"}]}  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        truth.createIndex()
        evaluation = COCOeval(truth, truth.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
    # precision[iou, recall, category, area, max boxes]: IoU 0.5, all areas, 100 boxes
    # (what COCOeval.summarize reports as stats[1]).
    precision = evaluation.eval["precision"][0, :, 0, 0, -1]
    return float(np.mean(precision[precision > -1]))


def score_detections(
    detections: Mapping[str, Found],
    labels: Mapping[str, Sequence[LabelBox]],
    *,
    tall_px: float = DEFAULT_TALL_PX,
) -> DetectionScore:
    """Score detections against labels: AP@0.5, recall, recall of tall people, false boxes.

    Args:
        detections: image name -> (box (x, y, w, h), score) pairs; an image missing here
            has no detections.
        labels: image name -> its labels (from :func:`read_boxes`); every image in it is
            scored.
        tall_px: float, default=100. People taller than this (box height, pixels) also
            count in ``recall_tall``.

    Returns:
        A :class:`DetectionScore`; ratios with nothing to count are None.
    """
    per_image = []
    for image, people in labels.items():
        found = detections.get(image, ())
        matched, false = match_detections(found, people)
        counted = [i for i, p in enumerate(people) if not p.ignore]
        tall = [i for i in counted if people[i].box[3] > tall_px]
        per_image.append(
            ImageScore(
                image=image,
                labelled=len(counted),
                found=len(matched),
                tall_labelled=len(tall),
                tall_found=len(matched.intersection(tall)),
                false_boxes=false,
                detections=len(found),
                missed=tuple(i for i in counted if i not in matched),
            )
        )
    people = sum(s.labelled for s in per_image)
    tall_people = sum(s.tall_labelled for s in per_image)
    return DetectionScore(
        ap50=coco_ap50(detections, labels),
        recall=_ratio(sum(s.found for s in per_image), people),
        recall_tall=_ratio(sum(s.tall_found for s in per_image), tall_people),
        false_per_image=_ratio(sum(s.false_boxes for s in per_image), len(per_image)),
        images=len(per_image),
        people=people,
        tall_people=tall_people,
        tall_px=tall_px,
        per_image=tuple(per_image),
    )


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


# --- running detectors on a folder ---------------------------------------------------------


def evaluate_detectors(
    root: str | Path,
    *,
    boxes: str | Path,
    detectors: Sequence[str] = (DEFAULT_DETECTOR,),
    tall_px: float = DEFAULT_TALL_PX,
    out: str | Path | None = None,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> DetectorEvaluation:
    """Run person detectors on the labelled images of a folder, score them, write a report.

    Each detector runs as ``snaplook crop --detector NAME`` finds people
    (:class:`snaplook.artists.PersonDetector`), without the minimum person size, so small
    people count. Images in ``root`` without labels are left out (one log line); every
    labelled image must be there. Milliseconds per image leave out loading the model
    (each detector runs once on the first image before the clock starts).

    Args:
        root: the image folder; label image names are relative to it.
        boxes: labels, COCO JSON or CSV (see :func:`read_boxes`).
        detectors: names ("auto", "nanodet", "ssdlite", "hog") or YOLO-style .onnx paths.
        tall_px: float, default=100. See :func:`score_detections`.
        out: report folder; default ``output/eval/<root name>-detection``.
        on_start: called once with the number of images.
        on_progress: called with the number of images done.

    Returns:
        A :class:`DetectorEvaluation`, whose ``files`` are ``report.json`` and ``report.md``.

    Raises:
        SnaplookError: bad labels (see :func:`read_boxes`), a labelled image missing from
            ``root``, a box reaching outside its image, no labelled image, an unknown
            detector or one not fetched (the message says what to run).
    """
    root, boxes = Path(root), Path(boxes)
    labels = read_boxes(boxes)
    paths, unlabelled = _pair_images(root, labels, boxes)
    # One run per detector that runs (``auto`` and the one it stands for run once).
    runners: dict[str, PersonDetector] = {}
    asked: dict[str, str] = {}
    if not detectors:
        raise SnaplookError("No detector to score; name one: auto, nanodet, ssdlite, hog.")
    for name in dict.fromkeys(detectors):
        if name not in DETECTORS and not (name.lower().endswith(".onnx") and Path(name).is_file()):
            raise SnaplookError(
                f"Unknown detector {name!r}; use {', '.join(DETECTORS)} or an existing .onnx file."
            )
        runner = PersonDetector(name, min_size=0.0)
        label = runner.label  # resolves ``auto``; fails here if a model is not fetched
        asked[name] = name if label == "onnx" else label  # two .onnx files: two runs
        runners.setdefault(asked[name], runner)
        logger.info("Detector %s: %s.", name, label)
    found, seconds = _run_detectors(list(runners.values()), paths, labels, on_start, on_progress)
    scores = {
        label: score_detections(found[i], labels, tall_px=tall_px)
        for i, label in enumerate(runners)
    }
    ms = {label: 1000 * sum(seconds[i]) / len(seconds[i]) for i, label in enumerate(runners)}
    results = [DetectorResult(n, runners[k].label, scores[k], ms[k]) for n, k in asked.items()]
    out = Path(out) if out is not None else DEFAULT_EVAL_ROOT / f"{root.resolve().name}-detection"
    evaluation = DetectorEvaluation(results, root, boxes, labels, out, unlabelled)
    evaluation.files = {"report_json": out / "report.json", "report_md": out / "report.md"}
    write_json_atomic(evaluation.files["report_json"], report_dict(evaluation))
    write_text_atomic(evaluation.files["report_md"], render_report_md(evaluation))
    logger.info("Wrote %s and %s.", *evaluation.files.values())
    return evaluation


def _pair_images(
    root: Path, labels: Mapping[str, Sequence[LabelBox]], boxes: Path
) -> tuple[dict[str, Path], list[str]]:
    """Labelled image name -> its file under ``root``; and the unlabelled images' names."""
    if not labels:
        raise SnaplookError(
            f"{display_path(boxes)} labels no image; add rows image,x,y,w,h (or COCO images)."
        )
    on_disk = {relative_or_absolute(p, root): p for p in find_images(root)}
    names = {image: image.replace("\\", "/").removeprefix("./") for image in labels}
    missing = [image for image, key in names.items() if key not in on_disk]
    if missing:
        first = labels[missing[0]][0].where if labels[missing[0]] else display_path(boxes)
        raise SnaplookError(
            f"{first}: image {missing[0]!r} is not in {display_path(root)} ({len(missing)} "
            "labelled image(s) missing); names are relative to the image folder: fix the "
            "name or remove its labels."
        )
    paths = {image: on_disk[key] for image, key in names.items()}
    unlabelled = sorted(set(on_disk) - set(names.values()))
    if unlabelled:
        logger.warning(
            "%d image(s) in %s have no labels in %s and are not scored (first: %s).",
            len(unlabelled), display_path(root), display_path(boxes), ", ".join(unlabelled[:3]),
        )  # fmt: skip
    return paths, unlabelled


def _check_inside(image: str, people: Sequence[LabelBox], width: int, height: int) -> None:
    """Refuse labels that reach outside their image (by more than :data:`EDGE_SLACK_PX`)."""
    for label in people:
        x, y, w, h = label.box
        s = EDGE_SLACK_PX
        if x < -s or y < -s or x + w > width + s or y + h > height + s:
            raise SnaplookError(
                f"{label.where}: box x={x:g}, y={y:g}, w={w:g}, h={h:g} reaches outside "
                f"{image} ({width}x{height} px); fix the box, or the image name if it "
                "labels another image."
            )


def _run_detectors(
    runners: Sequence[PersonDetector],
    paths: Mapping[str, Path],
    labels: Mapping[str, Sequence[LabelBox]],
    on_start: Callable[[int], None] | None,
    on_progress: Callable[[int], None] | None,
) -> tuple[list[dict[str, Found]], list[list[float]]]:
    """Each runner's detections per image and its seconds per image (each image read once)."""
    found: list[dict[str, Found]] = [{} for _ in runners]
    seconds: list[list[float]] = [[] for _ in runners]
    if on_start is not None:
        on_start(len(paths))
    for done, (image, path) in enumerate(paths.items(), start=1):
        frame = read_image(path)
        _check_inside(image, labels[image], frame.shape[1], frame.shape[0])
        for i, runner in enumerate(runners):
            if done == 1:
                runner.detect(frame)  # loads the model: not timed
            start = time.perf_counter()
            people = runner.detect(frame)
            seconds[i].append(time.perf_counter() - start)
            found[i][image] = [(tuple(map(float, d.box)), float(d.score)) for d in people]
        if on_progress is not None:
            on_progress(done)
    return found, seconds


# --- the report ----------------------------------------------------------------------------


def report_dict(evaluation: DetectorEvaluation) -> dict[str, Any]:
    """``report.json``: the settings, one entry per detector, found / labelled per image."""
    from snaplook import __version__

    first = evaluation.results[0].score
    return {
        "created": timestamp(),
        "snaplook_version": __version__,
        "root": str(evaluation.root.resolve()),
        "boxes": str(evaluation.boxes.resolve()),
        "match_iou": MATCH_IOU,
        "tall_px": first.tall_px,
        "images": first.images,
        "people": first.people,
        "tall_people": first.tall_people,
        "ignored_regions": sum(lb.ignore for v in evaluation.labels.values() for lb in v),
        "unlabelled_images": len(evaluation.unlabelled),
        "detectors": [_result_dict(r, evaluation.labels) for r in evaluation.results],
    }


def _result_dict(result: DetectorResult, labels: Mapping[str, Sequence[LabelBox]]) -> dict:
    s = result.score
    per_image = [
        {
            "image": p.image,
            "found": p.found,
            "labelled": p.labelled,
            "tall_found": p.tall_found,
            "tall_labelled": p.tall_labelled,
            "false_boxes": p.false_boxes,
            "detections": p.detections,
            "missed": [_describe(labels[p.image][i]) for i in p.missed],
        }
        for p in s.per_image
    ]
    return {
        "detector": result.detector,
        "ran": result.label,
        "ap50": s.ap50,
        "recall": s.recall,
        "recall_tall": s.recall_tall,
        "false_per_image": s.false_per_image,
        "images": s.images,
        "ms_per_image": result.ms_per_image,
        "per_image": per_image,
    }


def _describe(label: LabelBox) -> str:
    text = f"{label.where}: {label.box[3]:g} px tall"
    return f"{text} ({label.note})" if label.note else text


def format_score(value: float | None, digits: int = 3) -> str:
    """A ratio for tables: ``n/a`` when there was nothing to count."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def render_report_md(evaluation: DetectorEvaluation) -> str:
    """``report.md``: the detectors' table and found / labelled people per image."""
    first = evaluation.results[0].score
    lines = [
        f"# Person detection: {display_path(evaluation.root)}",
        "",
        f"Labels: `{display_path(evaluation.boxes)}`; {first.images} images, {first.people} "
        f"people ({first.tall_people} taller than {first.tall_px:g} px). A box finds a "
        f"person at IoU >= {MATCH_IOU}; false boxes match nobody and no ignored region.",
        "",
        f"| detector | ran | AP@0.5 | recall | recall > {first.tall_px:g} px "
        "| false boxes / image | ms / image |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in evaluation.results:
        s = r.score
        cells = [format_score(v) for v in (s.ap50, s.recall, s.recall_tall)]
        false, ms = format_score(s.false_per_image, 2), format_score(r.ms_per_image, 0)
        lines.append(f"| {r.detector} | {r.label} | {' | '.join(cells)} | {false} | {ms} |")
    lines += ["", "## Found / labelled people per image (false boxes)", ""]
    lines.append("| image | " + " | ".join(r.title for r in evaluation.results) + " |")
    lines.append("| --- |" + " --- |" * len(evaluation.results))
    for row, image in enumerate(evaluation.labels):
        cells = [r.score.per_image[row] for r in evaluation.results]
        text = [f"{p.found}/{p.labelled} ({p.false_boxes} false)" for p in cells]
        lines.append(f"| {image} | " + " | ".join(text) + " |")
    return "\n".join(lines) + "\n"
