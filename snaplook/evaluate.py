"""DeepFashion retrieval evaluation runs: embed a split, rank, and write a report folder.

:func:`evaluate` scores one setting on a :class:`~snaplook.datasets.Split` (read by
:mod:`snaplook.datasets`, ranked by :mod:`snaplook.metrics`) and writes ``report.md`` with
its figures; :func:`evaluate_settings` compares several settings side by side.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snaplook.datasets import Sample, Split, check_crop, load_split, resolve_bbox
from snaplook.errors import SnaplookError
from snaplook.features import (
    Embedder,
    embed_cached,
    embedder_runtime,
    get_backbone,
    is_random_weights,
)
from snaplook.io_utils import timestamp
from snaplook.metrics import (
    METRIC_DEFINITIONS,
    QueryMetrics,
    check_ks,
    check_normalization,
    check_ties,
    evaluate_embeddings,
    rank_metrics,
)
from snaplook.options import (
    DEFAULT_BACKBONE,
    DEFAULT_BATCH_SIZE,
    DEFAULT_C2S_SUBSET,
    DEFAULT_CACHE_DIR,
    DEFAULT_CROP,
    DEFAULT_EVAL_ROOT,
    DEFAULT_KS,
    DEFAULT_N_EXAMPLES,
    DEFAULT_NORMALIZATION,
    DEFAULT_PRECISION,
    DEFAULT_PROTOCOL,
    DEFAULT_RUNTIME,
    DEFAULT_SEED,
    DEFAULT_TIES,
    DEFAULT_TTA,
    DEFAULT_WEIGHTS,
    POOLINGS,
    TTAS,
)
from snaplook.postprocess import (
    Postprocessing,
    leave_one_out_distances,
    postprocess_features,
    refits_per_query,
)

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)


PER_QUERY_HEADER = (
    "query",
    "item",
    "category",
    "status",
    "n_relevant",
    "first_hit_rank",
    "ap",
    "map_at_r",
)


@dataclass
class Report:
    """One evaluation: its configuration, counts, metrics and the files written.

    Attributes:
        config: what was evaluated and how (protocol, files, backbone, weights identity,
            preprocessing, pooling, normalisation, crop, ks, tie rule, ...).
        counts: images and queries: listed, missing, unreadable, evaluated, excluded.
        metrics: overall means (see :meth:`QueryMetrics.summary`).
        per_category: category -> the same means over its queries.
        per_query: one dict per query (the rows of ``per_query.csv``).
        out: the report folder, or None when nothing was written.
        files: name -> path of each file written.
        seconds: {"embedding": ..., "ranking": ...} wall times.
        skipped: (path, reason) of each listed-but-missing or unreadable image
            (``skipped.csv``).
    """

    config: dict[str, Any]
    counts: dict[str, int]
    metrics: dict[str, Any]
    per_category: dict[str, dict[str, Any]]
    per_query: list[dict[str, Any]]
    out: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def recall_at_k(self) -> dict[int, float | None]:
        """{k: hit rate}: the DeepFashion Recall@K."""
        return self.metrics["recall_at_k"]

    def to_dict(self) -> dict[str, Any]:
        """The content of ``report.json``."""
        return {
            "snaplook_report": 1,
            "config": self.config,
            "counts": self.counts,
            "metrics": _json_metrics(self.metrics),
            "definitions": METRIC_DEFINITIONS,
            "per_category": {c: _json_metrics(m) for c, m in self.per_category.items()},
            "seconds": self.seconds,
            "files": {name: path.name for name, path in self.files.items()},
        }


def _json_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    out = dict(metrics)
    for key in ("recall_at_k", "mmfashion_recall_at_k"):
        out[key] = {str(k): v for k, v in metrics[key].items()}
    return out


@dataclass
class Comparison:
    """Several settings evaluated on the same split (``compare.md`` / ``compare.json``).

    Attributes:
        reports: one :class:`Report` per setting, in the order run.
        out: the folder written.
        files: name -> path of the comparison files (empty for a single setting).
    """

    reports: list[Report]
    out: Path
    files: dict[str, Path] = field(default_factory=dict)


def _setting_name(backbone: str, pooling: str, normalization: str, tta: str = "none") -> str:
    name = f"{backbone}-{pooling}-{normalization}"
    return name if tta == "none" else f"{name}+{tta}"


def evaluate(
    root: str | Path,
    *,
    protocol: str = DEFAULT_PROTOCOL,
    partition: str | Path | None = None,
    bbox: str | Path | None = None,
    crop: str = DEFAULT_CROP,
    backbone: str | None = None,
    weights: str | Path | None = None,
    pooling: str | None = None,
    normalization: str = DEFAULT_NORMALIZATION,
    postprocessing: Postprocessing | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    ties: str = DEFAULT_TIES,
    out: str | Path | None = None,
    strict: bool = False,
    subset: str = DEFAULT_C2S_SUBSET,
    seed: int = DEFAULT_SEED,
    batch_size: int | None = None,
    cache_dir: str | Path | None = None,
    n_examples: int = DEFAULT_N_EXAMPLES,
    runtime: str = "auto",
    precision: str = "fp32",
    embedder: Any = None,
    split: Split | None = None,
    head: Any = None,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_stage: Callable[[str, int], None] | None = None,
) -> Report:
    """Evaluate one backbone on a retrieval protocol and write a report folder.

    Loads the split (:func:`~snaplook.datasets.load_split`), embeds query and gallery images
    through the feature cache (``features.embed_cached``), ranks the gallery for every query
    in blocks (:func:`~snaplook.metrics.evaluate_embeddings`) and writes, atomically, into
    ``out``: ``report.json``, ``per_query.csv``, ``recall_at_k.png``,
    ``worst_queries_grid.png``, ``random_queries_grid.png`` and ``report.md``.

    Args:
        root: dataset root (see :func:`~snaplook.datasets.load_split`).
        protocol: "inshop" (default), "consumer2shop" or "folders".
        partition: partition file; default: found under ``root``.
        bbox: box file; default for ``crop="gt"``: ``list_bbox_<protocol>.txt`` under
            ``root`` or ``root/Anno``.
        crop: "none" (whole image, default) or "gt" (crop to the ground-truth box).
        backbone, weights, pooling, seed: the embedder (ignored when ``embedder`` is
            given); defaults: resnet50, imagenet, avg, 0.
        normalization: "l2" (cosine, default), "centered" or "none" (Euclidean).
        postprocessing: training-free steps after the embedding (PCA-whitening fitted on
            the gallery, alpha-DBA, alpha-QE; see :mod:`snaplook.postprocess`); they rank
            by cosine and need ``normalization="l2"``. In leave-one-out, whitening and DBA
            are refitted without each query (up to 1,000 images). The setting's name gets
            ``+<steps>``, e.g. ``+pca-qe1``. Default none.
        ks: Recall@K cut-offs, default=(1, 5, 10, 20, 30, 50).
        ties: tie rule, default="pessimistic" (see :data:`~snaplook.options.TIE_RULES`).
        out: report folder (replaced atomically when complete); default
            ``output/eval/<root name>-<protocol>-<backbone>-<pooling>-<normalization>``.
        strict: fail on listed-but-missing or unreadable images instead of counting them.
        subset: Consumer-to-shop status evaluated, default="test".
        batch_size: images per forward pass, default=32.
        cache_dir: feature cache folder, default="output/cache/features".
        n_examples: queries in the worst and in the random grid, default=8.
        runtime, precision: see :class:`~snaplook.features.Embedder` (ignored when
            ``embedder`` is given); int8 is calibrated on a seeded sample of the gallery.
        embedder: a ready :class:`~snaplook.features.Embedder` (or anything with its
            ``identity``/``prepare``/``embed``/``input_size``/``feature_dim``).
        split: an already loaded :class:`~snaplook.datasets.Split` (skips reading the
            partition again).
        head: a trained ``snaplook.train.Head``: the cached backbone features are mapped
            through it before ranking (the setting name gets ``+<head name>``).
        on_start: called with the number of images to embed (0 when cached).
        on_progress: called with the number embedded so far, and with ``on_stage`` also
            with the number of queries ranked so far.
        on_stage: called with (description, total) when embedding and ranking start,
            for one progress bar that follows both stages.

    Returns:
        :class:`Report`.

    Raises:
        SnaplookError: bad protocol files, missing images with ``strict``, unknown
            settings, unloadable weights, no query with a same-item gallery image.
    """
    # Long on purpose: over 80 lines only through its signature and docstring; the keyword
    # parameters are the public API (the CLI, notebooks and tests call it with them); the
    # stages are helpers.
    import time

    ks = check_ks(ks)
    check_ties(ties)
    check_crop(crop)
    check_normalization(normalization)
    post = _check_postprocessing(postprocessing, normalization)
    root = Path(root)
    if split is None:
        split = load_split(
            root,
            protocol=protocol,
            partition=partition,
            bbox=resolve_bbox(root, protocol, bbox, crop),
            strict=strict,
            subset=subset,
        )
        warn_ks_over_gallery(split, ks)
    if embedder is None:
        embedder = _make_embedder(backbone, weights, pooling, seed, runtime, precision)
    if getattr(embedder, "calibrate_on", None) and embedder.resolved_precision() == "int8":
        embedder.calibrate_on([split.root / s.path for s in split.gallery])
    identity, name = _identity_and_name(embedder, normalization, head)
    name += f"+{post.name()}" if post.active else ""
    out = (
        Path(out) if out is not None else DEFAULT_EVAL_ROOT / f"{root.name}-{split.protocol}-{name}"
    )
    embedded = _embed_split(
        split,
        embedder,
        crop=crop,
        head=head,
        cache_dir=cache_dir,
        batch_size=batch_size,
        strict=strict,
        on_start=_stage_start(f"Embedding ({name})", on_stage, on_start),
        on_progress=on_progress,
    )
    if on_stage is not None:
        on_stage(f"Ranking ({name})", len(embedded.q_rows))
    ranking = _Ranking(ks=ks, ties=ties, normalization=normalization, post=post)
    started = time.perf_counter()
    metrics = _rank_split(
        split, embedded, ranking, on_progress=on_progress if on_stage is not None else None
    )
    seconds = {
        "embedding": round(embedded.seconds, 3),
        "ranking": round(time.perf_counter() - started, 3),
    }
    config = _report_config(
        root, split, embedder, embedded, identity, name, ranking, crop=crop, subset=subset
    )
    report = _make_report(config, split, embedded, metrics, out=out, seconds=seconds)
    _write_report_folder(report, out, split, embedded, metrics, n_examples=n_examples, seed=seed)
    return report


@dataclass(frozen=True)
class _Ranking:
    """How the gallery is ranked and scored: cut-offs, tie rule, normalisation, training-free
    post-processing (checked)."""

    ks: tuple[int, ...]
    ties: str
    normalization: str
    post: Postprocessing = field(default_factory=Postprocessing)


def _check_postprocessing(post: Postprocessing | None, normalization: str) -> Postprocessing:
    """``post`` (none: inactive); post-processing ranks unit vectors by cosine only."""
    post = post or Postprocessing()
    if post.active and normalization != "l2":
        raise SnaplookError(
            f"--whiten/--dba/--qe rank by cosine on unit vectors; they do not combine with "
            f"--norm {normalization} (use --norm l2)."
        )
    return post


@dataclass(frozen=True)
class _Embedded:
    """A split's features: every query row and gallery row, and which images were readable.

    ``q_feats`` / ``g_feats``: ndarray of shape (n_query, d) / (n_gallery, d), float32
    (zeros for unreadable images); ``q_ok`` / ``g_ok``: bool masks of the readable ones.
    """

    q_feats: np.ndarray
    g_feats: np.ndarray
    q_ok: np.ndarray
    g_ok: np.ndarray
    skipped: list[Any]
    n_embedded: int
    cache_dir: Path
    seconds: float

    @property
    def q_rows(self) -> np.ndarray:
        """Row indices of the readable queries."""
        import numpy as np

        return np.flatnonzero(self.q_ok)

    @property
    def g_rows(self) -> np.ndarray:
        """Row indices of the readable gallery images."""
        import numpy as np

        return np.flatnonzero(self.g_ok)


def _make_embedder(
    backbone: str | None,
    weights: str | Path | None,
    pooling: str | None,
    seed: int,
    runtime: str,
    precision: str,
    tta: str = DEFAULT_TTA,
) -> Any:
    return Embedder(
        backbone or DEFAULT_BACKBONE,
        weights=weights if weights is not None else DEFAULT_WEIGHTS,
        pooling=pooling,  # None: the backbone's own
        seed=seed,
        runtime=runtime,
        precision=precision,
        tta=tta,
    )


def _identity_and_name(embedder: Any, normalization: str, head: Any) -> tuple[dict, str]:
    """The features' identity (with the head's, if any) and the setting's name."""
    identity = embedder.identity()
    name = _setting_name(
        identity["backbone"], identity["pooling"], normalization, identity.get("tta", "none")
    )
    if head is not None:
        # The cache holds backbone features; the head is applied after it, so raw and
        # head settings share one embedding.
        head.check_source(identity)
        identity = {**identity, "feature_dim": head.output_dim, "head": head.identity()}
        name += f"+{head.name}"
    return identity, name


def _stage_start(
    description: str,
    on_stage: Callable[[str, int], None] | None,
    on_start: Callable[[int], None] | None,
) -> Callable[[int], None]:
    """One ``on_start(total)`` that announces a stage to both callbacks."""

    def started(total: int) -> None:
        if on_stage is not None:
            on_stage(description, total)
        if on_start is not None:
            on_start(total)

    return started


def _embed_split(
    split: Split,
    embedder: Any,
    *,
    crop: str,
    head: Any,
    cache_dir: str | Path | None,
    batch_size: int | None,
    strict: bool,
    on_start: Callable[[int], None],
    on_progress: Callable[[int], None] | None,
) -> _Embedded:
    """Embed every distinct evaluated image once (queries and gallery may share images)."""
    import time

    import numpy as np

    def ref(s: Sample) -> tuple[Path, tuple[int, int, int, int] | None]:
        return split.root / s.path, s.box if crop == "gt" else None

    images = split.query if split.leave_one_out else split.query + split.gallery
    cache_dir = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR)
    skipped: list[Any] = []
    n_embedded: list[int] = []

    def started(total: int) -> None:
        n_embedded.append(total)
        on_start(total)

    t0 = time.perf_counter()
    matrix = embed_cached(
        [ref(s) for s in images],
        embedder,
        cache_dir=cache_dir,
        batch_size=batch_size or DEFAULT_BATCH_SIZE,
        on_skip=skipped.append,
        on_start=started,
        on_progress=on_progress,
    )
    if head is not None:
        matrix = head.transform(matrix)
    seconds = time.perf_counter() - t0
    unreadable = {str(s.path) for s in skipped}
    if unreadable and strict:
        raise SnaplookError(
            f"{len(unreadable)} evaluated image(s) could not be read (first: "
            f"{sorted(unreadable)[0]}); --strict stops here."
        )
    readable = np.array([str(ref(s)[0].resolve()) not in unreadable for s in images])
    n_q = len(split.query)
    return _Embedded(
        q_feats=matrix[:n_q],
        g_feats=matrix[:n_q] if split.leave_one_out else matrix[n_q:],
        q_ok=readable[:n_q],
        g_ok=readable[:n_q] if split.leave_one_out else readable[n_q:],
        skipped=skipped,
        n_embedded=n_embedded[0] if n_embedded else 0,
        cache_dir=cache_dir,
        seconds=seconds,
    )


def _rank_split(
    split: Split,
    embedded: _Embedded,
    ranking: _Ranking,
    *,
    on_progress: Callable[[int], None] | None,
) -> QueryMetrics:
    """Rank the readable gallery for every readable query; raise if no query has a match."""
    q_rows, g_rows = embedded.q_rows, embedded.g_rows
    q_ids = [split.query[i].item for i in q_rows]
    g_ids = [split.gallery[i].item for i in g_rows]
    q_feats, g_feats = embedded.q_feats[q_rows], embedded.g_feats[g_rows]
    post = ranking.post
    loo_refit = split.leave_one_out and len(q_rows) == len(g_rows)
    if post.active and loo_refit and refits_per_query(post, len(g_rows)):
        # Each query's own gallery: whitening and DBA fitted without it, as for a real query.
        metrics = rank_metrics(
            leave_one_out_distances(g_feats, post),
            q_ids,
            g_ids,
            ks=ranking.ks,
            ties=ranking.ties,
            exclude=_own_rows(len(g_rows)),
        )
    else:
        if post.active:
            q_feats, g_feats, _ = postprocess_features(
                q_feats, g_feats, post, leave_one_out=split.leave_one_out
            )
        metrics = evaluate_embeddings(
            q_feats,
            q_ids,
            g_feats,
            g_ids,
            ks=ranking.ks,
            ties=ranking.ties,
            normalization=ranking.normalization,
            leave_one_out=split.leave_one_out,
            on_progress=on_progress,
        )
    if not metrics.evaluated.any():
        raise SnaplookError(
            f"none of the {len(q_rows)} readable queries has an image of its item in the "
            "gallery; check the partition file and --protocol."
        )
    return metrics


def _own_rows(n: int) -> np.ndarray:
    import numpy as np

    return np.eye(n, dtype=bool)


def _make_report(
    config: dict[str, Any],
    split: Split,
    embedded: _Embedded,
    metrics: QueryMetrics,
    *,
    out: Path,
    seconds: dict[str, float],
) -> Report:
    import numpy as np

    q_rows = embedded.q_rows
    categories = np.array([split.query[i].category for i in q_rows])
    summary = metrics.summary()
    counts = {
        **split.counts(),
        "unreadable_query_images": int((~embedded.q_ok).sum()),
        "unreadable_gallery_images": int((~embedded.g_ok).sum()),
        "queries_ranked": len(q_rows),
        "gallery_images_searched": len(embedded.g_rows) - (1 if split.leave_one_out else 0),
        "queries_without_gallery_match": summary["n_without_match"],
        "queries_evaluated": summary["n_evaluated"],
        "queries_with_tied_first_hit": summary["tied_first_hit"],
    }
    return Report(
        config=config,
        counts=counts,
        metrics=summary,
        per_category={
            c: metrics.summary(categories == c) for c in sorted(set(categories.tolist()))
        },
        per_query=_per_query_rows(split, q_rows, metrics, embedded.q_ok),
        out=out,
        seconds=seconds,
        skipped=[(p, "listed in the partition file but missing") for p in split.missing]
        + sorted((str(s.path), s.reason) for s in embedded.skipped),
    )


def _report_config(
    root: Path,
    split: Split,
    embedder: Any,
    embedded: _Embedded,
    identity: dict[str, Any],
    name: str,
    ranking: _Ranking,
    *,
    crop: str,
    subset: str,
) -> dict[str, Any]:
    return {
        "root": str(root.resolve()),
        "image_root": str(split.root.resolve()),
        "protocol": split.protocol,
        "partition": str(split.partition.resolve()) if split.partition else None,
        "bbox": str(split.bbox.resolve()) if split.bbox else None,
        "subset": subset if split.protocol == "consumer2shop" else None,
        "crop": crop,
        "backbone": identity["backbone"],
        "weights": identity["weights"],
        "input_size": identity.get("input_size"),
        "preprocessing": identity.get("preprocessing"),
        "resize": identity.get("resize"),
        "pooling": identity["pooling"],
        "tta": identity.get("tta", "none"),
        "feature_dim": identity.get("feature_dim"),
        "head": identity.get("head"),
        "runtime": embedder_runtime(embedder),
        "feature_cache": {
            "dir": str(embedded.cache_dir),
            "images_embedded": embedded.n_embedded,
        },
        "normalization": ranking.normalization,
        **_postprocessing_config(ranking.post, split),
        "distance": "euclidean" if ranking.normalization == "none" else "cosine",
        "ks": list(ranking.ks),
        "ties": ranking.ties,
        "leave_one_out": split.leave_one_out,
        "setting": name,
        "snaplook_version": _version(),
        "created": timestamp(),
    }


def _postprocessing_config(post: Postprocessing, split: Split) -> dict[str, Any]:
    """The report's ``postprocessing`` record; absent without post-processing, so reports
    of plain settings stay as they were."""
    if not post.active:
        return {}
    fitted = post.whiten is not False or post.dba > 0
    if not (split.leave_one_out and fitted):
        fit = "gallery" if fitted else None
    elif refits_per_query(post, len(split.gallery)):
        fit = "gallery without each query"
    else:
        fit = "gallery, each query included (over 1,000 images)"
    return {"postprocessing": {**post.describe(), "fitted_on": fit}}


def _write_report_folder(
    report: Report,
    out: Path,
    split: Split,
    embedded: _Embedded,
    metrics: QueryMetrics,
    *,
    n_examples: int,
    seed: int,
) -> None:
    """Write the report into a temporary folder, then replace ``out`` with it."""
    from snaplook.io_utils import make_temp_dir, replace_dir

    tmp = make_temp_dir(out)
    try:
        _write_report(
            report,
            tmp,
            split,
            embedded.q_rows,
            embedded.g_rows,
            metrics,
            n_examples=n_examples,
            seed=seed,
        )
        replace_dir(tmp, out, marker="report.json")
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    report.files = {name: out / path.name for name, path in report.files.items()}


def _version() -> str:
    from snaplook import __version__

    return __version__


def _per_query_rows(
    split: Split, q_rows: np.ndarray, metrics: QueryMetrics, q_ok: np.ndarray
) -> list[dict[str, Any]]:
    import math

    rows: list[dict[str, Any]] = []
    position = {int(r): i for i, r in enumerate(q_rows)}
    for i, s in enumerate(split.query):
        row: dict[str, Any] = {"query": s.path, "item": s.item, "category": s.category}
        j = position.get(i)
        if j is None:
            row.update(status="unreadable", n_relevant="", first_hit_rank="", ap="", map_at_r="")
        elif metrics.n_relevant[j] == 0:
            row.update(
                status="no_gallery_match", n_relevant=0, first_hit_rank="", ap="", map_at_r=""
            )
        else:
            ap, mr = float(metrics.ap[j]), float(metrics.map_at_r[j])
            row.update(
                status="ok",
                n_relevant=int(metrics.n_relevant[j]),
                first_hit_rank=int(metrics.first_hit_rank[j]),
                ap=round(ap, 6) if not math.isnan(ap) else "",
                map_at_r=round(mr, 6) if not math.isnan(mr) else "",
            )
        rows.append(row)
    return rows


def _shown(root: Path, sample: Sample, crop: str) -> Path | np.ndarray:
    """What the grids draw: the file, or with ``crop="gt"`` the box the model saw."""
    from snaplook.io_utils import read_image
    from snaplook.transform_utils import crop_box

    path = root / sample.path
    if crop != "gt" or sample.box is None:
        return path
    try:
        return crop_box(read_image(path), sample.box)
    except (SnaplookError, ValueError):
        return path  # plot_utils draws a placeholder for a file it cannot read


def _grid_rows(
    split: Split,
    q_rows: np.ndarray,
    g_rows: np.ndarray,
    metrics: QueryMetrics,
    chosen: Sequence[int],
    crop: str,
) -> list[dict[str, Any]]:
    rows = []
    for j in chosen:
        query = split.query[int(q_rows[j])]
        top = [int(t) for t in metrics.top_index[j] if t >= 0]
        gallery = [split.gallery[int(g_rows[t])] for t in top]
        rank = int(metrics.first_hit_rank[j])
        rows.append(
            {
                "query": _shown(split.root, query, crop),
                "results": [_shown(split.root, g, crop) for g in gallery],
                "distances": [float(d) for d in metrics.top_distance[j][: len(top)]],
                "hits": [g.item == query.item for g in gallery],
                "labels": [g.item for g in gallery],
                "query_label": f"{query.item} (hit@{rank})" if rank else query.item,
                "query_name": Path(query.path).name,
            }
        )
    return rows


def _write_report(
    report: Report,
    folder: Path,
    split: Split,
    q_rows: np.ndarray,
    g_rows: np.ndarray,
    metrics: QueryMetrics,
    *,
    n_examples: int,
    seed: int,
) -> None:
    import numpy as np

    from snaplook.io_utils import (
        write_csv_atomic,
        write_json_atomic,
        write_skipped,
        write_text_atomic,
    )
    from snaplook.plot_utils import plot_recall_curve, plot_retrieval_rows

    files: dict[str, Path] = {}
    evaluated = np.flatnonzero(metrics.evaluated)
    # Worst first: lowest AP, then the latest first hit, then partition order.
    worst = sorted(
        evaluated.tolist(), key=lambda j: (metrics.ap[j], -metrics.first_hit_rank[j], j)
    )[:n_examples]
    rng = np.random.default_rng(seed)
    pick = min(n_examples, len(evaluated))
    random_rows = sorted(rng.choice(evaluated, size=pick, replace=False).tolist()) if pick else []
    note = (
        " · random weights: not a quality claim"
        if is_random_weights(report.config["weights"])
        else ""
    )
    setting = report.config["setting"]
    if report.skipped:
        files["skipped_csv"] = folder / "skipped.csv"
        write_skipped(files["skipped_csv"], report.skipped)
    files["per_query_csv"] = folder / "per_query.csv"
    write_csv_atomic(
        files["per_query_csv"],
        PER_QUERY_HEADER,
        ([row[c] for c in PER_QUERY_HEADER] for row in report.per_query),
    )
    files["recall_png"] = plot_recall_curve(
        {setting: {k: v or 0.0 for k, v in report.recall_at_k.items()}},
        folder / "recall_at_k.png",
        title=f"Recall@K (hit rate), {split.protocol}{note}",
    )
    files["worst_png"] = plot_retrieval_rows(
        _grid_rows(split, q_rows, g_rows, metrics, worst, report.config["crop"]),
        folder / "worst_queries_grid.png",
        title=f"{len(worst)} worst queries (lowest AP){note}",
    )
    files["random_png"] = plot_retrieval_rows(
        _grid_rows(split, q_rows, g_rows, metrics, random_rows, report.config["crop"]),
        folder / "random_queries_grid.png",
        title=f"{len(random_rows)} random queries (seed {seed}){note}",
    )
    files["report_md"] = folder / "report.md"
    files["report_json"] = folder / "report.json"
    report.files = files
    logger.info("wrote %s", ", ".join(sorted(p.name for p in files.values())))
    write_json_atomic(files["report_json"], report.to_dict())
    write_text_atomic(files["report_md"], render_report_md(report))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def render_report_md(report: Report) -> str:
    """The Markdown page that ties a report's numbers, definitions and figures together."""
    c = report.config
    lines = [f"# Retrieval evaluation: {c['protocol']}, {c['setting']}", ""]
    if is_random_weights(c["weights"]):
        lines += [
            "> **Random weights**: these numbers test the pipeline, not retrieval quality.",
            "",
        ]
    lines += _md_configuration(c)
    lines += _md_counts(report)
    lines += _md_metrics(report)
    lines += _md_per_category(report)
    lines += _md_failures(c)
    return "\n".join(lines)


def _md_configuration(c: dict[str, Any]) -> list[str]:
    weights = c["weights"]
    wtext = weights.get("name", "?")
    if weights.get("sha256"):
        wtext += f" (sha256 {weights['sha256'][:12]}…)"
    return [
        "## Configuration",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| dataset root | `{c['root']}` |",
        f"| protocol | {c['protocol']}"
        + (" (leave-one-out: every image queries all others)" if c["leave_one_out"] else "")
        + (f", subset {c['subset']}" if c.get("subset") else "")
        + " |",
        f"| partition file | `{c['partition']}` |",
        f"| crop | {c['crop']}"
        + (f" (boxes from `{c['bbox']}`)" if c["crop"] == "gt" else "")
        + " |",
        f"| backbone | {c['backbone']}, input {c['input_size']} px ({c['resize']}), "
        f"preprocessing {c['preprocessing']}, {c['pooling']} pooling, {c['feature_dim']}-d |",
        f"| weights | {wtext} |",
        f"| normalisation / distance | {c['normalization']} / {c['distance']} |",
        *_md_postprocessing(c),
        f"| tie rule | {c['ties']} |",
        "",
    ]


def _md_postprocessing(c: dict[str, Any]) -> list[str]:
    post = c.get("postprocessing")
    if not post:
        return []
    steps = f"whitening {post['whiten']}, DBA {post['dba']}, QE {post['qe']}"
    where = f"; fitted on the {post['fitted_on']}" if post.get("fitted_on") else ""
    return [f"| post-processing | {steps} (alpha {post['alpha']}){where} |"]


def _md_counts(report: Report) -> list[str]:
    n = report.counts
    lines = ["## Counts", "", "| | count |", "| --- | ---: |"]
    lines += [f"| {key.replace('_', ' ')} | {value} |" for key, value in n.items()]
    lines += [
        "",
        f"Queries whose item has no gallery image ({n['queries_without_gallery_match']}) are "
        "listed in `per_query.csv` with status `no_gallery_match` and left out of every mean; "
        f"{n['missing_images']} listed image(s) were missing and "
        f"{n['unreadable_query_images'] + n['unreadable_gallery_images']} unreadable"
        + (" (listed in `skipped.csv`)." if report.skipped else "."),
        "",
    ]
    return lines


def _md_metrics(report: Report) -> list[str]:
    c, m = report.config, report.metrics
    ks = c["ks"]
    lines = [
        "## Metrics",
        "",
        "| metric | " + " | ".join(f"K={k}" for k in ks) + " |",
        "| --- | " + " | ".join("---:" for _ in ks) + " |",
        "| Recall@K (hit rate, %) | " + " | ".join(_fmt(m["recall_at_k"][k]) for k in ks) + " |",
        "| MMFashion averaged recall@K (%) | "
        + " | ".join(_fmt(m["mmfashion_recall_at_k"][k]) for k in ks)
        + " |",
        "",
        f"mAP (full ranking): **{_fmt(m['map'])}%** · MAP@R: **{_fmt(m['map_at_r'])}%** "
        f"· over {m['n_evaluated']} queries.",
        "",
        "Definitions:",
        "",
    ]
    lines += [f"- {text}" for text in METRIC_DEFINITIONS.values()]
    lines += [
        f"- Ties ({c['ties']}): "
        + (
            "gallery images at exactly the same distance as a same-item image are ranked "
            "before it, so a tie never helps"
            if c["ties"] == "pessimistic"
            else "gallery images at the same distance keep their gallery order"
        )
        + f"; {report.counts['queries_with_tied_first_hit']} quer(ies) had their first hit "
        "tied.",
        "",
        "![Recall@K](recall_at_k.png)",
        "",
    ]
    return lines


def _md_per_category(report: Report) -> list[str]:
    ks = report.config["ks"]
    lines = [
        "## Per category",
        "",
        "| category | queries | " + " | ".join(f"R@{k}" for k in ks) + " | mAP | MAP@R |",
        "| --- | ---: | " + " | ".join("---:" for _ in ks) + " | ---: | ---: |",
    ]
    for cat, cm in report.per_category.items():
        lines.append(
            f"| {cat} | {cm['n_evaluated']} | "
            + " | ".join(_fmt(cm["recall_at_k"][k]) for k in ks)
            + f" | {_fmt(cm['map'])} | {_fmt(cm['map_at_r'])} |"
        )
    return lines


def _md_failures(c: dict[str, Any]) -> list[str]:
    return [
        "",
        "## Failures and samples",
        "",
        "Each row: the query (blue), then its nearest gallery images with rank and "
        "distance, outlined green for the same item and red otherwise"
        + (" (drawn as the ground-truth crops the model saw)." if c["crop"] == "gt" else "."),
        "",
        "Worst queries (lowest AP):",
        "",
        "![worst queries](worst_queries_grid.png)",
        "",
        "Random queries:",
        "",
        "![random queries](random_queries_grid.png)",
        "",
        "Per-query results (first hit rank, AP, MAP@R): `per_query.csv`; every number above: "
        "`report.json`.",
        "",
    ]


def inshop(root: str | Path, **kwargs: Any) -> Report:
    """Evaluate on DeepFashion In-shop Clothes Retrieval (see :func:`evaluate`).

    Example::

        report = snaplook.evaluate.inshop("data/In-shop", crop="gt", weights="imagenet")
        report.recall_at_k[1], report.metrics["map"]
    """
    return evaluate(root, protocol="inshop", **kwargs)


def consumer2shop(root: str | Path, **kwargs: Any) -> Report:
    """Evaluate on DeepFashion Consumer-to-shop Clothes Retrieval (see :func:`evaluate`)."""
    return evaluate(root, protocol="consumer2shop", **kwargs)


def folders(root: str | Path, **kwargs: Any) -> Report:
    """Leave-one-out evaluation of ``root/<label>/<images>`` (see :func:`evaluate`)."""
    return evaluate(root, protocol="folders", **kwargs)


def evaluate_settings(
    root: str | Path,
    *,
    protocol: str = DEFAULT_PROTOCOL,
    backbones: Sequence[str] = (),
    poolings: Sequence[str] = (),
    normalizations: Sequence[str] = (),
    postprocessings: Sequence[Postprocessing] = (),
    ttas: Sequence[str] = (),
    weights: str | Path | None = None,
    partition: str | Path | None = None,
    bbox: str | Path | None = None,
    crop: str = DEFAULT_CROP,
    strict: bool = False,
    subset: str = DEFAULT_C2S_SUBSET,
    out: str | Path | None = None,
    head: Any = None,
    on_setting: Callable[[str, int, int], None] | None = None,
    **kwargs: Any,
) -> Comparison:
    """Evaluate every combination of backbones x poolings x TTAs x normalisations x
    post-processings on one split.

    With one combination this is :func:`evaluate` writing into ``out``. With several,
    each report goes to ``out/<backbone>-<pooling>-<normalization>/`` and ``out`` gets
    ``compare.md`` and ``compare.json`` (one row per setting). Features are cached per
    backbone and pooling, so normalisations do not re-embed.

    Args:
        root: dataset root.
        protocol: see :func:`~snaplook.datasets.load_split`.
        backbones: default=("resnet50",).
        poolings: default=("avg",).
        normalizations: default=("l2",).
        postprocessings: post-processing settings compared (see :func:`evaluate`).
        ttas: test-time augmentations compared, "none" and/or "flip"; default=("none",).
        weights: "imagenet", "random" or a weights file (a file fits one backbone only).
        partition, bbox, crop, strict, subset: see :func:`evaluate`.
        out: output folder; default ``output/eval/<root name>-<protocol>``.
        head: a trained ``snaplook.train.Head``: every setting is evaluated twice, on the
            raw features and through the head (same cached features), side by side.
        on_setting: called with (setting name, index, total) before each setting.
        **kwargs: passed on to :func:`evaluate` (ks, ties, seed, batch_size, cache_dir,
            n_examples, on_start, on_progress, on_stage).

    Returns:
        :class:`Comparison`.
    """
    # Long on purpose: over 80 lines only through its signature and documented arguments.
    import itertools

    root = Path(root)
    backbones, poolings, normalizations, ttas = _setting_lists(
        backbones, poolings, normalizations, ttas
    )
    split = load_split(
        root,
        protocol=protocol,
        partition=partition,
        bbox=resolve_bbox(root, protocol, bbox, crop),
        strict=strict,
        subset=subset,
    )
    warn_ks_over_gallery(split, kwargs.get("ks", DEFAULT_KS))
    out = Path(out) if out is not None else DEFAULT_EVAL_ROOT / f"{root.name}-{split.protocol}"
    heads = [None, head] if head is not None else [None]
    posts = list(dict.fromkeys(postprocessings or [Postprocessing()]))
    combos = list(itertools.product(backbones, poolings, normalizations, heads, posts, ttas))
    reports = [
        _evaluate_setting(
            root,
            split,
            combo,
            i,
            len(combos),
            out=out,
            weights=weights,
            on_setting=on_setting,
            evaluate_kwargs={"crop": crop, "strict": strict, "subset": subset, **kwargs},
        )
        for i, combo in enumerate(combos)
    ]
    comparison = Comparison(reports, out)
    if len(combos) > 1:
        comparison.files = _write_comparison(reports, out)
    return comparison


def _setting_lists(
    backbones: Sequence[str],
    poolings: Sequence[str],
    normalizations: Sequence[str],
    ttas: Sequence[str],
) -> tuple[list[str], list[str], list[str], list[str]]:
    """Distinct settings in order (defaults for empty lists); raise on an unknown one."""
    ttas = list(dict.fromkeys(ttas or [DEFAULT_TTA]))
    for tta in ttas:
        if tta not in TTAS:
            raise SnaplookError(f"unknown --tta {tta!r}; choose one of: {', '.join(TTAS)}.")
    backbones = list(dict.fromkeys(backbones or [DEFAULT_BACKBONE]))
    poolings = list(dict.fromkeys(poolings or [None]))  # None: each backbone's own
    normalizations = list(dict.fromkeys(normalizations or [DEFAULT_NORMALIZATION]))
    for b in backbones:
        get_backbone(b)
    for p in poolings:
        if p is not None and p not in POOLINGS:
            raise SnaplookError(f"unknown pooling {p!r}; choose one of: {', '.join(POOLINGS)}.")
    for nz in normalizations:
        check_normalization(nz)
    return backbones, poolings, normalizations, ttas


def _evaluate_setting(
    root: Path,
    split: Split,
    combo: tuple[str, str, str, Any, Postprocessing, str],
    index: int,
    total: int,
    *,
    out: Path,
    weights: str | Path | None,
    on_setting: Callable[[str, int, int], None] | None,
    evaluate_kwargs: dict[str, Any],
) -> Report:
    """Evaluate one (backbone, pooling, normalisation, head, post-processing, TTA) of
    :func:`evaluate_settings`."""
    backbone, pooling, normalization, head, post, tta = combo
    pooling = pooling or get_backbone(backbone).pooling
    name = _setting_name(backbone, pooling, normalization, tta)
    name += f"+{head.name}" if head is not None else ""
    name += f"+{post.name()}" if post.active else ""
    if on_setting is not None:
        on_setting(name, index, total)
    embedder = _make_embedder(
        backbone,
        weights,
        pooling,
        evaluate_kwargs.get("seed", DEFAULT_SEED),
        evaluate_kwargs.get("runtime", DEFAULT_RUNTIME),
        evaluate_kwargs.get("precision", DEFAULT_PRECISION),
        tta,
    )
    return evaluate(
        root,
        split=split,
        embedder=embedder,
        head=head,
        normalization=normalization,
        postprocessing=post,
        out=out if total == 1 else out / name,
        **evaluate_kwargs,
    )


def _write_comparison(reports: list[Report], out: Path) -> dict[str, Path]:
    """Write ``compare.json`` and ``compare.md`` into ``out``; return their paths."""
    from snaplook.io_utils import write_json_atomic, write_text_atomic

    table = compare_reports(reports)
    files = {"compare_json": out / "compare.json", "compare_md": out / "compare.md"}
    write_json_atomic(files["compare_json"], table)
    write_text_atomic(files["compare_md"], render_compare_md(table))
    return files


def warn_ks_over_gallery(split: Split, ks: Sequence[int]) -> list[int]:
    """Warn about Recall@K cut-offs larger than the gallery a query is ranked against
    (there every query with any gallery match counts as a hit); return those K."""
    n = len(split.query) - 1 if split.leave_one_out else len(split.gallery)
    over = sorted(k for k in set(ks) if k > n)
    if over:
        logger.warning(
            "K=%s exceed%s the gallery (%d images per query): Recall@K there only says whether "
            "a query has any match; use --k values up to %d",
            ",".join(map(str, over)),
            "s" if len(over) == 1 else "",
            n,
            n,
        )
    return over


def compare_reports(reports: Sequence[Report]) -> dict[str, Any]:
    """One row per report: setting, backbone, pooling, normalisation and the main metrics."""
    rows = []
    for r in reports:
        rows.append(
            {
                "setting": r.config["setting"],
                "backbone": r.config["backbone"],
                "weights": r.config["weights"],
                "pooling": r.config["pooling"],
                "tta": r.config.get("tta", "none"),
                "normalization": r.config["normalization"],
                "recall_at_k": {str(k): v for k, v in r.metrics["recall_at_k"].items()},
                "map": r.metrics["map"],
                "map_at_r": r.metrics["map_at_r"],
                "mmfashion_recall_at_k": {
                    str(k): v for k, v in r.metrics["mmfashion_recall_at_k"].items()
                },
                "queries_evaluated": r.counts["queries_evaluated"],
                "report": f"{r.config['setting']}/report.md",
            }
        )
    first = reports[0].config if reports else {}
    return {
        "protocol": first.get("protocol"),
        "root": first.get("root"),
        "crop": first.get("crop"),
        "ks": first.get("ks", []),
        "ties": first.get("ties"),
        "definitions": METRIC_DEFINITIONS,
        "settings": rows,
    }


def render_compare_md(table: dict[str, Any]) -> str:
    """``compare.md``: one row per setting, the best value of each column in bold."""
    ks = table["ks"]
    rows = table["settings"]
    columns = [f"R@{k}" for k in ks] + ["mAP", "MAP@R"]

    def values(row: dict[str, Any]) -> list[float | None]:
        return [row["recall_at_k"][str(k)] for k in ks] + [row["map"], row["map_at_r"]]

    best = [
        max((v for v in col if v is not None), default=None)
        for col in zip(*(values(r) for r in rows))
    ]
    lines = [
        f"# Comparison: {table['protocol']} ({table['root']}), crop {table['crop']}",
        "",
        "Recall@K is the DeepFashion hit rate, in %; mAP over the full ranking; MAP@R; "
        f"ties {table['ties']}. Each setting's report.md has the definitions and failures.",
        "",
        "| setting | queries | " + " | ".join(columns) + " | report |",
        "| --- | ---: | " + " | ".join("---:" for _ in columns) + " | --- |",
    ]
    for row in rows:
        cells = []
        for v, b in zip(values(row), best):
            text = _fmt(v)
            cells.append(f"**{text}**" if v is not None and v == b and len(rows) > 1 else text)
        lines.append(
            f"| {row['setting']} | {row['queries_evaluated']} | "
            + " | ".join(cells)
            + f" | [{row['report']}]({row['report']}) |"
        )
    if any(is_random_weights(r["weights"]) for r in rows):
        lines += ["", "Random weights: these numbers test the pipeline, not retrieval quality."]
    return "\n".join(lines) + "\n"
