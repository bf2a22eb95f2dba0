"""`snaplook index --engine ray` on a local cluster against `--engine local`, in one run.

Generated 600x800 photo-like JPEGs (benchmarks/data, shared with run.py), ResNet50 with
seeded random weights (timing only), the same runtime for both engines. Per round:

- ``local``: ``build_index`` in this process (one model, one thread per core);
- ``ray``: ``build_index(engine=RayEngine(workers=W, cpus_per_worker=1))`` on a local
  cluster of this machine's cores (W actors, one model each, one thread each).

Reports images/s of each (wall time of ``build_index``, model load included), images/s
per Ray worker, the engine's fixed overhead (the same one-batch job on both engines: actor
start, model load in the actor, the dataset's scheduling; plus the cluster start), and
whether the features agree (max |difference|, rows and order, shard bytes identical).

    python benchmarks/bench_ray.py [--images 96] [--batch-size 8] [--workers 2] [--rounds 2]

Writes benchmarks/results/ray-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import DATA, REPO, RESULTS, ensure_photos, link_subset, machine  # noqa: E402

from snaplook.distributed import RayEngine  # noqa: E402
from snaplook.features import RUNTIMES, Embedder  # noqa: E402
from snaplook.index import load_index  # noqa: E402
from snaplook.indexing import build_index  # noqa: E402


def _index(folder: Path, out: Path, engine, args) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    embedder = Embedder("resnet50", weights="random", runtime=args.runtime)
    t = time.perf_counter()
    summary = build_index(folder, out, embedder=embedder, batch_size=args.batch_size, engine=engine)
    return time.perf_counter() - t, summary.n_indexed


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "features").iterdir())}


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runtime", default="auto", choices=RUNTIMES)
    args = parser.parse_args()
    started = dt.datetime.now(dt.UTC)
    load_start = os.getloadavg()
    photos = ensure_photos(DATA / "photos", args.images)
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    try:
        gallery = link_subset(photos, work / "gallery")
        one_batch = link_subset(photos[: args.batch_size], work / "one-batch")
        # Warm-up outside the timings: the OpenVINO conversion (once per weights) and the
        # page cache of the JPEGs.
        _index(one_batch, work / "warm", "local", args)
        t = time.perf_counter()
        python_path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
        ray.init(
            address="local",
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": python_path}},
        )
        cluster_start = time.perf_counter() - t
        engine = RayEngine(workers=args.workers, cpus_per_worker=1)
        rounds = []
        for r in range(args.rounds):
            order = ["local", "ray"] if r % 2 == 0 else ["ray", "local"]
            got: dict[str, float] = {}
            for name in order:
                out = work / f"{name}-{r}"
                seconds, n = _index(gallery, out, "local" if name == "local" else engine, args)
                assert n == args.images
                got[name] = seconds
                small, _ = _index(
                    one_batch,
                    work / f"{name}-small-{r}",
                    "local" if name == "local" else engine,
                    args,
                )
                got[f"{name}_one_batch"] = small
            rounds.append(got)
            print(
                f"round {r + 1}: local {args.images / got['local']:.2f} img/s, ray "
                f"{args.images / got['ray']:.2f} img/s; one batch: local "
                f"{got['local_one_batch']:.1f} s, ray {got['ray_one_batch']:.1f} s",
                flush=True,
            )
        local_idx, ray_idx = load_index(work / "local-0"), load_index(work / "ray-0")
        max_diff = float(
            np.max(np.abs(np.asarray(local_idx.features) - np.asarray(ray_idx.features)))
        )
        same_rows = local_idx.manifest == ray_idx.manifest
        same_bytes = _shards(work / "local-0") == _shards(work / "ray-0")
        runtime = Embedder("resnet50", weights="random", runtime=args.runtime).resolved_runtime()
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    best_local = args.images / min(r["local"] for r in rounds)
    best_ray = args.images / min(r["ray"] for r in rounds)
    overhead = statistics.median(r["ray_one_batch"] - r["local_one_batch"] for r in rounds)
    rows = [
        ("local engine (best round)", f"{best_local:.2f} img/s"),
        (f"ray engine, {args.workers} workers (best round)", f"{best_ray:.2f} img/s"),
        ("ray / local", f"{best_ray / best_local:.2f}"),
        ("ray, per worker", f"{best_ray / args.workers:.2f} img/s"),
        ("ray overhead per run (one-batch job, median)", f"{overhead:.1f} s"),
        ("local cluster start (ray.init)", f"{cluster_start:.1f} s"),
        ("features: max |ray - local|", f"{max_diff:.2e}"),
        ("same rows in the same order", str(same_rows)),
        ("shard bytes identical", str(same_bytes)),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    doc = {
        "benchmark": "ray",
        "command": "python benchmarks/bench_ray.py " + " ".join(sys.argv[1:]),
        "started_utc": started.isoformat(timespec="seconds"),
        "machine": {**machine(), "load_average_start": load_start},
        "load_average_end": os.getloadavg(),
        "images": args.images,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "runtime": runtime,
        "backbone": "resnet50 (random weights: timing only)",
        "rounds_seconds": rounds,
        "local_img_s": round(best_local, 3),
        "ray_img_s": round(best_ray, 3),
        "ray_per_worker_img_s": round(best_ray / args.workers, 3),
        "ray_over_local": round(best_ray / best_local, 3),
        "ray_overhead_s": round(overhead, 2),
        "cluster_start_s": round(cluster_start, 2),
        "max_abs_diff": max_diff,
        "same_rows": same_rows,
        "same_shard_bytes": same_bytes,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    target = RESULTS / f"ray-{started.date().isoformat()}.json"
    target.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
