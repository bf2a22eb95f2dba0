"""Benchmark for issue 23: person detectors against hand-labelled people in the test photos.

Every person in ../shared/testdata/people is labelled in tests/data/people_all_boxes.csv
(``ignore`` 1: occluded people and crowds too small to box one by one; a detection there is
neither found nor false). Per detector, scored by ``snaplook.detect_eval`` (what ``snaplook
evaluate-detector`` reports on a user's own labelled photos): AP@0.5 (pycocotools'
COCOeval), recall at IoU >= 0.5
of all people and of people taller than 100 px, false boxes per image (matching no person
and no ignored region), found/labelled per photo, and milliseconds per photo (best of
``--rounds``). Detectors: NanoDet two-pass (the default), each of its passes alone, SSDLite,
OpenCV HOG alone, and snaplook's whole ``PersonDetector`` for each (for HOG: + Haar cascades
and the false-people filter; ``min_size`` 0 so small people count).

    snaplook models fetch nanodet ssdlite    # once
    .venv/bin/python benchmarks/bench_detect.py [--rounds 3] [--threshold 0.35]

Prints a table and writes benchmarks/results/detect-<date>.json, with the CPU and a sweep of
NanoDet's two-pass merge settings (score threshold per pass, NMS IoU, the part-of-a-person
rule), one varied at a time around the defaults, on the same photos: the labelled set is 7
photos, so the sweep shows how far each chosen value is from where results change.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from snaplook.detect_eval import LabelBox

REPO = Path(__file__).resolve().parents[1]
PEOPLE = REPO.parent / "shared" / "testdata" / "people"
LABELS = REPO / "tests" / "data" / "people_all_boxes.csv"
RESULTS = REPO / "benchmarks" / "results"
TALL = 100  # px: the "people taller than 100 px"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def load_labels(path: Path = LABELS) -> dict[str, list[LabelBox]]:
    """The labelled people per photo (snaplook.detect_eval.read_boxes)."""
    from snaplook.detect_eval import read_boxes

    return read_boxes(path)


def detectors(thresholds: dict[str, float]) -> dict[str, Callable]:
    from snaplook.artists import PersonDetector
    from snaplook.detection import HogDetector, NanoDetDetector, SSDLiteDetector, nms
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
        print("NanoDet is not fetched (snaplook models fetch nanodet): no NanoDet rows.")
    else:
        det = NanoDetDetector(xml, score_thresholds=thresholds)
        out["nanodet two-pass"] = engine(det)
        # Each pass alone, at the letterboxed pass's threshold (a one-pass detector).
        single = thresholds["letterbox"]
        for name in ("stretch", "letterbox"):
            det = NanoDetDetector(xml, score_thresholds={name: single}, passes=(name,))
            out[f"nanodet {name} pass only ({single:g})"] = engine(det)
        out["PersonDetector('nanodet')"] = pipeline("nanodet")
    if model_path("ssdlite") is None:
        print("SSDLite is not fetched (snaplook models fetch ssdlite): no SSDLite rows.")
    else:
        out["ssdlite"] = engine(SSDLiteDetector(model_path("ssdlite")))
        out["PersonDetector('ssdlite')"] = pipeline("ssdlite")
    out["hog"] = engine(HogDetector())
    out["PersonDetector('hog') (HOG + Haar)"] = pipeline("hog")
    return out


def score(detections: dict[str, list[tuple]], labels: dict[str, list[LabelBox]]) -> dict:
    """AP@0.5, recall (all, taller than TALL), false boxes per image, found/labelled per photo,
    scored by snaplook.detect_eval (what `snaplook evaluate-detector` reports)."""
    from snaplook.detect_eval import score_detections

    result = score_detections(detections, labels, tall_px=TALL)
    per_photo, missed = {}, {}
    for p in result.per_image:
        per_photo[p.image] = f"{p.found}/{p.labelled}, {p.false_boxes} false"
        people = labels[p.image]
        missed[p.image] = [f"{people[i].note} ({people[i].box[3]:g} px)" for i in p.missed]
    return {
        "ap50": result.ap50 or 0.0,
        "recall": result.recall or 0.0,
        "recall_tall": result.recall_tall or 0.0,
        "false_per_image": result.false_per_image or 0.0,
        "people": result.people,
        "tall_people": result.tall_people,
        "per_photo": per_photo,
        "missed": missed,
    }


def bench(name: str, run: Callable, images: dict, labels: dict, rounds: int) -> dict:
    detections, times = {}, []
    for photo, image in images.items():
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            dets = run(image)
            best = min(best, time.perf_counter() - start)
        times.append(best)
        detections[photo] = dets
    result = score(detections, labels)
    per_photo, missed = result.pop("per_photo"), result.pop("missed")
    ms = 1000 * float(np.mean(times))
    row = {"detector": name, **result, "ms_per_image": ms}
    return {**row, "per_photo": per_photo, "missed": missed}


#: The NanoDet merge settings before this sweep (one threshold for both passes, NMS 0.5,
#: parts 0.8 inside / 0.6 of the height): the reference row of the sweep.
OLD_MERGE = {"stretch": 0.35, "letterbox": 0.35, "nms_iou": 0.5, "inside": 0.8, "height": 0.6}
#: One setting varied at a time around the defaults (part "inside" 1.01: no part removal).
SWEEP = {
    "stretch": [0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7],
    "letterbox": [0.25, 0.3, 0.32, 0.35, 0.37, 0.39, 0.4, 0.45, 0.5],
    "nms_iou": [0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6],
    "inside": [0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.9, 1.01],
    "height": [0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7],
}


def sweep_merge(images: dict, labels: dict) -> list[dict]:
    """NanoDet's two-pass merge scored over :data:`SWEEP` (the passes run once per photo)."""
    from snaplook import detection
    from snaplook.models import model_path

    xml = model_path("nanodet")
    if xml is None:
        return []
    det = detection.NanoDetDetector(xml)
    found = {photo: det.detect_passes(image, floor=0.2) for photo, image in images.items()}
    default = {
        **detection.DEFAULT_PASS_SCORES,
        "nms_iou": detection.DEFAULT_NMS_IOU,
        "inside": detection.PART_INSIDE,
        "height": detection.PART_MAX_HEIGHT,
    }
    settings = [("old merge", OLD_MERGE), ("default", default)]
    settings += [(key, {**default, key: v}) for key, values in SWEEP.items() for v in values]
    rows = []
    for varied, setting in settings:
        detections = {}
        for photo, passes in found.items():
            boxes, scores = detection.merge_passes(
                passes,
                score_thresholds={"stretch": setting["stretch"], "letterbox": setting["letterbox"]},
                nms_iou=setting["nms_iou"],
                part_inside=setting["inside"],
                part_max_height=setting["height"],
            )
            boxes[:, 2:] -= boxes[:, :2]
            detections[photo] = [(tuple(map(float, b)), float(s)) for b, s in zip(boxes, scores)]
        result = score(detections, labels)
        for key in ("per_photo", "missed", "people", "tall_people"):
            del result[key]
        rows.append({"varied": varied, **setting, **result})
    return rows


def _cpu() -> str:
    """The CPU's model name (Linux), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _print_rows(rows: list[dict], images: dict) -> None:
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


def _print_sweep(sweep: list[dict]) -> None:
    print("\nNanoDet two-pass merge, one setting varied at a time (7 photos: a small set)")
    print(f"{'varied':10} {'stretch':>7} {'letterb':>7} {'nms':>5} {'inside':>6} {'height':>6} "
          f"{'AP@0.5':>7} {'recall':>7} {'>100px':>7} {'false/img':>9}")  # fmt: skip
    for r in sweep:
        print(
            f"{r['varied']:10} {r['stretch']:7.2f} {r['letterbox']:7.2f} {r['nms_iou']:5.2f} "
            f"{r['inside']:6.2f} {r['height']:6.2f} {r['ap50']:7.3f} {r['recall']:7.3f} "
            f"{r['recall_tall']:7.3f} {r['false_per_image']:9.2f}"
        )


#: SSDLite score thresholds scored by :func:`sweep_ssdlite`.
SSDLITE_SWEEP = [0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7]


def sweep_ssdlite(images: dict, labels: dict) -> list[dict]:
    """SSDLite scored at each of :data:`SSDLITE_SWEEP` (the model runs once per photo)."""
    from snaplook.detection import SSDLiteDetector
    from snaplook.models import model_path

    if model_path("ssdlite") is None:
        return []
    det = SSDLiteDetector(model_path("ssdlite"), score_threshold=min(SSDLITE_SWEEP))
    found = {photo: det.detect(image) for photo, image in images.items()}
    rows = []
    for threshold in SSDLITE_SWEEP:
        detections = {
            photo: [(tuple(map(float, b)), float(s)) for b, s in zip(*dets) if s >= threshold]
            for photo, dets in found.items()
        }
        result = score(detections, labels)
        for key in ("per_photo", "missed", "people", "tall_people"):
            del result[key]
        rows.append({"threshold": threshold, **result})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--threshold", type=float, default=None, help="NanoDet letterboxed-pass score threshold"
    )
    parser.add_argument(
        "--stretch-threshold", type=float, default=None, help="NanoDet stretched-pass threshold"
    )
    args = parser.parse_args()

    import openvino

    from snaplook.detection import DEFAULT_PASS_SCORES
    from snaplook.io_utils import read_image

    thresholds = dict(DEFAULT_PASS_SCORES)
    if args.threshold is not None:
        thresholds["letterbox"] = args.threshold
    if args.stretch_threshold is not None:
        thresholds["stretch"] = args.stretch_threshold
    labels = load_labels()
    images = {name: read_image(PEOPLE / name) for name in labels}
    rows = [
        bench(name, run, images, labels, args.rounds) for name, run in detectors(thresholds).items()
    ]
    _print_rows(rows, images)
    sweep = sweep_merge(images, labels)
    _print_sweep(sweep)
    ssd_sweep = sweep_ssdlite(images, labels)
    if ssd_sweep:
        print("\nSSDLite score threshold")
        for r in ssd_sweep:
            print(
                f"{r['threshold']:10.2f} {r['ap50']:7.3f} {r['recall']:7.3f} "
                f"{r['recall_tall']:7.3f} {r['false_per_image']:9.2f}"
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"detect-{dt.date.today().isoformat()}.json"
    payload = {
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "python benchmarks/bench_detect.py " + " ".join(sys.argv[1:]),
        "thresholds": thresholds,
        "rounds": args.rounds,
        "cpu": _cpu(),
        "cpu_count": os.cpu_count(),
        "openvino": openvino.__version__,
        "labelled": "7 photos, tests/data/people_all_boxes.csv: a small set",
    }
    sweeps = {"merge_sweep": sweep, "ssdlite_sweep": ssd_sweep}
    out.write_text(json.dumps({**payload, "rows": rows, **sweeps}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
