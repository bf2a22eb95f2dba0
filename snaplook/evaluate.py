"""DeepFashion retrieval evaluation: protocols (In-shop, Consumer-to-shop, folders) and metrics.

Protocol loaders turn a dataset tree into :class:`Split` (train/query/gallery image lists
with item ids); metric functions take distances or features plus labels, so any embedding
can be scored; :func:`evaluate` runs a whole evaluation and writes a report folder.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from snaplook.errors import SnaplookError
from snaplook.io_utils import timestamp

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

PROTOCOLS = ("inshop", "consumer2shop", "folders")
DEFAULT_PROTOCOL = "inshop"
PARTITION_FILE = "list_eval_partition.txt"
BBOX_FILES = {"inshop": "list_bbox_inshop.txt", "consumer2shop": "list_bbox_consumer2shop.txt"}
#: Where the DeepFashion archives put their annotation files, relative to the benchmark
#: folder (the partition file lives in ``Eval/``, boxes in ``Anno/``).
_ANNOTATION_DIRS = (".", "Eval", "Anno")

#: Columns of the partition file, line 2 (after the count line), per protocol.
_PARTITION_HEADER = {
    "inshop": ("image_name", "item_id", "evaluation_status"),
    "consumer2shop": ("image_pair_name_1", "image_pair_name_2", "item_id", "evaluation_status"),
}
_STATUSES = {
    "inshop": frozenset({"train", "query", "gallery"}),
    "consumer2shop": frozenset({"train", "val", "test"}),
}
#: Consumer-to-shop has no query/gallery column: the evaluated split's consumer images
#: are the queries and its shop images the gallery.
DEFAULT_C2S_SUBSET = "test"


@dataclass(frozen=True)
class Sample:
    """One image of an evaluation set.

    Attributes:
        path: path relative to :attr:`Split.root`, POSIX, as written in the partition file.
        item: item id (the label: same item = relevant).
        category: the folder(s) between ``img/`` and the item folder (e.g.
            ``WOMEN/Dresses``), or the label folder for the folders protocol.
        box: ground-truth garment box (x, y, w, h) in pixels, or None.
    """

    path: str
    item: str
    category: str
    box: tuple[int, int, int, int] | None = None


@dataclass
class Split:
    """One evaluation set: which images are trained on, queried and searched.

    Attributes:
        root: folder the sample paths are relative to.
        train: training images (not used by evaluation).
        query: query images.
        gallery: gallery images. For ``protocol="folders"`` it is the same list as
            ``query`` and each query is searched against all images but itself.
        protocol: "inshop", "consumer2shop" or "folders".
        partition: the partition file read (None for folders).
        bbox: the box file read, or None.
        missing: paths listed in the partition file whose image file does not exist
            (dropped from the lists above).
    """

    root: Path
    train: list[Sample]
    query: list[Sample]
    gallery: list[Sample]
    protocol: str
    partition: Path | None = None
    bbox: Path | None = None
    missing: list[str] = field(default_factory=list)

    @property
    def leave_one_out(self) -> bool:
        """True when queries are searched against the other images of the same list."""
        return self.protocol == "folders"

    def counts(self) -> dict[str, int]:
        """Image and item counts per list, for reports."""
        return {
            "train_images": len(self.train),
            "query_images": len(self.query),
            "gallery_images": len(self.gallery),
            "query_items": len({s.item for s in self.query}),
            "gallery_items": len({s.item for s in self.gallery}),
            "missing_images": len(self.missing),
        }


def find_annotation(root: str | Path, name: str) -> Path | None:
    """Look for a DeepFashion annotation file under ``root``, ``root/Eval`` or ``root/Anno``."""
    root = Path(root)
    for sub in _ANNOTATION_DIRS:
        path = root / sub / name
        if path.is_file():
            return path
    return None


def _image_root(root: Path) -> Path:
    # The archives unpack to <benchmark>/Img/img/...; partition paths start with "img/".
    if not (root / "img").is_dir() and (root / "Img" / "img").is_dir():
        return root / "Img"
    return root


def _category_of(path: str) -> str:
    parts = PurePosixPath(path).parts
    if parts and parts[0].lower() == "img":
        parts = parts[1:]
    return "/".join(parts[:-2]) or "(none)"


def _read_lines(path: Path, what: str) -> list[str]:
    try:
        # utf-8-sig: a file saved by a Windows editor starts with a BOM.
        return path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise SnaplookError(f"{what} {path} not found; pass its path with --partition.") from None
    except UnicodeDecodeError as exc:
        raise SnaplookError(f"{path}: not a UTF-8 text file ({exc.reason}).") from exc
    except OSError as exc:
        raise SnaplookError(f"{path}: cannot read ({exc.strerror or exc}).") from exc


def _parse_listing(
    path: Path, header: tuple[str, ...] | None, n_columns: int, what: str
) -> list[tuple[int, list[str]]]:
    """Parse a DeepFashion listing: a count line, a header line, then whitespace rows.

    Returns (line number, tokens) per data row; raises naming the first bad line.
    """
    lines = _read_lines(path, what)
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise SnaplookError(f"{path}: empty file; expected a DeepFashion {what}.")
    first = lines[0].split()
    # isdigit() alone accepts '²' and other Unicode digits that int() refuses.
    if len(first) != 1 or not (first[0].isascii() and first[0].isdigit()):
        raise SnaplookError(
            f"{path}, line 1: expected the number of entries, found {lines[0].strip()[:80]!r}. "
            f"Is this a DeepFashion {what}?"
        )
    declared = int(first[0])
    if len(lines) < 2:
        raise SnaplookError(f"{path}, line 2: missing the header line.")
    found = tuple(lines[1].split())
    if header is not None and found[: len(header)] != header:
        raise SnaplookError(
            f"{path}, line 2: expected the header {' '.join(header)!r}, found "
            f"{lines[1].strip()[:80]!r}. Check --protocol and the file."
        )
    rows: list[tuple[int, list[str]]] = []
    for number, line in enumerate(lines[2:], start=3):
        tokens = line.split()
        if not tokens:
            raise SnaplookError(f"{path}, line {number}: empty line inside the listing.")
        if len(tokens) != n_columns:
            raise SnaplookError(
                f"{path}, line {number}: expected {n_columns} columns, found {len(tokens)} "
                f"({line.strip()[:100]!r})."
            )
        rows.append((number, tokens))
    if declared != len(rows):
        raise SnaplookError(
            f"{path}, line 1: declares {declared} entries but the file has {len(rows)}; "
            "the file may be truncated."
        )
    return rows


def read_bbox_file(path: str | Path) -> dict[str, tuple[int, int, int, int]]:
    """Read a DeepFashion box file (``list_bbox_inshop.txt`` or ``list_bbox_consumer2shop.txt``).

    Rows are ``image_name ... x_1 y_1 x_2 y_2`` (corner coordinates).

    Returns:
        image name -> box (x, y, w, h).

    Raises:
        SnaplookError: missing file, or a malformed line (the message names it).
    """
    path = Path(path)
    lines = _read_lines(path, "box file")
    n_columns = len(lines[1].split()) if len(lines) > 1 else 7
    boxes: dict[str, tuple[int, int, int, int]] = {}
    for number, tokens in _parse_listing(path, None, n_columns, "box file"):
        try:
            x1, y1, x2, y2 = (int(t) for t in tokens[-4:])
        except ValueError:
            raise SnaplookError(
                f"{path}, line {number}: box corners must be integers, found "
                f"{' '.join(tokens[-4:])!r}."
            ) from None
        if x2 <= x1 or y2 <= y1:
            raise SnaplookError(
                f"{path}, line {number}: empty box ({x1}, {y1}, {x2}, {y2}); expected "
                "x_1 < x_2 and y_1 < y_2."
            )
        boxes[tokens[0]] = (x1, y1, x2 - x1, y2 - y1)
    return boxes


def load_split(
    root: str | Path,
    *,
    protocol: str = DEFAULT_PROTOCOL,
    partition: str | Path | None = None,
    bbox: str | Path | None = None,
    strict: bool = False,
    subset: str = DEFAULT_C2S_SUBSET,
) -> Split:
    """Read a dataset's evaluation protocol into image lists with item ids.

    Protocols:
        - "inshop": DeepFashion In-shop; ``list_eval_partition.txt`` rows are
          ``image_name item_id evaluation_status`` (train / query / gallery).
        - "consumer2shop": DeepFashion Consumer-to-shop; rows are ``image_pair_name_1
          image_pair_name_2 item_id evaluation_status``; the consumer images (first column)
          of ``subset`` are the queries, its shop images (second column) the gallery.
        - "folders": ``root/<label>/<images>``; every image is a query against all others.

    Args:
        root: the benchmark folder (containing ``img/`` or ``Img/img/``), or for
            "folders" the folder of label folders.
        protocol: "inshop", "consumer2shop" or "folders", default="inshop".
        partition: the partition file; default: ``list_eval_partition.txt`` in ``root`` or
            ``root/Eval``.
        bbox: a box file; when given, each sample carries its ground-truth box.
        strict: raise if any listed image is missing, instead of dropping and counting it.
        subset: Consumer-to-shop status that is evaluated, default="test" ("val" for
            model selection).

    Returns:
        :class:`Split`.

    Raises:
        SnaplookError: unknown protocol; partition or box file missing or malformed (the
            message names the line); listed images missing with ``strict``; no queries.
    """
    root = Path(root)
    if protocol not in PROTOCOLS:
        raise SnaplookError(
            f"unknown protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}."
        )
    if not root.is_dir():
        raise SnaplookError(f"{root}: no such folder; pass the dataset root.")
    if protocol == "folders":
        split = _load_folders(root)
    else:
        split = _load_deepfashion(root, protocol, partition, subset)
    if bbox is not None:
        split = _attach_boxes(split, Path(bbox), strict=strict)
    split = _drop_missing(split, strict=strict)
    if not split.query:
        raise SnaplookError(f"{split.partition or root}: no query images to evaluate.")
    if not split.gallery:
        raise SnaplookError(f"{split.partition or root}: no gallery images to search.")
    return split


def _load_deepfashion(
    root: Path, protocol: str, partition: str | Path | None, subset: str
) -> Split:
    if partition is None:
        found = find_annotation(root, PARTITION_FILE)
        if found is None:
            raise SnaplookError(
                f"{PARTITION_FILE} not found in {root}, {root / 'Eval'}; pass its path with "
                "--partition."
            )
        partition = found
    partition = Path(partition)
    header = _PARTITION_HEADER[protocol]
    statuses = _STATUSES[protocol]
    if protocol == "consumer2shop" and subset not in statuses:
        raise SnaplookError(f"unknown subset {subset!r}; choose train, val or test.")
    rows = _parse_listing(partition, header, len(header), "partition file")
    train: list[Sample] = []
    query: list[Sample] = []
    gallery: list[Sample] = []
    seen: dict[str, set[str]] = {"train": set(), "query": set(), "gallery": set()}

    def add(kind: str, target: list[Sample], path: str, item: str) -> None:
        # Consumer-to-shop lists an image once per pair it is in; keep it once.
        if path not in seen[kind]:
            seen[kind].add(path)
            target.append(Sample(path, item, _category_of(path)))

    for number, tokens in rows:
        status = tokens[-1]
        if status not in statuses:
            raise SnaplookError(
                f"{partition}, line {number}: unknown evaluation_status {status!r}; expected "
                f"one of {', '.join(sorted(statuses))}."
            )
        if protocol == "inshop":
            path, item = tokens[0], tokens[1]
            target = {"train": train, "query": query, "gallery": gallery}[status]
            add(status, target, path, item)
        else:
            consumer, shop, item = tokens[0], tokens[1], tokens[2]
            if status == subset:
                add("query", query, consumer, item)
                add("gallery", gallery, shop, item)
            elif status == "train":
                add("train", train, consumer, item)
                add("train", train, shop, item)
    return Split(_image_root(root), train, query, gallery, protocol, partition=partition)


def _load_folders(root: Path) -> Split:
    from snaplook.io_utils import find_images

    samples: list[Sample] = []
    loose = 0
    for path in find_images(root):
        rel = path.relative_to(root).as_posix()
        parts = PurePosixPath(rel).parts
        if len(parts) < 2:
            loose += 1
            continue
        samples.append(Sample(rel, parts[0], parts[0]))
    if loose:
        logger.warning(
            "%d image(s) directly in %s have no label folder and were left out", loose, root
        )
    if not samples:
        raise SnaplookError(
            f"{root}: no images in label folders; the folders protocol expects "
            "ROOT/<label>/<images>."
        )
    return Split(root, [], samples, samples, "folders")


def _attach_boxes(split: Split, bbox: Path, *, strict: bool) -> Split:
    boxes = read_bbox_file(bbox)

    def with_box(samples: list[Sample]) -> list[Sample]:
        return [dataclasses.replace(s, box=boxes.get(s.path)) for s in samples]

    query = with_box(split.query)
    gallery = query if split.leave_one_out else with_box(split.gallery)
    unboxed = len({s.path for s in query + gallery if s.box is None})
    if unboxed:
        message = f"{bbox}: {unboxed} evaluated image(s) have no box"
        if strict:
            raise SnaplookError(message + " (--strict); check that it matches the partition file.")
        logger.warning("%s; they are used uncropped", message)
    return dataclasses.replace(
        split, train=with_box(split.train), query=query, gallery=gallery, bbox=bbox
    )


def _drop_missing(split: Split, *, strict: bool) -> Split:
    checked: dict[str, bool] = {}

    def exists(s: Sample) -> bool:
        if s.path not in checked:
            checked[s.path] = (split.root / s.path).is_file()
        return checked[s.path]

    train = [s for s in split.train if exists(s)]
    query = [s for s in split.query if exists(s)]
    gallery = query if split.leave_one_out else [s for s in split.gallery if exists(s)]
    missing = sorted(p for p, ok in checked.items() if not ok)
    if missing:
        message = (
            f"{len(missing)} image(s) listed in {split.partition} are missing under "
            f"{split.root} (first: {missing[0]})"
        )
        if strict:
            raise SnaplookError(message + "; --strict stops here. Check the dataset root.")
        logger.warning("%s; they are left out and counted in the report", message)
    return dataclasses.replace(split, train=train, query=query, gallery=gallery, missing=missing)


# --- metrics -------------------------------------------------------------------------

DEFAULT_KS = (1, 5, 10, 20, 30, 50)
#: How gallery images at exactly the same distance are ordered. "pessimistic" puts the
#: query's non-matching images before its matching ones (a tie never helps a score, so a
#: collapsed embedding cannot score well by luck of order); "gallery-order" keeps the
#: gallery order (what a stable argsort, e.g. ``cosine_knn``, returns).
TIE_RULES = ("pessimistic", "gallery-order")
DEFAULT_TIES = "pessimistic"
#: Feature normalisations before ranking: "l2" ranks by cosine distance; "centered"
#: subtracts the gallery mean first, then L2 (cosine around the gallery centre); "none"
#: ranks raw features by Euclidean distance.
NORMALIZATIONS = ("l2", "centered", "none")
DEFAULT_NORMALIZATION = "l2"
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


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    out = tuple(sorted({int(k) for k in ks}))
    if not out or out[0] < 1:
        raise SnaplookError(f"K values must be positive integers, got {list(ks)}.")
    return out


def _check_ties(ties: str) -> None:
    if ties not in TIE_RULES:
        raise SnaplookError(f"unknown tie rule {ties!r}; choose one of: {', '.join(TIE_RULES)}.")


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
        ties: "pessimistic" (default) or "gallery-order", see :data:`TIE_RULES`.
        exclude: ndarray of shape (m, n), bool: pairs left out of the ranking (e.g. each
            query itself in leave-one-out); default none.
        top_n: nearest gallery images kept per query, default=5.

    Returns:
        :class:`QueryMetrics`; call ``.summary()`` for the means.

    Raises:
        SnaplookError: shapes that do not match the labels, bad ``ks`` or ``ties``.
    """
    import numpy as np

    ks = _check_ks(ks)
    _check_ties(ties)
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
    """Apply a :data:`NORMALIZATIONS` setting to query and gallery features.

    Returns:
        (queries, gallery): float32 arrays of the input shapes.

    Raises:
        SnaplookError: unknown normalisation.
    """
    import numpy as np

    from snaplook.transform_utils import l2_normalize

    q = np.asarray(query_feats, dtype=np.float32)
    g = np.asarray(gallery_feats, dtype=np.float32)
    if normalization == "l2":
        return l2_normalize(q), l2_normalize(g)
    if normalization == "centered":
        centre = g.mean(axis=0, keepdims=True) if len(g) else 0.0
        return l2_normalize(q - centre), l2_normalize(g - centre)
    if normalization == "none":
        return q, g
    raise SnaplookError(
        f"unknown normalisation {normalization!r}; choose one of: {', '.join(NORMALIZATIONS)}."
    )


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
        ties: tie rule, default="pessimistic" (see :data:`TIE_RULES`).
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

    ks = _check_ks(ks)
    _check_ties(ties)
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


# --- evaluation runs and reports -----------------------------------------------------

CROPS = ("none", "gt")
DEFAULT_CROP = "none"
DEFAULT_OUT_ROOT = Path("output/eval")
#: Queries drawn in each of the worst and random grids.
DEFAULT_N_EXAMPLES = 8
DEFAULT_SEED = 0
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


def _setting_name(backbone: str, pooling: str, normalization: str) -> str:
    return f"{backbone}-{pooling}-{normalization}"


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

    Loads the split (:func:`load_split`), embeds query and gallery images through the
    feature cache (``features.embed_cached``), ranks the gallery for every query in
    blocks (:func:`evaluate_embeddings`) and writes, atomically, into ``out``:
    ``report.json``, ``per_query.csv``, ``recall_at_k.png``, ``worst_queries_grid.png``,
    ``random_queries_grid.png`` and ``report.md``.

    Args:
        root: dataset root (see :func:`load_split`).
        protocol: "inshop" (default), "consumer2shop" or "folders".
        partition: partition file; default: found under ``root``.
        bbox: box file; default for ``crop="gt"``: ``list_bbox_<protocol>.txt`` under
            ``root`` or ``root/Anno``.
        crop: "none" (whole image, default) or "gt" (crop to the ground-truth box).
        backbone, weights, pooling, seed: the embedder (ignored when ``embedder`` is
            given); defaults: resnet50, imagenet, avg, 0.
        normalization: "l2" (cosine, default), "centered" or "none" (Euclidean).
        ks: Recall@K cut-offs, default=(1, 5, 10, 20, 30, 50).
        ties: tie rule, default="pessimistic" (see :data:`TIE_RULES`).
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
        split: an already loaded :class:`Split` (skips reading the partition again).
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
    import time

    import numpy as np

    from snaplook import features as feats
    from snaplook.io_utils import make_temp_dir, replace_dir

    ks = _check_ks(ks)
    _check_ties(ties)
    if crop not in CROPS:
        raise SnaplookError(f"unknown crop {crop!r}; choose none or gt.")
    if normalization not in NORMALIZATIONS:
        raise SnaplookError(
            f"unknown normalisation {normalization!r}; choose one of: {', '.join(NORMALIZATIONS)}."
        )
    root = Path(root)
    if split is None:
        split = load_split(
            root,
            protocol=protocol,
            partition=partition,
            bbox=_resolve_bbox(root, protocol, bbox, crop),
            strict=strict,
            subset=subset,
        )
        warn_ks_over_gallery(split, ks)
    if embedder is None:
        embedder = feats.Embedder(
            backbone or feats.DEFAULT_BACKBONE,
            weights=weights if weights is not None else feats.DEFAULT_WEIGHTS,
            pooling=pooling or feats.DEFAULT_POOLING,
            seed=seed,
            runtime=runtime,
            precision=precision,
        )
    if getattr(embedder, "calibrate_on", None) and embedder.resolved_precision() == "int8":
        embedder.calibrate_on([split.root / s.path for s in split.gallery])
    identity = embedder.identity()
    name = _setting_name(identity["backbone"], identity["pooling"], normalization)
    if head is not None:
        # The cache holds backbone features; the head is applied after it, so raw and
        # head settings share one embedding.
        head.check_source(identity)
        identity = {**identity, "feature_dim": head.output_dim, "head": head.identity()}
        name += f"+{head.name}"
    out = (
        Path(out) if out is not None else DEFAULT_OUT_ROOT / f"{root.name}-{split.protocol}-{name}"
    )

    # Embed every distinct evaluated image once (queries and gallery may share images).
    def ref(s: Sample) -> tuple[Path, tuple[int, int, int, int] | None]:
        return split.root / s.path, s.box if crop == "gt" else None

    images = split.query if split.leave_one_out else split.query + split.gallery
    skipped: list[Any] = []
    n_embedded: list[int] = []

    def embedding_started(total: int) -> None:
        n_embedded.append(total)
        if on_stage is not None:
            on_stage(f"Embedding ({name})", total)
        if on_start is not None:
            on_start(total)

    started = time.perf_counter()
    matrix = feats.embed_cached(
        [ref(s) for s in images],
        embedder,
        cache_dir=cache_dir if cache_dir is not None else feats.DEFAULT_CACHE_DIR,
        batch_size=batch_size or feats.DEFAULT_BATCH_SIZE,
        on_skip=skipped.append,
        on_start=embedding_started,
        on_progress=on_progress,
    )
    if head is not None:
        matrix = head.transform(matrix)
    embed_seconds = time.perf_counter() - started
    unreadable = {str(s.path) for s in skipped}
    if unreadable and strict:
        raise SnaplookError(
            f"{len(unreadable)} evaluated image(s) could not be read (first: "
            f"{sorted(unreadable)[0]}); --strict stops here."
        )
    readable = np.array([str(ref(s)[0].resolve()) not in unreadable for s in images])
    n_q = len(split.query)
    q_ok = readable[:n_q]
    g_ok = readable[:n_q] if split.leave_one_out else readable[n_q:]
    q_feats = matrix[:n_q]
    g_feats = q_feats if split.leave_one_out else matrix[n_q:]
    q_rows = np.flatnonzero(q_ok)
    g_rows = np.flatnonzero(g_ok)

    if on_stage is not None:
        on_stage(f"Ranking ({name})", len(q_rows))
    started = time.perf_counter()
    metrics = evaluate_embeddings(
        q_feats[q_rows],
        [split.query[i].item for i in q_rows],
        g_feats[g_rows],
        [split.gallery[i].item for i in g_rows],
        ks=ks,
        ties=ties,
        normalization=normalization,
        leave_one_out=split.leave_one_out,
        on_progress=on_progress if on_stage is not None else None,
    )
    rank_seconds = time.perf_counter() - started
    if not metrics.evaluated.any():
        raise SnaplookError(
            f"none of the {len(q_rows)} readable queries has an image of its item in the "
            "gallery; check the partition file and --protocol."
        )

    per_query = _per_query_rows(split, q_rows, metrics, q_ok)
    categories = np.array([split.query[i].category for i in q_rows])
    per_category = {c: metrics.summary(categories == c) for c in sorted(set(categories.tolist()))}
    summary = metrics.summary()
    counts = {
        **split.counts(),
        "unreadable_query_images": int((~q_ok).sum()),
        "unreadable_gallery_images": int((~g_ok).sum()),
        "queries_ranked": len(q_rows),
        "gallery_images_searched": len(g_rows) - (1 if split.leave_one_out else 0),
        "queries_without_gallery_match": summary["n_without_match"],
        "queries_evaluated": summary["n_evaluated"],
        "queries_with_tied_first_hit": summary["tied_first_hit"],
    }
    config = {
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
        "feature_dim": identity.get("feature_dim"),
        "head": identity.get("head"),
        "runtime": feats.embedder_runtime(embedder),
        "feature_cache": {
            "dir": str(Path(cache_dir if cache_dir is not None else feats.DEFAULT_CACHE_DIR)),
            "images_embedded": n_embedded[0] if n_embedded else 0,
        },
        "normalization": normalization,
        "distance": "euclidean" if normalization == "none" else "cosine",
        "ks": list(ks),
        "ties": ties,
        "leave_one_out": split.leave_one_out,
        "setting": name,
        "snaplook_version": _version(),
        "created": timestamp(),
    }
    report = Report(
        config=config,
        counts=counts,
        metrics=summary,
        per_category=per_category,
        per_query=per_query,
        out=out,
        seconds={"embedding": round(embed_seconds, 3), "ranking": round(rank_seconds, 3)},
        skipped=[(p, "listed in the partition file but missing") for p in split.missing]
        + sorted((str(s.path), s.reason) for s in skipped),
    )
    tmp = make_temp_dir(out)
    try:
        _write_report(report, tmp, split, q_rows, g_rows, metrics, n_examples=n_examples, seed=seed)
        replace_dir(tmp, out, marker="report.json")
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    report.files = {name: out / path.name for name, path in report.files.items()}
    return report


def _version() -> str:
    from snaplook import __version__

    return __version__


def _resolve_bbox(
    root: Path, protocol: str, bbox: str | Path | None, crop: str
) -> str | Path | None:
    if bbox is not None or crop != "gt":
        return bbox
    if protocol == "folders":
        raise SnaplookError("--crop gt needs boxes; the folders protocol has none (use --bbox).")
    found = find_annotation(root, BBOX_FILES[protocol])
    if found is None:
        raise SnaplookError(
            f"--crop gt needs {BBOX_FILES[protocol]}; not found in {root} or {root / 'Anno'}. "
            "Pass it with --bbox, or use --crop none."
        )
    return found


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

    from snaplook.io_utils import write_csv_atomic, write_json_atomic, write_text_atomic
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
        if report.config["weights"].get("name") == "random"
        else ""
    )
    setting = report.config["setting"]
    if report.skipped:
        files["skipped_csv"] = folder / "skipped.csv"
        write_csv_atomic(files["skipped_csv"], ("path", "reason"), report.skipped)
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
    c, n, m = report.config, report.counts, report.metrics
    ks = c["ks"]
    weights = c["weights"]
    wtext = weights.get("name", "?")
    if weights.get("sha256"):
        wtext += f" (sha256 {weights['sha256'][:12]}…)"
    lines = [
        f"# Retrieval evaluation: {c['protocol']}, {c['setting']}",
        "",
    ]
    if weights.get("name") == "random":
        lines += [
            "> **Random weights**: these numbers test the pipeline, not retrieval quality.",
            "",
        ]
    lines += [
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
        f"| tie rule | {c['ties']} |",
        "",
        "## Counts",
        "",
        "| | count |",
        "| --- | ---: |",
    ]
    lines += [f"| {key.replace('_', ' ')} | {value} |" for key, value in n.items()]
    lines += [
        "",
        f"Queries whose item has no gallery image ({n['queries_without_gallery_match']}) are "
        "listed in `per_query.csv` with status `no_gallery_match` and left out of every mean; "
        f"{n['missing_images']} listed image(s) were missing and "
        f"{n['unreadable_query_images'] + n['unreadable_gallery_images']} unreadable"
        + (" (listed in `skipped.csv`)." if report.skipped else "."),
        "",
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
        + f"; {n['queries_with_tied_first_hit']} quer(ies) had their first hit tied.",
        "",
        "![Recall@K](recall_at_k.png)",
        "",
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
    lines += [
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
    return "\n".join(lines)


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
    """Evaluate every combination of backbones x poolings x normalisations on one split.

    With one combination this is :func:`evaluate` writing into ``out``. With several,
    each report goes to ``out/<backbone>-<pooling>-<normalization>/`` and ``out`` gets
    ``compare.md`` and ``compare.json`` (one row per setting). Features are cached per
    backbone and pooling, so normalisations do not re-embed.

    Args:
        root: dataset root.
        protocol: see :func:`load_split`.
        backbones: default=("resnet50",).
        poolings: default=("avg",).
        normalizations: default=("l2",).
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
    import itertools

    from snaplook import features as feats
    from snaplook.io_utils import write_json_atomic, write_text_atomic

    root = Path(root)
    backbones = list(dict.fromkeys(backbones or [feats.DEFAULT_BACKBONE]))
    poolings = list(dict.fromkeys(poolings or [feats.DEFAULT_POOLING]))
    normalizations = list(dict.fromkeys(normalizations or [DEFAULT_NORMALIZATION]))
    for b in backbones:
        feats.get_backbone(b)
    for p in poolings:
        if p not in feats.POOLINGS:
            raise SnaplookError(f"unknown pooling {p!r}; choose avg or max.")
    for nz in normalizations:
        if nz not in NORMALIZATIONS:
            raise SnaplookError(
                f"unknown normalisation {nz!r}; choose one of: {', '.join(NORMALIZATIONS)}."
            )
    split = load_split(
        root,
        protocol=protocol,
        partition=partition,
        bbox=_resolve_bbox(root, protocol, bbox, crop),
        strict=strict,
        subset=subset,
    )
    warn_ks_over_gallery(split, kwargs.get("ks", DEFAULT_KS))
    out = Path(out) if out is not None else DEFAULT_OUT_ROOT / f"{root.name}-{split.protocol}"
    heads = [None, head] if head is not None else [None]
    combos = list(itertools.product(backbones, poolings, normalizations, heads))
    single = len(combos) == 1
    reports: list[Report] = []
    for i, (b, p, nz, h) in enumerate(combos):
        name = _setting_name(b, p, nz) + (f"+{h.name}" if h is not None else "")
        if on_setting is not None:
            on_setting(name, i, len(combos))
        embedder = feats.Embedder(
            b,
            weights=weights if weights is not None else feats.DEFAULT_WEIGHTS,
            pooling=p,
            seed=kwargs.get("seed", DEFAULT_SEED),
            runtime=kwargs.get("runtime", feats.DEFAULT_RUNTIME),
            precision=kwargs.get("precision", feats.DEFAULT_PRECISION),
        )
        reports.append(
            evaluate(
                root,
                split=split,
                embedder=embedder,
                head=h,
                normalization=nz,
                crop=crop,
                strict=strict,
                subset=subset,
                out=out if single else out / name,
                **kwargs,
            )
        )
    comparison = Comparison(reports, out)
    if not single:
        table = compare_reports(reports)
        comparison.files = {"compare_json": out / "compare.json", "compare_md": out / "compare.md"}
        write_json_atomic(comparison.files["compare_json"], table)
        write_text_atomic(comparison.files["compare_md"], render_compare_md(table))
    return comparison


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
    if any(r["weights"].get("name") == "random" for r in rows):
        lines += ["", "Random weights: these numbers test the pipeline, not retrieval quality."]
    return "\n".join(lines) + "\n"


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
    return _check_ks(values)


def split_values(values: Sequence[str] | None) -> list[str]:
    """Flatten repeated and comma-separated option values ("a,b" "c" -> a, b, c)."""
    out: list[str] = []
    for value in values or ():
        out.extend(v.strip() for v in value.split(",") if v.strip())
    return list(dict.fromkeys(out))
