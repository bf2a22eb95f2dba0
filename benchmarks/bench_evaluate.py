"""Benchmark the blocked ranking of `snaplook evaluate` at DeepFashion In-shop scale.

Seeded random 2048-d features for 14,218 queries x 12,612 gallery images over 3,985 items
(the In-shop query/gallery sizes) are ranked with :func:`snaplook.metrics.evaluate_embeddings`;
the baseline is the single-matrix :func:`snaplook.metrics.rank_metrics` on a slice of
queries, scaled to the full set. Peak memory of the ranking is traced with tracemalloc
(NumPy reports its buffers to it); the full distance matrix alone would be m x n x 4 bytes.

    .venv/bin/python benchmarks/bench_evaluate.py [--queries 14218] [--gallery 12612]

Prints a summary and writes benchmarks/results/evaluate-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
import tracemalloc
from pathlib import Path

import numpy as np

from snaplook import __version__
from snaplook.metrics import RANKING_BLOCK_BYTES, evaluate_embeddings, rank_metrics

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=14218)
    parser.add_argument("--gallery", type=int, default=12612)
    parser.add_argument("--items", type=int, default=3985)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--baseline-queries", type=int, default=500)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    gallery_ids = rng.integers(0, args.items, args.gallery)
    query_ids = rng.choice(gallery_ids, args.queries)
    # Features near their item's centre, so rankings are neither trivial nor random.
    centres = rng.normal(size=(args.items, args.dim)).astype(np.float32)
    gallery = centres[gallery_ids] + 6.0 * rng.normal(size=(args.gallery, args.dim)).astype(
        np.float32
    )
    queries = centres[query_ids] + 6.0 * rng.normal(size=(args.queries, args.dim)).astype(
        np.float32
    )
    tracemalloc.start()
    started = time.perf_counter()
    metrics = evaluate_embeddings(queries, query_ids, gallery, gallery_ids)
    blocked_s = time.perf_counter() - started
    peak_mib = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    summary = metrics.summary()

    b = args.baseline_queries
    started = time.perf_counter()
    qn = queries[:b] / np.linalg.norm(queries[:b], axis=1, keepdims=True)
    gn = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    whole = rank_metrics(1.0 - qn @ gn.T, query_ids[:b], gallery_ids)
    baseline_s = (time.perf_counter() - started) * args.queries / b
    same = bool((whole.first_hit_rank == metrics.first_hit_rank[:b]).all())

    result = {
        "benchmark": "evaluate_embeddings (blocked ranking)",
        "date": dt.date.today().isoformat(),
        "snaplook": __version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "queries": args.queries,
        "gallery": args.gallery,
        "dim": args.dim,
        "block_bytes": RANKING_BLOCK_BYTES,
        "blocked_seconds": round(blocked_s, 2),
        "queries_per_second": round(args.queries / blocked_s, 1),
        "one_matrix_seconds_scaled": round(baseline_s, 2),
        "ranking_peak_mib": round(peak_mib, 1),
        "full_distance_matrix_mib": round(args.queries * args.gallery * 4 / 2**20, 1),
        "first_hit_ranks_equal_to_one_matrix": same,
        "recall_at_1": summary["recall_at_k"][1],
        "map": summary["map"],
    }
    print(json.dumps(result, indent=2))
    out = REPO / "benchmarks" / "results" / f"evaluate-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
