"""Benchmark `snaplook train`'s head training: seconds per epoch on cached features.

Seeded random 2048-d features for 5,000 items x 5 images (25,000 rows, near their item's
centre) are fed to :func:`snaplook.train.fit_head` with the default head (512-d, no hidden
layer, batch 16x4, triplet) and, for comparison, Proxy-Anchor and a 1024-unit hidden
layer. An epoch is n_train_images / (P*K) batches plus the validation Recall@1 on the
held-out 10% of items; the first epoch (graph tracing) is reported separately.

    .venv/bin/python benchmarks/bench_train.py [--items 5000] [--per-item 5] [--epochs 3]

Prints a table and writes benchmarks/results/train-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from snaplook import __version__
from snaplook.train import DEFAULT_BATCH, DEFAULT_DIM, fit_head

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--per-item", type=int, default=5)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--configs", default="default,proxy-anchor,hidden1024", help="Comma-separated."
    )
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    centres = np.abs(rng.normal(size=(args.items, args.dim))).astype(np.float32)
    ids = np.repeat(np.arange(args.items), args.per_item)
    feats = centres[ids] + np.abs(rng.normal(size=(len(ids), args.dim))).astype(np.float32)

    configs = {
        "default": {},
        "proxy-anchor": {"loss": "proxy-anchor"},
        "hidden1024": {"hidden": 1024},
    }
    rows = []
    for name in args.configs.split(","):
        kwargs = configs[name]
        times: list[float] = []
        started = time.perf_counter()
        head = fit_head(
            feats,
            ids,
            epochs=args.epochs,
            patience=args.epochs + 1,
            on_epoch=lambda r, t=times: t.append(r.seconds),
            **kwargs,
        )
        total = time.perf_counter() - started
        steady = times[1:] or times
        row = {
            "config": name,
            "loss": head.config["loss"],
            "hidden": head.config["hidden"],
            "dim": head.config["dim"],
            "batch": head.config["batch"],
            "train_images": head.info["counts"]["train_images"],
            "val_images": head.info["counts"]["val_images"],
            "first_epoch_s": round(times[0], 2),
            "seconds_per_epoch": round(statistics.median(steady), 2),
            "epochs": len(times),
            "fit_total_s": round(total, 2),
            "final_loss": round(head.history[-1].loss, 4),
        }
        rows.append(row)
        print(
            f"{name:14s} {row['seconds_per_epoch']:7.2f} s/epoch  (first {row['first_epoch_s']:.2f}"
            f" s incl. tracing; {row['train_images']} train images; loss {row['final_loss']})",
            flush=True,
        )

    print()
    print("| config | loss | hidden | dim | batch | s/epoch | first epoch s | target |")
    print("| --- | --- | ---: | ---: | --- | ---: | ---: | --- |")
    for r in rows:
        target = "< 30 s" if r["config"] == "default" else ""
        print(
            f"| {r['config']} | {r['loss']} | {r['hidden']} | {r['dim']} | "
            f"{r['batch'][0]}x{r['batch'][1]} | {r['seconds_per_epoch']:.2f} | "
            f"{r['first_epoch_s']:.2f} | {target} |"
        )
    result = {
        "benchmark": "train",
        "date": dt.date.today().isoformat(),
        "snaplook_version": __version__,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
        "features": {"items": args.items, "per_item": args.per_item, "dim": args.dim},
        "defaults": {"dim": DEFAULT_DIM, "batch": list(DEFAULT_BATCH)},
        "results": rows,
    }
    out = REPO / "benchmarks" / "results" / f"train-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
