"""Tests for snaplook.postprocess: GeM, PCA-whitening (stored pickle-free), alpha-QE, alpha-DBA."""

from __future__ import annotations

import numpy as np
import pytest

from snaplook import postprocess as pp
from snaplook.errors import SnaplookError


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def features() -> np.ndarray:
    rng = np.random.default_rng(0)
    # 120 samples with a few strong directions, so PCA has structure to find
    x = rng.normal(size=(120, 6)) @ rng.normal(size=(6, 40)) + 0.1 * rng.normal(size=(120, 40))
    return x.astype(np.float32)


# --- GeM ---


def test_gem_pool_equals_formula_and_limits():
    rng = np.random.default_rng(1)
    maps = rng.uniform(0, 6, size=(2, 3, 4, 5)).astype(np.float32)
    expected = np.mean(maps.astype(np.float64) ** 3, axis=(1, 2)) ** (1 / 3)
    np.testing.assert_allclose(pp.gem_pool(maps), expected, rtol=1e-6)
    np.testing.assert_allclose(pp.gem_pool(maps, p=1.0), maps.mean(axis=(1, 2)), rtol=1e-6)
    assert np.all(pp.gem_pool(maps, p=3.0) >= pp.gem_pool(maps, p=1.0) - 1e-6)
    np.testing.assert_allclose(pp.gem_pool(maps, p=200.0), maps.max(axis=(1, 2)), rtol=0.05)


def test_gem_pool_clamps_negatives_and_rejects_bad_input():
    maps = -np.ones((1, 2, 2, 3), dtype=np.float32)
    np.testing.assert_allclose(pp.gem_pool(maps), pp.GEM_EPS, rtol=1e-5)
    with pytest.raises(SnaplookError, match="positive"):
        pp.gem_pool(maps, p=0.0)
    with pytest.raises(SnaplookError, match=r"\(n, h, w, c\)"):
        pp.gem_pool(np.ones((2, 3)))


# --- whitening ---


def test_whitening_whitens_the_fit_features(features):
    w = pp.fit_whitening(features, dim=8, samples_per_dim=None)
    assert (w.dim, w.input_dim, w.n_fit) == (8, 40, 120)
    unit = _unit(features)
    projected = (unit - w.mean_) @ w.projection_
    np.testing.assert_allclose(np.cov(projected.T), np.eye(8), atol=1e-3)
    out = w.transform(features)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    assert np.all(np.diff(w.eigenvalues_) <= 0)


def test_whitening_round_trip_equals_numpy_transform(features, tmp_path):
    w = pp.fit_whitening(features, dim=16)
    path = tmp_path / pp.WHITEN_FILE
    digest = pp.save_whitening(w, path)
    loaded = pp.load_whitening(path, sha256=digest)
    queries = np.random.default_rng(2).normal(size=(5, 40)).astype(np.float32)
    # the transform written out by hand in NumPy, from the stored arrays
    with np.load(path, allow_pickle=False) as stored:
        unit = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        by_hand = (unit - stored["mean"]) @ stored["projection"]
        by_hand /= np.linalg.norm(by_hand, axis=1, keepdims=True)
    np.testing.assert_allclose(loaded.transform(queries), by_hand, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(loaded.transform(queries), w.transform(queries))
    assert loaded.digest() == digest == w.digest()
    assert loaded.describe()["dim"] == 16


def test_whitening_refit_is_bit_identical(features, tmp_path):
    a = pp.fit_whitening(features, dim=16)
    b = pp.fit_whitening(features.copy(), dim=16)
    np.testing.assert_array_equal(a.projection_, b.projection_)
    assert a.digest() == b.digest()
    # the digest is of the arrays, not of the zip (whose timestamps differ)
    assert pp.save_whitening(a, tmp_path / "a.npz") == pp.save_whitening(b, tmp_path / "b.npz")


def test_whitening_fewer_samples_than_dimensions_uses_the_gram_matrix():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 64)).astype(np.float32)
    w = pp.fit_whitening(x, dim=9, samples_per_dim=None)
    projected = (_unit(x) - w.mean_) @ w.projection_
    np.testing.assert_allclose(np.cov(projected.T), np.eye(9), atol=1e-3)


def test_whitening_dim_rule_caps_small_galleries():
    assert pp.whitening_dim(128, 200, 1280) == 200 // pp.WHITEN_SAMPLES_PER_DIM
    assert pp.whitening_dim(32, 10_000, 1280) == 32
    assert pp.whitening_dim(None, 10_000, 1280) == 1280
    assert pp.whitening_dim(None, 50, 1280) == 50 // pp.WHITEN_SAMPLES_PER_DIM


def test_whitening_shrinkage_one_is_plain_pca(features):
    w = pp.fit_whitening(features, dim=6, shrinkage=1.0)
    norms = np.linalg.norm(w.projection_, axis=0)
    np.testing.assert_allclose(norms, norms[0], rtol=1e-5)


def test_whitening_errors(features, tmp_path):
    with pytest.raises(SnaplookError, match="gallery images"):
        pp.fit_whitening(features[:10])
    with pytest.raises(SnaplookError, match="DIM >= 1"):
        pp.fit_whitening(features, dim=0)
    with pytest.raises(SnaplookError, match="shrinkage"):
        pp.fit_whitening(features, shrinkage=2.0)
    bad = features.copy()
    bad[0, 0] = np.nan
    with pytest.raises(SnaplookError, match="NaN"):
        pp.fit_whitening(bad)
    w = pp.fit_whitening(features, dim=8)
    with pytest.raises(SnaplookError, match="40-d"):
        w.transform(np.ones((1, 7)))
    path = tmp_path / pp.WHITEN_FILE
    pp.save_whitening(w, path)
    with pytest.raises(SnaplookError, match="SHA-256"):
        pp.load_whitening(path, sha256="0" * 64)
    with pytest.raises(SnaplookError, match="missing"):
        pp.load_whitening(tmp_path / "nope.npz")
    path.write_bytes(b"not a zip")
    with pytest.raises(SnaplookError, match="damaged"):
        pp.load_whitening(path)


def test_load_whitening_refuses_pickles(tmp_path):
    path = tmp_path / pp.WHITEN_FILE
    arrays = pp.fit_whitening(np.random.default_rng(4).normal(size=(60, 8)), dim=8).arrays()
    arrays["mean"] = np.array([object()], dtype=object)
    np.savez(path, **arrays)
    with pytest.raises(SnaplookError, match="damaged"):
        pp.load_whitening(path)


def test_parse_whiten():
    assert pp.parse_whiten("none") is False
    assert pp.parse_whiten(None) is False
    assert pp.parse_whiten("pca") is None
    assert pp.parse_whiten("PCA:64") == 64
    for bad in ("pca:0", "pca:x", "zca", "pca:-3"):
        with pytest.raises(SnaplookError, match="--whiten"):
            pp.parse_whiten(bad)


# --- neighbours, QE, DBA ---


def test_nearest_neighbours_ties_go_to_the_lower_row():
    gallery = _unit([[1, 0], [0, 1], [1, 0], [1, 0], [-1, 0]])
    rows, sims = pp.nearest_neighbours(_unit([[1, 0]]), gallery, 4)
    assert rows.tolist() == [[0, 2, 3, 1]]
    np.testing.assert_allclose(sims, [[1, 1, 1, 0]])
    rows, _ = pp.nearest_neighbours(gallery, gallery, 2, exclude_self=True, block_rows=2)
    assert rows[0].tolist() == [2, 3] and rows[2].tolist() == [0, 3]
    assert pp.nearest_neighbours(gallery, gallery, 9, exclude_self=True)[0].shape == (5, 4)


def test_query_expansion_equals_hand_computation():
    gallery = _unit([[1, 0, 0], [0.8, 0.6, 0], [0, 1, 0], [0, 0.6, 0.8]])
    query = _unit([[1, 0.1, 0]])
    out = pp.query_expansion(query, gallery, k=2, alpha=3.0)
    s = gallery @ query[0]  # neighbours: rows 0 and 1
    by_hand = query[0] + s[0] ** 3 * gallery[0] + s[1] ** 3 * gallery[1]
    np.testing.assert_allclose(out[0], by_hand / np.linalg.norm(by_hand), rtol=1e-6)
    np.testing.assert_array_equal(pp.query_expansion(query, gallery, k=0), query)


def test_database_augmentation_equals_hand_computation_and_is_deterministic():
    gallery = _unit([[1, 0], [0.6, 0.8], [0, 1], [-1, 0.1]])
    out = pp.database_augmentation(gallery, k=1, alpha=3.0)
    # row 3's nearest other row is row 2 (sim 0.0995); row 0's is row 1 (sim 0.6)
    sims = gallery @ gallery.T
    for row, neighbour in ((0, 1), (1, 2), (2, 1), (3, 2)):
        by_hand = gallery[row] + max(sims[row, neighbour], 0) ** 3 * gallery[neighbour]
        np.testing.assert_allclose(out[row], by_hand / np.linalg.norm(by_hand), rtol=1e-6)
    np.testing.assert_array_equal(out, pp.database_augmentation(gallery.copy(), k=1))
    np.testing.assert_array_equal(pp.database_augmentation(gallery, k=0), gallery)
    # In blocks (each block's own rows left out at their offset): the same rows.
    np.testing.assert_allclose(pp.database_augmentation(gallery, k=1, block_rows=3), out)


def test_expansion_ignores_negative_similarities():
    gallery = _unit([[1, 0], [-1, 0]])
    out = pp.query_expansion(_unit([[1, 0]]), gallery, k=2)
    np.testing.assert_allclose(out, _unit([[1, 0]]))


def test_expansion_on_empty_gallery_returns_queries():
    queries = _unit([[1, 0]])
    out = pp.query_expansion(queries, np.zeros((0, 2), dtype=np.float32), k=3)
    np.testing.assert_array_equal(out, queries)


def test_whitening_gram_and_covariance_paths_agree():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(40, 40)) @ np.diag(np.linspace(3, 0.5, 40))
    centred = x - x.mean(axis=0)
    gram_values, gram_vectors = pp._principal_axes(centred, 10)  # n <= d: Gram
    # the same data padded with a zero row, over n - 1 = 40: the covariance path
    padded = np.vstack([centred, np.zeros((1, 40))]) * np.sqrt(40 / 39)
    cov_values, cov_vectors = pp._principal_axes(padded, 10)
    np.testing.assert_allclose(gram_values, cov_values, rtol=1e-8)
    np.testing.assert_allclose(np.abs(gram_vectors.T @ cov_vectors), np.eye(10), atol=1e-6)


# --- postprocess_features ---


def test_postprocess_features_inactive_is_l2(features):
    settings = pp.Postprocessing()
    assert not settings.active and settings.name() == ""
    q, g, w = pp.postprocess_features(features[:3], features, settings)
    np.testing.assert_allclose(q, _unit(features[:3]), rtol=1e-6)
    np.testing.assert_allclose(g, _unit(features), rtol=1e-6)
    assert w is None


def test_postprocess_features_chains_whiten_dba_qe(features):
    settings = pp.Postprocessing(whiten=16, dba=1, qe=2)
    assert settings.active and settings.name() == "pca16-dba1-qe2"
    assert settings.describe()["whiten"] == "pca:16"
    q, g, w = pp.postprocess_features(features[:4], features, settings)
    assert w is not None and w.dim == 16
    expected_g = pp.database_augmentation(w.transform(features), k=1)
    np.testing.assert_allclose(g, expected_g, atol=1e-5)
    np.testing.assert_allclose(
        q, pp.query_expansion(w.transform(features[:4]), expected_g, k=2), atol=1e-5
    )
    # a given whitening is used, not refitted
    q2, g2, w2 = pp.postprocess_features(features[:4], features[:50], settings, whitening=w)
    assert w2 is w and g2.shape == (50, 16)


def test_postprocess_features_leave_one_out_skips_own_row(features):
    settings = pp.Postprocessing(qe=1)
    q, g, _ = pp.postprocess_features(features, features, settings, leave_one_out=True)
    rows, sims = pp.nearest_neighbours(g, g, 1, exclude_self=True)
    np.testing.assert_allclose(q, pp.expand_vectors(g, g[rows], sims), rtol=1e-6)


def test_fit_whitening_follows_samples_per_dim(features):
    assert pp.fit_whitening(features, samples_per_dim=4).dim == 30
    assert pp.fit_whitening(features, samples_per_dim=8).dim == 15
    assert pp.fit_whitening(features, samples_per_dim=None).dim == 40
    assert pp.whitening_dim(None, 120, 40, samples_per_dim=2) == 40


# --- leave-one-out ---


def _by_refitting(x: np.ndarray, settings: pp.Postprocessing) -> np.ndarray:
    n = len(x)
    out = np.full((n, n), np.inf)
    for i in range(n):
        keep = np.arange(n) != i
        q, g, _ = pp.postprocess_features(x[i : i + 1], x[keep], settings)
        out[i, keep] = 1.0 - (q @ g.T)[0]
    return out


@pytest.mark.parametrize(
    "settings",
    [
        pp.Postprocessing(whiten=None, shrinkage=0.25),
        pp.Postprocessing(whiten=12, dba=1, qe=2),
        pp.Postprocessing(dba=2),
    ],
)
def test_leave_one_out_distances_equal_refitting_without_the_query(features, settings):
    x = features[:60]
    distances = pp.leave_one_out_distances(x, settings)
    np.testing.assert_allclose(distances, _by_refitting(x, settings), atol=2e-4)
    assert np.all(np.isinf(np.diag(distances)))


def test_refits_per_query():
    assert pp.refits_per_query(pp.Postprocessing(whiten=None), 200)
    assert pp.refits_per_query(pp.Postprocessing(dba=1), pp.LEAVE_ONE_OUT_REFIT_MAX)
    assert not pp.refits_per_query(pp.Postprocessing(qe=2), 200)  # QE alone: nothing fitted
    assert not pp.refits_per_query(pp.Postprocessing(dba=1), pp.LEAVE_ONE_OUT_REFIT_MAX + 1)


def test_leave_one_out_distances_too_small_for_whitening(features):
    with pytest.raises(SnaplookError, match="gallery images"):
        pp.leave_one_out_distances(features[:12], pp.Postprocessing(whiten=None))


def test_expand_queries_through_a_search_equals_query_expansion(features):
    gallery = _unit(features)
    queries = features[:5] + 0.05

    def search(q, k):
        rows, sims = pp.nearest_neighbours(q, gallery, k)
        return 1.0 - sims, rows

    out = pp.expand_queries(queries, search, gallery, k=3)
    np.testing.assert_allclose(out, pp.query_expansion(_unit(queries), gallery, k=3), atol=1e-6)
    np.testing.assert_allclose(pp.expand_queries(queries, search, gallery, k=0), _unit(queries))


def test_expand_queries_ignores_missing_rows():
    gallery = _unit([[1, 0], [0, 1]])

    def search(q, k):  # one row found, one missing (a filter kept fewer than k)
        return np.array([[0.0, np.inf]]), np.array([[0, -1]])

    out = pp.expand_queries(_unit([[1, 0.2]]), search, gallery, k=2)
    by_hand = _unit([[1, 0.2]])[0] + gallery[0]
    np.testing.assert_allclose(out[0], by_hand / np.linalg.norm(by_hand), rtol=1e-6)
