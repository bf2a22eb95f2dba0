"""Retrieval metrics: rank a gallery for each query and score the ranking.

Recall@K (the DeepFashion hit rate), mAP, MAP@R and MMFashion's averaged recall, from a
distance matrix (:func:`rank_metrics`) or from features, in bounded memory
(:func:`evaluate_embeddings`). Used by ``evaluate`` (reports) and ``train`` (validation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from snaplook.errors import SnaplookError
from snaplook.options import (
    DEFAULT_KS,
    DEFAULT_NORMALIZATION,
    DEFAULT_TIES,
    NORMALIZATIONS,
    TIE_RULES,
)

if TYPE_CHECKING:
    import numpy as np

#: Working memory for one block of the query x gallery ranking, in bytes.
RANKING_BLOCK_BYTES = 256 * 1024 * 1024
#: Nearest gallery images kept per query (for grids).
DEFAULT_TOP_N = 5

METRIC_DEFINITIONS = {
    "recall_at_k": (
        "Recall@K (DeepFashion hit rate): the share of queries with at least one image of "
        "the same item among their K nearest gallery images."
    ),
    "map": (
        "mAP: the mean over queries of average precision over the full gallery ranking "
        "(precision at the rank of each same-item image, averaged over those images)."
    ),
    "map_at_r": (
        "MAP@R: like AP, but only the first R ranks count, R being the query's number of "
        "same-item gallery images (Musgrave et al., 2020); 1.0 means they are all first."
    ),
    "mmfashion_recall_at_k": (
        "MMFashion averaged recall@K: the share of the query's same-item gallery images "
        "found in its top K, averaged over queries (MMFashion's retrieval_eval.py); it is "
        "not the hit rate and is lower whenever an item has more than one gallery image."
    ),
}


@dataclasses.dataclass
class QueryMetrics:
    """Per-query retrieval results.

    Attributes:
        ks: the cut-offs, ascending.
        n_relevant: ndarray of shape (m,), int: same-item gallery images per query.
        first_hit_rank: ndarray of shape (m,), int: 1-based rank of the first same-item
            image, 0 when the query has none (such queries are excluded from means).
        ap: ndarray of shape (m,), float: average precision (NaN without same-item image).
        map_at_r: ndarray of shape (m,), float: precision@R-based AP (NaN likewise).
        mmfashion_recall: ndarray of shape (m, len(ks)), float: same-item images found in
            the top K over ``n_relevant`` (NaN likewise).
        tied_first_hit: ndarray of shape (m,), bool: the first same-item image is at
            exactly the distance of a non-matching one (the tie rule decided its rank).
        top_index: ndarray of shape (m, t), int: gallery rows of the t nearest, in rank
            order (-1 pads when the gallery is smaller).
        top_distance: ndarray of shape (m, t), float32: their distances.
        ties: the tie rule used.
    """

    ks: tuple[int, ...]
    n_relevant: np.ndarray
    first_hit_rank: np.ndarray
    ap: np.ndarray
    map_at_r: np.ndarray
    mmfashion_recall: np.ndarray
    tied_first_hit: np.ndarray
    top_index: np.ndarray
    top_distance: np.ndarray
    ties: str = DEFAULT_TIES

    @property
    def evaluated(self) -> np.ndarray:
        """ndarray of shape (m,), bool: queries with at least one same-item gallery image."""
        return self.n_relevant > 0

    def hits(self) -> np.ndarray:
        """ndarray of shape (m, len(ks)), bool: a same-item image within the top K."""
        import numpy as np

        ks = np.asarray(self.ks)
        return (self.first_hit_rank[:, None] > 0) & (self.first_hit_rank[:, None] <= ks)

    def summary(self, mask: np.ndarray | None = None) -> dict[str, Any]:
        """Mean metrics over the evaluated queries (those with a same-item gallery image).

        Args:
            mask: ndarray of shape (m,), bool: restrict to these queries (e.g. a category).

        Returns:
            dict with ``n_queries``, ``n_evaluated``, ``n_without_match``,
            ``recall_at_k`` {k: hit rate}, ``map``, ``map_at_r``,
            ``mmfashion_recall_at_k`` {k: value}, ``tied_first_hit``; means are None when
            no query is evaluated.
        """
        import numpy as np

        m = len(self.n_relevant)
        mask = np.ones(m, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        use = mask & self.evaluated
        n = int(use.sum())

        def mean(values: np.ndarray) -> float | None:
            return float(np.mean(values[use])) if n else None

        hits = self.hits()
        return {
            "n_queries": int(mask.sum()),
            "n_evaluated": n,
            "n_without_match": int((mask & ~self.evaluated).sum()),
            "recall_at_k": {k: mean(hits[:, j]) for j, k in enumerate(self.ks)},
            "map": mean(self.ap),
            "map_at_r": mean(self.map_at_r),
            "mmfashion_recall_at_k": {
                k: mean(self.mmfashion_recall[:, j]) for j, k in enumerate(self.ks)
            },
            "tied_first_hit": int((use & self.tied_first_hit).sum()),
        }


def check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """``ks`` as sorted distinct cut-offs; raise unless all are positive."""
    out = tuple(sorted({int(k) for k in ks}))
    if not out or out[0] < 1:
        raise SnaplookError(f"K values must be positive integers, got {list(ks)}.")
    return out


def check_ties(ties: str) -> None:
    """Raise unless ``ties`` is one of :data:`~snaplook.options.TIE_RULES`."""
    if ties not in TIE_RULES:
        raise SnaplookError(f"unknown tie rule {ties!r}; choose one of: {', '.join(TIE_RULES)}.")


def check_normalization(normalization: str) -> None:
    """Raise unless ``normalization`` is one of :data:`~snaplook.options.NORMALIZATIONS`."""
    if normalization not in NORMALIZATIONS:
        raise SnaplookError(
            f"unknown normalisation {normalization!r}; choose one of: {', '.join(NORMALIZATIONS)}."
        )


def _rank_block(
    distances: np.ndarray,
    relevant: np.ndarray,
    ks: tuple[int, ...],
    ties: str,
    top_n: int,
) -> dict[str, np.ndarray]:
    """Metrics of one block of queries from its (b, n) distances and relevance mask.

    Only each row's sorted distances are needed, not a full argsort: the rank of the j-th
    same-item image is j plus the number of other images ranked before it, counted with
    ``searchsorted`` (ties resolved by ``ties``). Excluded pairs carry distance +inf.
    """
    import numpy as np

    b, n = distances.shape
    kk = np.asarray(ks)
    n_rel = np.zeros(b, dtype=np.int64)
    first = np.zeros(b, dtype=np.int64)
    ap = np.full(b, np.nan)
    map_r = np.full(b, np.nan)
    mm = np.full((b, len(ks)), np.nan)
    tied = np.zeros(b, dtype=bool)
    top_index = np.full((b, top_n), -1, dtype=np.int64)
    top_distance = np.full((b, top_n), np.nan, dtype=np.float32)
    if n == 0:
        return _block_dict(n_rel, first, ap, map_r, mm, tied, top_index, top_distance)
    sorted_d = np.sort(distances, axis=1)
    t = min(top_n, n)
    threshold = sorted_d[:, t - 1 : t]
    positions = np.arange(n)
    for i in range(b):
        row, rel_row = distances[i], relevant[i]
        cols = np.flatnonzero(rel_row)
        # Nearest images for the grids, ordered by the same tie rule as the metrics.
        near = np.flatnonzero((row <= threshold[i]) & np.isfinite(row))
        second = rel_row[near] if ties == "pessimistic" else near
        near = near[np.lexsort((second, row[near]))][:t]
        top_index[i, : len(near)] = near
        top_distance[i, : len(near)] = row[near]
        if len(cols) == 0:
            continue
        d_rel = row[cols]
        order = np.lexsort((cols, d_rel))  # by distance, then gallery order
        d_rel, cols = d_rel[order], cols[order]
        count = len(cols)
        j = np.arange(1, count + 1)
        if ties == "pessimistic":
            # Others at distance <= d: all images at <= d minus same-item ones at <= d.
            others = np.searchsorted(sorted_d[i], d_rel, "right") - np.searchsorted(
                d_rel, d_rel, "right"
            )
        else:
            others = np.searchsorted(sorted_d[i], d_rel, "left") - np.searchsorted(
                d_rel, d_rel, "left"
            )
            n_equal = np.searchsorted(sorted_d[i], d_rel, "right") - np.searchsorted(
                sorted_d[i], d_rel, "left"
            )
            rel_equal = np.searchsorted(d_rel, d_rel, "right") - np.searchsorted(
                d_rel, d_rel, "left"
            )
            for m in np.flatnonzero(n_equal > rel_equal):  # a tie with another item
                others[m] += np.count_nonzero((row == d_rel[m]) & ~rel_row & (positions < cols[m]))
        ranks = others + j
        n_rel[i] = count
        first[i] = ranks[0]
        precision = j / ranks
        ap[i] = precision.mean()
        map_r[i] = precision[ranks <= count].sum() / count
        mm[i] = (ranks[None, :] <= kk[:, None]).sum(axis=1) / count
        equal_first = np.searchsorted(sorted_d[i], d_rel[0], "right") - np.searchsorted(
            sorted_d[i], d_rel[0], "left"
        )
        tied[i] = equal_first > np.count_nonzero(d_rel == d_rel[0])
    return _block_dict(n_rel, first, ap, map_r, mm, tied, top_index, top_distance)


def _block_dict(*arrays: np.ndarray) -> dict[str, np.ndarray]:
    names = (
        "n_relevant",
        "first_hit_rank",
        "ap",
        "map_at_r",
        "mmfashion_recall",
        "tied_first_hit",
        "top_index",
        "top_distance",
    )
    return dict(zip(names, arrays))


def _concat_blocks(
    blocks: list[dict[str, np.ndarray]], ks: tuple[int, ...], ties: str, top_n: int
) -> QueryMetrics:
    import numpy as np

    if not blocks:
        empty = np.zeros(0, dtype=np.int64)
        return QueryMetrics(
            ks,
            empty,
            empty,
            np.zeros(0),
            np.zeros(0),
            np.zeros((0, len(ks))),
            np.zeros(0, dtype=bool),
            np.zeros((0, top_n), dtype=np.int64),
            np.zeros((0, top_n), dtype=np.float32),
            ties,
        )
    merged = {key: np.concatenate([blk[key] for blk in blocks]) for key in blocks[0]}
    return QueryMetrics(ks=ks, ties=ties, **merged)


def rank_metrics(
    distances: np.ndarray,
    query_ids: Sequence[Any],
    gallery_ids: Sequence[Any],
    *,
    ks: Sequence[int] = DEFAULT_KS,
    ties: str = DEFAULT_TIES,
    exclude: np.ndarray | None = None,
    top_n: int = DEFAULT_TOP_N,
) -> QueryMetrics:
    """Per-query retrieval metrics from a query x gallery distance matrix and labels.

    A gallery image is relevant to a query when their ids are equal. Smaller distance
    ranks first; equal distances follow ``ties``.

    Args:
        distances: ndarray of shape (m, n), any distance (smaller = more similar).
        query_ids: m labels.
        gallery_ids: n labels.
        ks: cut-offs for Recall@K, default=(1, 5, 10, 20, 30, 50).
        ties: "pessimistic" (default) or "gallery-order", see :data:`~snaplook.options.TIE_RULES`.
        exclude: ndarray of shape (m, n), bool: pairs left out of the ranking (e.g. each
            query itself in leave-one-out); default none.
        top_n: nearest gallery images kept per query, default=5.

    Returns:
        :class:`QueryMetrics`; call ``.summary()`` for the means.

    Raises:
        SnaplookError: shapes that do not match the labels, bad ``ks`` or ``ties``.
    """
    import numpy as np

    ks = check_ks(ks)
    check_ties(ties)
    distances = np.asarray(distances, dtype=np.float64)
    q = np.asarray(query_ids)
    g = np.asarray(gallery_ids)
    if distances.ndim != 2 or distances.shape != (len(q), len(g)):
        raise SnaplookError(
            f"distances has shape {distances.shape}, expected ({len(q)}, {len(g)}) "
            "(queries x gallery)."
        )
    relevant = q[:, None] == g[None, :]
    if exclude is not None:
        exclude = np.asarray(exclude, dtype=bool)
        distances = np.where(exclude, np.inf, distances)
        relevant = relevant & ~exclude
    return _concat_blocks([_rank_block(distances, relevant, ks, ties, top_n)], ks, ties, top_n)


def recall_at_k(
    distances: np.ndarray,
    query_ids: Sequence[Any],
    gallery_ids: Sequence[Any],
    *,
    ks: Sequence[int] = DEFAULT_KS,
    ties: str = DEFAULT_TIES,
) -> dict[int, float | None]:
    """Recall@K as the DeepFashion hit rate (see :data:`METRIC_DEFINITIONS`).

    Queries without a same-item gallery image are excluded from the mean.

    Returns:
        {k: share of queries with a same-item image in their top k}.
    """
    return rank_metrics(distances, query_ids, gallery_ids, ks=ks, ties=ties).summary()[
        "recall_at_k"
    ]


def mean_average_precision(
    distances: np.ndarray,
    query_ids: Sequence[Any],
    gallery_ids: Sequence[Any],
    *,
    ties: str = DEFAULT_TIES,
) -> float | None:
    """mAP over the full ranking (see :data:`METRIC_DEFINITIONS`)."""
    return rank_metrics(distances, query_ids, gallery_ids, ks=(1,), ties=ties).summary()["map"]


def map_at_r(
    distances: np.ndarray,
    query_ids: Sequence[Any],
    gallery_ids: Sequence[Any],
    *,
    ties: str = DEFAULT_TIES,
) -> float | None:
    """MAP@R (see :data:`METRIC_DEFINITIONS`)."""
    metrics = rank_metrics(distances, query_ids, gallery_ids, ks=(1,), ties=ties)
    return metrics.summary()["map_at_r"]


def mmfashion_recall_at_k(
    distances: np.ndarray,
    query_ids: Sequence[Any],
    gallery_ids: Sequence[Any],
    *,
    ks: Sequence[int] = DEFAULT_KS,
    ties: str = DEFAULT_TIES,
) -> dict[int, float | None]:
    """MMFashion's averaged recall@K (see :data:`METRIC_DEFINITIONS`); not the hit rate."""
    metrics = rank_metrics(distances, query_ids, gallery_ids, ks=ks, ties=ties)
    return metrics.summary()["mmfashion_recall_at_k"]


def normalize_features(
    query_feats: np.ndarray,
    gallery_feats: np.ndarray,
    *,
    normalization: str = DEFAULT_NORMALIZATION,
) -> tuple[np.ndarray, np.ndarray]:
    """Apply a :data:`~snaplook.options.NORMALIZATIONS` setting to query and gallery features.

    Returns:
        (queries, gallery): float32 arrays of the input shapes.

    Raises:
        SnaplookError: unknown normalisation.
    """
    import numpy as np

    from snaplook.transform_utils import l2_normalize

    check_normalization(normalization)
    q = np.asarray(query_feats, dtype=np.float32)
    g = np.asarray(gallery_feats, dtype=np.float32)
    if normalization == "l2":
        return l2_normalize(q), l2_normalize(g)
    if normalization == "centered":
        centre = g.mean(axis=0, keepdims=True) if len(g) else 0.0
        return l2_normalize(q - centre), l2_normalize(g - centre)
    return q, g  # "none"


def _block_distances(q: np.ndarray, g: np.ndarray, g_sq: np.ndarray | None) -> np.ndarray:
    import numpy as np

    dots = q @ g.T
    if g_sq is None:  # unit rows: cosine distance
        return np.clip(1.0 - dots, 0.0, 2.0)
    q_sq = np.einsum("ij,ij->i", q, q)[:, None]
    return np.sqrt(np.maximum(q_sq + g_sq[None, :] - 2.0 * dots, 0.0))


def evaluate_embeddings(
    query_feats: np.ndarray,
    query_ids: Sequence[Any],
    gallery_feats: np.ndarray,
    gallery_ids: Sequence[Any],
    *,
    ks: Sequence[int] = DEFAULT_KS,
    ties: str = DEFAULT_TIES,
    normalization: str = DEFAULT_NORMALIZATION,
    leave_one_out: bool = False,
    top_n: int = DEFAULT_TOP_N,
    block_bytes: int = RANKING_BLOCK_BYTES,
    on_progress: Callable[[int], None] | None = None,
) -> QueryMetrics:
    """Score embeddings: rank the gallery for every query, in blocks, and measure.

    Memory stays bounded: queries are processed in blocks so that one block's distances
    and ranking take about ``block_bytes`` (In-shop: 14,218 x 12,612 in 16 blocks).

    Args:
        query_feats: ndarray of shape (m, d).
        query_ids: m item ids.
        gallery_feats: ndarray of shape (n, d).
        gallery_ids: n item ids.
        ks: cut-offs, default=(1, 5, 10, 20, 30, 50).
        ties: tie rule, default="pessimistic" (see :data:`~snaplook.options.TIE_RULES`).
        normalization: "l2" (cosine, default), "centered" or "none" (Euclidean).
        leave_one_out: queries and gallery are the same images (same order); each
            query's own row is left out of its ranking.
        top_n: nearest gallery images kept per query, default=5.
        block_bytes: working-memory budget per block, default=256 MiB.
        on_progress: called with the number of queries ranked so far.

    Returns:
        :class:`QueryMetrics`; ``.summary()`` gives the means.

    Raises:
        SnaplookError: feature and id counts that disagree, different dimensions, or an
            unknown ``ties`` / ``normalization``.
    """
    import numpy as np

    ks = check_ks(ks)
    check_ties(ties)
    q_ids = np.asarray(query_ids)
    g_ids = np.asarray(gallery_ids)
    query_feats = np.atleast_2d(np.asarray(query_feats))
    gallery_feats = np.atleast_2d(np.asarray(gallery_feats))
    if len(query_feats) != len(q_ids) or len(gallery_feats) != len(g_ids):
        raise SnaplookError(
            f"{len(query_feats)} query features for {len(q_ids)} query ids and "
            f"{len(gallery_feats)} gallery features for {len(g_ids)} gallery ids; they must "
            "match one to one."
        )
    if len(query_feats) and len(gallery_feats) and query_feats.shape[1] != gallery_feats.shape[1]:
        raise SnaplookError(
            f"query features are {query_feats.shape[1]}-d but gallery features "
            f"{gallery_feats.shape[1]}-d."
        )
    if leave_one_out and len(query_feats) != len(gallery_feats):
        raise SnaplookError("leave_one_out needs the same images as queries and gallery.")
    q, g = normalize_features(query_feats, gallery_feats, normalization=normalization)
    g_sq = np.einsum("ij,ij->i", g, g) if normalization == "none" else None
    m, n = len(q), len(g)
    # Per (query, gallery) cell a block holds about 24 bytes: the product and distances
    # (float32), sorted distances, the relevance mask and temporaries.
    rows = max(1, int(block_bytes // max(1, 24 * n)))
    blocks = []
    for start in range(0, m, rows):
        stop = min(m, start + rows)
        dist = _block_distances(q[start:stop], g, g_sq)
        relevant = q_ids[start:stop, None] == g_ids[None, :]
        if leave_one_out:
            own = np.arange(start, stop)
            dist[own - start, own] = np.inf
            relevant[own - start, own] = False
        blocks.append(_rank_block(dist, relevant, ks, ties, top_n))
        if on_progress is not None:
            on_progress(stop)
    return _concat_blocks(blocks, ks, ties, top_n)


def parse_ks(text: str) -> tuple[int, ...]:
    """Read a ``--k`` value such as "1,5,10" into sorted distinct cut-offs.

    Raises:
        SnaplookError: an empty list, or a value that is not a positive integer.
    """
    values = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        if not (part.isascii() and part.isdigit()) or int(part) < 1:
            raise SnaplookError(f"--k: {part!r} is not a positive integer; use e.g. --k 1,5,10.")
        values.append(int(part))
    if not values:
        raise SnaplookError("--k: no values; use e.g. --k 1,5,10,20,30,50.")
    return check_ks(values)
