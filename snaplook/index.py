"""The on-disk gallery index: loading it, and exact cosine k-nearest-neighbour search over it.

An index is a folder: ``meta.json`` (what produced the features, and the list of shards)
and ``features/shard-NNNNN.npy`` (float32 (rows, d), rows L2-normalised) each with its
``features/shard-NNNNN.csv`` manifest, so ``--update`` rewrites only the shards it
touches. Indexes of format 1 (one ``features.npy`` + ``manifest.csv``) still load.
Nothing is pickled; search reads the memory-mapped shards block by block.
:mod:`snaplook.indexing` builds the folder; :mod:`snaplook.results` writes query results.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snaplook.ann import AnnIndex
from snaplook.catalog import CATALOG_FILE, Products, load_products
from snaplook.errors import SnaplookError
from snaplook.features import Embedder, Skipped
from snaplook.io_utils import ManifestRow
from snaplook.options import (
    DEFAULT_BACKBONE,
    DEFAULT_BATCH_SIZE,
    DEFAULT_GEM_P,
    DEFAULT_INDEX_DIR,
    DEFAULT_K,
    DEFAULT_SEED,
    LEGACY_POOLING,
)

if TYPE_CHECKING:
    import numpy as np

    from snaplook.postprocess import Whitening

logger = logging.getLogger(__name__)

#: Version of the index folder layout; an index from a newer snaplook is refused.
#: 1: one ``features.npy`` + ``manifest.csv``; 2: shards listed in ``meta.json``.
INDEX_FORMAT_VERSION = 2
#: The sub-folder of an index that holds the shards.
SHARDS_DIR = "features"
_SHARD_NAME = re.compile(r"shard-[0-9]{5,}")
#: Gallery rows per GEMM block in search: bounds the similarity matrix to
#: n_queries x 8192 float32 whatever the gallery size.
SEARCH_BLOCK_ROWS = 8192


def _load_ann(path: Path, meta: dict[str, Any], features: Any, ann: bool) -> Any:
    if not ann:
        return None
    from snaplook.ann import load_ann

    return load_ann(path, meta.get("ann"), features)


def _replace_row(row: ManifestRow, new_row: int) -> ManifestRow:
    return dataclasses.replace(row, row=new_row)


class ShardedFeatures:
    """The (n, d) float32 feature matrix of a sharded index, read-only, shard by shard.

    Behaves like an ndarray for what search and scripts need: ``shape``, ``dtype``,
    ``len()``, a row (``features[i]``), a row range (``features[a:b]``, a view when it
    lies in one shard), rows by number or mask (``features[[3, 9]]``, gathered shard by
    shard) and ``np.asarray(features)``, which concatenates the shards into one array in
    memory (only then). ``shards`` holds the per-shard memory maps.
    """

    def __init__(self, shards: Sequence[np.ndarray]) -> None:
        import numpy as np

        self.shards = list(shards)
        self.offsets = [0]
        for shard in self.shards:
            self.offsets.append(self.offsets[-1] + shard.shape[0])
        self.dim = self.shards[0].shape[1] if self.shards else 0
        self.dtype = np.dtype(np.float32)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.offsets[-1], self.dim)

    @property
    def ndim(self) -> int:
        return 2

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, key: Any) -> np.ndarray:
        import bisect

        import numpy as np

        n = len(self)
        if isinstance(key, slice) and key.step in (None, 1):
            start, stop, _ = key.indices(n)
            pieces = []
            for shard, offset in zip(self.shards, self.offsets):
                lo, hi = max(start, offset), min(stop, offset + shard.shape[0])
                if lo < hi:
                    pieces.append(shard[lo - offset : hi - offset])
            if len(pieces) == 1:
                return pieces[0]
            return np.concatenate(pieces) if pieces else np.zeros((0, self.dim), np.float32)
        if isinstance(key, (int, np.integer)):
            i = int(key) + n if int(key) < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"row {int(key)} is out of range for {n} rows")
            s = bisect.bisect_right(self.offsets, i) - 1
            return self.shards[s][i - self.offsets[s]]
        rows = np.asarray(key)
        if rows.dtype == bool and rows.shape == (n,):
            rows = np.flatnonzero(rows)
        if rows.ndim == 1 and rows.dtype.kind in "iu":
            return self._take(rows.astype(np.int64))
        return np.asarray(self)[key]

    def _take(self, rows: np.ndarray) -> np.ndarray:
        """Rows by number (fancy indexing), gathered shard by shard: nothing concatenated."""
        import numpy as np

        n = len(self)
        rows = np.where(rows < 0, rows + n, rows)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"row numbers out of range for {n} rows")
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        which = np.searchsorted(np.asarray(self.offsets), rows, side="right") - 1
        for s in np.unique(which):
            mask = which == s
            out[mask] = self.shards[s][rows[mask] - self.offsets[s]]
        return out

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        import numpy as np

        whole = self[0 : len(self)]
        return np.asarray(whole, dtype=dtype)

    def __repr__(self) -> str:
        return f"ShardedFeatures(shape={self.shape}, shards={len(self.shards)})"


@dataclass
class Index:
    """A loaded index: L2-normalised gallery features, their manifest and meta.

    Attributes:
        path: the index folder.
        features: (n, d) float32, unit rows, memory-mapped: a :class:`ShardedFeatures`
            (format 2) or an ndarray (format 1). ``np.asarray(index.features)`` gives one
            array (concatenating the shards).
        manifest: one :class:`ManifestRow` per row of ``features``.
        meta: the parsed ``meta.json``.
        shards_: the ``meta.json`` shard entries (name, rows, sha256) with their first
            row (``start``); empty for a format-1 index.
    """

    path: Path
    features: np.ndarray | ShardedFeatures
    manifest: list[ManifestRow]
    meta: dict[str, Any]
    shards_: list[dict[str, Any]] = field(default_factory=list)
    root_: Path = field(init=False)
    #: The checked FAISS index when the folder has one (see :mod:`snaplook.ann`).
    ann_: AnnIndex | None = None
    products_: Products | None = field(init=False, default=None, repr=False)
    #: The whitened and/or database-augmented gallery (``search.npy``, memory-mapped) when
    #: the index was built with ``--whiten`` or ``--dba``; None: it searches ``features``.
    search_vectors_: np.ndarray | None = None
    #: The whitening queries go through (``whiten.npz``), when the index has one.
    whitening_: Whitening | None = None

    def __post_init__(self) -> None:
        self.root_ = Path(self.meta.get("root", self.path))

    def __len__(self) -> int:
        return len(self.manifest)

    @property
    def vectors(self) -> np.ndarray | ShardedFeatures:
        """The (n, k) unit rows :meth:`search` compares queries with: ``features``, or the
        whitened and/or augmented gallery of an index built with ``--whiten``/``--dba``."""
        return self.features if self.search_vectors_ is None else self.search_vectors_

    def prepare(self, queries: np.ndarray) -> np.ndarray:
        """Map embedder features of queries into the space :attr:`vectors` live in:
        L2-normalised, then whitened when the index is.

        Returns:
            ndarray of shape (m, k), float32, unit rows.
        """
        from snaplook.transform_utils import l2_normalize

        if self.whitening_ is not None:
            return self.whitening_.transform(queries)
        return l2_normalize(queries)

    def gallery_path(self, row: int) -> Path:
        """Absolute path of the gallery image in ``row`` (resolved under the indexed root)."""
        rel = Path(self.manifest[row].path)
        return rel if rel.is_absolute() else self.root_ / rel

    def embedder(self, *, head: Any = None, **overrides: Any) -> Embedder:
        """An :class:`Embedder` identical to the one that built this index.

        ``precision`` (or ``runtime``) may be passed: None means the index's; another
        precision than the index's is refused.

        Raises:
            SnaplookError: ``head`` is not the head the index was built with (or the
                index has a head and none is given); see :func:`check_head`. A
                ``precision`` other than the index's.
        """
        check_head(self.meta, head, self.path)
        embedder = _embedder_from_meta(self.meta, **overrides)
        if head is None:
            return embedder
        from snaplook.features import with_head

        return with_head(embedder, head)

    def search(
        self,
        queries: np.ndarray,
        k: int = DEFAULT_K,
        *,
        allowed: np.ndarray | None = None,
        exact: bool = False,
        nprobe: int | None = None,
        ef: int | None = None,
        prepared: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Cosine k-NN of ``queries`` against the gallery (:attr:`vectors`).

        Exact (:func:`cosine_knn`) when the index has no FAISS index, with ``exact``, or
        when ``allowed`` leaves fewer than ``snaplook.ann.AUTO_EXACT_BELOW`` rows;
        otherwise FAISS candidates re-ranked exactly (:meth:`snaplook.ann.AnnIndex.search`).
        Distances are 1 - cos either way.

        Args:
            queries: ndarray of shape (m, d): embedder features, mapped by :meth:`prepare`
                here (whitened, if the index is), or already prepared with ``prepared``.
            k: neighbours per query, clamped to the gallery size n.
            allowed: optional bool ndarray of shape (n,): only these rows may be returned
                (a catalogue filter).
            exact: force exact search.
            nprobe: IVF lists visited per query (IVF indexes only).
            ef: HNSW search breadth (HNSW indexes only).
            prepared: ``queries`` come from :meth:`prepare` (e.g. expanded there by QE).

        Returns:
            (distances, rows) of shape (m, min(k, n)), nearest first, ties by row. Where
            fewer rows were found (``allowed`` keeps fewer than k, or the approximate
            search came back short), the missing results are row -1 at distance inf.

        Raises:
            SnaplookError: ``allowed`` is not a bool array of shape (n,).
        """
        import numpy as np

        from snaplook.ann import AUTO_EXACT_BELOW
        from snaplook.transform_utils import l2_normalize

        vectors = self.vectors
        if not prepared:
            queries = self.prepare(queries)
        n = vectors.shape[0]
        k = min(int(k), n)
        if allowed is not None:
            allowed = np.asarray(allowed)
            if allowed.shape != (n,):
                raise SnaplookError(
                    f"allowed must be a bool array of shape ({n},) (one flag per gallery row), "
                    f"got {allowed.dtype} of shape {allowed.shape}."
                )
            allowed = allowed.astype(bool, copy=False)
            n_allowed = int(allowed.sum())
            if exact or self.ann_ is None or n_allowed < AUTO_EXACT_BELOW:
                return cosine_knn(queries, vectors, k=k, normalized_gallery=True, allowed=allowed)
        if exact or self.ann_ is None or k < 1:
            return cosine_knn(queries, vectors, k=k, normalized_gallery=True)
        q = l2_normalize(np.atleast_2d(queries))
        return self.ann_.search(q, k, features=vectors, allowed=allowed, nprobe=nprobe, ef=ef)

    def products(self) -> Products | None:
        """The catalogue joined to the gallery rows, or None (loaded on first use)."""
        if self.products_ is None and (self.path / CATALOG_FILE).is_file():
            self.products_ = load_products(self.path, [row.path for row in self.manifest])
        return self.products_


def check_head(meta: dict[str, Any], head: Any, where: str | Path) -> None:
    """Refuse to embed queries with another head (or none) than an index was built with.

    Args:
        meta: the index's ``meta.json``.
        head: the ``snaplook.train.Head`` queries would go through, or None.
        where: the index folder, for the message.

    Raises:
        SnaplookError: the index has a head and ``head`` is None or another one, or the
            index has none and ``head`` is given.
    """
    want = meta.get("head")
    got = head.identity() if head is not None else None
    if want is None and got is None:
        return
    if want is None:
        raise SnaplookError(
            f"{where} was built without a head; querying it through head {got['name']!r} "
            "would compare unrelated features. Drop --head, or rebuild the index with "
            f"`snaplook index ... --head {got['name']}`."
        )
    described = f"head {want.get('name')!r} ({want.get('dim')}-d, sha256 {want['sha256'][:12]})"
    if got is None:
        raise SnaplookError(
            f"{where} was built with {described}; its features are that head's output, so "
            "queries need it too: pass --head with that head folder."
        )
    if got["sha256"] != want["sha256"]:
        raise SnaplookError(
            f"{where} was built with {described}, not head {got['name']!r} (sha256 "
            f"{got['sha256'][:12]}); pass the index's head or rebuild the index with this one."
        )


def recorded_settings(meta: dict[str, Any]) -> dict[str, Any]:
    """The :class:`Embedder` arguments an index or cache recorded: backbone, weights (name
    or file path), pooling (and GeM's exponent), test-time augmentation, seed, resize mode
    and precision."""
    weights_meta = meta.get("weights", {})
    kind = weights_meta.get("name", "imagenet")
    weights: str | Path = kind if kind in ("imagenet", "random") else weights_meta.get("path", "")
    return dict(
        backbone=meta.get("backbone", DEFAULT_BACKBONE),
        weights=weights,
        pooling=meta.get("pooling", LEGACY_POOLING),  # before pooling was recorded: avg
        gem_p=float(meta.get("gem_p", DEFAULT_GEM_P)),
        tta=meta.get("tta", "none"),  # indexes from before issue 24 had no TTA
        seed=int(weights_meta.get("seed", DEFAULT_SEED)),
        resize_mode=meta.get("resize", "pad"),
        # Indexes from before issue 12 carry no precision: they were computed in fp32.
        precision=meta.get("precision", "fp32"),
    )


def _embedder_from_meta(meta: dict[str, Any], **overrides: Any) -> Embedder:
    """Rebuild the embedder an index or cache recorded (same backbone, weights, pooling)."""
    weights_meta = meta.get("weights", {})
    kwargs = recorded_settings(meta)
    weights = kwargs["weights"]
    want_precision = kwargs.pop("precision")
    asked = overrides.pop("precision", None)
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    if asked is not None and asked != want_precision:
        got = Embedder(**kwargs, precision=asked).resolved_precision()
        if got != want_precision:
            raise SnaplookError(
                f"the index was built at --precision {want_precision}; querying it at {got} "
                f"would compare features of two different models. Pass --precision "
                f"{want_precision} (or leave it out), or rebuild the index at {got}."
            )
    embedder = Embedder(**kwargs, precision=want_precision)
    if want_precision == "int8":
        embedder.use_calibration(meta.get("calibration") or {})
    want = weights_meta.get("sha256")
    if want and weights_meta.get("name") == "file":
        got = embedder.identity()["weights"].get("sha256")
        if got != want:
            raise SnaplookError(
                f"weights file {weights} has changed since the index was built (sha256 "
                f"{got[:12] if got else None} != {want[:12]}); rebuild the index."
            )
    return embedder


def load_index(
    path: str | Path = DEFAULT_INDEX_DIR, *, mmap: bool = True, ann: bool = True
) -> Index:
    """Load and validate an index folder (sharded, or a format-1 ``features.npy``).

    Args:
        path: the index folder.
        mmap: memory-map the feature shards (or ``features.npy``) instead of reading them.
        ann: load and check the folder's FAISS index (``ann.faiss``) if it has one;
            False for exact search only (and to skip reading that file).

    Raises:
        SnaplookError: missing folder or file, unreadable or newer-format ``meta.json``,
            a pickled or non-float32 shard (or ``features.npy``), counts that disagree,
            manifest rows out of order or with paths that climb out of the indexed root
            (``..``), NaN/infinite features, or an ``ann.faiss`` that does not belong to the
            features (see :func:`snaplook.ann.load_ann`).
    """
    path = Path(path)
    meta = _read_meta(path)
    if "shards" in meta:
        features, manifest, shards = _load_shards(path, meta, mmap=mmap)
        _check_manifest(path, manifest)
        for shard in shards:
            _check_finite(path / SHARDS_DIR / f"{shard['name']}.npy", features.shards[shard["i"]])
        vectors, whitening = _load_search(path, meta, len(manifest), mmap=mmap)
        return Index(
            path=path,
            features=features,
            manifest=manifest,
            meta=meta,
            shards_=shards,
            ann_=_load_ann(path, meta, features if vectors is None else vectors, ann),
            search_vectors_=vectors,
            whitening_=whitening,
        )
    return _load_single_file(path, meta, mmap=mmap, ann=ann)


def _load_search(
    path: Path, meta: dict[str, Any], n: int, *, mmap: bool
) -> tuple[np.ndarray | None, Whitening | None]:
    """The search vectors and whitening of an index built with ``--whiten``/``--dba``
    (``meta.json["postprocess"]``), checked; (None, None) for any other index."""
    from snaplook.io_utils import load_npy
    from snaplook.postprocess import load_whitening

    record = meta.get("postprocess")
    if record is None:
        return None, None
    fix = "rebuild the index (or run index --update)"
    if not isinstance(record, dict) or not _is_int(record.get("dim"), 1):
        raise field_error(path / "meta.json", "postprocess", "an object with dim", record, fix)
    file = _confined(path, path / str(record.get("file", "")), "postprocess.file")
    vectors = load_npy(file, mmap=mmap)
    if vectors.dtype != "float32" or vectors.shape != (n, record["dim"]):
        raise SnaplookError(
            f"{file}: {vectors.dtype} of shape {vectors.shape}, expected float32 of shape "
            f"({n}, {record['dim']}) (one row per gallery image); {fix}."
        )
    _check_finite(file, vectors)
    whitening = None
    if record.get("whitening"):
        stored = record["whitening"]
        file = _confined(path, path / str(stored.get("file", "")), "postprocess.whitening.file")
        whitening = load_whitening(file, sha256=stored.get("sha256"))
        if whitening.dim != record["dim"]:
            raise SnaplookError(
                f"{path}: whiten.npz and search.npy disagree on the dimension; {fix}."
            )
    return vectors, whitening


def _read_meta(path: Path) -> dict[str, Any]:
    """The index folder's parsed ``meta.json``, checked for a format this snaplook reads."""
    if not path.is_dir():
        raise SnaplookError(
            f"{path}: no index here; build one with `snaplook index DIR --out {path}`."
        )
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        if not any((path / name).exists() for name in (SHARDS_DIR, "features.npy", "manifest.csv")):
            raise SnaplookError(
                f"{path}: no index here (no meta.json, features/, features.npy or manifest.csv: "
                f"`snaplook index` never wrote this folder); build one with `snaplook index "
                f"DIR --out {path}` or pass --index with an index folder."
            )
        raise SnaplookError(f"{meta_path} is missing: not a complete index; rebuild it.")
    meta = read_json_object(meta_path, fix="rebuild the index")
    version = meta.get("format_version")
    if not _is_int(version):
        raise SnaplookError(f"{meta_path} has no format_version; rebuild the index.")
    if version > INDEX_FORMAT_VERSION:
        raise SnaplookError(
            f"{path} has index format {version}, newer than this snaplook understands "
            f"({INDEX_FORMAT_VERSION}); upgrade snaplook or rebuild the index."
        )
    check_meta(meta, meta_path)
    return meta


def read_json_object(path: str | Path, *, fix: str) -> dict[str, Any]:
    """A JSON object read through the input gate (``kind="json"``, see
    :func:`snaplook.io_utils.read_input_bytes`).

    Args:
        path: the file (``meta.json``, ``head.json``).
        fix: what the user should do, ending every message ("rebuild the index").

    Raises:
        SnaplookError: the gate refuses the file; it is not UTF-8, not JSON, nested too
            deeply, holds an integer too long to parse, or is not an object. The message
            names the file and never quotes it.
    """
    from snaplook.io_utils import read_input_bytes

    data = read_input_bytes(path, kind="json")
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise SnaplookError(f"{path} is not valid JSON (not UTF-8 text); {fix}.") from None
    except RecursionError:
        raise SnaplookError(f"{path} nests too deeply to be snaplook's JSON; {fix}.") from None
    except ValueError as exc:  # JSONDecodeError, or an integer of thousands of digits
        where = f" (line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise SnaplookError(f"{path} is not valid JSON{where}; {fix}.") from None
    if not isinstance(value, dict):
        raise SnaplookError(f"{path} is not a JSON object; {fix}.")
    return value


#: The largest count, size or dimension a metadata field may hold (2**53: exact in JSON).
MAX_JSON_INT = 1 << 53


def _is_int(value: Any, low: int = 0) -> bool:
    # bool is an int to Python, never to a metadata field.
    return type(value) is int and low <= value <= MAX_JSON_INT


def describe_value(value: Any) -> str:
    """A metadata field's value for a message: short printable text or a number as it is,
    else only its type (a crafted file's content is never echoed)."""
    if isinstance(value, str) and len(value) <= 60 and value.isprintable():
        return repr(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and len(str(value)) <= 30:
        return str(value)
    return "null" if value is None else f"a {type(value).__name__}"


def field_error(path: str | Path, field: str, want: str, value: Any, fix: str) -> SnaplookError:
    """One line naming the file and the field that is wrong, and what it should be."""
    return SnaplookError(
        f"{path}: field {field} must be {want}, got {describe_value(value)}; {fix}."
    )


_META_TEXT = ("backbone", "pooling", "resize", "precision", "preprocessing", "root", "created")
_META_OBJECTS = ("weights", "head", "ann", "catalog", "calibration")
_META_INTS = (("count", 0), ("feature_dim", 1), ("shard_rows", 1), ("skipped", 0))


def check_meta(meta: dict[str, Any], meta_path: str | Path) -> None:
    """Check the types of the ``meta.json`` fields snaplook uses (plain checks).

    Raises:
        SnaplookError: one line naming ``meta_path`` and the first wrong field (a wrong
            type, null where a value is needed, an integer out of range).
    """
    fix = "rebuild the index"
    if "count" not in meta:
        raise field_error(meta_path, "count", "the number of rows", None, fix)
    for name, low in _META_INTS:
        if name in meta and not _is_int(meta[name], low):
            raise field_error(meta_path, name, f"an integer from {low} to 2**53", meta[name], fix)
    for name in _META_TEXT:
        if name in meta and not isinstance(meta[name], str):
            raise field_error(meta_path, name, "text", meta[name], fix)
    for name in _META_OBJECTS:
        if meta.get(name) is not None and not isinstance(meta[name], dict):
            raise field_error(meta_path, name, "an object or null", meta[name], fix)
    weights = meta.get("weights") or {}
    for name, ok, want in (
        ("name", lambda v: isinstance(v, str), "text"),
        ("seed", _is_int, "an integer from 0 to 2**53"),
        ("path", lambda v: isinstance(v, str), "text"),
        ("sha256", lambda v: v is None or isinstance(v, str), "text or null"),
    ):
        if name in weights and not ok(weights[name]):
            raise field_error(meta_path, f"weights.{name}", want, weights[name], fix)
    head = meta.get("head") or {}
    for name, ok, want in (
        ("name", lambda v: isinstance(v, str), "text"),
        ("sha256", lambda v: isinstance(v, str), "text"),
        ("dim", _is_int, "an integer from 0 to 2**53"),
    ):
        if head and not ok(head.get(name)):
            raise field_error(meta_path, f"head.{name}", want, head.get(name), fix)
    if "shards" in meta:
        _check_shard_entries(meta["shards"], meta_path)


def _check_shard_entries(entries: Any, meta_path: str | Path) -> None:
    fix = "rebuild the index"
    if not isinstance(entries, list) or not entries:
        raise field_error(meta_path, "shards", "a non-empty list of shards", entries, fix)
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise field_error(meta_path, f"shards[{i}]", "an object", entry, fix)
        name, rows = entry.get("name"), entry.get("rows")
        # The name becomes a file path: only shard-NNNNN, never "../x".
        if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name):
            raise field_error(meta_path, f"shards[{i}].name", "shard-NNNNN", name, fix)
        if not _is_int(rows, 1):
            raise field_error(
                meta_path, f"shards[{i}].rows", "an integer from 1 to 2**53", rows, fix
            )
        if "sha256" in entry and not isinstance(entry["sha256"], str):
            raise field_error(meta_path, f"shards[{i}].sha256", "text", entry["sha256"], fix)


def _load_single_file(path: Path, meta: dict[str, Any], *, mmap: bool, ann: bool) -> Index:
    """Format 1: one ``features.npy`` + ``manifest.csv``; ``--update`` rewrites it as shards."""
    from snaplook.io_utils import load_npy, read_manifest

    logger.info(
        "%s is a single-file index (format 1); `snaplook index ROOT --out %s --update` "
        "rewrites it as shards without embedding again.",
        path,
        path,
    )
    features = load_npy(path / "features.npy", mmap=mmap)
    if features.dtype.name != "float32" or features.ndim != 2:
        raise SnaplookError(
            f"{path / 'features.npy'} holds {features.dtype} of shape {features.shape}, "
            "expected float32 (n, d); rebuild the index."
        )
    manifest = read_manifest(path / "manifest.csv")
    count = meta.get("count")
    if not (len(manifest) == features.shape[0] == count):
        raise SnaplookError(
            f"{path}: features.npy has {features.shape[0]} rows, manifest.csv "
            f"{len(manifest)}, meta.json says {count}; the index is inconsistent, rebuild it."
        )
    dim = meta.get("feature_dim")
    if dim is not None and features.shape[1] != dim:
        raise SnaplookError(
            f"{path}: features.npy has dimension {features.shape[1]}, meta.json says {dim}; "
            "rebuild the index."
        )
    _check_manifest(path, manifest)
    _check_finite(path / "features.npy", features)
    return Index(
        path=path,
        features=features,
        manifest=manifest,
        meta=meta,
        ann_=_load_ann(path, meta, features, ann),
    )


def _load_shards(
    path: Path, meta: dict[str, Any], *, mmap: bool
) -> tuple[ShardedFeatures, list[ManifestRow], list[dict[str, Any]]]:
    from snaplook.io_utils import load_npy, read_manifest

    entries = meta["shards"]
    _check_shard_entries(entries, path / "meta.json")  # names and rows (check_meta did too)
    shards: list[dict[str, Any]] = []
    arrays: list[np.ndarray] = []
    manifest: list[ManifestRow] = []
    dim = meta.get("feature_dim")
    for i, entry in enumerate(entries):
        name, rows = entry["name"], entry["rows"]
        npy = _confined(path, path / SHARDS_DIR / f"{name}.npy", f"shards[{i}].name")
        array = load_npy(npy, mmap=mmap)
        if array.dtype.name != "float32" or array.ndim != 2:
            raise SnaplookError(
                f"{npy} holds {array.dtype} of shape {array.shape}, expected float32 (n, d); "
                "rebuild the index."
            )
        dim = array.shape[1] if dim is None else dim
        if array.shape != (rows, dim):
            raise SnaplookError(
                f"{npy} has shape {array.shape}, meta.json says ({rows}, {dim}); the index "
                "is inconsistent, rebuild it."
            )
        csv_path = _confined(path, npy.with_suffix(".csv"), f"shards[{i}].name")
        local = read_manifest(csv_path)
        if len(local) != rows or any(r.row != j for j, r in enumerate(local)):
            raise SnaplookError(
                f"{csv_path} does not list rows 0..{rows - 1} in order; the index is "
                "inconsistent, rebuild it."
            )
        start = len(manifest)
        manifest.extend(_replace_row(r, start + r.row) for r in local)
        arrays.append(array)
        shards.append({**entry, "start": start, "i": i})
    if len(manifest) != meta.get("count"):
        raise SnaplookError(
            f"{path}: the shards hold {len(manifest)} rows, meta.json's count says "
            f"{describe_value(meta.get('count'))}; the index is inconsistent, rebuild it."
        )
    return ShardedFeatures(arrays), manifest, shards


def _confined(folder: Path, path: Path, field: str) -> Path:
    """``path``, a file named by ``meta.json``'s ``field``, if its real path lies in ``folder``.

    A shard that is a symlink out of the index (to ``/dev/zero``, another user's file) is
    refused before it is opened.
    """
    try:
        inside = path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):
        inside = False
    if not inside:
        raise SnaplookError(
            f"{path} (field {field} of {folder / 'meta.json'}) leads out of the index folder; "
            "refusing to read it. Rebuild the index."
        )
    return path


def _check_manifest(path: Path, manifest: Sequence[ManifestRow]) -> None:
    from pathlib import PurePosixPath

    outside = 0
    for i, row in enumerate(manifest):
        if row.row != i:
            raise SnaplookError(
                f"{path / 'manifest.csv'}: line {i + 2} is row {row.row}, expected {i} (rows "
                "must be 0..n-1 in order); the index is inconsistent, rebuild it."
            )
        rel = PurePosixPath(row.path)
        if not row.path or (".." in rel.parts and not rel.is_absolute()):
            raise SnaplookError(
                f"{path / 'manifest.csv'}: row {i} has path {row.path!r}, which is empty or "
                "climbs out of the indexed root with '..'; refusing this index, rebuild it."
            )
        outside += rel.is_absolute()
    if outside:
        # snaplook itself records files reached through a symlink out of the root this
        # way; they are only ever read (shown in grids), never written.
        logger.info("%s: %d manifest paths lie outside the indexed root", path, outside)


def _check_finite(npy: Path, features: np.ndarray) -> None:
    import numpy as np

    for start in range(0, features.shape[0], SEARCH_BLOCK_ROWS):
        block = np.asarray(features[start : start + SEARCH_BLOCK_ROWS])
        if not np.isfinite(block).all():
            bad = start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
            raise SnaplookError(
                f"{npy}: row {bad} holds NaN or infinite values; the index is corrupt, rebuild it."
            )


def cosine_knn(
    queries: np.ndarray,
    gallery: np.ndarray,
    *,
    k: int = DEFAULT_K,
    normalized_gallery: bool = False,
    block_rows: int = SEARCH_BLOCK_ROWS,
    allowed: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine k-nearest neighbours by blocked inner products.

    Equivalent to scikit-learn ``NearestNeighbors(metric="cosine", algorithm="brute")``
    but the gallery is normalised once (at index time), not on every call, and is read
    in blocks so a memory-mapped gallery never has to fit in RAM.

    Args:
        queries: ndarray of shape (m, d).
        gallery: ndarray of shape (n, d); unit rows if ``normalized_gallery``.
        k: neighbours per query, clamped to n.
        block_rows: gallery rows per GEMM block.
        allowed: boolean ndarray of shape (n,): search only these rows (a catalogue
            filter); None searches all.

    Returns:
        (distances, indices): ndarrays of shape (m, min(k, n)); distances are cosine
        distances 1 - cos in [0, 2], ascending; equal distances are listed by gallery row.
        When ``allowed`` leaves fewer than k rows, the rest is padded with index -1 and
        distance inf.
    """
    import numpy as np

    from snaplook.transform_utils import l2_normalize

    q = l2_normalize(np.atleast_2d(queries))
    n = gallery.shape[0]
    k = min(int(k), n)
    m = q.shape[0]
    if k < 1 or m == 0:
        return np.zeros((m, 0), dtype=np.float32), np.zeros((m, 0), dtype=np.int64)
    selected = None
    if allowed is not None:
        allowed = np.asarray(allowed, dtype=bool)
        if allowed.shape != (n,):
            raise ValueError(f"allowed has shape {allowed.shape}, expected ({n},)")
        selected = np.flatnonzero(allowed)
    n_searched = n if selected is None else len(selected)
    best_sim = np.full((m, k), -np.inf, dtype=np.float32)
    best_idx = np.full((m, k), -1, dtype=np.int64)
    for start in range(0, n_searched, block_rows):
        if selected is None:
            ids = np.arange(start, min(start + block_rows, n))
            block = np.asarray(gallery[start : start + block_rows], dtype=np.float32)
        else:
            ids = selected[start : start + block_rows]
            block = np.asarray(gallery[ids], dtype=np.float32)
        if not normalized_gallery:
            block = l2_normalize(block)
        sims = q @ block.T
        cand_sim = np.concatenate([best_sim, sims], axis=1)
        cand_idx = np.concatenate([best_idx, np.broadcast_to(ids, sims.shape)], axis=1)
        if cand_sim.shape[1] > k:
            part = np.argpartition(-cand_sim, k - 1, axis=1)[:, :k]
            cand_sim = np.take_along_axis(cand_sim, part, axis=1)
            cand_idx = np.take_along_axis(cand_idx, part, axis=1)
        best_sim, best_idx = cand_sim, cand_idx
    # Unfilled slots (-inf, row -1) sort last: pad them as row -1 at distance inf.
    order = np.lexsort((np.where(best_idx < 0, n, best_idx), -best_sim), axis=1)
    best_sim = np.take_along_axis(best_sim, order, axis=1)
    best_idx = np.take_along_axis(best_idx, order, axis=1)
    distances = np.clip(1.0 - best_sim, 0.0, 2.0).astype(np.float32)
    distances[best_idx < 0] = np.inf
    return distances, best_idx


@dataclass
class Hit:
    """One retrieved gallery image."""

    rank: int
    row: int
    path: Path
    distance: float
    product: dict[str, str] | None = None


@dataclass
class QueryResult:
    """The k nearest gallery images of one query, nearest first.

    ``category`` and ``confidence`` are the predicted category under ``restrict="auto"``.
    """

    query: Path
    hits: list[Hit]
    category: str | None = None
    confidence: float | None = None


@dataclass
class QuerySummary:
    """What :func:`query_index` did.

    ``where`` and ``restrict`` are the filters applied; ``n_allowed`` the gallery rows
    they left (None without ``where``).
    """

    results: list[QueryResult]
    k: int
    skipped: list[Skipped]
    out: Path | None = None
    grids: list[Path] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    restrict: str = "none"
    n_allowed: int | None = None
    page: Path | None = None


def check_k(k: int, index: Index) -> int:
    """Validate ``k`` and clamp it to the gallery size (with a warning)."""
    if k < 1:
        raise SnaplookError(f"-k must be at least 1, got {k}.")
    if k > len(index):
        logger.warning(
            "k=%d is larger than the gallery (%d images); using k=%d", k, len(index), len(index)
        )
        return len(index)
    return k


def query_index(
    queries: str | Path | Sequence[str | Path],
    index: Index | str | Path = DEFAULT_INDEX_DIR,
    *,
    k: int = DEFAULT_K,
    backbone: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    embedder: Embedder | None = None,
    head: Any = None,
    exact: bool = False,
    nprobe: int | None = None,
    ef: int | None = None,
    where: Sequence[str] | None = None,
    restrict: str = "none",
    qe: int = 0,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> QuerySummary:
    """Embed query images the way the index was built and find their k nearest neighbours.

    Args:
        queries: an image, a folder of images, or a list of image paths.
        index: a loaded :class:`Index` or its folder, default="output/index".
        k: neighbours per query, default=5 (clamped to the gallery size with a warning).
        backbone: if given, must equal the index's backbone.
        batch_size: images per forward pass.
        embedder: use this embedder instead of rebuilding the index's (it must match).
        head: the ``snaplook.train.Head`` the index was built with, if any (required
            then; see :func:`check_head`).
        where: catalogue conditions (``"category=Dresses"``, ``"price<=50"``; grammar in
            :func:`snaplook.catalog.parse_where`), all of which must hold; the search is
            exact on the rows left (approximate through the FAISS index, if any, when
            100,000 rows or more match), so k results come back when k rows match.
        exact, nprobe, ef: search settings, see :meth:`Index.search`.
        restrict: "none" (default) or "auto": search within each query's category as
            predicted by its nearest catalogue neighbours (recorded in the results).
        qe: alpha-query expansion: each query plus its ``qe`` nearest allowed gallery rows
            first (``snaplook.postprocess.expand_queries``); default 0 (none).

    Returns:
        :class:`QuerySummary` with one :class:`QueryResult` per readable query; a query
        has fewer than k hits when fewer rows match ``where`` (a warning says so).

    Raises:
        SnaplookError: no query images or none readable, backbone mismatch, missing/corrupt
            index, a bad or unknown ``where`` column, ``where``/``restrict`` without a
            catalogue.
    """
    # Long on purpose: over 80 lines only through its signature and docstring (the keyword
    # parameters are the public API); the steps are helpers.
    from snaplook.catalog import filter_mask, restricted_search, warn_if_few
    from snaplook.postprocess import expand_queries

    if not isinstance(index, Index):
        index = load_index(index, ann=not exact)
    _check_backbone(index, backbone)
    k = check_k(k, index)
    products = index.products()
    allowed = filter_mask(products, where, index.path)
    n_allowed = None if allowed is None else int(allowed.sum())
    warn_if_few(allowed, k, where)
    paths, skipped = _query_paths(queries)
    embedder = _query_embedder(index, embedder, head)
    if on_start is not None:
        on_start(len(paths))
    features, kept = _embed_queries(paths, embedder, batch_size, on_progress, skipped)
    features = index.prepare(features)
    search = functools.partial(index.search, exact=exact, nprobe=nprobe, ef=ef, prepared=True)
    if qe > 0:
        near = functools.partial(search, allowed=allowed)
        features = expand_queries(features, near, index.vectors, k=min(qe, len(index)))
    distances, rows, guesses = restricted_search(
        search, features, k, products=products, allowed=allowed, restrict=restrict
    )
    return QuerySummary(
        results=[
            QueryResult(
                q,
                hits_of(index, rows[i], distances[i]),
                guesses[i].category if guesses else None,
                guesses[i].confidence if guesses else None,
            )
            for i, q in enumerate(kept)
        ],
        k=k,
        skipped=skipped,
        where=list(where or ()),
        restrict=restrict,
        n_allowed=n_allowed,
    )


def _check_backbone(index: Index, backbone: str | None) -> None:
    if backbone is not None and backbone != index.meta.get("backbone"):
        raise SnaplookError(
            f"{index.path} was built with backbone {index.meta.get('backbone')!r}; "
            f"querying it with {backbone!r} would compare unrelated features. Drop --backbone "
            "or use an index built with it."
        )


def _query_embedder(index: Index, embedder: Embedder | None, head: Any) -> Embedder:
    # A given embedder must carry the index's head; otherwise the index rebuilds its own.
    if embedder is not None:
        check_head(index.meta, getattr(embedder, "head", None), index.path)
        return embedder
    return index.embedder(head=head)


def _query_paths(queries: str | Path | Sequence[str | Path]) -> tuple[list[Path], list[Skipped]]:
    """The query images, and the files with an image name that the listing left out (a
    FIFO, a device, a name that is not UTF-8), for ``skipped.csv``."""
    from snaplook.io_utils import find_images

    skipped: list[Skipped] = []
    if not isinstance(queries, (str, Path)):
        return [Path(p) for p in queries], skipped
    paths = find_images(queries, on_skip=lambda path, why: skipped.append(Skipped(path, why)))
    if not paths:
        raise SnaplookError(f"{queries}: no query images found.")
    return paths, skipped


def _embed_queries(
    paths: list[Path],
    embedder: Embedder,
    batch_size: int,
    on_progress: Callable[[int], None] | None,
    skipped: list[Skipped],
) -> tuple[np.ndarray, list[Path]]:
    """Embed the queries; the unreadable ones are appended to ``skipped``."""
    from snaplook.features import embed_images

    before = len(skipped)
    features, kept = embed_images(
        paths, embedder, batch_size=batch_size, on_skip=skipped.append, on_progress=on_progress
    )
    if paths and not kept:
        # Nothing was queried: an empty results.csv with exit 0 would look like success.
        raise SnaplookError(
            f"none of the {len(paths)} query images could be read ({skipped[before].reason})."
        )
    return features, kept


def hits_of(index: Index, rows: np.ndarray, distances: np.ndarray) -> list[Hit]:
    """One query's search result as :class:`Hit` s, padding (row -1) left out."""
    products = index.products()
    return [
        Hit(
            rank=r + 1,
            row=int(row),
            path=index.gallery_path(int(row)),
            distance=float(d),
            product=products.product(int(row)) if products is not None else None,
        )
        for r, (row, d) in enumerate(zip(rows, distances))
        if row >= 0
    ]
