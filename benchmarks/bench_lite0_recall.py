"""Recall@1/5 of efficientnet_lite0 features on real photos: ImageNet vs random weights.

For each augmentation strength (see scripts/make_photo_folders.py), builds the labelled
photo folders, then for ``--weights imagenet`` and ``--weights random`` runs the real
commands:

    snaplook train ROOT/train --protocol folders --backbone efficientnet_lite0 --weights W \\
        --dim 128 --batch 8x4 --seed 0
    snaplook evaluate ROOT/eval --protocol folders --backbone efficientnet_lite0 --weights W \\
        --head HEAD --k 1,5

(evaluate scores raw features and the head's output from the same cached features; the
head is trained on other photos than it is evaluated on). The Keras runtime is used
(``SNAPLOOK_RUNTIME=keras``), so no LiteRT conversion is timed or cached.

    python benchmarks/bench_lite0_recall.py [--out output/bench_lite0] [--strengths mild,strong]

Prints a table and writes benchmarks/results/lite0-recall-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import make_photo_folders  # noqa: E402

from snaplook import runtime  # noqa: E402


def _snaplook(*args: object) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "SNAPLOOK_RUNTIME": "keras"}
    command = [sys.executable, "-c", "from snaplook.cli import app; app()", *map(str, args)]
    subprocess.run(command, check=True, env=env, cwd=REPO)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "output" / "bench_lite0")
    parser.add_argument("--strengths", default="mild,strong")
    parser.add_argument("--copies", type=int, default=8)
    args = parser.parse_args()

    rows = []
    for strength in args.strengths.split(","):
        root = args.out / strength
        counts = make_photo_folders.build(root, copies=args.copies, strength=strength)
        for weights in ("imagenet", "random"):
            started = time.perf_counter()
            head = root / "heads" / weights
            common = ["--backbone", "efficientnet_lite0", "--weights", weights]
            common += ["--cache-dir", root / "cache", "-q"]
            _snaplook(
                "train", root / "train", "--protocol", "folders", *common,
                "--dim", 128, "--batch", "8x4", "--seed", 0, "--out", head,
            )  # fmt: skip
            report = root / "eval-report" / weights
            _snaplook(
                "evaluate", root / "eval", "--protocol", "folders", *common,
                "--head", head, "--k", "1,5", "--out", report,
            )  # fmt: skip
            compare = json.loads((report / "compare.json").read_text())
            for setting in compare["settings"]:
                rows.append(
                    {
                        "strength": strength,
                        "weights": weights,
                        "features": "head" if "+" in setting["setting"] else "raw",
                        "queries": setting["queries_evaluated"],
                        "recall_at_1": round(100 * setting["recall_at_k"]["1"], 2),
                        "recall_at_5": round(100 * setting["recall_at_k"]["5"], 2),
                        "map_at_r": round(100 * setting["map_at_r"], 2),
                        "eval_labels": counts["eval_labels"],
                        "train_labels": counts["train_labels"],
                    }
                )
            print(f"{strength}/{weights}: {time.perf_counter() - started:.0f} s", flush=True)

    header = f"{'set':<8} {'weights':<9} {'features':<9} {'queries':>7} {'R@1':>7} {'R@5':>7}"
    print(header + f" {'MAP@R':>7}")
    for r in rows:
        print(
            f"{r['strength']:<8} {r['weights']:<9} {r['features']:<9} {r['queries']:>7} "
            f"{r['recall_at_1']:>7.2f} {r['recall_at_5']:>7.2f} {r['map_at_r']:>7.2f}"
        )
    now = dt.datetime.now(dt.UTC)
    result = {
        "benchmark": "lite0-recall",
        "date": now.isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_lite0_recall.py " + " ".join(sys.argv[1:]),
        "cpu": runtime.cpu_model(),
        "cpu_flags": sorted(
            runtime.cpu_flags() & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"}
        ),  # noqa: E501
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "backbone": "efficientnet_lite0",
        "head": {"dim": 128, "batch": "8x4", "loss": "triplet", "seed": 0},
        "copies_per_label": args.copies,
        "rows": rows,
    }
    path = REPO / "benchmarks" / "results" / f"lite0-recall-{now.date()}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
