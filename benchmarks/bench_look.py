"""Benchmark for issue 4: person detection on the real photos, and `snaplook look` on the video.

(a) ``detect_people`` on each photo in ../shared/testdata/people: the best IoU against the
    hand-checked boxes in tests/data/people_boxes.csv and the time per photo (best of
    ``--rounds``);
(b) ``PersonDetector.detect`` per frame of the real video (768x432), HOG and cascades apart;
(c) ``snaplook look`` on the real video end to end (a subprocess, wall and CPU seconds),
    against an index of data/train built with ``--weights random``;
(d) false artists (issue 15): the lead artists chosen on each photo on its own (fully
    labelled photos: every detection that matches no label is false) and on the real
    video, whole and cut into ``--clip-s`` second clips, judged against the hand-checked
    boxes in tests/data/video_boxes.csv (``background``: floorboards; ``partial``: part of
    a person; every other detection at ``--every 1`` was checked to be a whole person).
    An artist is false when most of its boxes are background. Also counts partial boxes
    kept as ``full_shot`` views. Uses only API that predates issue 15, so the same script
    measures the code before the change: ``PYTHONPATH=<old checkout> python ...``.

    .venv/bin/python benchmarks/bench_look.py [--every 1.0] [--rounds 3] [--skip-look]
        [--only-false-artists] [--tag before]

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

from snaplook import runtime  # noqa: E402

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

    detector = PersonDetector("hog")  # HOG and cascades timed apart: the fallback's parts
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
        detector._detect_engine(frame)
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


#: Photos where every person is labelled in people_boxes.csv (PROVENANCE.md: one person).
FULLY_LABELLED = (
    "coco_000000000785.jpg",
    "darknet_person.jpg",
    "skimage_astronaut.png",
    "skimage_camera.png",
)


def _judge(selection, label_of) -> dict:
    false_artists, partial_full = [], 0
    for artist in selection.artists:
        labels = [label_of(f, b) for f, b in zip(artist.frames, artist.boxes)]
        if labels.count("background") * 2 > len(labels):
            false_artists.append(artist.artist)
        partial_full += sum(
            1 for c in artist.crops if c.full_shot and label_of(c.frame, c.box) == "partial"
        )
    return {
        "artists": len(selection.artists),
        "false_artists": false_artists,
        "partial_full_shots": partial_full,
    }


def bench_false_artists(every: float, clip_s: float, detector_name: str = "auto") -> dict:
    from snaplook.artists import FrameDetections, PersonDetector, iou, select_lead_artists
    from snaplook.io_utils import read_image
    from snaplook.video import iter_frames

    detector = PersonDetector(detector_name)
    photo_labels: dict[str, list[tuple[int, ...]]] = {}
    with open(REPO / "tests" / "data" / "people_boxes.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            photo_labels.setdefault(row["file"], []).append(tuple(int(row[c]) for c in "xywh"))
    photos = []
    for path in sorted((TESTDATA / "people").iterdir()):
        image = read_image(path)
        dets = detector.detect(image)
        labels = photo_labels.get(path.name, [])

        def label_of(frame, box, labels=labels):
            return "person" if any(iou(box, lab) >= 0.3 for lab in labels) else "unmatched"

        sel = select_lead_artists([FrameDetections(0, None, image, dets)])
        found = [label_of(0, a.boxes[0]) for a in sel.artists]
        photos.append(
            {
                "file": path.name,
                "fully_labelled": path.name in FULLY_LABELLED,
                "labels": len(labels),
                "labels_found": sum(any(iou(d.box, lab) >= 0.5 for d in dets) for lab in labels),
                "artists": len(found),
                "artists_unmatched": found.count("unmatched"),
            }
        )

    video_labels: dict[int, list[tuple[tuple[int, ...], str]]] = {}
    with open(REPO / "tests" / "data" / "video_boxes.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            box = tuple(int(row[c]) for c in "xywh")
            video_labels.setdefault(int(row["frame"]), []).append((box, row["label"]))

    def video_label(frame, box):
        for lab_box, label in video_labels.get(frame, []):
            if iou(box, lab_box) >= 0.8:
                return label
        return "person"

    frames = []
    start = time.perf_counter()
    for fr in iter_frames(VIDEO, every=every):
        frames.append(FrameDetections(fr.frame, fr.time_s, fr.image, detector.detect(fr.image)))
    seconds = time.perf_counter() - start
    counts = {"person": 0, "partial": 0, "background": 0}
    for fd in frames:
        for d in fd.detections:
            counts[video_label(fd.frame, d.box)] += 1
    clips = []
    for c in range(int(frames[-1].time_s // clip_s) + 1):
        mine = [fd for fd in frames if c * clip_s <= fd.time_s < (c + 1) * clip_s]
        if mine:
            judged = _judge(select_lead_artists(mine), video_label)
            clips.append({"clip": c, "start_s": c * clip_s, **judged})
    return {
        "photos": photos,
        "video": {
            "every": every,
            "frames": len(frames),
            "detect_s": seconds,
            "detections": counts,
            "whole_clip_max2": _judge(select_lead_artists(frames), video_label),
            "whole_clip_all_tracks": _judge(
                select_lead_artists(frames, max_artists=50), video_label
            ),
            "clip_s": clip_s,
            "clips": clips,
            "false_artists_in_clips": sum(len(c["false_artists"]) for c in clips),
            "clips_with_false_artists": sum(1 for c in clips if c["false_artists"]),
            "partial_full_shots_in_clips": sum(c["partial_full_shots"] for c in clips),
        },
    }


def _print_false_artists(fa: dict) -> None:
    print("false artists (issue 15): photos, each on its own, max 2 artists")
    for p in fa["photos"]:
        kind = "fully labelled" if p["fully_labelled"] else "partly labelled"
        print(
            f"  {p['file'][:40]:40s} {kind:15s} labels found {p['labels_found']}/{p['labels']}"
            f"  artists {p['artists']}, matching no label {p['artists_unmatched']}"
        )
    v = fa["video"]
    d = v["detections"]
    print(
        f"video, --every {v['every']}: {v['frames']} frames, detections: {d['person']} person, "
        f"{d['partial']} partial, {d['background']} background"
    )
    for name in ("whole_clip_max2", "whole_clip_all_tracks"):
        j = v[name]
        print(
            f"  {name:22s} artists {j['artists']:2d}, false {j['false_artists']}, "
            f"partial full shots {j['partial_full_shots']}"
        )
    print(
        f"  {len(v['clips'])} clips of {v['clip_s']:.0f} s (max 2 artists each): "
        f"{v['false_artists_in_clips']} false artists in {v['clips_with_false_artists']} clips, "
        f"{v['partial_full_shots_in_clips']} partial boxes kept as full shots"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-look", action="store_true")
    parser.add_argument("--clip-s", type=float, default=10.0)
    parser.add_argument("--only-false-artists", action="store_true")
    parser.add_argument("--tag", default="", help="Suffix of the JSON file (e.g. before).")
    parser.add_argument(
        "--detector", default="auto", help="auto, nanodet or hog (issue 23; false artists only)."
    )
    args = parser.parse_args()
    result = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "cpu": runtime.cpu_model(),
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "snaplook": _snaplook_source(),
    }
    result["false_artists"] = bench_false_artists(args.every, args.clip_s, args.detector)
    _print_false_artists(result["false_artists"])
    if args.only_false_artists:
        _write(result, args.tag)
        return
    result["photos"] = bench_photos(args.rounds)
    result["video_frames"] = bench_video_frames(12)
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
    _write(result, args.tag)


def _snaplook_source() -> str:
    import snaplook

    return str(Path(snaplook.__file__).parent)


def _write(result: dict, tag: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = f"-{tag}" if tag else ""
    target = RESULTS / f"look-{dt.date.today().isoformat()}{suffix}.json"
    target.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
