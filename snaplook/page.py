"""Static HTML pages of results: ``index.html`` for ``look`` and ``query`` output folders.

Hand-written Jinja2 templates (``snaplook/templates``); every image is a small JPEG copied
into the page's ``thumbs/`` folder and linked relatively, so the folder opens from the file
system, moves as a whole and needs no server. The pages render the plain view objects
defined here (:class:`QueryPage`, :class:`LookPage`); the chain and the CLI build them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

PAGE_FILE = "index.html"
THUMBS_DIR = "thumbs"
#: Longest side of a page thumbnail, in pixels.
THUMB_PX = 200
#: Frames shown on a look page's timeline at most (evenly spaced beyond that).
MAX_TIMELINE = 120


@dataclass
class PageHit:
    """One retrieved gallery image: its rank, file, cosine distance and catalogue row."""

    rank: int
    path: Path
    distance: float
    product: dict[str, str] | None = None


@dataclass
class QueryView:
    """One query image with its hits, nearest first (and its predicted category, if any)."""

    image: Path
    hits: list[PageHit]
    category: str | None = None
    confidence: float | None = None


@dataclass
class QueryPage:
    """What a ``query`` page shows.

    Attributes:
        backbone: the index's backbone (in the title).
        k: neighbours per query.
        queries: the queries, in order.
        skipped: names of the query images that could not be read.
        where, restrict, n_allowed: the filters applied and the gallery rows they left.
        random_weights: the index was built on random weights (the page says so).
    """

    backbone: str
    k: int
    queries: list[QueryView]
    skipped: list[str] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    restrict: str = "none"
    n_allowed: int | None = None
    random_weights: bool = False


@dataclass
class CropView:
    """One lead-artist crop of a look with its hits; ``image`` is the crop file to show."""

    artist: int
    kind: str
    frame: int
    time_s: float | None
    image: Path
    hits: list[PageHit]
    category: str | None = None
    confidence: float | None = None


@dataclass
class FusedView:
    """A product in an artist's fused ranking: ``hit`` at the mean distance, its votes."""

    hit: PageHit
    votes: int
    best_distance: float


@dataclass
class LookPage:
    """What a ``look`` page shows.

    Attributes:
        video: the video's file name.
        k: neighbours per crop.
        frames: (frame number, time in seconds, thumbnail RGB uint8) of the examined
            frames, for the timeline.
        people: per frame number, the people found in it.
        crops: the crops, in order.
        fused: per artist number, the fused ranking.
        where, restrict: the filters applied.
        random_weights: the index was built on random weights (the page says so).
    """

    video: str
    k: int
    frames: Sequence[tuple[int, float | None, np.ndarray]]
    people: dict[int, int]
    crops: list[CropView]
    fused: dict[int, list[FusedView]]
    where: list[str] = field(default_factory=list)
    restrict: str = "none"
    random_weights: bool = False


@dataclass
class _Card:
    """One retrieved product (or gallery image) as the page shows it."""

    rank: int
    thumb: str | None
    name: str
    distance: float
    product_id: str = ""
    title: str = ""
    price: str = ""
    url: str = ""
    extra: str = ""


class _Thumbs:
    """Writes each source image once as ``thumbs/<hash>.jpg``; returns relative links."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.done: dict[str, str | None] = {}

    def link(self, image: str | Path | np.ndarray, *, name: str | None = None) -> str | None:
        from PIL import Image

        from snaplook.errors import SnaplookError
        from snaplook.io_utils import atomic_path, read_image

        key = name or str(Path(image).resolve())
        if key in self.done:
            return self.done[key]
        rel = f"{THUMBS_DIR}/{hashlib.sha1(key.encode()).hexdigest()[:16]}.jpg"
        try:
            array = image if name is not None else read_image(image)
        except SnaplookError as exc:
            logger.warning("page: cannot show %s", exc)
            self.done[key] = None
            return None
        picture = Image.fromarray(array)
        picture.thumbnail((THUMB_PX, THUMB_PX))
        with atomic_path(self.out / rel) as tmp:
            picture.save(tmp, format="JPEG", quality=85)
        self.done[key] = rel
        return rel


def _safe_url(url: str) -> str:
    # Only web links: a catalogue must not put javascript: or file: links on the page.
    return url if url.lower().startswith(("http://", "https://")) else ""


def _card(hit: PageHit, thumbs: _Thumbs) -> _Card:
    product = hit.product or {}
    extra = " · ".join(
        product[c] for c in ("brand", "category", "colour", "color") if product.get(c)
    )
    return _Card(
        rank=hit.rank,
        thumb=thumbs.link(hit.path),
        name=hit.path.name,
        distance=hit.distance,
        product_id=product.get("product_id", ""),
        title=product.get("title", ""),
        price=f"{product.get('price', '')} {product.get('currency', '')}".strip(),
        url=_safe_url(product.get("url", "")),
        extra=extra,
    )


def _render(template: str, **context: Any) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template(template).render(**context)


def _weights_note(random_weights: bool) -> str:
    if random_weights:
        return "random weights: these results show the pipeline, not retrieval quality"
    return ""


def write_query_page(view: QueryPage, out: str | Path) -> Path:
    """Write ``out/index.html``: each query with its top-k products.

    Args:
        view: the results to show (``snaplook.results.query_page`` builds it from a
            query's results).
        out: the results folder (thumbnails go to ``out/thumbs``).

    Returns:
        the page's path.
    """
    from snaplook.io_utils import write_text_atomic

    out = Path(out)
    thumbs = _Thumbs(out)
    queries = [
        {
            "name": q.image.name,
            "thumb": thumbs.link(q.image),
            "category": q.category,
            "confidence": q.confidence,
            "cards": [_card(h, thumbs) for h in q.hits],
        }
        for q in view.queries
    ]
    html = _render(
        "query.html",
        title=f"snaplook query · {view.backbone} · k={view.k}",
        note=_weights_note(view.random_weights),
        k=view.k,
        where=view.where,
        restrict=view.restrict,
        n_allowed=view.n_allowed,
        queries=queries,
        skipped=view.skipped,
    )
    write_text_atomic(out / PAGE_FILE, html)
    return out / PAGE_FILE


def write_look_page(view: LookPage, out: str | Path) -> Path:
    """Write ``out/index.html`` for a look: timeline, artists' crops and products, fused list.

    Args:
        view: the look to show (``snaplook.look`` builds it).
        out: the folder the page goes in (thumbnails in ``out/thumbs``).

    Returns:
        the page's path.
    """
    from snaplook.io_utils import write_text_atomic

    out = Path(out)
    thumbs = _Thumbs(out)
    crop_frames = {c.frame for c in view.crops}
    step = max(1, -(-len(view.frames) // MAX_TIMELINE))
    timeline = [
        {
            "frame": frame,
            "time": "" if time_s is None else f"{time_s:.1f} s",
            "thumb": thumbs.link(image, name=f"frame:{frame}"),
            "people": view.people.get(frame, 0),
            "used": frame in crop_frames,
        }
        for frame, time_s, image in list(view.frames)[::step]
    ]
    artists = []
    for artist in sorted({c.artist for c in view.crops}):
        crops = [
            {
                "kind": c.kind,
                "frame": c.frame,
                "time": "" if c.time_s is None else f"{c.time_s:.1f} s",
                "thumb": thumbs.link(c.image),
                "category": c.category,
                "confidence": c.confidence,
                "cards": [_card(h, thumbs) for h in c.hits],
            }
            for c in view.crops
            if c.artist == artist
        ]
        fused = [
            {"card": _card(f.hit, thumbs), "votes": f.votes, "best": f.best_distance}
            for f in view.fused.get(artist, [])
        ]
        artists.append({"artist": artist, "crops": crops, "fused": fused})
    html = _render(
        "look.html",
        title=f"snaplook look · {view.video}",
        note=_weights_note(view.random_weights),
        video=view.video,
        k=view.k,
        where=view.where,
        restrict=view.restrict,
        timeline=timeline,
        n_frames=len(view.frames),
        artists=artists,
    )
    write_text_atomic(out / PAGE_FILE, html)
    return out / PAGE_FILE
