"""Benchmark for issue 14: does ``--restrict auto`` raise Recall@K on a labelled catalogue?

A generated catalogue: garment silhouettes (the category: tops, trousers, dresses, skirts)
in colours and stripe patterns (the product), each colour used in every category, so an
unrestricted search can confuse a red top with a red skirt. Every product has two
gallery views and one query view (shifted, scaled, other noise and backdrop). The index
and queries go through the library exactly as ``snaplook index --catalog`` and
``snaplook query [--restrict auto]`` do; Recall@K counts a query when one of its top K
hits is its own product. ``--clutter`` makes the queries street-like: a smaller garment
among colourful rectangles.

    python benchmarks/bench_restrict.py [--backbone mobilenet_v2] [--weights random]
        [--per-category 24] [--clutter]

Prints a table and writes benchmarks/results/restrict-<backbone>-<weights>-<date>.json.
With --weights random the numbers say whether the mechanism helps on these features, not
how good retrieval is.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CATEGORIES = ("Tops", "Trousers", "Dresses", "Skirts")
PALETTE = [
    (200, 30, 30),
    (30, 140, 60),
    (30, 60, 200),
    (220, 190, 40),
    (30, 30, 30),
    (230, 130, 170),
    (120, 80, 40),
    (140, 140, 150),
    (100, 30, 140),
    (20, 160, 170),
    (240, 120, 20),
    (200, 200, 200),
]
KS = (1, 5, 10)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _silhouette(category: str, w: int, h: int) -> list[tuple[float, float]]:
    if category == "Tops":  # T-shape with sleeves
        return [
            (0.2, 0.15),
            (0.8, 0.15),
            (0.95, 0.4),
            (0.8, 0.45),
            (0.75, 0.85),
            (0.25, 0.85),
            (0.2, 0.45),
            (0.05, 0.4),
        ]
    if category == "Trousers":  # two legs
        return [
            (0.3, 0.05),
            (0.7, 0.05),
            (0.75, 0.95),
            (0.56, 0.95),
            (0.5, 0.35),
            (0.44, 0.95),
            (0.25, 0.95),
        ]
    if category == "Dresses":  # long A-line with a narrow bodice
        return [(0.38, 0.05), (0.62, 0.05), (0.64, 0.35), (0.85, 0.95), (0.15, 0.95), (0.36, 0.35)]
    return [(0.3, 0.3), (0.7, 0.3), (0.85, 0.75), (0.15, 0.75)]  # Skirts: short trapezoid


def draw(
    category: str, colour, stripes: int, *, seed: int, size: int = 160, clutter: bool = False
) -> Image.Image:
    rng = np.random.default_rng(seed)
    shift = rng.uniform(-0.06, 0.06, 2)
    scale = rng.uniform(0.85, 1.05) * (0.7 if clutter else 1.0)
    backdrop = tuple(int(v) for v in rng.integers(225, 256, 3))
    mask = Image.new("L", (size, size), 0)
    points = [
        (size * (0.5 + (x - 0.5) * scale + shift[0]), size * (0.5 + (y - 0.5) * scale + shift[1]))
        for x, y in _silhouette(category, size, size)
    ]
    ImageDraw.Draw(mask).polygon(points, fill=255)
    cloth = np.zeros((size, size, 3), dtype=np.float32) + colour
    if stripes:  # the product's pattern: horizontal stripes at its own frequency
        rows = (np.arange(size) * stripes // size) % 2 == 1
        cloth[rows] *= 0.55
    cloth += rng.normal(0, 10, cloth.shape)
    image = np.zeros_like(cloth) + backdrop
    if clutter:  # a street shot: other colourful things around a smaller garment
        for _ in range(4):
            x, y = rng.integers(0, size - 40, 2)
            w, h = rng.integers(20, 60, 2)
            image[y : y + h, x : x + w] = PALETTE[int(rng.integers(len(PALETTE)))]
    m = np.asarray(mask, dtype=bool)
    image[m] = cloth[m]
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def make_catalogue(
    root: Path, per_category: int, *, clutter: bool = False
) -> tuple[Path, Path, list[tuple[Path, str]]]:
    gallery, queries = root / "gallery", root / "queries"
    gallery.mkdir(parents=True)
    queries.mkdir()
    lines = ["image,product_id,title,price,category"]
    truth = []
    for c, category in enumerate(CATEGORIES):
        for p in range(per_category):
            pid = f"{category[:2].upper()}{p:03d}"
            colour = PALETTE[p % len(PALETTE)]
            stripes = (p // len(PALETTE)) * 6  # plain, then striped variants
            for v in range(3):
                seed = (c * 1000 + p) * 10 + v
                image = draw(category, colour, stripes, seed=seed, clutter=clutter and v == 2)
                if v < 2:
                    name = f"{category.lower()}/{pid}_v{v}.png"
                    (gallery / category.lower()).mkdir(exist_ok=True)
                    image.save(gallery / name)
                    lines.append(f"{name},{pid},{category} {p},{10 + p}.00,{category}")
                else:
                    path = queries / f"{pid}_query.png"
                    image.save(path)
                    truth.append((path, pid))
    (root / "products.csv").write_text("\n".join(lines) + "\n")
    return gallery, root / "products.csv", truth


def recall(summary, truth: dict[str, str]) -> dict[int, float]:
    out = {}
    for k in KS:
        found = [
            any((h.product or {}).get("product_id") == truth[r.query.name] for h in r.hits[:k])
            for r in summary.results
        ]
        out[k] = float(np.mean(found))
    return out


def same_category(summary, truth: dict[str, str], k: int) -> float:
    """Share of the top-k hits in the query's own category (what a shopper sees)."""
    shares = [
        np.mean(
            [
                (h.product or {}).get("product_id", "")[:2] == truth[r.query.name][:2]
                for h in r.hits[:k]
            ]
        )
        for r in summary.results
    ]
    return float(np.mean(shares))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--per-category", type=int, default=24)
    parser.add_argument(
        "--clutter", action="store_true", help="queries: smaller garment among colourful clutter"
    )
    args = parser.parse_args()

    from snaplook.index import load_index, query_index
    from snaplook.indexing import build_index

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        gallery, catalog, truth = make_catalogue(root, args.per_category, clutter=args.clutter)
        started = time.perf_counter()
        build_index(
            gallery, root / "index", backbone=args.backbone, weights=args.weights, catalog=catalog
        )
        index = load_index(root / "index")
        embedder = index.embedder()
        names = {p.name: pid for p, pid in truth}
        category_of = {pid: pid[:2] for _, pid in truth}
        runs = {}
        for restrict in ("none", "auto"):
            summary = query_index(
                [p for p, _ in truth], index, k=max(KS), embedder=embedder, restrict=restrict
            )
            runs[restrict] = {
                "recall": recall(summary, names),
                "same_category_at_10": same_category(summary, names, 10),
            }
            if restrict == "auto":
                right = [
                    (r.category or "")[:2].upper() == category_of[names[r.query.name]]
                    for r in summary.results
                ]
                runs[restrict]["category_accuracy"] = float(np.mean(right))
                runs[restrict]["mean_confidence"] = float(
                    np.mean([r.confidence for r in summary.results])
                )
        seconds = time.perf_counter() - started

    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line),
        platform.processor(),
    )
    print(
        f"{len(truth)} queries, {2 * len(truth)} gallery images, {len(CATEGORIES)} categories; "
        f"{args.backbone} --weights {args.weights}{' --clutter' if args.clutter else ''}"
    )
    print(
        f"{'restrict':<10}"
        + "".join(f"{'R@' + str(k):>8}" for k in KS)
        + "  same category in top 10  category predicted right"
    )
    for restrict, run in runs.items():
        acc = run.get("category_accuracy")
        print(
            f"{restrict:<10}"
            + "".join(f"{run['recall'][k]:>8.3f}" for k in KS)
            + f"  {run['same_category_at_10']:>24.3f}"
            + (f"  {acc:>25.3f}" if acc is not None else "")
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    mode = "-clutter" if args.clutter else ""
    target = RESULTS / f"restrict-{args.backbone}-{args.weights}{mode}-{now:%Y-%m-%d}.json"
    doc = {
        "benchmark": "bench_restrict",
        "date": now.isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "backbone": args.backbone,
        "weights": args.weights,
        "note": "generated catalogue; random weights measure the mechanism, not quality"
        if args.weights == "random"
        else "generated catalogue",
        "clutter": args.clutter,
        "per_category": args.per_category,
        "queries": len(truth),
        "gallery": 2 * len(truth),
        "categories": list(CATEGORIES),
        "runs": runs,
        "seconds": round(seconds, 1),
    }
    target.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
