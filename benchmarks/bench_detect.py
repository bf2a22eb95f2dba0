"""Benchmark for issue 23: person detectors against hand-labelled people in the test photos.

Every person in ../shared/testdata/people is labelled in tests/data/people_all_boxes.csv
(``ignore`` 1: occluded people and crowds too small to box one by one; a detection there is
neither found nor false). Per detector: AP@0.5 (pycocotools' COCOeval), recall at IoU >= 0.5
of all people and of people taller than 100 px, false boxes per image (matching no person
and no ignored region), found/labelled per photo, and milliseconds per photo (best of
``--rounds``). Detectors: NanoDet two-pass (the default), each of its passes alone, OpenCV
HOG alone, and snaplook's whole ``PersonDetector`` for both (HOG + Haar cascades, and the
false-people filter; ``min_size`` 0 so small people count).

    snaplook models fetch nanodet    # once
    .venv/bin/python benchmarks/bench_detect.py [--rounds 3] [--threshold 0.35]

Prints a table and writes benchmarks/results/detect-<date>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import io
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PEOPLE = REPO.parent / "shared" / "testdata" / "people"
LABELS = REPO / "tests" / "data" / "people_all_boxes.csv"
RESULTS = REPO / "benchmarks" / "results"
TALL = 100  # px: the "people taller than 100 px"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def load_labels(path: Path = LABELS) -> dict[str, list[dict]]:
    labels: dict[str, list[dict]] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            box = tuple(float(row[c]) for c in "xywh")
            labels.setdefault(row["image"], []).append({"box": box, "ignore": row["ignore"] == "1"})
    return labels


def _iou(a, b) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def _inside(det, region) -> float:
    """Fraction of ``det`` inside ``region`` (COCO's rule for crowd / ignored regions)."""
    ix = max(0.0, min(det[0] + det[2], region[0] + region[2]) - max(det[0], region[0]))
    iy = max(0.0, min(det[1] + det[3], region[1] + region[3]) - max(det[1], region[1]))
    return ix * iy / max(det[2] * det[3], 1e-9)


def match(dets: list[tuple], people: list[dict]) -> tuple[set[int], int]:
    """Greedy matching, strongest first: (indices of found people, number of false boxes)."""
    found: set[int] = set()
    false = 0
    for box, _ in sorted(dets, key=lambda d: -d[1]):
        best, best_iou = None, 0.5
        for i, person in enumerate(people):
            if i in found or person["ignore"]:
                continue
            value = _iou(box, person["box"])
            if value >= best_iou:
                best, best_iou = i, value
        if best is not None:
            found.add(best)
        elif not any(p["ignore"] and _inside(box, p["box"]) >= 0.5 for p in people):
            false += 1
    return found, false


def coco_ap50(labels: dict[str, list[dict]], detections: dict[str, list[tuple]]) -> float:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images = [{"id": i, "file_name": name} for i, name in enumerate(labels, start=1)]
    ids = {img["file_name"]: img["id"] for img in images}
    annotations, results = [], []
    for name, people in labels.items():
        for person in people:
            x, y, w, h = person["box"]
            annotations.append(
                {"id": len(annotations) + 1, "image_id": ids[name], "category_id": 1,
                 "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(person["ignore"])}
            )  # fmt: skip
        for box, score in detections.get(name, []):
            results.append(
                {"image_id": ids[name], "category_id": 1, "bbox": list(box), "score": score}
            )
    if not results:
        return 0.0
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations,
                  "categories": [{"id": 1, "name": "person"}]}  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[1])  # AP at IoU 0.5, all areas, 100 detections


def detectors(threshold: float) -> dict[str, Callable]:
    from snaplook.artists import PersonDetector
    from snaplook.detection import HogDetector, NanoDetDetector, nms
    from snaplook.models import model_path

    def engine(det):
        def run(image):
            boxes, scores = det.detect(image)
            if isinstance(det, HogDetector):  # raw HOG windows overlap: merge as artists does
                xyxy = boxes.copy()
                xyxy[:, 2:] += xyxy[:, :2]
                keep = nms(xyxy, scores, iou_threshold=0.45)
                boxes, scores = boxes[keep], scores[keep]
            return [(tuple(map(float, b)), float(s)) for b, s in zip(boxes, scores)]

        return run

    def pipeline(name):
        det = PersonDetector(name, min_size=0.0)

        def run(image):
            return [(tuple(map(float, d.box)), float(d.score)) for d in det.detect(image)]

        return run

    out: dict[str, Callable] = {}
    xml = model_path("nanodet")
    if xml is None:
        print("NanoDet is not fetched (snaplook models fetch nanodet): HOG rows only.")
    else:
        for label, passes in (
            ("nanodet two-pass", ("stretch", "letterbox")),
            ("nanodet stretched only", ("stretch",)),
            ("nanodet letterboxed only", ("letterbox",)),
        ):
            out[label] = engine(NanoDetDetector(xml, score_threshold=threshold, passes=passes))
        out["PersonDetector('nanodet')"] = pipeline("nanodet")
    out["hog"] = engine(HogDetector())
    out["PersonDetector('hog') (HOG + Haar)"] = pipeline("hog")
    return out


def bench(name: str, run: Callable, images: dict, labels: dict, rounds: int) -> dict:
    detections, per_photo, times = {}, {}, []
    n_all = n_tall = found_all = found_tall = false = 0
    for photo, image in images.items():
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            dets = run(image)
            best = min(best, time.perf_counter() - start)
        times.append(best)
        detections[photo] = dets
        people = labels[photo]
        found, n_false = match(dets, people)
        counted = [i for i, p in enumerate(people) if not p["ignore"]]
        tall = [i for i in counted if people[i]["box"][3] > TALL]
        n_all, n_tall = n_all + len(counted), n_tall + len(tall)
        found_all += len(found)
        found_tall += len(found & set(tall))
        false += n_false
        per_photo[photo] = f"{len(found)}/{len(counted)}, {n_false} false"
    return {
        "detector": name,
        "ap50": coco_ap50(labels, detections),
        "recall": found_all / max(n_all, 1),
        "recall_tall": found_tall / max(n_tall, 1),
        "false_per_image": false / len(images),
        "ms_per_image": 1000 * float(np.mean(times)),
        "people": n_all,
        "tall_people": n_tall,
        "per_photo": per_photo,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threshold", type=float, default=None, help="NanoDet score threshold")
    args = parser.parse_args()

    from snaplook.detection import DEFAULT_NANODET_SCORE
    from snaplook.io_utils import read_image

    threshold = DEFAULT_NANODET_SCORE if args.threshold is None else args.threshold
    labels = load_labels()
    images = {name: read_image(PEOPLE / name) for name in labels}
    rows = [
        bench(name, run, images, labels, args.rounds) for name, run in detectors(threshold).items()
    ]
    header = f"{'detector':38} {'AP@0.5':>7} {'recall':>7} {'>100px':>7} {'false/img':>9} {'ms':>6}"
    print(header)
    for r in rows:
        print(
            f"{r['detector']:38} {r['ap50']:7.3f} {r['recall']:7.3f} {r['recall_tall']:7.3f} "
            f"{r['false_per_image']:9.2f} {r['ms_per_image']:6.0f}"
        )
    print(f"\n{rows[0]['people']} people labelled ({rows[0]['tall_people']} taller than {TALL} px)")
    for photo in images:
        print(f"{photo[:30]:30} " + " | ".join(f"{r['per_photo'][photo]:>12}" for r in rows))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"detect-{dt.date.today().isoformat()}.json"
    payload = {"threshold": threshold, "rounds": args.rounds, "cpu_count": os.cpu_count()}
    out.write_text(json.dumps({**payload, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
