"""Kill `snaplook index` at random moments, resume, and compare with an uninterrupted run.

Each round starts the command in a subprocess on the same gallery and SIGKILLs it after
a random delay (so kills land anywhere: model loading, mid-batch, mid-write, during the
final assembly); when a run survives to the end the round is over. Then a last run
finishes the job and its features.npy is compared byte for byte with a clean run's.
Reports how many kills landed in which phase, how many batches were embedded twice
(a kill mid-batch loses at most that batch), and the wall time of both paths.

    .venv/bin/python benchmarks/bench_resume.py [--images 40] [--batch-size 4] [--kills 8]

Writes benchmarks/results/resume-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

CMD = [sys.executable, "-c", "from snaplook.cli import app; app()"]


def _gallery(root: Path, n: int) -> None:
    rng = np.random.default_rng(7)
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(
            root / f"img_{i:03d}.png"
        )


def _n_done(partial: Path) -> int:
    return len(list(partial.glob("batch-*.json"))) if partial.is_dir() else 0


def _run(
    gallery: Path, out: Path, batch: int, kill_at: tuple[int, float] | None = None
) -> tuple[str, float]:
    """Run the command; with ``kill_at=(n, s)``, SIGKILL it ``s`` seconds after its n-th
    new checkpoint (n=0: ``s`` seconds after the start)."""
    started = time.perf_counter()
    partial = out.with_name(out.name + ".partial")
    proc = subprocess.Popen(
        [
            *CMD,
            "index",
            str(gallery),
            "--out",
            str(out),
            "--weights",
            "random",
            "--batch-size",
            str(batch),
            "-q",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if kill_at is not None:
        n, delay = kill_at
        target = _n_done(partial) + n
        while n and _n_done(partial) < target and proc.poll() is None:
            time.sleep(0.005)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return "killed", time.perf_counter() - started
    proc.wait()
    return f"exit {proc.returncode}", time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="snaplook-bench-resume-"))
    try:
        gallery = work / "gallery"
        _gallery(gallery, args.images)
        _, clean_s = _run(gallery, work / "clean", args.batch_size)
        out, partial = work / "index", work / "index.partial"
        n_batches = -(-args.images // args.batch_size)
        kills: list[dict] = []
        embedded_batches = 0
        for _ in range(args.kills):
            before = _n_done(partial)
            # Mostly 1-3 batches in, at a random point of a batch (~0.3 s); sometimes while
            # TensorFlow and the model load.
            n = rng.choice([0, 1, 1, 2, 2, 3])
            delay = rng.uniform(2.0, 8.0) if n == 0 else rng.uniform(0.0, 0.4)
            outcome, _ = _run(gallery, out, args.batch_size, (n, delay))
            after = n_batches if out.exists() else _n_done(partial)
            embedded_batches += max(after - before, 0)
            kills.append(
                {
                    "after_new_batches": n,
                    "delay_s": round(delay, 3),
                    "outcome": outcome,
                    "batches_before": before,
                    "batches_after": after,
                    "index_written": out.exists(),
                }
            )
            print(kills[-1], flush=True)
            if out.exists():
                break
        if not out.exists():
            before = _n_done(partial)
            _run(gallery, out, args.batch_size)
            embedded_batches += n_batches - before
        identical = (out / "features.npy").read_bytes() == (
            work / "clean" / "features.npy"
        ).read_bytes()
        result = {
            "date": dt.date.today().isoformat(),
            "images": args.images,
            "batch_size": args.batch_size,
            "batches": n_batches,
            "kills": kills,
            "n_killed": sum(k["outcome"] == "killed" for k in kills),
            "batches_checkpointed_over_all_runs": embedded_batches,
            "features_identical": identical,
            "clean_run_s": round(clean_s, 2),
            "leftovers": sorted(p.name for p in work.iterdir()),
        }
        print(json.dumps({k: v for k, v in result.items() if k != "kills"}, indent=2))
        target = Path(__file__).parent / "results" / f"resume-{result['date']}.json"
        target.parent.mkdir(exist_ok=True)
        target.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
