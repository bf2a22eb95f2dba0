"""Tests for snaplook.metrics: hand-computed cases, references, blocks, the --k parser."""

from __future__ import annotations

import numpy as np
import pytest

from snaplook import metrics
from snaplook.errors import SnaplookError

# --- metrics: hand-computed cases -------------------------------------------------------


def test_rank_metrics_hand_computed_single_query():
    # Ranking by distance: g0 (other), g1 (same), g2 (other), g3 (same), g4 (other).
    distances = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]])
    m = metrics.rank_metrics(distances, ["a"], ["b", "a", "c", "a", "d"], ks=(1, 2, 3, 4))
    assert m.first_hit_rank.tolist() == [2]
    assert m.n_relevant.tolist() == [2]
    # AP = (1/2 + 2/4) / 2; MAP@R with R = 2: (0 + 1/2) / 2.
    assert m.ap[0] == pytest.approx(0.5)
    assert m.map_at_r[0] == pytest.approx(0.25)
    assert m.hits().tolist() == [[False, True, True, True]]
    assert m.mmfashion_recall[0].tolist() == pytest.approx([0.0, 0.5, 0.5, 1.0])
    assert m.top_index[0].tolist() == [0, 1, 2, 3, 4]


def test_rank_metrics_ties_pessimistic_ranks_matches_after_tied_others():
    # The same item (g0) and another item (g1) at exactly the same distance.
    distances = np.array([[0.5, 0.5, 0.9]])
    pessimistic = metrics.rank_metrics(distances, ["a"], ["a", "b", "c"], ks=(1,))
    assert pessimistic.first_hit_rank.tolist() == [2]
    assert pessimistic.ap[0] == pytest.approx(0.5)
    assert pessimistic.tied_first_hit.tolist() == [True]
    assert pessimistic.summary()["recall_at_k"] == {1: 0.0}
    in_order = metrics.rank_metrics(
        distances, ["a"], ["a", "b", "c"], ks=(1,), ties="gallery-order"
    )
    assert in_order.first_hit_rank.tolist() == [1]
    assert in_order.ap[0] == pytest.approx(1.0)
    # Gallery order: the tie goes to whichever comes first in the gallery.
    later = metrics.rank_metrics(distances, ["a"], ["b", "a", "c"], ks=(1,), ties="gallery-order")
    assert later.first_hit_rank.tolist() == [2]


def test_rank_metrics_all_distances_equal_scores_like_worst_case():
    # A collapsed embedding: every distance ties; pessimistic puts the 1 match last of 4.
    m = metrics.rank_metrics(np.zeros((2, 4)), ["a", "b"], ["a", "x", "y", "b"], ks=(1, 3, 4))
    assert m.first_hit_rank.tolist() == [4, 4]
    assert m.summary()["recall_at_k"] == {1: 0.0, 3: 0.0, 4: 1.0}
    assert m.ap.tolist() == pytest.approx([0.25, 0.25])


def test_recall_at_k_excludes_queries_without_gallery_match():
    distances = np.array([[0.1, 0.9], [0.2, 0.3], [0.5, 0.6]])
    m = metrics.rank_metrics(distances, ["a", "b", "zzz"], ["a", "b"], ks=(1, 2))
    s = m.summary()
    assert (s["n_queries"], s["n_evaluated"], s["n_without_match"]) == (3, 2, 1)
    assert s["recall_at_k"] == {1: 0.5, 2: 1.0}
    assert m.first_hit_rank.tolist() == [1, 2, 0]
    assert np.isnan(m.ap[2])
    assert (
        metrics.recall_at_k(distances, ["a", "b", "zzz"], ["a", "b"], ks=(1, 2)) == s["recall_at_k"]
    )
    assert metrics.mean_average_precision(
        distances, ["a", "b", "zzz"], ["a", "b"]
    ) == pytest.approx(0.75)


def test_mmfashion_recall_differs_from_hit_rate_with_several_matches():
    # 3 same-item gallery images, one of them first: hit rate 1, MMFashion recall@1 = 1/3.
    distances = np.array([[0.1, 0.5, 0.6, 0.7]])
    ids = ["a", "x", "a", "a"]
    assert metrics.recall_at_k(distances, ["a"], ids, ks=(1,)) == {1: 1.0}
    assert metrics.mmfashion_recall_at_k(distances, ["a"], ids, ks=(1,))[1] == pytest.approx(1 / 3)
    # MAP@R, R = 3: precision 1 at rank 1, ranks 2-3 miss/hit: (1 + 0 + 2/3) / 3.
    assert metrics.map_at_r(distances, ["a"], ids) == pytest.approx((1 + 2 / 3) / 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_metrics_ap_matches_sklearn_average_precision(seed):
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(seed)
    distances = rng.random((25, 60))
    query_ids = rng.integers(0, 6, 25)
    gallery_ids = rng.integers(0, 6, 60)
    m = metrics.rank_metrics(distances, query_ids, gallery_ids)
    for i in range(25):
        relevant = gallery_ids == query_ids[i]
        if relevant.any():
            assert m.ap[i] == pytest.approx(average_precision_score(relevant, -distances[i]), 1e-6)


def naive_metrics(distances, query_ids, gallery_ids, k, ties):
    """Reference: sort each row in Python with the tie rule as an explicit key."""
    out = []
    for i, qid in enumerate(query_ids):
        rel = [g == qid for g in gallery_ids]
        if ties == "pessimistic":
            order = sorted(range(len(rel)), key=lambda c: (distances[i][c], rel[c], c))
        else:
            order = sorted(range(len(rel)), key=lambda c: (distances[i][c], c))
        hits = [rel[c] for c in order]
        ranks = [p + 1 for p, h in enumerate(hits) if h]
        if not ranks:
            out.append(None)
            continue
        precision = [(j + 1) / r for j, r in enumerate(ranks)]
        r_count = len(ranks)
        out.append(
            (
                ranks[0],
                sum(precision) / r_count,
                sum(p for p, r in zip(precision, ranks) if r <= r_count) / r_count,
                sum(r <= k for r in ranks) / r_count,
                order[:5],
            )
        )
    return out


@pytest.mark.parametrize("ties", ["pessimistic", "gallery-order"])
def test_rank_metrics_match_naive_sort_with_many_ties(ties):
    rng = np.random.default_rng(7)
    distances = rng.integers(0, 4, (30, 40)) / 4.0  # only 4 distinct values: ties everywhere
    query_ids = rng.integers(0, 5, 30)
    gallery_ids = rng.integers(0, 5, 40)
    m = metrics.rank_metrics(distances, query_ids, gallery_ids, ks=(3,), ties=ties)
    for i, ref in enumerate(naive_metrics(distances, query_ids, gallery_ids, 3, ties)):
        if ref is None:
            assert m.first_hit_rank[i] == 0 and np.isnan(m.ap[i])
            continue
        assert m.first_hit_rank[i] == ref[0]
        assert m.ap[i] == pytest.approx(ref[1])
        assert m.map_at_r[i] == pytest.approx(ref[2])
        assert m.mmfashion_recall[i, 0] == pytest.approx(ref[3])
        assert m.top_index[i].tolist() == ref[4]


def test_evaluate_embeddings_blocks_match_one_matrix_and_leave_one_out():
    rng = np.random.default_rng(3)
    q, g = rng.normal(size=(37, 8)), rng.normal(size=(53, 8))
    qi, gi = rng.integers(0, 9, 37), rng.integers(0, 9, 53)
    blocked = metrics.evaluate_embeddings(q, qi, g, gi, block_bytes=64 * 53 * 5)  # 5-query blocks
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    whole = metrics.rank_metrics(1 - qn @ gn.T, qi, gi)
    assert blocked.first_hit_rank.tolist() == whole.first_hit_rank.tolist()
    np.testing.assert_allclose(blocked.ap, whole.ap, rtol=1e-5)
    # Leave-one-out: no query finds itself; a label seen once has no match.
    loo = metrics.evaluate_embeddings(g, gi, g, gi, leave_one_out=True, top_n=3)
    assert not (loo.top_index == np.arange(53)[:, None]).any()
    counts = np.bincount(gi)
    assert loo.n_relevant.tolist() == (counts[gi] - 1).tolist()


def test_evaluate_embeddings_mismatched_ids_raise():
    with pytest.raises(SnaplookError, match="3 query features for 2 query ids"):
        metrics.evaluate_embeddings(np.zeros((3, 4)), [1, 2], np.zeros((2, 4)), [1, 2])


def test_normalize_features_none_ranks_by_euclidean_distance():
    q = np.array([[1.0, 0.0]])
    g = np.array([[10.0, 0.0], [0.0, 1.0]])
    # Cosine: g0 has the same direction; Euclidean: g1 is nearer.
    assert metrics.evaluate_embeddings(q, ["a"], g, ["a", "b"]).first_hit_rank.tolist() == [1]
    raw = metrics.evaluate_embeddings(q, ["a"], g, ["a", "b"], normalization="none")
    assert raw.first_hit_rank.tolist() == [2]
    assert raw.top_distance[0, :2].tolist() == pytest.approx([2**0.5, 9.0])


def test_parse_ks_sorts_and_rejects_bad_values():
    assert metrics.parse_ks("10, 1,5,5") == (1, 5, 10)
    with pytest.raises(SnaplookError, match="'0' is not a positive integer"):
        metrics.parse_ks("1,0")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: metrics.check_ks([]), r"K values must be positive integers, got \[\]"),
        (lambda: metrics.check_ks([0, 5]), r"K values must be positive integers, got \[0, 5\]"),
        (lambda: metrics.check_ties("random"), "unknown tie rule 'random'; choose one of"),
        (
            lambda: metrics.check_normalization("l1"),
            "unknown normalisation 'l1'; choose one of: l2, centered, none",
        ),
        (
            lambda: metrics.normalize_features(np.ones((1, 2)), np.ones((1, 2)), normalization="x"),
            "unknown normalisation 'x'",
        ),
    ],
)
def test_metric_settings_bad_values_raise_naming_the_choices(call, message):
    with pytest.raises(SnaplookError, match=message):
        call()


def test_check_ks_sorts_and_dedupes():
    assert metrics.check_ks([10, 1, 5, 5]) == (1, 5, 10)


def test_evaluate_embeddings_empty_queries_give_empty_metrics():
    m = metrics.evaluate_embeddings(np.zeros((0, 4)), [], np.ones((3, 4)), ["a", "b", "c"])
    assert m.n_relevant.shape == (0,)
    assert m.summary()["n_evaluated"] == 0
    assert m.summary()["map"] is None
