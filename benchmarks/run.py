"""Benchmark suite (issues 6 and 12): each target of the performance table against its baseline.

Every row is measured against its baseline in the same run (interleaved rounds, best of
``--rounds``), on the same decoded images, so the ratios compare like with like on a busy
machine:

(a) ``snaplook index`` throughput (library ``build_index``: JPEG decoding, hashing and
    writing included; OpenVINO fp32) / the bare OpenVINO fp32 compiled model (the
    library's: preprocessing in the graph, uint8 input) on the same decoded and resized
    images (best of the library's batched requests and OpenVINO's own throughput mode,
    one image per request): target >= 0.9. Decoding alone (sequential and with the library's
    decode threads) is measured too;
(b) bare OpenVINO fp32 throughput / FLOP ceiling (best float32 GEMM GFLOP/s of numpy's
    BLAS / 7.7 GFLOP per ResNet50 image): target >= 0.85; oneDNN's own SGEMM (an OpenVINO
    MatMul) is reported as a second, usually higher, ceiling;
(c) ``snaplook index`` fp32 / Keras ``model.predict`` at its best batch size: reported;
(d) ``--precision bf16`` and ``int8`` (``snaplook index`` and bare) / Keras ``predict``:
    target >= 5x for bf16 on AMX; reported with the CPU (bf16 only where the CPU has it);
(e) fidelity of bf16 and int8 against fp32 with REAL weights (``--fidelity-backbone``,
    default efficientnet_lite0 with ImageNet weights) on ../shared/testdata (people photos
    and video frames, each with augmented copies): per-vector relative error, top-10
    neighbour agreement, leave-one-out Recall@1 per precision. Skipped (with the reason)
    when no real weights are available; random weights are never used for this row;
(f) peak RSS of the ``snaplook index`` command on N_large vs N_small images (subprocesses);
plus ``snaplook --help`` wall time, 1,000 queries against 100,000 x 2048 (``cosine_knn`` vs
bare GEMM + argpartition) and, with ``--litert``, the LiteRT interpreter that OpenVINO
replaced.

Throughput rows run ResNet50 with seeded random weights (``--weights random``): speed does
not depend on the weight values.

    python benchmarks/run.py [--images DIR] [--quick] [--rounds 4] [--litert]

Photo-like 600x800 JPEGs are generated (deterministically) into benchmarks/data/ unless
``--images`` names a folder. Prints a table and writes benchmarks/results/<date>.json
(``<date>-quick.json`` with ``--quick``) with the CPU model and flags.
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


def sgemm_gflops(sizes=(2048, 4096), repeats: int = 3) -> float:
    """Best float32 GEMM rate of numpy's BLAS on all cores, GFLOP/s (best over sizes)."""
    rng = np.random.default_rng(0)
    best_rate = 0.0
    for n in sizes:
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        a @ b  # warm-up (thread pool, pages)
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            best_rate = max(best_rate, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best_rate


def onednn_sgemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 GEMM rate of OpenVINO's CPU plugin (oneDNN): one MatMul, GFLOP/s."""
    import openvino as ov
    import openvino.opset13 as ops

    a = ops.parameter([n, n], np.float32)
    b = ops.constant(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    model = ov.Model([ops.matmul(a, b, False, False)], [a])
    compiled = ov.Core().compile_model(
        model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    )
    x = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    compiled(x)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        compiled(x)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def decode_prepared(paths: list[Path]) -> np.ndarray:
    """The library's decode + resize, sequential: (n, 224, 224, 3) uint8."""
    from snaplook.io_utils import read_image_with_size
    from snaplook.transform_utils import resize_to_square

    return np.stack(
        [resize_to_square(read_image_with_size(p, min_size=224)[0], 224) for p in paths]
    )


def decode_rates(paths: list[Path]) -> dict[str, float]:
    """img/s of decode + resize alone: sequential, and through the library's decode threads."""
    from snaplook import features

    t = time.perf_counter()
    decode_prepared(paths)
    sequential = len(paths) / (time.perf_counter() - t)
    embedder = features.Embedder("resnet50", weights="random")

    def decode(path: Path) -> np.ndarray:
        from snaplook.io_utils import read_image_with_size

        return embedder.prepare(read_image_with_size(path, min_size=224)[0])

    t = time.perf_counter()
    for _item, error in features._decode_ahead(paths, decode, depth=64):
        assert error is None, error
    threaded = len(paths) / (time.perf_counter() - t)
    return {
        "sequential_img_s": sequential,
        f"decode_threads_{features.DECODE_THREADS}_img_s": threaded,
    }


def keras_predict_rate(model, batch: np.ndarray, batch_size: int) -> tuple[float, np.ndarray]:
    """img/s of ``model.predict`` on preprocessed ``batch`` (after a warm-up batch)."""
    model.predict(batch[:batch_size], batch_size=batch_size, verbose=0)
    t = time.perf_counter()
    out = model.predict(batch, batch_size=batch_size, verbose=0)
    return len(batch) / (time.perf_counter() - t), out


def index_rate(folder: Path, n: int, work: Path, embedder) -> float:
    """img/s of the library's build_index with a loaded model (the steady state of a long run).

    Everything per image is timed: decoding, resizing, preprocessing, inference, hashing
    and writing; the one-time model load and compile (about a second) is not.
    """
    from snaplook.indexing import build_index

    out = work / f"index-{embedder.resolved_precision()}"
    t = time.perf_counter()
    summary = build_index(folder, out, embedder=embedder)
    seconds = time.perf_counter() - t
    assert summary.n_indexed == n, summary
    shutil.rmtree(out)
    return n / seconds


def bare_openvino_rates(embedder, pixels: np.ndarray) -> dict[str, float]:
    """img/s of the compiled model alone on prepared uint8 ``pixels`` (no decoding), per mode.

    The model is the library's: preprocessing compiled into the graph, uint8 input.
    ``library chunk C``: the library's ``CompiledModel.infer`` (OpenVINO's throughput
    streams, two queued requests of C images per stream); ``throughput mode``: OpenVINO's
    THROUGHPUT hint with its own number of requests, one image per request.
    """
    import openvino as ov

    from snaplook.runtime import _HINTS, _core, with_preprocessing

    compiled = embedder.load_compiled()
    rates = {}
    for chunk in (4, 8, 16):
        compiled.infer(pixels[:chunk], chunk=chunk)
        t = time.perf_counter()
        compiled.infer(pixels, chunk=chunk)
        rates[f"library chunk {chunk}"] = len(pixels) / (time.perf_counter() - t)
    model = with_preprocessing(
        _core().read_model(str(embedder.ir_path())), embedder.spec_.preprocessing
    )
    tput = _core().compile_model(
        model,
        "CPU",
        {
            "INFERENCE_PRECISION_HINT": _HINTS[embedder.resolved_precision()],
            "PERFORMANCE_HINT": "THROUGHPUT",
        },
    )
    queue = ov.AsyncInferQueue(tput, tput.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    queue.start_async({0: pixels[:1]})
    queue.wait_all()
    t = time.perf_counter()
    for i in range(len(pixels)):
        queue.start_async({0: pixels[i : i + 1]})
    queue.wait_all()
    rates["throughput mode"] = len(pixels) / (time.perf_counter() - t)
    return rates


def litert_rate(model, batch: np.ndarray) -> float:
    """img/s of the LiteRT interpreter (XNNPACK, all cores, batch 1) that OpenVINO replaced."""
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    from snaplook.runtime import cpu_threads

    flatbuffer = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    it = Interpreter(model_content=flatbuffer, num_threads=cpu_threads())
    it.allocate_tensors()
    inp = it.get_input_details()[0]["index"]
    it.set_tensor(inp, np.ascontiguousarray(batch[:1]))
    it.invoke()
    t = time.perf_counter()
    for i in range(len(batch)):
        it.set_tensor(inp, np.ascontiguousarray(batch[i : i + 1]))
        it.invoke()
    return len(batch) / (time.perf_counter() - t)


def fidelity_images(folder: Path, *, augment: int = 3, video_frames: int = 20) -> list[Path]:
    """Real photos (testdata people + video frames), each with ``augment`` augmented copies.

    Written as ``folder/<item>/<view>.jpg`` (labelled folders: the item is the source
    image), deterministically.
    """
    from PIL import Image, ImageEnhance, ImageOps

    from snaplook.io_utils import read_image

    testdata = REPO.parent / "shared" / "testdata"
    sources = [(p.stem, read_image(p)) for p in sorted((testdata / "people").iterdir())]
    video = testdata / "video" / "one-by-one-person-detection.mp4"
    if video.is_file() and video_frames:
        from snaplook.video import iter_frames

        for frame in iter_frames(video, every=6.5, max_frames=video_frames):
            sources.append((f"frame{frame.frame:05d}", frame.image))
    paths = []
    for name, array in sources:
        rng = np.random.default_rng(len(paths))
        image = Image.fromarray(array)
        views = [image]
        w, h = image.size
        for v in range(augment):
            x0, y0 = rng.uniform(0, 0.15, 2)
            s = rng.uniform(0.75, 0.9)
            view = image.crop((int(x0 * w), int(y0 * h), int((x0 + s) * w), int((y0 + s) * h)))
            if v % 2 == 0:
                view = ImageOps.mirror(view)
            view = ImageEnhance.Brightness(view).enhance(float(rng.uniform(0.8, 1.2)))
            view = ImageEnhance.Color(view).enhance(float(rng.uniform(0.8, 1.2)))
            views.append(view.rotate(float(rng.uniform(-8, 8)), fillcolor=(255, 255, 255)))
        for v, view in enumerate(views):
            path = folder / name / f"view{v}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            view.save(path, quality=92)
            paths.append(path)
    return paths


def fidelity_rows(backbone: str, weights: str, work: Path) -> list[dict[str, object]]:
    """(e): bf16 and int8 against fp32 on real photos with real weights, and Recall@1 each."""
    from snaplook.errors import SnaplookError
    from snaplook.features import BACKBONES, Embedder, embed_images
    from snaplook.index import cosine_knn
    from snaplook.metrics import evaluate_embeddings
    from snaplook.runtime import bf16_support

    if backbone not in BACKBONES:
        return [_skipped_row("(e) fidelity", f"backbone {backbone!r} is not available here")]
    if weights == "random":
        return [_skipped_row("(e) fidelity", "needs real weights, not --weights random")]
    paths = fidelity_images(work / "fidelity")
    items = [p.parent.name for p in paths]
    precisions = ["fp32", "int8"] + (["bf16"] if bf16_support() else [])
    feats: dict[str, np.ndarray] = {}
    for precision in precisions:
        try:
            embedder = Embedder(backbone, weights=weights, precision=precision, calibration=paths)
            feats[precision], kept = embed_images(paths, embedder)
        except SnaplookError as exc:
            return [_skipped_row("(e) fidelity", str(exc))]
        assert kept == paths
    k = 10
    _, nn_ref = cosine_knn(feats["fp32"], feats["fp32"], k=k + 1)
    rows = []
    recall = {}
    for precision in precisions:
        metrics = evaluate_embeddings(
            feats[precision], items, feats[precision], items, ks=(1,), leave_one_out=True
        )
        recall[precision] = float(metrics.summary()["recall_at_k"][1])
    for precision in precisions[1:]:
        ref, got = feats["fp32"], feats[precision]
        rel = np.abs(got - ref).max(axis=1) / np.abs(ref).max(axis=1)
        _, nn = cosine_knn(got, got, k=k + 1)
        # Agreement: share of each image's fp32 top-10 (itself excluded) found in its top-10.
        overlap = [len(set(a[1:]) & set(b[1:])) / k for a, b in zip(nn_ref.tolist(), nn.tolist())]
        agreement = float(np.mean(overlap))
        detail = {
            "backbone": backbone,
            "weights": weights,
            "images": len(paths),
            "items": len(set(items)),
            "rel_error_mean": float(rel.mean()),
            "rel_error_max": float(rel.max()),
            "top10_agreement": agreement,
            "identical_top10_queries": int(np.sum(np.all(nn_ref[:, 1:] == nn[:, 1:], axis=1))),
            "recall_at_1": recall[precision],
            "recall_at_1_fp32": recall["fp32"],
        }
        rows.append(
            dict(
                what=f"(e) {precision} vs fp32 ({backbone}): top-10 agreement / R@1",
                value=agreement,
                unit="",
                baseline=None,
                ratio=None,
                target=">= 0.95 agreement (else README + --help say so)",
                ok=agreement >= 0.95,
                detail=detail,
                show=f"agree {agreement:.3f}, rel err max {rel.max():.2e}, R@1 "
                f"{recall[precision]:.3f} (fp32 {recall['fp32']:.3f})",
            )
        )
    return rows


def _skipped_row(what: str, reason: str) -> dict[str, object]:
    return dict(
        what=what, value=None, unit="", baseline=None, ratio=None, target="", ok=None,
        detail={"skipped": reason}, show=f"skipped: {reason}",
    )  # fmt: skip


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
    from snaplook.runtime import _core, bf16_support, cpu_flags, cpu_model, cpu_threads

    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "cores": cpu_threads(),
        "simd": sorted(
            f for f in flags if f in {"avx", "avx2", "fma"} or f.startswith(("avx512", "amx"))
        ),
        "cpu_flags": sorted(flags),
        "bf16_native": bf16_support(),
        "openvino_capabilities": list(_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "load_average_start": os.getloadavg(),
    }


def _row(what, value, unit, baseline, target, ok, detail, ratio=None, show=None):
    if ratio is None and baseline:
        ratio = value / baseline
    return dict(
        what=what, value=value, unit=unit, baseline=baseline, ratio=ratio, target=target,
        ok=ok, detail=detail, show=show,
    )  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, object]:
    from importlib.metadata import version

    from snaplook import __version__
    from snaplook.features import Embedder, WeightsSpec, build_model
    from snaplook.index import cosine_knn
    from snaplook.runtime import bf16_support
    from snaplook.transform_utils import preprocess_caffe

    info = machine()
    info.update(
        snaplook=__version__,
        tensorflow=version("tensorflow"),
        openvino=version("openvino"),
        nncf=version("nncf"),
    )
    rows: list[dict[str, object]] = []
    n_small, n_large = (100, 400) if args.quick else (500, 2000)
    n_round = args.round_images or (48 if args.quick else 384)
    if args.images:
        from snaplook.io_utils import find_images

        photos = find_images(args.images)
        if len(photos) < n_large:
            raise SystemExit(f"{args.images} holds {len(photos)} images, need {n_large}")
    else:
        photos = ensure_photos(DATA / "photos", n_large)
    work = Path(tempfile.mkdtemp(prefix="snaplook-bench-"))
    os.environ.setdefault("SNAPLOOK_CACHE_DIR", str(work / "models"))
    try:
        print("snaplook --help ...", flush=True)
        h = help_timings()
        rows.append(
            _row("snaplook --help wall (min of 10)", h["wall_min_s"], "s", None,
                 "<= 0.3 s, no tensorflow",
                 h["wall_min_s"] <= 0.3 and "tensorflow" not in h["heavy_modules_imported"], h)
        )  # fmt: skip

        # (a)-(d): throughput on the same images.
        round_paths = photos[:n_round]
        round_dir = link_subset(round_paths, work / "round")
        precisions = ["fp32", "int8"] + (["bf16"] if bf16_support() else [])
        print(f"(a-d) preparing models ({', '.join(precisions)}), decoding {n_round} images ...")
        t = time.perf_counter()
        embedders = {
            p: Embedder("resnet50", weights="random", precision=p, calibration=round_paths)
            for p in precisions
        }
        for e in embedders.values():
            e.load_compiled()
        prepare_s = time.perf_counter() - t
        prepared = decode_prepared(round_paths)
        batch = preprocess_caffe(prepared)
        model = build_model("resnet50", WeightsSpec(kind="random", seed=0))
        keras_rates: dict[int, float] = {}
        per_round: list[dict[str, object]] = []
        for r in range(args.rounds):
            gemm = sgemm_gflops()
            onednn = onednn_sgemm_gflops()
            sizes = (8, 16, 32) if r == 0 else (max(keras_rates, key=keras_rates.get),)
            this_keras = 0.0
            for bs in sizes:
                rate, _ = keras_predict_rate(model, batch, bs)
                keras_rates[bs] = max(keras_rates.get(bs, 0.0), rate)
                this_keras = max(this_keras, rate)
            record: dict[str, object] = {
                "sgemm_gflop_s": gemm, "onednn_sgemm_gflop_s": onednn, "keras_img_s": this_keras,
                "decode": decode_rates(round_paths),
            }  # fmt: skip
            for p in precisions:
                record[f"bare_{p}"] = bare_openvino_rates(embedders[p], prepared)
                record[f"index_{p}_img_s"] = index_rate(round_dir, n_round, work, embedders[p])
            per_round.append(record)
            print(
                f"  round {r + 1}: gemm {gemm:.0f} (oneDNN {onednn:.0f}) GFLOP/s, keras "
                f"{this_keras:.1f}, "
                + ", ".join(
                    f"{p} bare {max(record[f'bare_{p}'].values()):.1f} index "
                    f"{record[f'index_{p}_img_s']:.1f}"
                    for p in precisions
                )
                + f" img/s, decode {record['decode']}, load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
        best_bs = max(keras_rates, key=keras_rates.get)
        keras_best = keras_rates[best_bs]

        def best(key: str) -> float:
            return max(
                max(r[key].values()) if isinstance(r[key], dict) else r[key] for r in per_round
            )

        bare_fp32, index_fp32 = best("bare_fp32"), best("index_fp32_img_s")
        gemm_best, onednn_best = best("sgemm_gflop_s"), best("onednn_sgemm_gflop_s")
        ceiling = gemm_best / RESNET50_GFLOP
        paired_a = [r["index_fp32_img_s"] / max(r["bare_fp32"].values()) for r in per_round]
        common = {"images_per_round": n_round, "rounds": per_round, "prepare_models_s": prepare_s}
        rows.append(
            _row("(a) index fp32 vs bare OpenVINO fp32", index_fp32, "img/s", bare_fp32,
                 ">= 0.9", index_fp32 / bare_fp32 >= 0.9,
                 {**common, "median_paired_ratio": statistics.median(paired_a)})
        )  # fmt: skip
        rows.append(
            _row(f"(b) bare OpenVINO fp32 vs FLOP ceiling (SGEMM {gemm_best:.0f} GFLOP/s / 7.7)",
                 bare_fp32, "img/s", ceiling, ">= 0.85", bare_fp32 / ceiling >= 0.85,
                 {"sgemm_gflop_s": gemm_best, "onednn_sgemm_gflop_s": onednn_best,
                  "ratio_vs_onednn_ceiling": bare_fp32 / (onednn_best / RESNET50_GFLOP),
                  "gflop_per_image": RESNET50_GFLOP})
        )  # fmt: skip
        rows.append(
            _row(f"(c) index fp32 vs Keras predict (batch {best_bs})", index_fp32, "img/s",
                 keras_best, "report", None, {"keras_predict_img_s_by_batch": keras_rates})
        )  # fmt: skip
        for p in precisions[1:]:
            index_p, bare_p = best(f"index_{p}_img_s"), best(f"bare_{p}")
            amx = "amx_bf16" in info["cpu_flags"]
            target = ">= 5x (bf16 on AMX)" if p == "bf16" and amx else "report"
            rows.append(
                _row(f"(d) index {p} vs Keras predict (batch {best_bs})", index_p, "img/s",
                     keras_best, target, index_p / keras_best >= 5 if target != "report" else None,
                     {"bare_img_s": bare_p, "bare_vs_keras": bare_p / keras_best,
                      "index_vs_index_fp32": index_p / index_fp32, "native": info["bf16_native"]})
            )  # fmt: skip
        if args.litert:
            print("LiteRT (replaced runtime) ...", flush=True)
            rate = litert_rate(model, batch)
            rows.append(
                _row("LiteRT bare (XNNPACK, batch 1) vs bare OpenVINO fp32", rate, "img/s",
                     bare_fp32, "report (LiteRT kept only where it wins)", None, {})
            )  # fmt: skip
        del model, batch, prepared, embedders

        print(f"(e) fidelity ({args.fidelity_backbone}, {args.fidelity_weights}) ...", flush=True)
        rows.extend(fidelity_rows(args.fidelity_backbone, args.fidelity_weights, work))

        # (f) peak RSS of the command itself.
        print(f"(f) peak RSS: snaplook index of {n_small} and {n_large} images ...", flush=True)
        exe = str(Path(sys.executable).parent / "snaplook")
        rss = {}
        for n in (n_small, n_large):
            folder = link_subset(photos[:n], work / f"rss{n}")
            cmd = [exe, "index", str(folder), "--out", str(work / f"rss-index-{n}")]
            cmd += ["--weights", "random", "--quiet"]
            peak, seconds, _ = peak_rss_of(cmd)
            rss[n] = {"peak_rss_mb": peak / 2**20, "seconds": seconds, "img_s": n / seconds}
            shutil.rmtree(work / f"rss-index-{n}", ignore_errors=True)
        growth = rss[n_large]["peak_rss_mb"] / rss[n_small]["peak_rss_mb"]
        rows.append(
            _row(f"(f) peak RSS, index {n_large} vs {n_small} images",
                 rss[n_large]["peak_rss_mb"], "MB", rss[n_small]["peak_rss_mb"],
                 "< 1.15x, <= 2048 MB", growth < 1.15 and rss[n_large]["peak_rss_mb"] <= 2048, rss)
        )  # fmt: skip

        n_gallery = 20_000 if args.quick else 100_000
        print(f"search: 1000 queries against {n_gallery} x 2048 ...", flush=True)
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
            _row(f"query 1000 x {n_gallery}: cosine_knn vs GEMM+argpartition", t_lib, "s",
                 t_bare, ">= 0.8", t_bare / t_lib >= 0.8,
                 {"same_neighbours_fraction": agree, "k": 10}, ratio=t_bare / t_lib)
        )  # fmt: skip
        del gallery, queries
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info["load_average_end"] = os.getloadavg()
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
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
        value = r.get("show") or f"{r['value']:.3g} {r['unit']}".strip()
        base = "" if r["baseline"] is None else f"{r['baseline']:.3g} {r['unit']}".strip()
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        verdict = "" if r["ok"] is None else "PASS" if r["ok"] else "FAIL"
        lines.append((r["what"], value, base, ratio, r["target"], verdict))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
    print(fmt.format(*header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for line in lines:
        print(fmt.format(*line))
    m = result["machine"]
    print(
        f"\n{m['cpu']}, {m['cores']} cores ({', '.join(m['simd'])}; native bf16: "
        f"{m['bf16_native']}), load average "
        f"{m['load_average_start'][0]:.1f} -> {m['load_average_end'][0]:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, help="folder of JPEGs instead of generated ones")
    parser.add_argument(
        "--quick", action="store_true", help="smaller counts (RSS 100/400, gallery 20k)"
    )
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds, best kept")
    parser.add_argument("--litert", action="store_true", help="also time LiteRT (replaced)")
    parser.add_argument("--fidelity-backbone", default="efficientnet_lite0", help="for (e)")
    parser.add_argument("--fidelity-weights", default="imagenet", help="for (e); not random")
    parser.add_argument(
        "--round-images",
        type=int,
        default=0,
        help="images per throughput round (a-d), default 384 (48 with --quick)",
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
