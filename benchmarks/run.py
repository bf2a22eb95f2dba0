"""Benchmark suite for issue 6: each target of the performance table against its baseline.

Every row is measured against its baseline in the same run (interleaved, best of
``--rounds``), so the ratios compare like with like on a busy machine:

(a) ``snaplook index`` throughput (library ``build_index``, JPEG decoding included, LiteRT
    runtime) vs plain Keras ``model.predict`` at its best batch size on the same decoded
    images, and vs the CPU's FLOP ceiling (numpy float32 GEMM GFLOP/s / 7.7 GFLOP per image);
(b) LiteRT features vs Keras features: max relative difference per vector, top-10 neighbours;
(c) peak RSS of the ``snaplook index`` command on N_large vs N_small images (subprocesses);
(d) 1,000 queries against a 100,000 x 2048 gallery: ``cosine_knn`` vs bare GEMM + argpartition;
(e) ``snaplook --help`` wall time and the heavy modules it imports.

ResNet50 runs with seeded random weights (``--weights random``): throughput does not depend
on the weight values, and ImageNet weights cannot be downloaded here.

    .venv/bin/python benchmarks/run.py [--images DIR] [--quick] [--rounds 2]

Photo-like 600x800 JPEGs are generated (deterministically) into benchmarks/data/ unless
``--images`` names a folder. Prints a table and writes benchmarks/results/<date>.json
(``<date>-quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "benchmarks" / "data"
RESULTS = REPO / "benchmarks" / "results"
RESNET50_GFLOP = 7.7  # multiply-adds x 2 of one 224x224 ResNet50 forward pass
PHOTO_SIZE = (600, 800)  # width, height
GENERATOR_VERSION = "1"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# --------------------------------------------------------------------------- data


def make_photo(index: int, size: tuple[int, int] = PHOTO_SIZE) -> np.ndarray:
    """A deterministic photo-like RGB image: smooth gradient backdrop, shapes, sensor noise."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(index)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    t = xx * np.cos(angle) / w + yy * np.sin(angle) / h
    t = (t - t.min()) / (np.ptp(t) or 1.0)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    base = c0 * (1 - t[..., None]) + c1 * t[..., None]
    img = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.uniform(0, w * 0.8), rng.uniform(0, h * 0.8)
        x1, y1 = x0 + rng.uniform(40, w * 0.5), y0 + rng.uniform(40, h * 0.5)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            pts = [(float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1))) for _ in range(5)]
            draw.polygon(pts, fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 2.0))))
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 5, (h, w, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def ensure_photos(folder: Path, count: int) -> list[Path]:
    """Generate ``count`` photos into ``folder`` (kept between runs); return their paths."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / ".generator"
    if not stamp.exists() or stamp.read_text() != GENERATOR_VERSION:
        for old in folder.glob("*.jpg"):
            old.unlink()
        stamp.write_text(GENERATOR_VERSION)
    paths = [folder / f"photo{i:05d}.jpg" for i in range(count)]
    missing = [p for p in paths if not p.exists()]
    if missing:
        print(f"generating {len(missing)} photo-like JPEGs into {folder} ...", flush=True)
    for p in missing:
        Image.fromarray(make_photo(int(p.stem[5:]))).save(p, quality=90)
    return paths


def link_subset(paths: list[Path], folder: Path) -> Path:
    """A folder holding symlinks to ``paths`` (an index of exactly these images)."""
    folder.mkdir(parents=True, exist_ok=True)
    for p in paths:
        (folder / p.name).symlink_to(p.resolve())
    return folder


# --------------------------------------------------------------------------- measurements


def sgemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 GEMM rate of numpy's BLAS on all cores, GFLOP/s."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up (thread pool, pages)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def decode_prepared(paths: list[Path]) -> np.ndarray:
    """The library's decode + resize, sequential: (n, 224, 224, 3) uint8."""
    from snaplook.io_utils import read_image_with_size
    from snaplook.transform_utils import resize_to_square

    return np.stack(
        [resize_to_square(read_image_with_size(p, min_size=224)[0], 224) for p in paths]
    )


def keras_predict_rate(model, batch: np.ndarray, batch_size: int) -> tuple[float, np.ndarray]:
    """img/s of ``model.predict`` on preprocessed ``batch`` (after a warm-up batch)."""
    model.predict(batch[:batch_size], batch_size=batch_size, verbose=0)
    t = time.perf_counter()
    out = model.predict(batch, batch_size=batch_size, verbose=0)
    return len(batch) / (time.perf_counter() - t), out


def index_rate(folder: Path, n: int, work: Path, runtime: str) -> float:
    """img/s of the library's build_index (fresh embedder: interpreter load included)."""
    from snaplook.features import Embedder
    from snaplook.index import build_index

    out = work / f"index-{runtime}"
    embedder = Embedder("resnet50", weights="random", runtime=runtime)
    t = time.perf_counter()
    summary = build_index(folder, out, embedder=embedder)
    seconds = time.perf_counter() - t
    assert summary.n_indexed == n, summary
    shutil.rmtree(out)
    return n / seconds


def litert_invoke_rates(batch: np.ndarray, sizes=(1, 4, 8)) -> dict[str, float]:
    """img/s of the bare LiteRT interpreter per images-per-invoke (no decoding)."""
    from ai_edge_litert.interpreter import Interpreter

    from snaplook.features import Embedder, _cpu_threads

    path = Embedder("resnet50", weights="random").tflite_path()
    rates = {}
    for bs in sizes:
        it = Interpreter(model_path=str(path), num_threads=_cpu_threads())
        inp = it.get_input_details()[0]["index"]
        it.resize_tensor_input(inp, [bs, 224, 224, 3])
        it.allocate_tensors()
        n = (len(batch) // bs) * bs
        it.set_tensor(inp, np.ascontiguousarray(batch[:bs]))
        it.invoke()  # warm-up
        t = time.perf_counter()
        for s in range(0, n, bs):
            it.set_tensor(inp, np.ascontiguousarray(batch[s : s + bs]))
            it.invoke()
        rates[f"batch {bs}"] = n / (time.perf_counter() - t)
    return rates


def peak_rss_of(cmd: list[str]) -> tuple[int, float, str]:
    """Run ``cmd`` in a wrapper process; return (peak RSS in bytes, seconds, output tail)."""
    wrapper = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "dt = time.perf_counter() - t\n"
        "sys.stdout.write((p.stdout + p.stderr)[-600:])\n"
        "print(f'\\n@@ {p.returncode} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}"
        " {dt}')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, check=True
    ).stdout
    tail, last = out.rsplit("@@", 1)
    rc, kb, seconds = last.split()
    if rc != "0":
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}): {tail}")
    return int(kb) * 1024, float(seconds), tail.strip()


def bare_knn(queries: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    """Baseline: normalise queries, one GEMM, argpartition, sort the k."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q @ gallery.T
    part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1)
    return np.take_along_axis(part, order, axis=1)


def help_timings(runs: int = 10) -> dict[str, object]:
    """Wall time of the installed ``snaplook --help`` (bytecode cached, as installed)."""
    exe = Path(sys.executable).parent / "snaplook"
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    cache = tempfile.mkdtemp(prefix="snaplook-pyc-")
    env["PYTHONPYCACHEPREFIX"] = cache  # keeps .pyc files out of the checkout
    subprocess.run([str(exe), "--help"], env=env, capture_output=True, check=True)
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        subprocess.run([str(exe), "--help"], env=env, capture_output=True, check=True)
        walls.append(time.perf_counter() - t)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    probe = (
        "import sys\nfrom snaplook.cli import app\n"
        "try:\n    app(['--help'], prog_name='snaplook')\nexcept SystemExit:\n    pass\n"
        "heavy = ('tensorflow', 'keras', 'numpy', 'PIL', 'cv2', 'matplotlib', 'sklearn',"
        " 'ai_edge_litert', 'rich.markdown')\n"
        "print('@@' + ','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    ).stdout
    shutil.rmtree(cache, ignore_errors=True)
    heavy = [m for m in out.rsplit("@@", 1)[1].strip().split(",") if m]
    return {
        "wall_min_s": min(walls),
        "wall_median_s": statistics.median(walls),
        "cpu_median_s": statistics.median(cpus),
        "heavy_modules_imported": heavy,
    }


# --------------------------------------------------------------------------- suite


def machine() -> dict[str, object]:
    model = ""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    from snaplook.features import _cpu_threads

    return {
        "cpu": model or platform.processor(),
        "cores": _cpu_threads(),
        "simd": sorted(f for f in flags if f in {"avx", "avx2", "fma", "avx512f"}),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "load_average_start": os.getloadavg(),
    }


def run(args: argparse.Namespace) -> dict[str, object]:
    from importlib.metadata import version

    from snaplook import __version__
    from snaplook.features import Embedder, WeightsSpec, build_model, embed_images
    from snaplook.index import cosine_knn
    from snaplook.transform_utils import preprocess_caffe

    info = machine()
    info.update(snaplook=__version__, tensorflow=version("tensorflow"))
    info["ai_edge_litert"] = version("ai-edge-litert")
    rows: list[dict[str, object]] = []
    n_small, n_large = (100, 400) if args.quick else (500, 2000)
    n_tp = args.throughput_images or (60 if args.quick else 160)
    if args.images:
        from snaplook.io_utils import find_images

        photos = find_images(args.images)
        if len(photos) < n_large:
            raise SystemExit(f"{args.images} holds {len(photos)} images, need {n_large}")
    else:
        photos = ensure_photos(DATA / "photos", n_large)
    work = Path(tempfile.mkdtemp(prefix="snaplook-bench-"))
    try:
        # (e) first: nothing of ours is warm yet.
        print("(e) snaplook --help ...", flush=True)
        h = help_timings()
        rows.append(
            dict(
                what="snaplook --help wall (min of 10)",
                value=h["wall_min_s"],
                unit="s",
                baseline=None,
                ratio=None,
                target="<= 0.3 s, no tensorflow",
                ok=h["wall_min_s"] <= 0.3 and "tensorflow" not in h["heavy_modules_imported"],
                detail=h,
            )
        )

        # (a) + (b): throughput and fidelity on the same images.
        tp_paths = photos[:n_tp]
        n_round = min(args.round_images or (32 if args.quick else 96), n_tp)
        round_dir = link_subset(tp_paths[:n_round], work / "round")
        print(f"(a) preparing LiteRT model and decoding {n_tp} images ...", flush=True)
        t = time.perf_counter()
        Embedder("resnet50", weights="random", runtime="litert").load_interpreter()
        convert_s = time.perf_counter() - t
        prepared = decode_prepared(tp_paths)
        batch = preprocess_caffe(prepared)
        model = build_model("resnet50", WeightsSpec(kind="random", seed=0))
        # Short interleaved rounds, best of each kept: on a shared machine the best of
        # several short runs is the closest to what the code does on an idle one.
        keras_rates: dict[int, float] = {}
        per_round: list[dict[str, float]] = []
        for r in range(args.rounds):
            gemm = sgemm_gflops()
            sizes = (8, 16, 32) if r == 0 else (max(keras_rates, key=keras_rates.get),)
            this_keras = 0.0
            for bs in sizes:
                rate, _ = keras_predict_rate(model, batch[:n_round], bs)
                keras_rates[bs] = max(keras_rates.get(bs, 0.0), rate)
                this_keras = max(this_keras, rate)
            index = index_rate(round_dir, n_round, work, "litert")
            per_round.append(
                {"sgemm_gflop_s": gemm, "keras_img_s": this_keras, "index_img_s": index}
            )
            print(
                f"  round {r + 1}: gemm {gemm:.1f} GFLOP/s, keras {this_keras:.2f} img/s "
                f"(by batch {keras_rates}), index {index:.2f} img/s, load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
        best_bs = max(keras_rates, key=keras_rates.get)
        keras_best = keras_rates[best_bs]
        best_index = max(r["index_img_s"] for r in per_round)
        best_gemm = max(r["sgemm_gflop_s"] for r in per_round)
        ceiling = best_gemm / RESNET50_GFLOP
        paired = [r["index_img_s"] / r["keras_img_s"] for r in per_round]
        invoke = litert_invoke_rates(batch[: min(len(batch), 32)])
        keras_out = model.predict(batch, batch_size=best_bs, verbose=0)  # for (b)
        rows.append(
            dict(
                what=f"index throughput vs Keras predict (batch {best_bs})",
                value=best_index,
                unit="img/s",
                baseline=keras_best,
                ratio=best_index / keras_best,
                target=">= 1.8x",
                ok=best_index / keras_best >= 1.8,
                detail={
                    "keras_predict_img_s_by_batch": keras_rates,
                    "images_per_round": n_round,
                    "rounds": per_round,
                    "median_paired_ratio": statistics.median(paired),
                    "litert_bare_invoke_img_s": invoke,
                    "first_conversion_or_cache_load_s": convert_s,
                },
            )
        )
        rows.append(
            dict(
                what="index throughput vs FLOP ceiling",
                value=best_index,
                unit="img/s",
                baseline=ceiling,
                ratio=best_index / ceiling,
                target=">= 0.8",
                ok=best_index / ceiling >= 0.8,
                detail={"sgemm_gflop_s": best_gemm, "gflop_per_image": RESNET50_GFLOP},
            )
        )

        print("(b) LiteRT vs Keras features ...", flush=True)
        fast, kept = embed_images(
            tp_paths, Embedder("resnet50", weights="random", runtime="litert")
        )
        assert kept == tp_paths
        ref = np.asarray(keras_out, dtype=np.float32)
        rel = np.abs(fast - ref).max(axis=1) / np.abs(ref).max(axis=1)
        k = min(10, n_tp - 1)
        _, nn_ref = cosine_knn(ref, ref, k=k + 1)
        _, nn_fast = cosine_knn(fast, fast, k=k + 1)
        same_order = float(np.mean(np.all(nn_ref == nn_fast, axis=1)))
        same_set = float(
            np.mean([set(a) == set(b) for a, b in zip(nn_ref.tolist(), nn_fast.tolist())])
        )
        rows.append(
            dict(
                what="LiteRT vs Keras: max relative diff per vector",
                value=float(rel.max()),
                unit="",
                baseline=None,
                ratio=None,
                target="<= 1e-4",
                ok=float(rel.max()) <= 1e-4,
                detail={"mean": float(rel.mean()), "images": n_tp},
            )
        )
        rows.append(
            dict(
                what=f"LiteRT vs Keras: identical top-{k} neighbours",
                value=round(same_order * n_tp),
                unit=f"of {n_tp} queries",
                baseline=None,
                ratio=None,
                target="all identical",
                ok=same_order == 1.0,
                detail={"same_set_fraction": same_set, "queries": n_tp},
            )
        )
        del model, batch, prepared

        # (c) peak RSS of the command itself.
        print(f"(c) peak RSS: snaplook index of {n_small} and {n_large} images ...", flush=True)
        exe = str(Path(sys.executable).parent / "snaplook")
        rss = {}
        for n in (n_small, n_large):
            folder = link_subset(photos[:n], work / f"rss{n}")
            cmd = [exe, "index", str(folder), "--out", str(work / f"rss-index-{n}")]
            cmd += ["--weights", "random", "--runtime", "litert", "--quiet"]
            peak, seconds, _ = peak_rss_of(cmd)
            rss[n] = {"peak_rss_mb": peak / 2**20, "seconds": seconds, "img_s": n / seconds}
            shutil.rmtree(work / f"rss-index-{n}", ignore_errors=True)
        growth = rss[n_large]["peak_rss_mb"] / rss[n_small]["peak_rss_mb"]
        rows.append(
            dict(
                what=f"peak RSS, index {n_large} vs {n_small} images",
                value=rss[n_large]["peak_rss_mb"],
                unit="MB",
                baseline=rss[n_small]["peak_rss_mb"],
                ratio=growth,
                target="< 1.15x, <= 2048 MB",
                ok=growth < 1.15 and rss[n_large]["peak_rss_mb"] <= 2048,
                detail=rss,
            )
        )

        # (d) search.
        n_gallery = 20_000 if args.quick else 100_000
        print(f"(d) 1000 queries against {n_gallery} x 2048 ...", flush=True)
        rng = np.random.default_rng(0)
        gallery = rng.standard_normal((n_gallery, 2048), dtype=np.float32)
        gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
        queries = rng.standard_normal((1000, 2048), dtype=np.float32)
        t_lib = t_bare = float("inf")
        for _ in range(args.rounds):
            t = time.perf_counter()
            base_idx = bare_knn(queries, gallery, 10)
            t_bare = min(t_bare, time.perf_counter() - t)
            t = time.perf_counter()
            _, lib_idx = cosine_knn(queries, gallery, k=10, normalized_gallery=True)
            t_lib = min(t_lib, time.perf_counter() - t)
        agree = float(np.mean(lib_idx == base_idx))
        rows.append(
            dict(
                what=f"query 1000 x {n_gallery} gallery: cosine_knn vs GEMM+argpartition",
                value=t_lib,
                unit="s",
                baseline=t_bare,
                ratio=t_bare / t_lib,
                target=">= 0.8",
                ok=t_bare / t_lib >= 0.8,
                detail={"same_neighbours_fraction": agree, "k": 10},
            )
        )
        del gallery, queries
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info["load_average_end"] = os.getloadavg()
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/run.py", *sys.argv[1:]]),
        "quick": args.quick,
        "machine": info,
        "rows": rows,
    }


def print_table(result: dict[str, object]) -> None:
    rows = result["rows"]
    header = ("what", "measured", "baseline", "ratio", "target", "")
    lines = []
    for r in rows:
        value = f"{r['value']:.3g} {r['unit']}".strip()
        base = "" if r["baseline"] is None else f"{r['baseline']:.3g} {r['unit']}".strip()
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append((r["what"], value, base, ratio, r["target"], "PASS" if r["ok"] else "FAIL"))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
    print(fmt.format(*header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for line in lines:
        print(fmt.format(*line))
    m = result["machine"]
    print(
        f"\n{m['cpu']}, {m['cores']} cores ({', '.join(m['simd'])}), load average "
        f"{m['load_average_start'][0]:.1f} -> {m['load_average_end'][0]:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, help="folder of JPEGs instead of generated ones")
    parser.add_argument(
        "--quick", action="store_true", help="smaller counts (RSS 100/400, gallery 20k)"
    )
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds, best kept")
    parser.add_argument("--throughput-images", type=int, default=0, help="images for (b)")
    parser.add_argument(
        "--round-images", type=int, default=0, help="images per throughput round (a)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON result")
    args = parser.parse_args()
    result = run(args)
    print()
    print_table(result)
    args.out.mkdir(parents=True, exist_ok=True)
    name = dt.date.today().isoformat() + ("-quick" if args.quick else "") + ".json"
    (args.out / name).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nwrote {args.out / name}")


if __name__ == "__main__":
    main()
