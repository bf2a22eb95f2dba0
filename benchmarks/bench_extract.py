"""Benchmark `snaplook extract`: frames/s of --every 1 and --scenes against a plain read().

The baseline is the cheapest honest way to see every frame: ``cv2.VideoCapture.read()`` in
a loop. Each mode is timed on the same video in the same run (modes interleaved, best of
``--repeats``), so the ratios compare like with like on a busy machine.

    .venv/bin/python benchmarks/bench_extract.py [--video PATH] [--repeats 3]

Prints a table and writes benchmarks/results/extract-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2

from snaplook import __version__
from snaplook.video import extract_frames, iter_frames

REPO = Path(__file__).resolve().parents[1]
# Real test media as the tests find it: $SNAPLOOK_TESTDATA, else the shared folder beside the clone.
TESTDATA = Path(os.environ.get("SNAPLOOK_TESTDATA") or REPO.parent / "shared" / "testdata")
DEFAULT_VIDEO = TESTDATA / "video" / "one-by-one-person-detection.mp4"


def read_all(video: Path) -> tuple[int, int]:
    """Baseline: decode and convert every frame with read(); returns (decoded, kept)."""
    cap = cv2.VideoCapture(str(video), cv2.CAP_FFMPEG)
    n = 0
    while True:
        ok, _ = cap.read()
        if not ok:
            break
        n += 1
    cap.release()
    return n, n


def grab_all(video: Path) -> tuple[int, int]:
    """Floor: grab() every frame (decode, no colour conversion)."""
    cap = cv2.VideoCapture(str(video), cv2.CAP_FFMPEG)
    n = 0
    while cap.grab():
        n += 1
    cap.release()
    return n, 0


def _count_frames(video: Path) -> int:
    cap = cv2.VideoCapture(str(video), cv2.CAP_FFMPEG)
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    cap.release()
    return n


def modes(video: Path, n_frames: int, tmp: Path) -> dict[str, Callable[[], tuple[int, int]]]:
    def stream(**kwargs) -> Callable[[], tuple[int, int]]:
        return lambda: (n_frames, sum(1 for _ in iter_frames(video, **kwargs)))

    def write(**kwargs) -> Callable[[], tuple[int, int]]:
        def run() -> tuple[int, int]:
            kept = len(extract_frames(video, out=tmp / "frames", **kwargs))
            return n_frames, kept

        return run

    return {
        "read() every frame (baseline)": lambda: read_all(video),
        "grab() every frame (decode floor)": lambda: grab_all(video),
        "iter_frames --every 1": stream(every=1.0),
        "extract --every 1 (writes JPEGs)": write(every=1.0),
        "iter_frames --scenes (scenes only)": stream(every=None, scenes=True),
        "extract --every 1 --scenes (writes)": write(every=1.0, scenes=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", type=Path, default=DEFAULT_VIDEO)
    parser.add_argument("--repeats", type=int, default=3, help="best of N per mode")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    video = args.video
    if not video.is_file():
        raise SystemExit(f"{video}: not found (see ../shared/testdata/PROVENANCE.md)")
    n_frames = _count_frames(video)
    tmp = Path(tempfile.mkdtemp(prefix="bench_extract."))
    try:
        runs = modes(video, n_frames, tmp)
        best: dict[str, float] = {}
        best_cpu: dict[str, float] = {}
        kept: dict[str, int] = {}
        decoded: dict[str, int] = {}
        for _ in range(args.repeats):
            for name, fn in runs.items():  # interleaved, so load spikes hit every mode
                start, start_cpu = time.perf_counter(), time.process_time()
                n_decoded, n_kept = fn()
                seconds = time.perf_counter() - start
                cpu = time.process_time() - start_cpu
                best[name] = min(best.get(name, float("inf")), seconds)
                best_cpu[name] = min(best_cpu.get(name, float("inf")), cpu)
                kept[name], decoded[name] = n_kept, n_decoded
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    base_name = next(iter(runs))
    base_fps = decoded[base_name] / best[base_name]
    base_cpu_fps = decoded[base_name] / best_cpu[base_name]
    rows = []
    for name in runs:
        fps = decoded[name] / best[name]
        cpu_fps = decoded[name] / best_cpu[name]
        rows.append(
            {
                "mode": name,
                "seconds": round(best[name], 3),
                "cpu_seconds": round(best_cpu[name], 3),
                "video_frames": decoded[name],
                "kept_frames": kept[name],
                "frames_per_s": round(fps, 1),
                "ratio_vs_read": round(fps / base_fps, 2),
                "frames_per_cpu_s": round(cpu_fps, 1),
                "cpu_ratio_vs_read": round(cpu_fps / base_cpu_fps, 2),
            }
        )

    print(f"video: {video.name} ({n_frames} frames), best of {args.repeats}, cpus={os.cpu_count()}")
    print(
        f"{'mode':38} {'kept':>5} {'wall s':>7} {'frames/s':>9} {'vs read':>8}"
        f" {'cpu s':>7} {'frames/cpu-s':>12} {'vs read':>8}"
    )
    for r in rows:
        print(
            f"{r['mode']:38} {r['kept_frames']:5d} {r['seconds']:7.2f} "
            f"{r['frames_per_s']:9.1f} {r['ratio_vs_read']:7.2f}x {r['cpu_seconds']:7.2f} "
            f"{r['frames_per_cpu_s']:12.1f} {r['cpu_ratio_vs_read']:7.2f}x"
        )

    cap = cv2.VideoCapture(str(video), cv2.CAP_FFMPEG)
    info = {
        "width": int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
        "height": int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
        "fps": cap.get(cv2.CAP_PROP_FPS),
        "frames": n_frames,
    }
    cap.release()
    now = dt.datetime.now(dt.UTC)
    report = {
        "benchmark": "extract",
        "created": now.isoformat(timespec="seconds"),
        "snaplook": __version__,
        "opencv": cv2.__version__,
        "opencv_threads": cv2.getNumThreads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "video": str(video),
        "video_info": info,
        "repeats": args.repeats,
        "timing": "best wall and best process CPU time of the repeats (modes interleaved); "
        "frames/s = video frames / seconds. CPU time is steadier on a shared machine.",
        "results": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"extract-{now:%Y-%m-%d}.json"
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
