"""``snaplook index`` speed per issue-24 setting: pooling, TTA, whitening, DBA (issue 24).

Every setting indexes the same generated 600x800 photo-like JPEGs (``benchmarks/run.py``'s
generator) with the library call ``snaplook index`` makes (``indexing.index_gallery``), at
fp32 on the default runtime. A rate is the slope between two gallery sizes,
``(large - small) / (t_large - t_small)`` img/s, so model load and compile cancel; the
settings run interleaved in ``--rounds`` rounds (the CPU is shared) and a setting's rate is
the median of its slopes. "vs today" is the rate relative to the first setting (avg
pooling, no TTA, whitening or DBA: what ``snaplook index`` did before issue 24); issue 24
asks the defaults to keep at least 0.5 of it. Speed does not depend on the weight values,
so seeded random weights are used (no quality is read from this benchmark).

    python benchmarks/bench_index_settings.py [--backbone efficientnet_lite0] [--small 32]
        [--large 128] [--rounds 3]

Prints a table and writes benchmarks/results/index-settings-<date>.json with the CPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "benchmarks" / "data"
RESULTS = REPO / "benchmarks" / "results"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("SNAPLOOK_CACHE_DIR", str(DATA / "model-cache"))
sys.path.insert(0, str(REPO / "benchmarks"))

#: name -> index_gallery keyword arguments; the first is the baseline (before issue 24).
SETTINGS = {
    "avg (before issue 24)": {"pooling": "avg"},
    "gem (default)": {"pooling": "gem"},
    "gem + flip": {"pooling": "gem", "tta": "flip"},
    "gem + pca": {"pooling": "gem", "whiten": "pca"},
    "gem + dba 1": {"pooling": "gem", "dba": 1},
}


def index_seconds(photos: list[Path], work: Path, backbone: str, settings: dict) -> float:
    """Seconds ``index_gallery`` takes over ``photos`` (a fresh index each time)."""
    from run import link_subset

    from snaplook.indexing import index_gallery

    gallery = link_subset(photos, Path(tempfile.mkdtemp(dir=work)))
    out = Path(tempfile.mkdtemp(dir=work)) / "index"
    start = time.perf_counter()
    index_gallery(gallery, out, backbone=backbone, weights="random", precision="fp32", **settings)
    return time.perf_counter() - start


def measure(args: argparse.Namespace) -> dict[str, list[float]]:
    """Per setting, its slopes (img/s) over the rounds, settings interleaved."""
    from run import ensure_photos

    photos = ensure_photos(DATA / "photos", args.large)
    slopes: dict[str, list[float]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for settings in SETTINGS.values():  # warm-up: convert and cache every model
            index_seconds(photos[: args.small], work, args.backbone, settings)
        for r in range(args.rounds):
            for name, settings in SETTINGS.items():
                small = index_seconds(photos[: args.small], work, args.backbone, settings)
                large = index_seconds(photos, work, args.backbone, settings)
                slopes[name].append((args.large - args.small) / max(large - small, 1e-9))
                print(f"round {r + 1}: {name:24} {slopes[name][-1]:7.1f} img/s", flush=True)
    return slopes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--small", type=int, default=32)
    parser.add_argument("--large", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from run import machine

    slopes = measure(args)
    base = statistics.median(next(iter(slopes.values())))
    rows = [
        {
            "setting": name,
            "settings": SETTINGS[name],
            "img_per_s": round(statistics.median(values), 2),
            "slopes": [round(v, 2) for v in values],
            "vs_today": round(statistics.median(values) / base, 3),
        }
        for name, values in slopes.items()
    ]
    print(f"\n{'setting':26} {'img/s':>8} {'vs today':>9}")
    for row in rows:
        print(f"{row['setting']:26} {row['img_per_s']:8.1f} {row['vs_today']:9.2f}")
    result = {
        "benchmark": "index-settings",
        "date": dt.date.today().isoformat(),
        "command": "python benchmarks/bench_index_settings.py " + " ".join(sys.argv[1:]),
        "backbone": args.backbone,
        "gallery_sizes": [args.small, args.large],
        "rounds": args.rounds,
        "machine": machine(),
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"index-settings-{result['date']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
