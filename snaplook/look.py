"""`snaplook look`: the whole chain for one video, frames -> lead artists -> clothes -> k-NN.

Every hit keeps its provenance (video, time, frame, artist, box, crop kind); each
artist's crops are fused into one ranking of gallery items.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snaplook.artists import (
    DEFAULT_CROPS_PER_ARTIST,
    DEFAULT_DETECTOR,
    DEFAULT_LEAD_ARTIST_ROOT,
    DEFAULT_MAX_ARTISTS,
    DEFAULT_MIN_SIZE,
    ArtistRow,
    PersonDetector,
    Selection,
)
from snaplook.errors import SnaplookError
from snaplook.index import DEFAULT_INDEX_DIR, DEFAULT_K

if TYPE_CHECKING:
    from snaplook.index import Index

logger = logging.getLogger(__name__)

DEFAULT_LOOKS_ROOT = Path("output/looks")
#: Seconds between the frames `look` examines (the `extract` default).
DEFAULT_EVERY = 1.0

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
    """A gallery item in one artist's fused ranking.

    Attributes:
        rank: 1 for the best.
        row: gallery row in the index.
        path: gallery image.
        votes: how many of the artist's crops retrieved it in their top k.
        mean_distance: mean cosine distance over those crops.
        best_distance: the smallest of them.
    """

    rank: int
    row: int
    path: Path
    votes: int
    mean_distance: float
    best_distance: float


@dataclass
class LookSummary:
    """What :func:`look` did.

    Attributes:
        video: the video.
        out: folder with grids, ``looks.csv`` and ``looks_fused.csv``.
        crops_out: folder with the lead-artist crops and ``artists.csv``.
        selection: the lead artists and the per-frame record.
        crops: rows of ``artists.csv`` (the queries).
        hits: rows of ``looks.csv``, as dicts keyed by :data:`LOOKS_HEADER`.
        fused: per artist number, the fused ranking.
        grids: PNG grids written.
        k: neighbours per crop.
        seconds: wall time.
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

    @property
    def n_frames(self) -> int:
        return len(self.selection.frames)


def fuse_hits(
    distances: Any, rows: Any, *, k: int = DEFAULT_K
) -> list[tuple[int, int, float, float]]:
    """Fuse the rankings of several crops of one artist.

    Gallery items are ranked by how many crops retrieved them (more first), then by their
    mean distance over those crops (smaller first), then by gallery row.

    Args:
        distances: ndarray of shape (n_crops, k'), cosine distances, ascending per row.
        rows: ndarray of shape (n_crops, k'), gallery rows.
        k: how many fused items to return.

    Returns:
        (row, votes, mean_distance, best_distance) tuples, best first, at most ``k``.
    """
    found: dict[int, list[float]] = {}
    for crop_rows, crop_dists in zip(rows, distances):
        for row, dist in zip(crop_rows, crop_dists):
            found.setdefault(int(row), []).append(float(dist))
    ranked = sorted(
        ((row, len(d), sum(d) / len(d), min(d)) for row, d in found.items()),
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
    every: float = DEFAULT_EVERY,
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
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> LookSummary:
    """Shop the look of a video: extract frames, find the lead artists, query their clothes.

    Frames are streamed (never all held in memory); each is searched for people, people
    are followed across frames and the lead artists' best views are cut out
    (``crops_out``: crops and ``artists.csv``). Every crop is embedded the way the index
    was built and its k nearest gallery images are written with provenance to
    ``looks.csv``; each artist's crops are fused into one ranking (``looks_fused.csv``).
    One grid per crop (``<crop stem>_grid.png``) and one per artist
    (``artist<k>_fused_grid.png``). Both folders are replaced atomically.

    Args:
        video: the video file.
        index: a loaded index or its folder, default="output/index".
        k: neighbours per crop and fused items per artist, default=5.
        out: results folder, default ``output/looks/<video stem>``.
        crops_out: crops folder, default ``output/lead_artist/<video stem>``.
        every: seconds between examined frames, default=1.0.
        max_frames: stop after this many frames.
        max_artists: lead artists to keep, default=2.
        min_size: minimum person height as a fraction of the frame height.
        clothes: cut out clothes (upper/lower crops) besides the person crop.
        detector: "builtin", the path of a YOLO-style ONNX model, or a configured
            :class:`~snaplook.artists.PersonDetector`.
        crops_per_artist: best views per artist.
        plot: draw the grids.
        batch_size: crops per forward pass.
        head: the ``snaplook.train.Head`` the index was built with, if any (see
            :func:`snaplook.index.check_head`).
        runtime: "auto", "openvino" or "keras" (default: auto).
        precision: must be the index's if given (default: the index's).
        on_start: called once with the video duration in whole seconds (0 if unknown).
        on_progress: called with the video time reached, in whole seconds.

    Returns:
        :class:`LookSummary`. A video with nobody in it gives empty CSVs (headers only)
        and no grids; that is not an error.

    Raises:
        SnaplookError: missing or broken index, bad ``k``, unreadable video, bad detector,
            an output folder that holds something else.
    """
    from snaplook.artists import (
        FrameDetections,
        check_output_dir,
        make_detector,
        select_lead_artists,
        write_lead_artists,
    )
    from snaplook.index import check_head, check_k, load_index
    from snaplook.video import iter_frames, probe_duration

    started = time.perf_counter()
    video = Path(video)
    if not video.is_file():
        raise SnaplookError(f"{video}: no such video file; check the path.")
    loaded = index if not isinstance(index, (str, Path)) else load_index(index)
    k = check_k(k, loaded)
    check_head(loaded.meta, head, loaded.path)  # before the video is decoded
    embedder = loaded.embedder(head=head, runtime=runtime, precision=precision)
    out = Path(out) if out is not None else DEFAULT_LOOKS_ROOT / video.stem
    crops_out = Path(crops_out) if crops_out is not None else DEFAULT_LEAD_ARTIST_ROOT / video.stem
    check_output_dir(out, "looks.csv")
    check_output_dir(crops_out, "artists.csv")
    person_detector = make_detector(detector, min_size=min_size)  # fails before decoding
    if on_start is not None:
        on_start(int(probe_duration(video) or 0))

    def _stream() -> Iterator[FrameDetections]:
        for frame in iter_frames(
            video, every=every, max_frames=max_frames, on_progress=on_progress
        ):
            image = frame.image
            yield FrameDetections(frame.frame, frame.time_s, image, person_detector.detect(image))

    selection = select_lead_artists(
        _stream(), max_artists=max_artists, crops_per_artist=crops_per_artist
    )
    crops = write_lead_artists(selection, crops_out, clothes=clothes)
    summary = LookSummary(
        video=video, out=out, crops_out=crops_out, selection=selection, crops=crops, k=k
    )
    _query_crops(summary, loaded, plot=plot, batch_size=batch_size, embedder=embedder)
    summary.seconds = time.perf_counter() - started
    return summary


def _query_crops(
    summary: LookSummary, index: Index, *, plot: bool, batch_size: int, embedder: Any
) -> None:
    import shutil

    from snaplook.features import embed_arrays
    from snaplook.io_utils import make_temp_dir, read_image, replace_dir, write_csv_atomic

    crops = summary.crops
    k = summary.k
    tmp = make_temp_dir(summary.out)
    try:
        hits: list[dict[str, Any]] = []
        grids: list[tuple[str, Any]] = []
        if crops:
            images = [read_image(c.path) for c in crops]
            features = embed_arrays(images, embedder, batch_size=batch_size)
            distances, rows = index.search(features, k=k)
            for crop, crop_rows, crop_dists in zip(crops, rows, distances):
                for rank, (row, dist) in enumerate(zip(crop_rows, crop_dists), start=1):
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
                            "rank": rank,
                            "gallery_path": str(index.gallery_path(int(row))),
                            "distance": f"{float(dist):.6f}",
                        }
                    )
            for artist in sorted({c.artist for c in crops}):
                mine = [i for i, c in enumerate(crops) if c.artist == artist]
                fused = fuse_hits(distances[mine], rows[mine], k=k)
                summary.fused[artist] = [
                    FusedHit(rank, row, index.gallery_path(row), votes, mean_d, best_d)
                    for rank, (row, votes, mean_d, best_d) in enumerate(fused, start=1)
                ]
        summary.hits = hits
        write_csv_atomic(
            tmp / "looks.csv", LOOKS_HEADER, ([h[c] for c in LOOKS_HEADER] for h in hits)
        )
        write_csv_atomic(
            tmp / "looks_fused.csv",
            FUSED_HEADER,
            (
                (
                    artist,
                    f.rank,
                    str(f.path),
                    f.votes,
                    sum(1 for c in crops if c.artist == artist),
                    f"{f.mean_distance:.6f}",
                    f"{f.best_distance:.6f}",
                )
                for artist, ranking in summary.fused.items()
                for f in ranking
            ),
        )
        if plot and crops:
            grids = _draw_grids(summary, index, tmp)
        replace_dir(tmp, summary.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary.grids = [summary.out / name for name, _ in grids]


def _draw_grids(summary: LookSummary, index: Index, tmp: Path) -> list[tuple[str, Any]]:
    from snaplook.plot_utils import plot_retrieval_grid

    note = " · random weights" if index.meta.get("weights", {}).get("name") == "random" else ""
    drawn: list[tuple[str, Any]] = []
    k = summary.k
    for n, crop in enumerate(summary.crops):
        mine = summary.hits[n * k : (n + 1) * k]
        when = f" · t={crop.time_s:.1f}s" if crop.time_s is not None else ""
        name = f"{crop.path.stem}_grid.png"
        plot_retrieval_grid(
            crop.path,
            [h["gallery_path"] for h in mine],
            tmp / name,
            distances=[float(h["distance"]) for h in mine],
            query_label=f"artist {crop.artist} · {crop.kind}",
            title=f"{summary.video.name} · frame {crop.frame}{when} · k={k}{note}",
        )
        drawn.append((name, crop))
    for artist, ranking in summary.fused.items():
        persons = [c for c in summary.crops if c.artist == artist and c.kind == "person"]
        query = persons[0] if persons else next(c for c in summary.crops if c.artist == artist)
        name = f"artist{artist}_fused_grid.png"
        plot_retrieval_grid(
            query.path,
            [f.path for f in ranking],
            tmp / name,
            distances=[f.mean_distance for f in ranking],
            labels=[f"{f.votes} vote(s) · {f.path.name}" for f in ranking],
            query_label=f"artist {artist}",
            title=f"{summary.video.name} · artist {artist} fused over its crops · k={k}{note}",
        )
        drawn.append((name, None))
    return drawn
