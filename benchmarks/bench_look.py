"""Benchmark for issue 4: person detection on the real photos, and `snaplook look` on the video.

(a) ``detect_people`` on each photo in ../shared/testdata/people: the best IoU against the
    hand-checked boxes in tests/data/people_boxes.csv and the time per photo (best of
    ``--rounds``);
(b) ``PersonDetector.detect`` per frame of the real video (768x432), HOG and cascades apart;
(c) ``snaplook look`` on the real video end to end (a subprocess, wall and CPU seconds),
    against an index of data/train built with ``--weights random``.

    .venv/bin/python benchmarks/bench_look.py [--every 1.0] [--rounds 3] [--skip-look]

Prints a table and writes benchmarks/results/look-<date>.json. On a shared machine compare
CPU seconds, not wall seconds.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTDATA = REPO.parent / "shared" / "testdata"
VIDEO = TESTDATA / "video" / "one-by-one-person-detection.mp4"
RESULTS = REPO / "benchmarks" / "results"
SNAPLOOK = str(Path(sys.executable).with_name("snaplook"))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def bench_photos(rounds: int) -> list[dict]:
    from snaplook.artists import PersonDetector, iou
    from snaplook.io_utils import read_image

    labels: dict[str, list[tuple[int, int, int, int]]] = {}
    with open(REPO / "tests" / "data" / "people_boxes.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            labels.setdefault(row["file"], []).append(
                tuple(int(row[c]) for c in ("x", "y", "w", "h"))
            )
    detector = PersonDetector()
    detector.detect(read_image(TESTDATA / "people" / "darknet_person.jpg"))  # load models
    out = []
    for path in sorted((TESTDATA / "people").iterdir()):
        image = read_image(path)
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            found = detector.detect(image)
            times.append(time.perf_counter() - start)
        per_label = [
            max((iou(d.box, lab) for d in found), default=0.0) for lab in labels.get(path.name, [])
        ]
        out.append(
            {
                "file": path.name,
                "size": f"{image.shape[1]}x{image.shape[0]}",
                "seconds": min(times),
                "n_found": len(found),
                "sources": sorted({d.source for d in found}),
                "best_iou_per_label": [round(v, 3) for v in per_label],
            }
        )
    return out


def bench_video_frames(n: int) -> dict:
    import cv2

    from snaplook.artists import PersonDetector

    detector = PersonDetector()
    cap = cv2.VideoCapture(str(VIDEO))
    frames = []
    for i in range(n):
        cap.set(cv2.CAP_PROP_POS_FRAMES, i * 1394 // n)
        ok, bgr = cap.read()
        if ok:
            frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    detector.detect(frames[0])
    hog = casc = total = 0.0
    for frame in frames:
        t0 = time.perf_counter()
        detector._detect_hog(frame)
        t1 = time.perf_counter()
        detector._detect_cascades(frame)
        t2 = time.perf_counter()
        detector.detect(frame)
        total += time.perf_counter() - t2
        hog += t1 - t0
        casc += t2 - t1
    k = len(frames)
    return {"frames": k, "hog_s": hog / k, "cascades_s": casc / k, "detect_s": total / k}


def bench_look(every: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        index = Path(tmp) / "index"
        subprocess.run(
            [SNAPLOOK, "index", str(REPO / "data" / "train"), "--out", str(index)]
            + ["--weights", "random", "-q"],
            check=True,
            capture_output=True,
        )
        cmd = [SNAPLOOK, "look", str(VIDEO), "--index", str(index), "--every", str(every)]
        cmd += ["--out", f"{tmp}/looks", "--crops-out", f"{tmp}/lead", "-q"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        run = subprocess.run(cmd, check=True, capture_output=True, text=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        with open(f"{tmp}/lead/artists.csv", newline="") as fh:
            crops = list(csv.DictReader(fh))
        with open(f"{tmp}/lead/detections.csv", newline="") as fh:
            frames = {r["frame"] for r in csv.DictReader(fh)}
        return {
            "command": " ".join(cmd).replace(tmp, "$TMP"),
            "wall_s": wall,
            "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
            "frames": len(frames),
            "crops": len(crops),
            "artists": sorted({r["artist"] for r in crops}),
            "stdout_tail": run.stdout.strip().splitlines()[-3:],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-look", action="store_true")
    args = parser.parse_args()
    result = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "photos": bench_photos(args.rounds),
        "video_frames": bench_video_frames(12),
    }
    for p in result["photos"]:
        print(
            f"{p['file'][:40]:40s} {p['size']:>9s} {p['seconds']:6.2f}s "
            f"found={p['n_found']} {','.join(p['sources']):12s} IoU={p['best_iou_per_label']}"
        )
    v = result["video_frames"]
    print(
        f"video frame 768x432: detect {v['detect_s']:.3f}s (HOG {v['hog_s']:.3f}s, "
        f"cascades {v['cascades_s']:.3f}s) over {v['frames']} frames"
    )
    if not args.skip_look:
        result["look"] = bench_look(args.every)
        lk = result["look"]
        print(
            f"look --every {args.every}: {lk['frames']} frames, {lk['crops']} crops, "
            f"wall {lk['wall_s']:.1f}s, CPU {lk['cpu_s']:.1f}s\n  {lk['command']}"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    target = RESULTS / f"look-{dt.date.today().isoformat()}.json"
    target.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
