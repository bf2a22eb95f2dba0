"""The product catalogue joined to a gallery: reading it, the join, ``--where`` filters, categories.

A catalogue (CSV or Parquet) has one row per product image: the image (a path relative
to the indexed folder), a ``product_id`` and any other columns (title, price, url,
category, body...). ``snaplook index --catalog`` stores it in the index folder as
``catalog.csv``; an index joins it to its gallery rows on the image path.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from snaplook.errors import SnaplookError
from snaplook.options import DEFAULT_IMAGE_COLUMN, RESTRICT_MODES

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

PRODUCT_ID = "product_id"
#: Parsed as a number when present: an unparsable value stops the join with its line.
PRICE = "price"
TITLE = "title"
CATEGORY = "category"
#: ``upper``, ``lower`` or ``full``: which garment crops of ``look`` a product can match.
BODY = "body"
BODY_VALUES = ("upper", "lower", "full")
#: The stored catalogue in an index folder, and its unmatched rows.
CATALOG_FILE = "catalog.csv"
UNMATCHED_FILE = "catalog_unmatched.csv"
#: Catalogue neighbours that vote for a query's category under ``--restrict auto``.
DEFAULT_CATEGORY_NEIGHBOURS = 10
#: Columns that results (results.csv/json, looks.csv, grids) carry from the catalogue.
RESULT_COLUMNS = (PRODUCT_ID, TITLE, PRICE)


@dataclass
class Catalog:
    """A product catalogue as read from disk.

    Attributes:
        columns: column names; ``image`` first, ``product_id`` second, then the others in
            the order of the source file.
        rows: one dict per catalogue row (all values as text, "" when empty).
        lines: the source line (CSV) or row number (Parquet) of each row, for messages.
        source: the file it was read from.
    """

    columns: list[str]
    rows: list[dict[str, str]]
    lines: list[int]
    source: str

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def n_products(self) -> int:
        return len({r[PRODUCT_ID] for r in self.rows})


@dataclass
class CatalogJoin:
    """A catalogue joined to gallery rows on the image path.

    Attributes:
        catalog_rows: per gallery row, the catalogue row it matched, or -1.
        unmatched_gallery: gallery paths without a catalogue row (kept in the index).
        unmatched_catalog: catalogue rows whose image is not in the gallery, as
            (line, image, product_id).
    """

    catalog_rows: list[int]
    unmatched_gallery: list[str]
    unmatched_catalog: list[tuple[int, str, str]]

    @property
    def n_matched(self) -> int:
        return sum(1 for r in self.catalog_rows if r >= 0)

    def counts(self) -> dict[str, int]:
        return {
            "gallery_matched": self.n_matched,
            "gallery_without_product": len(self.unmatched_gallery),
            "catalog_without_image": len(self.unmatched_catalog),
        }


def read_catalog(
    path: str | Path, *, image_column: str = DEFAULT_IMAGE_COLUMN, root: str | Path | None = None
) -> Catalog:
    """Read a product catalogue (``.csv`` or ``.parquet``) and check it.

    Args:
        path: the catalogue file; ``.parquet`` / ``.pq`` is read with pyarrow, anything
            else as CSV (UTF-8, a header row).
        image_column: the column naming each row's image, default="image". Paths are
            relative to the indexed folder (``root``); absolute paths under ``root`` are
            made relative.
        root: the indexed folder, for absolute image paths.

    Returns:
        :class:`Catalog`; the image column is renamed ``image``.

    Raises:
        SnaplookError: unreadable file, no rows, a missing key column, a row with the
            wrong number of fields, an empty or duplicate image, an empty product_id or a
            price that is not a number; each names the file and line.
    """
    path = Path(path)
    if not path.exists():  # a FIFO or a folder: the input gate says what it is
        raise SnaplookError(f"--catalog {path}: no such file; check the path.")
    if path.suffix.lower() in (".parquet", ".pq"):
        header, records = _read_parquet(path)
        where = "row"
    else:
        header, records = _read_csv(path)
        where = "line"
    for key in (image_column, PRODUCT_ID):
        if key not in header:
            hint = " (or name it with --catalog-image-column)" if key == image_column else ""
            at = " line 1" if where == "line" else ""
            raise SnaplookError(
                f"{path}{at}: no {key!r} column (columns: {', '.join(header) or 'none'}); "
                f"add it{hint}."
            )
    if image_column != DEFAULT_IMAGE_COLUMN and DEFAULT_IMAGE_COLUMN in header:
        raise SnaplookError(
            f"{path}: has both {image_column!r} (the image column) and an {DEFAULT_IMAGE_COLUMN!r}"
            " column; rename one."
        )
    columns = [DEFAULT_IMAGE_COLUMN, PRODUCT_ID] + [
        c for c in header if c not in (image_column, PRODUCT_ID)
    ]
    rows: list[dict[str, str]] = []
    lines: list[int] = []
    seen: dict[str, int] = {}
    for line, values in records:
        row = {c: values.get(c, "").strip() for c in header}
        row[DEFAULT_IMAGE_COLUMN] = _image_key(row.pop(image_column), root)
        if not row[DEFAULT_IMAGE_COLUMN]:
            raise SnaplookError(f"{path} {where} {line}: empty {image_column!r}; fill it in.")
        if not row[PRODUCT_ID]:
            raise SnaplookError(f"{path} {where} {line}: empty {PRODUCT_ID!r}; fill it in.")
        key = row[DEFAULT_IMAGE_COLUMN]
        if key in seen:
            raise SnaplookError(
                f"{path} {where} {line}: duplicate image {key!r} (also on {where} {seen[key]}); "
                "each image may appear once: remove or merge one of the rows."
            )
        seen[key] = line
        if PRICE in row and row[PRICE] and _number(row[PRICE]) is None:
            raise SnaplookError(
                f"{path} {where} {line}: price {row[PRICE]!r} is not a number; write it like "
                "49.90 (currency in its own column)."
            )
        if BODY in row and row[BODY] and row[BODY].lower() not in BODY_VALUES:
            raise SnaplookError(
                f"{path} {where} {line}: {BODY} {row[BODY]!r} is not one of "
                f"{', '.join(BODY_VALUES)}; fix it or leave it empty."
            )
        rows.append({c: row[c] for c in columns})
        lines.append(line)
    if not rows:
        raise SnaplookError(f"{path}: the catalogue has no rows.")
    return Catalog(columns=columns, rows=rows, lines=lines, source=str(path))


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    import io

    from snaplook.io_utils import open_input

    records: list[tuple[int, dict[str, str]]] = []
    try:
        with (
            open_input(path, kind="table") as raw,
            io.TextIOWrapper(raw, newline="", encoding="utf-8-sig") as fh,
        ):
            reader = csv.reader(fh, strict=True)
            header = next(reader, None)
            if header is None:
                raise SnaplookError(f"{path}: empty file; a catalogue needs a header row.")
            header = [h.strip() for h in header]
            dupes = sorted({h for h in header if header.count(h) > 1})
            if dupes or "" in header:
                named = ", ".join(repr(d) for d in dupes) or "''"
                raise SnaplookError(
                    f"{path} line 1: the header has empty or repeated column names ({named}); "
                    "name every column once."
                )
            for values in reader:
                if not values or all(not v.strip() for v in values):
                    continue  # a blank line
                if len(values) != len(header):
                    raise SnaplookError(
                        f"{path} line {reader.line_num}: {len(values)} fields, the header has "
                        f"{len(header)}; quote fields that contain commas."
                    )
                records.append((reader.line_num, dict(zip(header, values))))
    except csv.Error as exc:
        raise SnaplookError(f"{path} line {reader.line_num}: not valid CSV ({exc}).") from exc
    except UnicodeDecodeError as exc:
        raise SnaplookError(f"{path}: not UTF-8 text ({exc}); save it as UTF-8 CSV.") from exc
    except OSError as exc:
        raise SnaplookError(f"{path}: cannot read it ({exc.strerror or exc}).") from exc
    return header, records


def _read_parquet(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from snaplook.io_utils import check_input

    check_input(path, kind="table")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise SnaplookError(f"{path}: not a readable Parquet file ({exc}).") from exc
    header = [str(c) for c in table.column_names]
    columns = {name: table.column(name).to_pylist() for name in header}
    records = [
        (i + 1, {name: _text(columns[name][i]) for name in header}) for i in range(table.num_rows)
    ]
    return header, records


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def _image_key(value: str, root: str | Path | None) -> str:
    value = value.strip().replace("\\", "/")
    if not value:
        return ""
    if root is not None and Path(value).is_absolute():
        from snaplook.io_utils import relative_or_absolute

        return relative_or_absolute(value, root)
    return PurePosixPath(value).as_posix().removeprefix("./")


def _number(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def join_catalog(catalog: Catalog, gallery_paths: Sequence[str]) -> CatalogJoin:
    """Join ``catalog`` to gallery rows by image path (as stored in the manifest)."""
    by_image = {r[DEFAULT_IMAGE_COLUMN]: i for i, r in enumerate(catalog.rows)}
    catalog_rows = [by_image.get(p, -1) for p in gallery_paths]
    used = {r for r in catalog_rows if r >= 0}
    return CatalogJoin(
        catalog_rows=catalog_rows,
        unmatched_gallery=[p for p, r in zip(gallery_paths, catalog_rows) if r < 0],
        unmatched_catalog=[
            (catalog.lines[i], r[DEFAULT_IMAGE_COLUMN], r[PRODUCT_ID])
            for i, r in enumerate(catalog.rows)
            if i not in used
        ],
    )


def write_catalog(catalog: Catalog, join: CatalogJoin, folder: str | Path) -> dict[str, Any]:
    """Store ``catalog`` (all rows) and its unmatched rows in an index folder.

    Returns:
        the ``meta.json`` entry: source, columns, rows, products and the join counts.
    """
    from snaplook.io_utils import write_csv_atomic

    folder = Path(folder)
    write_csv_atomic(
        folder / CATALOG_FILE,
        catalog.columns,
        ([r[c] for c in catalog.columns] for r in catalog.rows),
    )
    write_csv_atomic(folder / UNMATCHED_FILE, ("line", "image", PRODUCT_ID), join.unmatched_catalog)
    return {
        "file": CATALOG_FILE,
        "source": catalog.source,
        "columns": catalog.columns,
        "rows": len(catalog),
        "products": catalog.n_products,
        **join.counts(),
    }


def log_join(join: CatalogJoin, catalog: Catalog) -> None:
    """Warn about gallery images without a product and catalogue rows without an image."""
    if join.unmatched_gallery:
        logger.warning(
            "%d of %d gallery images have no row in %s (kept, without product), e.g. %s",
            len(join.unmatched_gallery),
            len(join.catalog_rows),
            catalog.source,
            join.unmatched_gallery[0],
        )
    if join.unmatched_catalog:
        line, image, product = join.unmatched_catalog[0]
        logger.warning(
            "%d of %d rows of %s name an image that is not in the gallery (listed in %s), "
            "e.g. line %d: %s (%s)",
            len(join.unmatched_catalog),
            len(catalog),
            catalog.source,
            UNMATCHED_FILE,
            line,
            image,
            product,
        )


@dataclass
class Products:
    """The catalogue as seen from an index: one product (or None) per gallery row.

    Attributes:
        columns: the catalogue's columns.
        rows: per gallery row, the catalogue row as a dict, or None when it has none.
    """

    columns: list[str]
    rows: list[dict[str, str] | None]

    def __len__(self) -> int:
        return len(self.rows)

    def product(self, row: int) -> dict[str, str] | None:
        return self.rows[row] if 0 <= row < len(self.rows) else None

    def values(self, column: str) -> list[str]:
        """The column's value per gallery row ("" without product or value)."""
        return [(r or {}).get(column, "") for r in self.rows]

    def mask(self, conditions: Sequence[Condition]) -> np.ndarray:
        """Boolean ndarray of shape (n,): gallery rows whose product meets every condition.

        Raises:
            SnaplookError: a condition names a column the catalogue does not have.
        """
        import numpy as np

        allowed = np.ones(len(self.rows), dtype=bool)
        for cond in conditions:
            if cond.column not in self.columns:
                raise SnaplookError(
                    f"--where {cond.text!r}: the catalogue has no column {cond.column!r} "
                    f"(columns: {', '.join(self.columns)})."
                )
            allowed &= np.array([cond.matches(v or None) for v in self.values(cond.column)])
        return allowed


def load_products(index_dir: str | Path, gallery_paths: Sequence[str]) -> Products | None:
    """The catalogue stored in an index folder joined to its gallery rows (None if none)."""
    path = Path(index_dir) / CATALOG_FILE
    if not path.is_file():
        return None
    catalog = read_catalog(path)
    join = join_catalog(catalog, gallery_paths)
    return Products(
        columns=catalog.columns,
        rows=[catalog.rows[r] if r >= 0 else None for r in join.catalog_rows],
    )


# --- the --where grammar -------------------------------------------------------------------

_COMPARE = re.compile(r"^\s*([A-Za-z_][\w.-]*)\s*(!=|<=|>=|==|=|<|>)\s*(.*?)\s*$")
_IN = re.compile(r"^\s*([A-Za-z_][\w.-]*)\s+(?:in|IN)\s+(.+?)\s*$")


@dataclass(frozen=True)
class Condition:
    """One ``--where`` condition.

    Attributes:
        column: catalogue column.
        op: one of ``=``, ``!=``, ``<``, ``<=``, ``>``, ``>=``, ``in``.
        values: the right-hand side (several for ``in``).
        text: the condition as written.
    """

    column: str
    op: str
    values: tuple[str, ...]
    text: str

    def matches(self, value: str | None) -> bool:
        """Whether a product's ``value`` meets the condition (no value never does)."""
        if value is None or value == "":
            return False
        if self.op in ("<", "<=", ">", ">="):
            got, want = _number(value), _number(self.values[0])
            if got is None or want is None:
                return False
            return {
                "<": got < want,
                "<=": got <= want,
                ">": got > want,
                ">=": got >= want,
            }[self.op]
        equal = any(_equal(value, v) for v in self.values)
        return not equal if self.op == "!=" else equal


def _equal(a: str, b: str) -> bool:
    x, y = _number(a), _number(b)
    if x is not None and y is not None:
        return x == y
    return a.strip().casefold() == b.strip().casefold()


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def parse_where(text: str) -> Condition:
    """Parse one ``--where`` condition.

    Grammar: ``COLUMN OP VALUE`` with OP one of ``= == != < <= > >=``, or
    ``COLUMN in V1,V2,...`` (optionally in brackets). Values may be quoted. ``<``, ``<=``,
    ``>``, ``>=`` need a number; ``=``/``!=``/``in`` compare numbers as numbers and text
    case-insensitively. A product without a value for the column matches nothing.

    Raises:
        ValueError: the text does not follow the grammar (the message says why).
    """
    match = _IN.match(text)
    if match:
        column, rest = match.groups()
        if rest[:1] in "([" and rest[-1:] in ")]":
            rest = rest[1:-1]
        values = tuple(_unquote(v) for v in rest.split(",") if v.strip())
        if not values:
            raise ValueError(f"{text!r}: 'in' needs a comma-separated list, e.g. 'size in S,M'")
        return Condition(column, "in", values, text)
    match = _COMPARE.match(text)
    if not match:
        raise ValueError(
            f"{text!r} is not COLUMN=VALUE, COLUMN!=VALUE, COLUMN<NUMBER (also <=, >, >=) or "
            "'COLUMN in A,B'"
        )
    column, op, value = match.groups()
    op = "=" if op == "==" else op
    value = _unquote(value)
    if not value:
        raise ValueError(f"{text!r}: no value after {op!r}")
    if op in ("<", "<=", ">", ">=") and _number(value) is None:
        raise ValueError(f"{text!r}: {op} needs a number, got {value!r}")
    return Condition(column, op, (value,), text)


def parse_wheres(texts: Sequence[str] | None) -> list[Condition]:
    """Parse several ``--where`` conditions; ``SnaplookError`` on the first bad one."""
    conditions = []
    for text in texts or ():
        try:
            conditions.append(parse_where(text))
        except ValueError as exc:
            raise SnaplookError(f"--where {exc}.") from exc
    return conditions


def filter_mask(
    products: Products | None, where: Sequence[str] | None, index_dir: str | Path
) -> np.ndarray | None:
    """The ``allowed`` row mask for ``where`` (None when there is nothing to filter).

    Raises:
        SnaplookError: ``where`` given but the index has no catalogue; an unknown column.
    """
    conditions = parse_wheres(where)
    if not conditions:
        return None
    if products is None:
        raise SnaplookError(
            f"--where needs a catalogue, and {index_dir} has none; rebuild it with "
            "`snaplook index DIR --catalog products.csv`."
        )
    return products.mask(conditions)


def warn_if_few(allowed: np.ndarray | None, k: int, where: Sequence[str] | None) -> None:
    """Log a warning when fewer than ``k`` gallery rows pass the filters."""
    if allowed is None:
        return
    n_allowed = int(allowed.sum())
    if n_allowed < k:
        logger.warning(
            "only %d gallery images match --where %s; returning %d result(s) per query, not %d",
            n_allowed,
            " --where ".join(where or ()),
            n_allowed,
            k,
        )


# --- category prediction (--restrict auto) -------------------------------------------------


@dataclass
class CategoryGuess:
    """A query's predicted category: the vote of its nearest catalogue neighbours.

    Attributes:
        category: the winning category, or None when no neighbour has one.
        confidence: the winner's share of the neighbours' votes, 0..1.
    """

    category: str | None
    confidence: float


def vote_categories(neighbour_rows: np.ndarray, categories: Sequence[str]) -> list[CategoryGuess]:
    """Rank-weighted vote over each query's neighbours: the i-th nearest counts 1/i.

    A plain majority over 10 neighbours lets a colour shared by every category outvote
    the nearest images; weighting by rank predicted the category of 45 of 48 queries on
    the generated catalogue of benchmarks/bench_restrict.py, the majority 33 (MobileNetV2,
    random weights).

    Args:
        neighbour_rows: ndarray of shape (m, n) of gallery rows, nearest first; -1 pads.
        categories: category per gallery row ("" when none); compared case-insensitively.

    Returns:
        one :class:`CategoryGuess` per query; confidence is the winner's share of the
        weights.
    """
    guesses = []
    for rows in neighbour_rows:
        votes: dict[str, float] = {}
        shown: dict[str, str] = {}
        for rank, row in enumerate((int(r) for r in rows), start=1):
            if row >= 0 and categories[row]:
                key = categories[row].casefold()
                votes[key] = votes.get(key, 0.0) + 1.0 / rank
                shown.setdefault(key, categories[row])
        if not votes:
            guesses.append(CategoryGuess(None, 0.0))
            continue
        best = max(votes, key=lambda c: votes[c])  # ties: the first seen, i.e. the nearer
        guesses.append(CategoryGuess(shown[best], votes[best] / sum(votes.values())))
    return guesses


def _body_mask(products: Products, kind: str) -> np.ndarray | None:
    """Rows a garment crop of ``kind`` may match: upper/lower-body or full-body products.

    None (no restriction) for a person crop or a catalogue without a ``body`` column.
    """
    import numpy as np

    if kind not in ("upper", "lower") or BODY not in products.columns:
        return None
    return np.array([v.lower() in (kind, "full") for v in products.values(BODY)], dtype=bool)


def restricted_search(
    search: Callable[..., tuple[np.ndarray, np.ndarray]],
    features: np.ndarray,
    k: int,
    *,
    products: Products | None,
    allowed: np.ndarray | None = None,
    restrict: str = "none",
    kinds: Sequence[str] | None = None,
    neighbours: int = DEFAULT_CATEGORY_NEIGHBOURS,
) -> tuple[np.ndarray, np.ndarray, list[CategoryGuess] | None]:
    """k-NN within the allowed rows, optionally within each query's predicted category.

    Args:
        search: ``Index.search``: ``(queries, k, *, allowed) -> (distances, rows)``.
        features: ndarray of shape (m, d), the queries.
        k: neighbours per query.
        products: the index's catalogue (None: no catalogue).
        allowed: boolean ndarray of shape (n,) from ``--where``, or None for all rows.
        restrict: "none", or "auto": predict each query's category by a vote of its
            ``neighbours`` nearest catalogue neighbours, then search within it.
        kinds: per query, the crop kind (person/upper/lower); under "auto", upper and
            lower crops only see upper-/lower-body (or full) products when the catalogue
            has a ``body`` column.

    Returns:
        (distances, rows, guesses): ndarrays of shape (m, k) padded with inf / -1 where
        fewer than k rows are allowed; guesses is None unless ``restrict="auto"``.

    Raises:
        SnaplookError: ``restrict="auto"`` without a catalogue ``category`` column.
    """
    import numpy as np

    if restrict not in RESTRICT_MODES:
        raise SnaplookError(f"--restrict must be one of {', '.join(RESTRICT_MODES)}.")
    if restrict == "none":
        distances, rows = search(features, k, allowed=allowed)
        return distances, rows, None
    if products is None or CATEGORY not in products.columns:
        raise SnaplookError(
            "--restrict auto predicts a category from the catalogue's 'category' column, and "
            "this index has "
            + ("no catalogue" if products is None else "no such column")
            + "; rebuild it with `snaplook index DIR --catalog products.csv` or drop --restrict."
        )
    n = len(products)
    base = np.ones(n, dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
    categories = products.values(CATEGORY)
    has_category = np.array([bool(c) for c in categories])
    kinds = list(kinds) if kinds is not None else ["person"] * len(features)
    masks: dict[str, np.ndarray] = {}
    for kind in sorted(set(kinds)):
        body = _body_mask(products, kind)
        masks[kind] = base if body is None else base & body
    m = len(features)
    guesses: list[CategoryGuess] = [CategoryGuess(None, 0.0)] * m
    for kind, mask in masks.items():
        mine = [i for i in range(m) if kinds[i] == kind]
        _, near = search(features[mine], neighbours, allowed=mask & has_category)
        for i, guess in zip(mine, vote_categories(near, categories)):
            guesses[i] = guess
    width = min(k, n)
    distances = np.full((m, width), np.inf, dtype=np.float32)
    rows = np.full((m, width), -1, dtype=np.int64)
    folded = np.array([c.casefold() for c in categories])
    groups: dict[tuple[str, str | None], list[int]] = {}
    for i in range(m):
        category = guesses[i].category
        groups.setdefault((kinds[i], category.casefold() if category else None), []).append(i)
    for (kind, category), mine in sorted(groups.items(), key=lambda g: g[1][0]):
        mask = masks[kind] if category is None else masks[kind] & (folded == category)
        d, r = search(features[mine], width, allowed=mask)
        distances[mine, : d.shape[1]], rows[mine, : r.shape[1]] = d, r
    return distances, rows, guesses
