"""Approximate nearest-neighbour search with FAISS: choosing, building, saving, checking.

An index folder may hold ``ann.faiss`` (FAISS's own file format, never pickle) beside
``features.npy``; ``meta.json["ann"]`` records how it was built and what it belongs to.
Candidates from FAISS are re-ranked exactly against ``features.npy``, so every distance
reported is the true cosine distance 1 - cos.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snaplook.errors import SnaplookError
from snaplook.options import (
    ANN_KINDS,
    AUTO_EXACT_BELOW,
    AUTO_HNSW_BELOW,
    DEFAULT_ANN,
    DEFAULT_EF,
    DEFAULT_NPROBE,
)

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

ANN_FILE = "ann.faiss"
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
#: FAISS candidates per wanted neighbour that are re-ranked exactly from the features:
#: PQ codes rank coarsely, so IVF-PQ needs more of them than HNSW's full vectors.
RERANK_HNSW = 2
RERANK_IVFPQ = 10
#: Dimension that features wider than twice this are projected to (PCA) for the FAISS
#: index (the re-rank uses the full features).
PCA_DIM = 256
#: HNSW over more rows than this, of features wider than 2 * PCA_DIM, is built on PCA'd rows.
HNSW_PCA_FROM = 10_000
#: IVF-PQ needs enough rows to train its lists and 16-centroid sub-quantizers.
IVFPQ_MIN_ROWS = 1_000
#: Rows sampled for the fingerprint of a features matrix.
FINGERPRINT_ROWS = 64
_ADD_BLOCK = 65_536


@dataclass(frozen=True)
class AnnPlan:
    """What to build: ``kind`` (hnsw, ivfpq or factory), the FAISS factory string, metric."""

    kind: str
    factory: str
    metric: str  # "inner_product" or "l2"; on unit rows both rank like cosine
    rerank: int
    n_train: int


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:
        raise SnaplookError(
            f"approximate search needs FAISS, which cannot be imported ({exc}); "
            "`pip install faiss-cpu` (or the GPU build), or use --ann none / --exact."
        ) from exc
    return faiss


def check_ann_spec(spec: str) -> str:
    """Validate an ``--ann`` value: a keyword of :data:`ANN_KINDS` or a factory string.

    A factory string is checked by building it empty for a few common feature widths
    (2048, 1280, 512, 256, 128); the final check happens at build time with the real one.

    Raises:
        SnaplookError: not a keyword and FAISS cannot parse it.
    """
    spec = spec.strip()
    if spec.lower() in ANN_KINDS:
        return spec.lower()
    faiss = _faiss()

    if "idmap" in spec.lower():
        raise SnaplookError(
            f"--ann {spec!r}: IDMap indexes are not supported (rows are the ids); drop IDMap."
        )
    errors = []
    for d in (2048, 1280, 512, 256, 128):
        try:
            faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
            return spec
        except RuntimeError as exc:
            errors.append(str(exc).strip().splitlines()[-1] if str(exc).strip() else "")
    raise SnaplookError(
        f"--ann {spec!r} is neither one of {', '.join(ANN_KINDS)} nor a FAISS index-factory "
        f"string FAISS can build ({errors[0][:120]}); see the faiss wiki 'The index factory'."
    )


def plan_ann(spec: str, n: int, d: int) -> AnnPlan | None:
    """Choose the FAISS index for ``n`` rows of dimension ``d``; None means exact search.

    ``auto`` is exact below :data:`AUTO_EXACT_BELOW` rows, HNSW below
    :data:`AUTO_HNSW_BELOW`, IVF-PQ (PCA to 256 first when ``d`` > 512) beyond.
    """
    spec = check_ann_spec(spec)
    if spec == "auto":
        spec = "none" if n < AUTO_EXACT_BELOW else "hnsw" if n < AUTO_HNSW_BELOW else "ivfpq"
    if spec == "none":
        return None
    if spec == "hnsw":
        if d > 2 * PCA_DIM and n >= HNSW_PCA_FROM:
            # Full-width HNSW keeps a second copy of every vector (8 KB a row at 2048-d);
            # on PCA'd rows it is 8x smaller and faster, and the exact re-rank of 10
            # candidates per neighbour recovers the recall (bench_ann.py, 100k x 2048).
            factory = f"PCA{PCA_DIM},HNSW{HNSW_M}"
            return AnnPlan("hnsw", factory, "l2", RERANK_IVFPQ, min(n, 50_000))
        return AnnPlan("hnsw", f"HNSW{HNSW_M}", "inner_product", RERANK_HNSW, 0)
    if spec == "ivfpq":
        return _plan_ivfpq(n, d)
    # PCA centres the data, which changes inner products but not L2 distances; on unit
    # rows L2 ranks exactly like cosine, so a projecting factory string searches in L2.
    metric = "l2" if "PCA" in spec.upper() else "inner_product"
    _factory_for(spec, d, metric)
    upper = spec.upper()
    n_train = min(n, 100_000) if any(t in upper for t in ("IVF", "PQ", "PCA", "SQ")) else 0
    # Compressed or projected vectors rank coarsely: re-rank more candidates exactly.
    lossy = any(t in upper for t in ("PQ", "PCA", "SQ", "LSH", "RR"))
    return AnnPlan("factory", spec, metric, RERANK_IVFPQ if lossy else RERANK_HNSW, n_train)


def _factory_for(spec: str, d: int, metric: str) -> Any:
    faiss = _faiss()

    try:
        return faiss.index_factory(
            d, spec, faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
        )
    except RuntimeError as exc:
        raise SnaplookError(
            f"--ann {spec!r}: FAISS cannot build it for {d}-d features "
            f"({str(exc).strip().splitlines()[-1][:120]}); choose another --ann."
        ) from exc


def _plan_ivfpq(n: int, d: int) -> AnnPlan:
    import math

    if n < IVFPQ_MIN_ROWS:
        raise SnaplookError(
            f"--ann ivfpq needs at least {IVFPQ_MIN_ROWS:,} images to train, the gallery has "
            f"{n:,}; use --ann auto, none or hnsw."
        )

    # sqrt(n) lists (a power of two), each trained on at least 39 points as FAISS asks.
    nlist = max(1, min(2 ** round(math.log2(max(1.0, math.sqrt(n)))), n // 39))
    n_train = min(n, max(50 * nlist, 20_000))
    d_in = PCA_DIM if d > 2 * PCA_DIM else d
    # 4-bit fast-scan PQ (SIMD lookups) on 2-d sub-vectors: an order of magnitude faster
    # to train and scan than 8-bit PQ, and as accurate after the exact re-rank. Features
    # have a decaying spectrum; a random rotation (PCAR: PCA, then rotation) spreads the
    # variance evenly over the sub-quantizers (recall@10 0.92 -> 0.98 in bench_ann.py).
    m = max(2, d_in // 2)
    prefix = f"PCAR{d_in}," if d_in != d else f"RR{d},"
    factory = f"{prefix}IVF{nlist},PQ{m}x4fs"
    metric = "l2" if d_in != d else "inner_product"
    return AnnPlan("ivfpq", factory, metric, RERANK_IVFPQ, n_train)


def _features_fingerprint(features: np.ndarray) -> str:
    """SHA-256 of a features matrix's shape and of :data:`FINGERPRINT_ROWS` evenly spaced
    rows (first and last included): cheap on a memory-mapped 80 GB file, and enough to
    tell one gallery's features from another's."""
    import numpy as np

    n, d = features.shape
    digest = hashlib.sha256(f"{n}x{d}".encode())
    if n:
        rows = np.unique(np.linspace(0, n - 1, min(n, FINGERPRINT_ROWS)).astype(np.int64))
        digest.update(np.ascontiguousarray(features[rows], dtype="<f4").tobytes())
    return digest.hexdigest()


def build_ann(
    features: np.ndarray,
    folder: str | Path,
    *,
    spec: str = DEFAULT_ANN,
    seed: int = 0,
) -> dict[str, Any]:
    """Build the FAISS index ``spec`` asks for over ``features`` and save it in ``folder``.

    Training (IVF, PQ, PCA) uses a seeded random sample of rows; rows are added in order,
    so FAISS id i is features row i. The file is written atomically as ``ann.faiss``.

    Args:
        features: ndarray of shape (n, d), float32, unit rows (may be memory-mapped).
        folder: the index folder being assembled.
        spec: ``auto``, ``none``, ``hnsw``, ``ivfpq`` or a FAISS factory string.
        seed: seeds the training sample and FAISS's k-means.

    Returns:
        The ``meta.json["ann"]`` block: ``{"requested": spec, "kind": "exact"}`` when
        exact search was chosen, else kind, factory, metric, parameters, file size and
        SHA-256, and the fingerprint of the features it belongs to.

    Raises:
        SnaplookError: FAISS cannot build ``spec`` for this dimension or gallery size.
    """
    faiss = _faiss()
    import numpy as np

    from snaplook.io_utils import atomic_path, file_sha256

    started = time.perf_counter()
    n, d = features.shape
    plan = plan_ann(spec, n, d)
    if plan is None:
        return {"requested": spec, "kind": "exact"}
    index = _factory_for(plan.factory, d, plan.metric)
    hnsw = _hnsw_of(index)
    if hnsw is not None:
        hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        hnsw.hnsw.efSearch = DEFAULT_EF
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = min(DEFAULT_NPROBE, ivf.nlist)
        ivf.cp.seed = seed
        _train_on_gpu(ivf, faiss)
    n_train = 0 if index.is_trained else _train(index, ivf, features, plan, spec=spec, seed=seed)
    for start in range(0, n, _ADD_BLOCK):
        index.add(np.ascontiguousarray(features[start : start + _ADD_BLOCK], dtype=np.float32))
    target = Path(folder) / ANN_FILE
    with atomic_path(target) as tmp:
        faiss.write_index(index, str(tmp))
    block = {
        "requested": spec,
        "kind": plan.kind,
        "factory": plan.factory,
        "metric": plan.metric,
        "file": ANN_FILE,
        "bytes": target.stat().st_size,
        "sha256": file_sha256(target),
        "ntotal": int(index.ntotal),
        "dim": int(d),
        "features_fingerprint": _features_fingerprint(features),
        "rerank": plan.rerank,
        "train_rows": n_train,
        "seed": seed,
        "params": {
            **({"efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": DEFAULT_EF} if hnsw else {}),
            **({"nlist": int(ivf.nlist), "nprobe": int(ivf.nprobe)} if ivf is not None else {}),
        },
        "faiss_version": faiss.__version__,
        "build_seconds": round(time.perf_counter() - started, 3),
    }
    logger.info("built %s over %d rows in %.1f s", plan.factory, n, block["build_seconds"])
    return block


def _train(
    index: Any, ivf: Any, features: np.ndarray, plan: AnnPlan, *, spec: str, seed: int
) -> int:
    """Train ``index`` on a seeded sample of ``features`` rows; returns the sample size."""
    import numpy as np

    n = features.shape[0]
    n_train = max(plan.n_train, 1)
    if n < n_train or n < getattr(ivf, "nlist", 1):
        raise SnaplookError(
            f"--ann {spec!r} ({plan.factory}) needs at least "
            f"{max(n_train, getattr(ivf, 'nlist', 1))} rows to train, the gallery has "
            f"{n}; use --ann auto or none."
        )
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=n_train, replace=False))
    sample = np.ascontiguousarray(features[rows], dtype=np.float32)
    try:
        index.train(sample)
    except RuntimeError as exc:
        raise SnaplookError(
            f"--ann {spec!r}: FAISS could not train {plan.factory!r} on {n_train} rows "
            f"({str(exc).strip().splitlines()[-1]}); use --ann auto or another factory."
        ) from exc
    return n_train


def _train_on_gpu(ivf: Any, faiss: Any) -> None:
    # The GPU build of FAISS trains the coarse quantizer's k-means on the GPU; the index
    # itself stays a CPU index, so the saved file is the same kind either way.
    if getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
        try:
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
        except (AttributeError, RuntimeError) as exc:  # a GPU build without working devices
            logger.warning("training on the CPU: the GPU build of FAISS failed (%s)", exc)
        else:
            logger.info("training the IVF quantizer on %d GPU(s)", faiss.get_num_gpus())


def _hnsw_of(index: Any) -> Any:
    faiss = _faiss()

    inner = (
        faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
    )
    return inner if isinstance(inner, faiss.IndexHNSW) else None


class AnnIndex:
    """A loaded, checked FAISS index over an index folder's features.

    Attributes:
        meta: the ``meta.json["ann"]`` block.
        faiss_index_: the FAISS index (row i of the features is FAISS id i).
    """

    def __init__(self, meta: dict[str, Any], faiss_index: Any) -> None:
        self.meta = meta
        self.faiss_index_ = faiss_index

    @property
    def kind(self) -> str:
        return str(self.meta.get("kind"))

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        features: np.ndarray,
        allowed: np.ndarray | None = None,
        nprobe: int | None = None,
        ef: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Approximate cosine k-NN: FAISS candidates, re-ranked exactly from ``features``.

        Args:
            queries: ndarray of shape (m, d), unit rows.
            k: neighbours per query.
            features: the index's ndarray of shape (n, d), unit rows.
            allowed: bool ndarray of shape (n,): only these rows may be returned (FAISS
                ``IDSelectorBitmap``).
            nprobe: IVF lists visited per query (IVF indexes only).
            ef: HNSW search breadth (HNSW indexes only); raised to the candidate count.

        Returns:
            (distances, rows) of shape (m, k), nearest first; where fewer than k rows were
            found, rows are -1 and distances inf.
        """
        faiss = _faiss()
        import numpy as np

        n = features.shape[0]
        n_cand = min(n, k * int(self.meta.get("rerank", 1)))
        bits = sel = None
        share = 1.0
        if allowed is not None:
            bits = np.packbits(allowed.astype(np.uint8), bitorder="little")
            sel = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bits))
            share = max(float(allowed.mean()), 1e-9)
        params, inner_params = self._params(
            faiss, nprobe=nprobe, ef=ef, n_cand=n_cand, sel=sel, share=share
        )
        _, cand = self.faiss_index_.search(
            np.ascontiguousarray(queries, dtype=np.float32), n_cand, params=params
        )
        del bits, sel, inner_params  # the C++ parameters point into these until here
        return _rerank_exact(queries, cand, features, k)

    def _params(
        self, faiss: Any, *, nprobe: int | None, ef: int | None, n_cand: int, sel: Any, share: float
    ) -> tuple[Any, Any]:
        import math

        index = self.faiss_index_
        pre = isinstance(index, faiss.IndexPreTransform)
        inner = faiss.downcast_index(index.index) if pre else index
        ivf = faiss.try_extract_index_ivf(inner)
        # A filter that keeps a share s of the rows leaves s as many candidates per list
        # or graph step: widen the search by 1/s so about as many allowed rows are seen.
        if ivf is not None:
            probe = math.ceil((nprobe or ivf.nprobe) / share)
            params = faiss.SearchParametersIVF(sel=sel, nprobe=min(probe, ivf.nlist))
        elif isinstance(inner, faiss.IndexHNSW):
            breadth = max(min(math.ceil((ef or DEFAULT_EF) / share), 4096), n_cand)
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=breadth)
        else:
            params = faiss.SearchParameters(sel=sel)
        if nprobe is not None and ivf is None:
            logger.warning("--nprobe applies to IVF indexes; %s has none, ignored", self.kind)
        if ef is not None and not isinstance(inner, faiss.IndexHNSW):
            logger.warning("--ef applies to HNSW indexes; %s is not one, ignored", self.kind)
        if pre:
            return faiss.SearchParametersPreTransform(index_params=params), params
        return params, params


def _rerank_exact(
    queries: np.ndarray, candidates: np.ndarray, features: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine distances of candidate rows, best ``k`` per query.

    Args:
        queries: ndarray of shape (m, d), unit rows.
        candidates: int ndarray of shape (m, c), gallery rows; -1 marks none.
        features: ndarray of shape (n, d), unit rows.
        k: results per query.

    Returns:
        (distances, rows) of shape (m, k): 1 - cos ascending, ties by row; missing
        results are row -1 at distance inf.
    """
    import numpy as np

    m, c = candidates.shape
    dist = np.full((m, max(k, c)), np.inf, dtype=np.float32)
    rows = np.full((m, max(k, c)), -1, dtype=np.int64)
    valid = candidates >= 0
    if valid.any():
        uniq, inverse = np.unique(candidates[valid], return_inverse=True)
        vectors = np.asarray(features[uniq], dtype=np.float32)
        pos = np.zeros(candidates.shape, dtype=np.int64)
        pos[valid] = inverse
        step = max(1, (1 << 26) // max(1, c * vectors.shape[1]))  # ~256 MB of gathered rows
        for s in range(0, m, step):
            sims = np.einsum("md,mcd->mc", queries[s : s + step], vectors[pos[s : s + step]])
            d = np.clip(1.0 - sims, 0.0, 2.0).astype(np.float32)
            dist[s : s + step, :c] = np.where(valid[s : s + step], d, np.inf)
        rows[:, :c] = np.where(valid, candidates, -1)
    order = np.lexsort((np.where(rows < 0, np.iinfo(np.int64).max, rows), dist), axis=1)
    dist = np.take_along_axis(dist, order, axis=1)[:, :k]
    rows = np.take_along_axis(rows, order, axis=1)[:, :k]
    return dist, rows


#: What ``meta.json``'s ``ann.file`` may name: a bare file name in the index folder.
_ANN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*\.faiss")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def ann_file(folder: str | Path, meta: dict[str, Any]) -> Path:
    """The FAISS file ``meta.json["ann"]`` names, confined to the index folder.

    Args:
        folder: the index folder.
        meta: the ``meta.json["ann"]`` block.

    Returns:
        The file's path (``folder/<name>``, a regular file whose real path lies in
        ``folder``).

    Raises:
        SnaplookError: ``ann.file`` is not a bare ``<name>.faiss`` file name, the file is
            missing, a symlink out of the folder, or refused by the input gate; the
            message names the file and the field.
    """
    from snaplook.io_utils import check_input, display_path

    folder = Path(folder)
    meta_path = folder / "meta.json"
    name = meta.get("file", ANN_FILE)
    # The name becomes a path: only a file name of the folder, never "../x" or "/etc/x".
    if not isinstance(name, str) or not _ANN_NAME.fullmatch(name):
        raise SnaplookError(
            f"{meta_path}: field ann.file must be a file name like {ANN_FILE!r} in the index "
            f"folder, got {_describe(name)}; rebuild the index or query it with --exact."
        )
    path = folder / name
    if not path.is_file():
        raise SnaplookError(
            f"{path} is missing but meta.json names it (field ann.file); rebuild the index "
            f"(`snaplook index DIR --out {folder}`) or query it with --exact."
        )
    try:
        inside = path.resolve().parent == folder.resolve()
    except (OSError, RuntimeError):
        inside = False
    if not inside:
        raise SnaplookError(
            f"{display_path(path)} (field ann.file of {meta_path}) leads out of the index "
            "folder; refusing to read it. Rebuild the index or query it with --exact."
        )
    check_input(path, kind="file")
    return path


def _describe(value: Any) -> str:
    """A field's value for a message: its type, and short text only for short strings."""
    if isinstance(value, str) and len(value) <= 60 and value.isprintable():
        return repr(value)
    return f"a {type(value).__name__}"


def load_ann(folder: str | Path, meta: dict[str, Any], features: np.ndarray) -> AnnIndex | None:
    """Load ``ann.faiss`` and check it belongs to ``features``; None for an exact index.

    The file is confined to ``folder`` (:func:`ann_file`) and its SHA-256 is compared with
    ``meta.json``'s before FAISS parses a byte of it: FAISS only ever reads the file this
    index was built with.

    Raises:
        SnaplookError: ``ann.file`` or ``ann.sha256`` is malformed, the file is missing,
            outside the folder or unreadable, its SHA-256 differs from ``meta.json``'s (a
            swapped file), its row count or dimension differ from the features', or the
            features are not the ones it was built over.
    """
    from snaplook.io_utils import file_sha256

    folder = Path(folder)
    if meta is not None and not isinstance(meta, dict):
        raise SnaplookError(
            f"{folder / 'meta.json'}: field ann must be an object, got {_describe(meta)}; "
            "rebuild the index or query it with --exact."
        )
    if not meta or meta.get("kind") in (None, "exact"):
        return None
    hint = f"rebuild the index (`snaplook index DIR --out {folder}`) or query it with --exact"
    want = meta.get("sha256")
    if not isinstance(want, str) or not _SHA256.fullmatch(want):
        raise SnaplookError(
            f"{folder / 'meta.json'}: field ann.sha256 must be 64 hex digits, got "
            f"{_describe(want)}; {hint}."
        )
    path = ann_file(folder, meta)
    if file_sha256(path) != want:
        raise SnaplookError(
            f"{path} is not the file this index was built with (SHA-256 differs from "
            f"meta.json's ann.sha256): a swapped or changed file; {hint}."
        )
    faiss = _faiss()
    try:
        index = faiss.read_index(str(path))
    except (OSError, RuntimeError, ValueError, MemoryError) as exc:
        # Not FAISS's words: they may quote the file's first bytes.
        raise SnaplookError(f"{path}: not a readable FAISS index; {hint}.") from exc
    n, d = features.shape
    if index.d != d:
        raise SnaplookError(
            f"{path} has dimension {index.d} but features.npy has {d}: it belongs to another "
            f"index; {hint}."
        )
    if index.ntotal != n:
        raise SnaplookError(
            f"{path} holds {index.ntotal} rows but features.npy has {n}: it belongs to "
            f"another index or an older build; {hint}."
        )
    if _features_fingerprint(features) != meta.get("features_fingerprint"):
        raise SnaplookError(
            f"{path} was built over other features than {folder / 'features.npy'} "
            f"(fingerprint differs); {hint}."
        )
    return AnnIndex(meta, index)
