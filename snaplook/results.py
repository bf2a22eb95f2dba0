"""What ``snaplook query`` writes and draws: result files, retrieval grids, the t-SNE map.

``results.csv`` / ``results.json`` / ``skipped.csv`` and one grid PNG per query in a
results folder (:func:`write_query_results`), the view of the results a page shows
(:func:`query_page`), the one description of a weights identity (:func:`describe_weights`)
and the gallery map (:func:`map_index`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from snaplook.errors import SnaplookError
from snaplook.features import is_random_weights
from snaplook.index import (
    Hit,
    Index,
    QuerySummary,
    load_index,
)
from snaplook.options import (
    DEFAULT_INDEX_DIR,
    DEFAULT_MAP_DIR,
    DEFAULT_MAP_IMAGES,
    DEFAULT_MAP_THUMB_SIZE,
    DEFAULT_SEED,
)
from snaplook.page import PageHit, QueryPage, QueryView

logger = logging.getLogger(__name__)

RESULTS_HEADER = ("query", "rank", "path", "distance", "backbone", "weights")


def product_label(product: dict[str, str] | None, fallback: str) -> str:
    """A grid label: ``product_id · price`` and the title on a second line, or ``fallback``."""
    if not product:
        return fallback
    price = f"{product.get('price', '')} {product.get('currency', '')}".strip()
    first = " · ".join(x for x in (product.get("product_id", ""), price) if x)
    return "\n".join(x for x in (first, product.get("title", "")) if x)


#: The file every query results folder holds: a non-empty folder without it is the user's.
RESULTS_CSV = "results.csv"


def check_results_dir(out: str | Path) -> None:
    """Refuse ``out`` as a query results folder unless it is new, empty or an earlier one.

    The folder is replaced whole (see :func:`write_query_results`), so a folder snaplook
    did not write, with other files in it, is never taken. Call it before the queries are
    embedded, so the refusal comes first.

    Raises:
        SnaplookError: ``out`` is a file, or a non-empty folder without ``results.csv``.
    """
    from snaplook.artists import check_output_dir

    check_output_dir(out, RESULTS_CSV)


def write_query_results(
    summary: QuerySummary,
    out: str | Path,
    *,
    index: Index,
    plot: bool = True,
    title_note: str = "",
    write_page: Callable[[Path], Path] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> QuerySummary:
    """Write ``results.csv``, ``results.json``, ``skipped.csv`` and (if ``plot``) one grid
    PNG per query, replacing the folder ``out`` whole.

    All-or-nothing: the files are written into a temporary folder beside ``out``, which
    then replaces ``out`` in one step; after a failure (or Ctrl-C) ``out`` is as it was,
    and after success it holds only this run's files (no grid or thumbnail of an earlier
    run). As for ``look``, ``out`` must be new, empty or an earlier results folder (it
    holds ``results.csv``); any other folder is refused, never replaced.

    Grids are named after the query file (``<stem>_grid.png``, with its parent folders
    joined by ``__`` when queries come from several folders). With a catalogue, results
    carry each hit's product_id, title and price.

    Args:
        summary: from :func:`~snaplook.index.query_index`.
        out: the results folder.
        index: the index searched.
        plot: draw the grids.
        title_note: appended to each grid's title.
        write_page: called with the temporary folder once the results are in it; writes
            the page (``index.html``, see :func:`query_page` and
            :func:`snaplook.page.write_query_page`) there and returns its path, so the page
            is swapped in with the results. None: no page.
        on_progress: called with the number of grids drawn so far.

    Returns:
        ``summary`` with ``out``, ``grids`` and ``page`` filled in (paths under ``out``).

    Raises:
        SnaplookError: ``out`` is a file, or a folder that is not an earlier results
            folder (see :func:`check_results_dir`).
    """
    import shutil

    from snaplook.io_utils import make_temp_dir, replace_dir

    out = Path(out)
    check_results_dir(out)
    tmp = make_temp_dir(out)
    try:
        _write_tables(summary, tmp, index)
        grids = _draw_grids(summary, tmp, index, title_note, on_progress) if plot else []
        page = write_page(tmp) if write_page is not None else None
        replace_dir(tmp, out, marker=RESULTS_CSV)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s, results.json and skipped.csv", out / RESULTS_CSV)
    logger.info("wrote %d grid(s) in %s", len(grids), out)
    summary.out = out
    summary.grids = [out / g.name for g in grids]
    if page is not None:
        summary.page = out / Path(page).relative_to(tmp)
    return summary


def _write_tables(summary: QuerySummary, out: Path, index: Index) -> None:
    from snaplook.catalog import RESULT_COLUMNS
    from snaplook.io_utils import write_csv_atomic, write_json_atomic, write_skipped

    has_products = index.products() is not None
    extra = RESULT_COLUMNS if has_products else ()
    backbone = str(index.meta.get("backbone"))
    weights = describe_weights(index.meta.get("weights"))
    # Query and gallery paths in the same (absolute) form, whatever form the query was given in.
    rows = [
        (str(_absolute(r.query)), h.rank, str(_absolute(h.path)), f"{h.distance:.6f}")
        + tuple((h.product or {}).get(c, "") for c in extra)
        + (backbone, weights)
        for r in summary.results
        for h in r.hits
    ]
    write_csv_atomic(
        out / RESULTS_CSV,
        (*RESULTS_HEADER[:4], *extra, *RESULTS_HEADER[4:]),
        rows,
        spreadsheet=True,  # catalogue text may start with = + - @; results.json keeps it raw
    )
    write_skipped(out / "skipped.csv", ((_absolute(s.path), s.reason) for s in summary.skipped))
    write_json_atomic(out / "results.json", _results_doc(summary, index, has_products))


def _results_doc(summary: QuerySummary, index: Index, has_products: bool) -> dict[str, Any]:
    return {
        "index": str(index.path),
        "backbone": index.meta.get("backbone"),
        "weights": index.meta.get("weights"),
        "k": summary.k,
        **({"where": summary.where, "n_allowed": summary.n_allowed} if summary.where else {}),
        **({"restrict": summary.restrict} if summary.restrict != "none" else {}),
        "results": [
            {
                "query": str(_absolute(r.query)),
                **(
                    {"category": r.category, "confidence": round(r.confidence, 4)}
                    if r.confidence is not None
                    else {}
                ),
                "n_hits": len(r.hits),
                "hits": [
                    {
                        "rank": h.rank,
                        "path": str(_absolute(h.path)),
                        "distance": round(h.distance, 6),
                        **({"product": h.product} if has_products else {}),
                    }
                    for h in r.hits
                ],
            }
            for r in summary.results
        ],
        "skipped": [{"path": str(s.path), "reason": s.reason} for s in summary.skipped],
    }


def _draw_grids(
    summary: QuerySummary,
    out: Path,
    index: Index,
    title_note: str,
    on_progress: Callable[[int], None] | None,
) -> list[Path]:
    from snaplook.plot_utils import plot_retrieval_grid

    has_products = index.products() is not None
    grids: list[Path] = []
    names = _grid_names([r.query for r in summary.results])
    for n, (result, name) in enumerate(zip(summary.results, names)):
        title = f"{index.meta.get('backbone')} · k={summary.k}{title_note}"
        grid = out / name
        plot_retrieval_grid(
            result.query,
            [h.path for h in result.hits],
            grid,
            distances=[h.distance for h in result.hits],
            labels=[product_label(h.product, h.path.name) for h in result.hits]
            if has_products
            else None,
            title=title,
        )
        grids.append(grid)
        if on_progress is not None:
            on_progress(n + 1)
    return grids


def page_hits(hits: Sequence[Hit]) -> list[PageHit]:
    """Search hits as the page shows them (see :mod:`snaplook.page`)."""
    return [PageHit(h.rank, h.path, h.distance, h.product) for h in hits]


def query_page(summary: QuerySummary, *, index: Index) -> QueryPage:
    """The view of a query's results that :func:`snaplook.page.write_query_page` renders."""
    return QueryPage(
        backbone=str(index.meta.get("backbone")),
        k=summary.k,
        queries=[
            QueryView(r.query, page_hits(r.hits), r.category, r.confidence) for r in summary.results
        ],
        skipped=[s.path.name if hasattr(s.path, "name") else str(s.path) for s in summary.skipped],
        where=list(summary.where),
        restrict=summary.restrict,
        n_allowed=summary.n_allowed,
        random_weights=is_random_weights(index.meta),
    )


def _absolute(path: Path) -> Path:
    """``path`` absolute and without symlinks or '..', as the index records its root."""
    return Path(path).resolve()


def describe_weights(
    weights: dict[str, Any] | None, *, form: Literal["short", "hash", "label"] = "short"
) -> str:
    """Words for a weights identity (the ``weights`` block of ``meta.json`` or a head).

    Args:
        weights: ``{"name": "imagenet" | "random" | "file", "seed"?, "sha256"?, "path"?}``.
        form: "short" (results.csv, map titles): ``imagenet``, ``random (seed 0)`` or a
            weights file's path; "hash" (messages that compare two identities):
            ``imagenet (sha256 0123456789ab)``, ``random (seed 0)``; "label" (plot
            labels): the "hash" form and "weights", random weights with a warning that
            they test the pipeline, ``unknown weights`` for None.
    """
    if form == "label":
        if not weights:
            return "unknown weights"
        if is_random_weights(weights):
            return (
                f"random weights (seed {weights.get('seed')}): a pipeline test, not retrieval "
                "quality"
            )
        return f"{describe_weights(weights, form='hash')} weights"
    weights = weights or {}
    kind = weights.get("name", "unknown" if form == "short" else "?")
    if kind == "random":
        return f"random (seed {weights.get('seed')})"
    if form == "hash":
        sha = weights.get("sha256")
        return f"{kind}" + (f" (sha256 {sha[:12]})" if sha else "")
    if kind == "file":
        return str(weights.get("path", "file"))
    return str(kind)


def _grid_names(queries: Sequence[Path]) -> list[str]:
    stems = [q.stem for q in queries]
    if len(set(stems)) == len(stems):
        return [f"{s}_grid.png" for s in stems]
    # Same stem in several folders (or x.jpg beside x.png): name by the last folders, never
    # by the root or "..", which would make the name an absolute path or climb out of out.
    names: list[str] = []
    for q in queries:
        parts = [p for p in q.with_suffix("").parts if p not in (q.anchor, "..", ".")]
        base = "__".join(parts[-3:])
        name, n = f"{base}_grid.png", 1
        while name in names:
            n += 1
            name = f"{base}-{n}_grid.png"
        names.append(name)
    return names


def map_index(
    index: Index | str | Path = DEFAULT_INDEX_DIR,
    out: str | Path | None = None,
    *,
    max_images: int = DEFAULT_MAP_IMAGES,
    seed: int = DEFAULT_SEED,
    thumb_size: int = DEFAULT_MAP_THUMB_SIZE,
) -> Path:
    """Draw the gallery of an index as a t-SNE map of thumbnails (see ``plot_utils.plot_tsne``).

    Args:
        index: a loaded :class:`Index` or its folder, default="output/index".
        out: PNG to write, default ``output/maps/<index folder name>_tsne.png``.
        max_images: draw at most this many images, a seeded sample of larger galleries
            (t-SNE and the thumbnails stay readable), default=500.
        seed: seeds the sample and t-SNE: the same seed draws the same map.
        thumb_size: thumbnail side in pixels.

    Returns:
        the PNG written.

    Raises:
        SnaplookError: no index, or fewer than 2 images in it.
    """
    import numpy as np

    from snaplook.plot_utils import plot_tsne

    if not isinstance(index, Index):
        index = load_index(index)
    n = len(index)
    if n < 2:
        raise SnaplookError(f"{index.path} holds {n} image(s); a map needs at least 2.")
    if max_images < 2:
        raise SnaplookError(f"--max-images must be at least 2, got {max_images}.")
    rows = np.arange(n)
    if n > max_images:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=max_images, replace=False))
    out = Path(out) if out is not None else DEFAULT_MAP_DIR / f"{index.path.name}_tsne.png"
    if out.is_dir():
        raise SnaplookError(f"--out {out} is a folder; pass the PNG file to write.")
    out.parent.mkdir(parents=True, exist_ok=True)
    title = (
        f"t-SNE of {len(rows)} of {n} gallery images · {index.meta.get('backbone')}, "
        f"{describe_weights(index.meta.get('weights'))} weights"
    )
    if is_random_weights(index.meta):
        title += ": shows the pipeline, not retrieval quality"
    logger.info("t-SNE of %d gallery images of %s", len(rows), index.path)
    plot_tsne(
        np.asarray(index.features[rows]),
        [index.gallery_path(int(r)) for r in rows],
        out,
        seed=seed,
        thumb_size=thumb_size,
        title=title,
    )
    logger.info("wrote %s", out)
    return out
