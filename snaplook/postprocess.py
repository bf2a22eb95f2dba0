"""Training-free post-processing of retrieval features, in NumPy: GeM pooling, learned
PCA-whitening (stored pickle-free as ``whiten.npz``), alpha-query expansion and
database-side augmentation. Exact and deterministic; no step, no model.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snaplook.errors import SnaplookError
from snaplook.options import DEFAULT_GEM_P

if TYPE_CHECKING:
    import numpy as np

#: Activations are clamped to at least this before the power (GeM's epsilon).
GEM_EPS = 1e-6
#: Exponent on the similarity weights of alpha-QE and alpha-DBA (Radenovic et al. 2018).
DEFAULT_ALPHA = 3.0
#: The whitening file in an index folder.
WHITEN_FILE = "whiten.npz"
WHITEN_FORMAT_VERSION = 1
#: Dimension rule: the whitened dimension is at most n_fit // WHITEN_SAMPLES_PER_DIM. PCA
#: directions estimated from fewer samples are mostly noise, and whitening divides by their
#: small eigenvalues, so it amplifies that noise. Measured (benchmarks/bench_quality.py,
#: results/quality-2026-12-06.json, lite0 GeM): a fixed 128 dimensions drop R@1 on 106
#: images from 0.67 to 0.04 (0.43 to 0.00 on harder copies), on 212 from 0.81 to 0.69;
#: by the rule they gain 0.01-0.02. Honest leave-one-out R@1 by samples per dimension,
#: 2: 0.625, 3: 0.603, 4: 0.579, 6: 0.552, 8: 0.521 (no whitening 0.600); issue 24's
#: catalogue set (199 images) gained with 64 dimensions (n/3) and lost with 128 (n/1.6).
#: 3 keeps to the catalogue evidence; 2 is within noise of it on the photo sets.
WHITEN_SAMPLES_PER_DIM = 3
#: Below this many dimensions whitening is not worth fitting (the gallery is too small).
MIN_WHITEN_DIM = 8
#: Eigenvalue shrinkage towards their mean: lambda' = (1 - s) lambda + s mean(lambda);
#: 0 is full whitening, 1 a plain PCA projection. Measured: s = 0.1 / 0.25 / 0.5 / 1 move
#: leave-one-out R@1 by -0.01 to +0.01 (noise at these sizes), so none by default.
DEFAULT_SHRINKAGE = 0.0
#: Rows of the query x gallery similarity computed at once by the exact neighbour search.
NEIGHBOUR_BLOCK_ROWS = 1024
#: An index fits its whitening on at most this many gallery rows (a seeded sample, in row
#: order): the covariance of 2,048-d features is well estimated long before, and the fit
#: then holds (rows x d) floats in memory whatever the gallery size.
WHITEN_FIT_MAX_ROWS = 65536
#: The search vectors (whitened and/or database-augmented gallery) in an index folder.
SEARCH_FILE = "search.npy"


# --- pooling ---


def gem_pool(feature_maps: np.ndarray, *, p: float = DEFAULT_GEM_P) -> np.ndarray:
    """Generalised-mean pooling of CNN feature maps: ``mean(max(x, eps) ** p) ** (1 / p)``.

    Args:
        feature_maps: ndarray of shape (n, h, w, c), channels last.
        p: the exponent, default=3.0; p=1 is average pooling.

    Returns:
        ndarray of shape (n, c), float32.

    Raises:
        SnaplookError: ``p`` not positive, or maps that are not 4-d.
    """
    import numpy as np

    if not p > 0 or not math.isfinite(p):
        raise SnaplookError(f"--gem-p must be a positive number, got {p}.")
    maps = np.asarray(feature_maps, dtype=np.float64)
    if maps.ndim != 4:
        raise SnaplookError(f"GeM needs feature maps of shape (n, h, w, c), got {maps.shape}.")
    pooled = np.mean(np.maximum(maps, GEM_EPS) ** p, axis=(1, 2)) ** (1.0 / p)
    return pooled.astype(np.float32)


# --- whitening ---


@dataclass
class Whitening:
    """A fitted centring + PCA-whitening: ``l2(l2(x) - mean_) @ projection_``.

    Attributes:
        mean_: ndarray of shape (d,), float32: the mean of the L2-normalised fit features.
        projection_: ndarray of shape (d, k), float32: principal directions, each divided
            by the square root of its (shrunk) eigenvalue.
        eigenvalues_: ndarray of shape (k,), float64: the variances along them, unshrunk.
        shrinkage: the eigenvalue shrinkage it was fitted with.
        n_fit: how many feature vectors it was fitted on.
    """

    mean_: np.ndarray
    projection_: np.ndarray
    eigenvalues_: np.ndarray
    shrinkage: float
    n_fit: int

    @property
    def dim(self) -> int:
        """The whitened dimension k."""
        return int(self.projection_.shape[1])

    @property
    def input_dim(self) -> int:
        """The dimension d of the features it takes."""
        return int(self.projection_.shape[0])

    def transform(self, features: np.ndarray) -> np.ndarray:
        """Whiten features: L2-normalise, centre, project, L2-normalise.

        Args:
            features: ndarray of shape (n, d).

        Returns:
            ndarray of shape (n, k), float32, unit rows.

        Raises:
            SnaplookError: features of another dimension than the fit's.
        """
        import numpy as np

        from snaplook.transform_utils import l2_normalize

        features = np.atleast_2d(np.asarray(features, dtype=np.float32))
        if features.shape[1] != self.input_dim:
            raise SnaplookError(
                f"the whitening was fitted on {self.input_dim}-d features, but these are "
                f"{features.shape[1]}-d; refit it (index --update --refit) or index again."
            )
        return l2_normalize((l2_normalize(features) - self.mean_) @ self.projection_)

    def arrays(self) -> dict[str, np.ndarray]:
        """What :func:`save_whitening` stores: plain arrays only (no pickles)."""
        import numpy as np

        return {
            "format_version": np.array(WHITEN_FORMAT_VERSION, dtype=np.int64),
            "mean": self.mean_,
            "projection": self.projection_,
            "eigenvalues": self.eigenvalues_,
            "shrinkage": np.array(self.shrinkage, dtype=np.float64),
            "n_fit": np.array(self.n_fit, dtype=np.int64),
        }

    def digest(self) -> str:
        """SHA-256 of the stored arrays' names, dtypes, shapes and bytes (not of the zip,
        whose timestamps change on every save): equal fits give equal digests."""
        return _arrays_digest(self.arrays())

    def describe(self) -> dict[str, object]:
        """The record ``meta.json`` keeps: method, dimensions, shrinkage, digest."""
        return {
            "method": "pca",
            "dim": self.dim,
            "input_dim": self.input_dim,
            "shrinkage": self.shrinkage,
            "n_fit": self.n_fit,
            "file": WHITEN_FILE,
            "sha256": self.digest(),
        }


def whitening_dim(
    requested: int | None,
    n_fit: int,
    n_features: int,
    *,
    samples_per_dim: int = WHITEN_SAMPLES_PER_DIM,
) -> int:
    """The whitened dimension: the request, capped by the dimension rule.

    ``min(requested, n_features, n_fit - 1, n_fit // samples_per_dim)``; ``None`` asks for
    as many as the rule allows. Centring costs one dimension, hence ``n_fit - 1``.
    """
    cap = min(n_features, n_fit - 1, n_fit // max(1, samples_per_dim))
    return max(0, cap if requested is None else min(requested, cap))


def check_fit_size(
    dim: int | None, n_fit: int, n_features: int, *, samples_per_dim: int = WHITEN_SAMPLES_PER_DIM
) -> int:
    """The whitened dimension for ``n_fit`` images (see :func:`whitening_dim`).

    Raises:
        SnaplookError: fewer than :data:`MIN_WHITEN_DIM` dimensions (or than ``dim``, if
            smaller) under the rule: the gallery is too small to whiten.
    """
    k = whitening_dim(dim, n_fit, n_features, samples_per_dim=samples_per_dim)
    if k < min(MIN_WHITEN_DIM, dim or MIN_WHITEN_DIM):
        raise SnaplookError(
            f"whitening needs at least {samples_per_dim * MIN_WHITEN_DIM + 1} gallery images "
            f"for {MIN_WHITEN_DIM} dimensions ({samples_per_dim} per dimension); this gallery "
            f"has {n_fit}. Index without --whiten, or add images."
        )
    return k


def fit_whitening(
    features: np.ndarray,
    *,
    dim: int | None = None,
    shrinkage: float = DEFAULT_SHRINKAGE,
    samples_per_dim: int | None = WHITEN_SAMPLES_PER_DIM,
) -> Whitening:
    """Fit centring + PCA-whitening on (gallery) features.

    The features are L2-normalised, centred on their mean, and their principal directions
    found (eigenvectors of the covariance, or right singular vectors when there are fewer
    samples than dimensions); each direction's sign is fixed (largest component positive),
    so a refit on the same features is bit-for-bit the same transform.

    Args:
        features: ndarray of shape (n, d).
        dim: the whitened dimension k, default=None (as many as the dimension rule allows).
        shrinkage: eigenvalue shrinkage in [0, 1], default=0 (full whitening).
        samples_per_dim: the dimension rule, k <= n // samples_per_dim; None turns the
            rule off (k <= n - 1 only; overfits small galleries, for measurement).

    Returns:
        :class:`Whitening`.

    Raises:
        SnaplookError: non-finite features, a bad ``dim`` or ``shrinkage``, or too few
            features for :data:`MIN_WHITEN_DIM` dimensions under the rule.
    """
    import numpy as np

    from snaplook.transform_utils import l2_normalize

    x = np.atleast_2d(np.asarray(features, dtype=np.float32))
    n, d = x.shape
    if dim is not None and dim < 1:
        raise SnaplookError(f"--whiten pca:DIM needs DIM >= 1, got {dim}.")
    if not 0.0 <= shrinkage <= 1.0:
        raise SnaplookError(f"whitening shrinkage must lie in [0, 1], got {shrinkage}.")
    if not np.isfinite(x).all():
        raise SnaplookError("cannot fit whitening: the features contain NaN or infinity.")
    k = check_fit_size(dim, n, d, samples_per_dim=samples_per_dim or 1)
    unit = l2_normalize(x).astype(np.float64)
    mean = unit.mean(axis=0)
    eigenvalues, vectors = _principal_axes(unit - mean, k)
    vectors *= np.where(_largest_positive(vectors), 1.0, -1.0)
    shrunk = (1.0 - shrinkage) * eigenvalues + shrinkage * eigenvalues.mean()
    floor = max(float(shrunk.max()) * 1e-12, 1e-30)  # a zero variance: no division by zero
    projection = vectors / np.sqrt(np.maximum(shrunk, floor))
    return Whitening(
        mean_=mean.astype(np.float32),
        projection_=projection.astype(np.float32),
        eigenvalues_=eigenvalues,
        shrinkage=float(shrinkage),
        n_fit=int(n),
    )


def _principal_axes(centred: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest covariance eigenvalues (descending) and their directions, (d, k)."""
    import numpy as np

    n, d = centred.shape
    if n > d:
        values, vectors = np.linalg.eigh(centred.T @ centred / max(1, n - 1))
        order = np.argsort(-values, kind="stable")[:k]
        return np.maximum(values[order], 0.0), vectors[:, order]
    # Fewer samples than dimensions: the n x n Gram matrix has the same non-zero spectrum,
    # and its eigendecomposition is several times faster than an SVD of the data.
    values, left = np.linalg.eigh(centred @ centred.T)
    order = np.argsort(-values, kind="stable")[:k]
    values = np.maximum(values[order], 0.0)
    vectors = centred.T @ left[:, order]
    vectors /= np.maximum(np.linalg.norm(vectors, axis=0), 1e-300)
    return values / max(1, n - 1), vectors


def _largest_positive(vectors: np.ndarray) -> np.ndarray:
    import numpy as np

    rows = np.argmax(np.abs(vectors), axis=0)
    return vectors[rows, np.arange(vectors.shape[1])] >= 0


def _arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    import numpy as np

    digest = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        header = {"name": name, "dtype": value.dtype.str, "shape": list(value.shape)}
        digest.update(json.dumps(header, sort_keys=True).encode() + b"\n")
        digest.update(value.tobytes())
    return digest.hexdigest()


def save_whitening(whitening: Whitening, path: str | Path) -> str:
    """Write ``whitening`` as an ``.npz`` of plain arrays (atomically); return its digest.

    The digest is :meth:`Whitening.digest`, which :func:`load_whitening` checks.
    """
    import numpy as np

    from snaplook.io_utils import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **whitening.arrays())
    return whitening.digest()


def load_whitening(path: str | Path, *, sha256: str | None = None) -> Whitening:
    """Read a whitening written by :func:`save_whitening`, without pickles.

    Args:
        path: the ``whiten.npz`` file.
        sha256: the digest ``meta.json`` recorded; when given, the file must match it.

    Raises:
        SnaplookError: missing, unreadable or damaged file, another format version, or a
            digest that does not match (the file changed after indexing).
    """
    import zipfile

    import numpy as np

    path = Path(path)
    names = ("format_version", "mean", "projection", "eigenvalues", "shrinkage", "n_fit")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: np.array(data[name]) for name in names}
    except FileNotFoundError:
        raise SnaplookError(
            f"{path} is missing; the index was built with --whiten. Rebuild it, or run "
            "index --update --refit to fit the whitening again."
        ) from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise SnaplookError(
            f"{path}: cannot read the whitening ({type(exc).__name__}: {exc}); the file is "
            "damaged. Run index --update --refit, or index again."
        ) from exc
    if int(arrays["format_version"]) != WHITEN_FORMAT_VERSION:
        raise SnaplookError(
            f"{path} has whitening format {int(arrays['format_version'])}; this snaplook reads "
            f"format {WHITEN_FORMAT_VERSION}. Run index --update --refit."
        )
    if sha256 is not None and _arrays_digest(arrays) != sha256:
        raise SnaplookError(
            f"{path} does not match the SHA-256 in meta.json; it changed after indexing. "
            "Run index --update --refit, or index again."
        )
    projection, mean = arrays["projection"], arrays["mean"]
    if projection.ndim != 2 or mean.shape != (projection.shape[0],):
        raise SnaplookError(f"{path}: whitening arrays of inconsistent shapes; file damaged.")
    return Whitening(
        mean_=mean,
        projection_=projection,
        eigenvalues_=arrays["eigenvalues"],
        shrinkage=float(arrays["shrinkage"]),
        n_fit=int(arrays["n_fit"]),
    )


def parse_whiten(text: str | None) -> int | None | bool:
    """Read a ``--whiten`` value: "none" -> False, "pca" -> None (the rule's dimension),
    "pca:DIM" -> DIM.

    Raises:
        SnaplookError: anything else.
    """
    value = (text or "none").strip().lower()
    if value in ("none", "off", ""):
        return False
    method, _, dim = value.partition(":")
    if method == "pca" and not dim:
        return None
    if method == "pca" and dim.isascii() and dim.isdigit() and int(dim) >= 1:
        return int(dim)
    raise SnaplookError(f"--whiten: {text!r} is not none, pca or pca:DIM (e.g. pca:64).")


# --- neighbours, query expansion, database-side augmentation ---


def nearest_neighbours(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    *,
    exclude_self: bool = False,
    first_row: int = 0,
    block_rows: int = NEIGHBOUR_BLOCK_ROWS,
) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar gallery rows (dot product) of each query, exactly.

    Ties go to the lower gallery row (a stable sort), so the result is deterministic.

    Args:
        queries: ndarray of shape (m, d); gallery: ndarray of shape (n, d).
        k: neighbours per query (at most n, or n - 1 with ``exclude_self``).
        exclude_self: queries are gallery rows (query i is row ``first_row + i``): leave
            each one's own row out.
        first_row: with ``exclude_self``, the gallery row of the first query.
        block_rows: queries per block of the similarity matrix.

    Returns:
        (rows, similarities): int64 and float32 ndarrays of shape (m, k), best first.
    """
    import numpy as np

    q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    g = np.atleast_2d(np.asarray(gallery, dtype=np.float32))
    k = min(k, len(g) - (1 if exclude_self else 0))
    rows = np.zeros((len(q), max(k, 0)), dtype=np.int64)
    sims = np.zeros((len(q), max(k, 0)), dtype=np.float32)
    if k <= 0:
        return rows, sims
    for start in range(0, len(q), block_rows):
        block = q[start : start + block_rows] @ g.T
        if exclude_self:
            own = np.arange(start, start + len(block))
            block[own - start, first_row + own] = -np.inf
        order = np.argsort(-block, axis=1, kind="stable")[:, :k]
        rows[start : start + len(block)] = order
        sims[start : start + len(block)] = np.take_along_axis(block, order, axis=1)
    return rows, sims


def expand_vectors(
    vectors: np.ndarray,
    neighbours: np.ndarray,
    similarities: np.ndarray,
    *,
    alpha: float = DEFAULT_ALPHA,
) -> np.ndarray:
    """alpha-weighted expansion: ``l2(v + sum_i max(s_i, 0) ** alpha * n_i)``.

    Args:
        vectors: ndarray of shape (m, d), unit rows (weight 1: their self-similarity).
        neighbours: ndarray of shape (m, K, d): each vector's K neighbours, unit rows.
        similarities: ndarray of shape (m, K): vector-neighbour similarities.
        alpha: the weight exponent, default=3; 0 averages uniformly.

    Returns:
        ndarray of shape (m, d), float32, unit rows.
    """
    import numpy as np

    from snaplook.transform_utils import l2_normalize

    weights = np.maximum(np.asarray(similarities, dtype=np.float32), 0.0) ** alpha
    summed = np.asarray(vectors, dtype=np.float32) + np.einsum("mk,mkd->md", weights, neighbours)
    return l2_normalize(summed)


def query_expansion(
    queries: np.ndarray,
    gallery: np.ndarray,
    *,
    k: int,
    alpha: float = DEFAULT_ALPHA,
    exclude_self: bool = False,
) -> np.ndarray:
    """alpha-query expansion (alpha-QE): each query plus its k nearest gallery vectors.

    Args:
        queries: ndarray of shape (m, d), unit rows; gallery: ndarray of shape (n, d), unit
            rows (whitened and database-augmented, if the index is).
        k: gallery neighbours added; 0 returns the queries unchanged.
        alpha: weight exponent, default=3.
        exclude_self: queries are the gallery rows (leave-one-out evaluation).

    Returns:
        ndarray of shape (m, d), float32, unit rows.
    """
    import numpy as np

    q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    if k <= 0:
        return q.copy()
    g = np.asarray(gallery, dtype=np.float32)
    rows, sims = nearest_neighbours(q, g, k, exclude_self=exclude_self)
    return expand_vectors(q, g[rows], sims, alpha=alpha)


def database_augmentation(
    gallery: np.ndarray,
    *,
    k: int,
    alpha: float = DEFAULT_ALPHA,
    out: np.ndarray | None = None,
    block_rows: int = NEIGHBOUR_BLOCK_ROWS,
) -> np.ndarray:
    """alpha-database-side augmentation (alpha-DBA): each gallery vector plus its k nearest
    other gallery vectors (its own row always weighs 1, duplicates or not).

    Exact: O(n^2 d) in blocks of ``block_rows`` rows, so the memory beyond ``gallery`` and
    ``out`` is one block's similarities and neighbours whatever n is.

    Args:
        gallery: ndarray of shape (n, d), unit rows (may be memory-mapped).
        k: neighbours added; 0 returns the gallery unchanged.
        alpha: weight exponent, default=3.
        out: ndarray of shape (n, d), float32, to write into (e.g. a memory-mapped file);
            default None: a new array.

    Returns:
        ``out`` (or a new ndarray) of shape (n, d), float32, unit rows.
    """
    import numpy as np

    g = np.atleast_2d(np.asarray(gallery, dtype=np.float32))
    out = np.empty(g.shape, dtype=np.float32) if out is None else out
    for start in range(0, len(g), block_rows):
        block = np.asarray(g[start : start + block_rows])
        if k <= 0:
            out[start : start + len(block)] = block
            continue
        rows, sims = nearest_neighbours(block, g, k, exclude_self=True, first_row=start)
        out[start : start + len(block)] = expand_vectors(block, g[rows], sims, alpha=alpha)
    return out


# --- one call for evaluate and query ---


@dataclass(frozen=True)
class Postprocessing:
    """Which training-free steps follow the embedding, in order: whitening, DBA, QE.

    Attributes:
        whiten: False (none), None (PCA to the rule's dimension) or the requested dimension.
        shrinkage: the whitening's eigenvalue shrinkage.
        dba: gallery neighbours of alpha-DBA (0: none).
        qe: gallery neighbours of alpha-QE (0: none).
        alpha: the weight exponent of both.
    """

    whiten: int | None | bool = False
    shrinkage: float = DEFAULT_SHRINKAGE
    dba: int = 0
    qe: int = 0
    alpha: float = DEFAULT_ALPHA

    @property
    def active(self) -> bool:
        return self.whiten is not False or self.dba > 0 or self.qe > 0

    def name(self) -> str:
        """A short label: "" when inactive, else e.g. "pca64-dba1-qe2"."""
        parts = []
        if self.whiten is not False:
            parts.append("pca" if self.whiten is None else f"pca{self.whiten}")
        parts += [f"dba{self.dba}"] * (self.dba > 0) + [f"qe{self.qe}"] * (self.qe > 0)
        return "-".join(parts)

    def describe(self) -> dict[str, object]:
        """The record a report or ``meta.json`` keeps (the whitening's own record is added
        by the caller that fitted it)."""
        whiten = (
            "none"
            if self.whiten is False
            else "pca" + ("" if self.whiten is None else f":{self.whiten}")
        )
        return {
            "whiten": whiten,
            "shrinkage": self.shrinkage,
            "dba": self.dba,
            "qe": self.qe,
            "alpha": self.alpha,
        }


def postprocess_features(
    queries: np.ndarray,
    gallery: np.ndarray,
    settings: Postprocessing,
    *,
    leave_one_out: bool = False,
    whitening: Whitening | None = None,
) -> tuple[np.ndarray, np.ndarray, Whitening | None]:
    """Apply ``settings`` to query and gallery features: whiten (fitted on the gallery
    unless ``whitening`` is given), alpha-DBA on the gallery, alpha-QE of the queries on it.

    Args:
        queries: ndarray of shape (m, d); gallery: ndarray of shape (n, d).
        settings: :class:`Postprocessing`.
        leave_one_out: queries are the gallery rows (each query's own row is left out of
            its expansion; the whitening and DBA, fitted on the gallery, include it).
        whitening: a fitted whitening to use instead of fitting one.

    Returns:
        (queries, gallery, whitening): float32 unit rows, and the whitening used (or None).

    Raises:
        SnaplookError: see :func:`fit_whitening`.
    """
    from snaplook.transform_utils import l2_normalize

    q, g = l2_normalize(queries), l2_normalize(gallery)
    if settings.whiten is not False:
        if whitening is None:
            whitening = fit_whitening(g, dim=settings.whiten, shrinkage=settings.shrinkage)
        q, g = whitening.transform(q), whitening.transform(g)
    g = database_augmentation(g, k=settings.dba, alpha=settings.alpha)
    q = query_expansion(q, g, k=settings.qe, alpha=settings.alpha, exclude_self=leave_one_out)
    return q, g, whitening


#: Leave-one-out evaluation refits whitening and DBA without each query (O(n^4) for
#: whitening) up to this many images; above it, they are fitted once on all images.
LEAVE_ONE_OUT_REFIT_MAX = 1000


def refits_per_query(settings: Postprocessing, n_images: int) -> bool:
    """Whether leave-one-out evaluation of ``settings`` on ``n_images`` refits per query
    (:func:`leave_one_out_distances`), or fits once on all images, each query included
    (:func:`postprocess_features` with ``leave_one_out=True``; transductive)."""
    fitted = settings.whiten is not False or settings.dba > 0
    return fitted and n_images <= LEAVE_ONE_OUT_REFIT_MAX


def leave_one_out_distances(features: np.ndarray, settings: Postprocessing) -> np.ndarray:
    """Cosine distances for leave-one-out evaluation of ``settings`` on ``features``.

    Each image queries all the others. A real query is not in the gallery, so whitening
    and DBA are fitted, for each query, on the other n - 1 images only: the whitening in
    the (n - 1) x (n - 1) Gram space, which gives the transform :func:`fit_whitening` fits
    on them without fitting on the features n times. O(n^4): meant for up to
    :data:`LEAVE_ONE_OUT_REFIT_MAX` images (see :func:`refits_per_query`).

    Args:
        features: ndarray of shape (n, d).
        settings: :class:`Postprocessing`.

    Returns:
        ndarray of shape (n, n), float64, inf on the diagonal.

    Raises:
        SnaplookError: the dimension rule leaves fewer than :data:`MIN_WHITEN_DIM`
            dimensions.
    """
    import numpy as np

    from snaplook.transform_utils import l2_normalize

    x = l2_normalize(features)
    n = len(x)
    gram = x.astype(np.float64) @ x.astype(np.float64).T
    distances = np.full((n, n), np.inf)
    for i in range(n):
        keep = np.arange(n) != i
        if settings.whiten is False:
            q, g = x[i : i + 1], x[keep]
        else:
            q, g = _whiten_without(x, gram, i, settings)
        g = database_augmentation(g, k=settings.dba, alpha=settings.alpha)
        q = query_expansion(q, g, k=settings.qe, alpha=settings.alpha)
        distances[i, keep] = 1.0 - (q @ g.T)[0]
    return distances


def _whiten_without(
    x: np.ndarray, gram: np.ndarray, i: int, settings: Postprocessing
) -> tuple[np.ndarray, np.ndarray]:
    """(query row i, the other rows) whitened by the whitening fitted without row i,
    from the Gram matrix of the unit rows ``x`` (see :func:`leave_one_out_distances`)."""
    import numpy as np

    from snaplook.transform_utils import l2_normalize

    n = len(x)
    keep = np.arange(n) != i
    m = n - 1
    k = whitening_dim(settings.whiten, m, x.shape[1])
    if k < min(MIN_WHITEN_DIM, settings.whiten or MIN_WHITEN_DIM):
        fit_whitening(x[keep], dim=settings.whiten)  # raises the user-facing error
    g = gram[np.ix_(keep, keep)]
    row_mean = g.mean(axis=1)
    total = row_mean.mean()
    values, vectors = np.linalg.eigh(g - row_mean[:, None] - row_mean[None, :] + total)
    order = np.argsort(-values, kind="stable")[:k]
    values, vectors = np.maximum(values[order], 1e-300), vectors[:, order]
    variances = values / max(1, m - 1)
    s = settings.shrinkage
    shrunk = (1.0 - s) * variances + s * variances.mean()
    shrunk = np.sqrt(np.maximum(shrunk, max(float(shrunk.max()) * 1e-12, 1e-30)))
    # gallery coordinates: Xc V / sqrt(shrunk), with V = Xc^T U / sqrt(values) -> U sqrt(values)
    gallery = vectors * np.sqrt(values) / shrunk
    q_row = gram[i, keep]
    dots = q_row - q_row.mean() - row_mean + total  # (x_i - mean) . (x_j - mean)
    query = (dots @ vectors) / np.sqrt(values) / shrunk
    return l2_normalize(query[None]), l2_normalize(gallery)


def parse_neighbours(text: str, *, option: str) -> int:
    """Read a ``--qe`` / ``--dba`` value: a count of neighbours, 0 for none.

    Raises:
        SnaplookError: not a non-negative integer.
    """
    value = text.strip()
    if not (value.isascii() and value.isdigit()):
        raise SnaplookError(f"{option}: {text!r} is not a number of neighbours (0, 1, 2, ...).")
    return int(value)


def postprocessing_grid(
    whitens: Sequence[str] = (), qes: Sequence[str] = (), dbas: Sequence[str] = ()
) -> list[Postprocessing]:
    """Every combination of ``--whiten`` x ``--dba`` x ``--qe`` values, in order (empty
    lists mean none), as :class:`Postprocessing` settings to compare.

    Raises:
        SnaplookError: a value :func:`parse_whiten` or :func:`parse_neighbours` refuses.
    """
    import itertools

    whiten = [parse_whiten(w) for w in whitens or ["none"]]
    dba = [parse_neighbours(k, option="--dba") for k in dbas or ["0"]]
    qe = [parse_neighbours(k, option="--qe") for k in qes or ["0"]]
    grid = [Postprocessing(whiten=w, dba=d, qe=q) for w, d, q in itertools.product(whiten, dba, qe)]
    return list(dict.fromkeys(grid))


def expand_queries(
    queries: np.ndarray,
    search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    gallery: Any,
    *,
    k: int,
    alpha: float = DEFAULT_ALPHA,
) -> np.ndarray:
    """alpha-QE through an index's search: each query plus its k nearest gallery rows.

    Args:
        queries: ndarray of shape (m, d).
        search: ``search(unit_queries, k) -> (distances, rows)``, cosine distances
            (1 - cos) nearest first, row -1 where fewer were found (``Index.search``).
        gallery: the gallery rows, unit vectors; ``gallery[rows]`` for a 1-d int array.
        k: neighbours added; 0 returns the queries L2-normalised.
        alpha: weight exponent, default=3.

    Returns:
        ndarray of shape (m, d), float32, unit rows.
    """
    import numpy as np

    from snaplook.transform_utils import l2_normalize

    q = l2_normalize(np.atleast_2d(queries))
    if k <= 0 or len(q) == 0:
        return q
    distances, rows = search(q, k)
    found = rows >= 0
    neighbours = np.asarray(gallery[np.where(found, rows, 0).ravel()], dtype=np.float32)
    neighbours = neighbours.reshape(*rows.shape, q.shape[1])
    similarities = np.where(found, 1.0 - distances, 0.0)
    return expand_vectors(q, neighbours, similarities, alpha=alpha)


# --- an index's search vectors ---


def fit_rows(n: int, *, seed: int, max_rows: int = WHITEN_FIT_MAX_ROWS) -> np.ndarray:
    """The gallery rows an index fits its whitening on: all of them up to ``max_rows``,
    else a sample of ``max_rows`` drawn with ``seed``, in row order (deterministic)."""
    import numpy as np

    if n <= max_rows:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))


def write_search_vectors(
    features: Any,
    folder: str | Path,
    settings: Postprocessing,
    *,
    whitening: Whitening | None = None,
    seed: int = 0,
    block_rows: int = NEIGHBOUR_BLOCK_ROWS,
) -> dict[str, Any]:
    """Write an index's search vectors: its features whitened and/or database-augmented.

    Writes ``folder/search.npy`` ((n, k) float32, unit rows) and, when ``settings``
    whitens, ``folder/whiten.npz``. The features are read in blocks (they may be memory-
    mapped shards); the whitening is fitted on :func:`fit_rows` of them unless given.

    Args:
        features: (n, d) array-like of unit rows (an ndarray or ``ShardedFeatures``).
        folder: the index folder being assembled.
        settings: :class:`Postprocessing` (its ``qe`` is a query setting and is ignored).
        whitening: a fitted whitening to keep (``index --update`` without ``--refit``).
        seed: seeds the fit sample of galleries over :data:`WHITEN_FIT_MAX_ROWS` rows.

    Returns:
        the ``meta.json["postprocess"]`` record: settings, the whitening's record (or
        None), the search file, its dimension and SHA-256.

    Raises:
        SnaplookError: see :func:`fit_whitening`; a kept whitening of another dimension.
    """
    import numpy as np

    from snaplook.io_utils import file_sha256
    from snaplook.transform_utils import l2_normalize

    folder = Path(folder)
    n = features.shape[0]
    if settings.whiten is not False and whitening is None:
        sample = np.asarray(features[fit_rows(n, seed=seed)], dtype=np.float32)
        whitening = fit_whitening(sample, dim=settings.whiten, shrinkage=settings.shrinkage)
        del sample
    if settings.whiten is False:
        whitening = None
    dim = whitening.dim if whitening is not None else features.shape[1]
    plain = folder / ("search.plain.npy" if settings.dba > 0 else SEARCH_FILE)
    vectors = np.lib.format.open_memmap(plain, mode="w+", dtype=np.float32, shape=(n, dim))
    for start in range(0, n, block_rows):
        block = np.asarray(features[start : start + block_rows], dtype=np.float32)
        vectors[start : start + len(block)] = (
            whitening.transform(block) if whitening is not None else l2_normalize(block)
        )
    if settings.dba > 0:
        out = np.lib.format.open_memmap(
            folder / SEARCH_FILE, mode="w+", dtype=np.float32, shape=(n, dim)
        )
        database_augmentation(vectors, k=settings.dba, alpha=settings.alpha, out=out)
        out.flush()
        del out, vectors
        plain.unlink()
    else:
        vectors.flush()
        del vectors
    record: dict[str, Any] = {**settings.describe(), "whitening": None}
    record.pop("qe")
    if whitening is not None:
        save_whitening(whitening, folder / WHITEN_FILE)
        record["whitening"] = whitening.describe()
    record.update(file=SEARCH_FILE, dim=int(dim), sha256=file_sha256(folder / SEARCH_FILE))
    return record
