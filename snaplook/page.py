"""Static HTML pages of results: ``index.html`` for ``look`` and ``query`` output folders.

Hand-written Jinja2 templates (``snaplook/templates``); every image is a small JPEG copied
into the page's ``thumbs/`` folder and linked relatively, so the folder opens from the file
system, moves as a whole and needs no server.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from snaplook.index import Hit, Index, QuerySummary
    from snaplook.look import LookSummary

logger = logging.getLogger(__name__)

PAGE_FILE = "index.html"
THUMBS_DIR = "thumbs"
#: Longest side of a page thumbnail, in pixels.
THUMB_PX = 200
#: Frames shown on a look page's timeline at most (evenly spaced beyond that).
MAX_TIMELINE = 120


@dataclass
class Card:
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


def _card(hit: Hit, thumbs: _Thumbs) -> Card:
    product = hit.product or {}
    extra = " · ".join(
        product[c] for c in ("brand", "category", "colour", "color") if product.get(c)
    )
    return Card(
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


def _weights_note(index: Index) -> str:
    if index.meta.get("weights", {}).get("name") == "random":
        return "random weights: these results show the pipeline, not retrieval quality"
    return ""


def write_query_page(
    summary: QuerySummary, out: str | Path, *, index: Index, title_note: str = ""
) -> Path:
    """Write ``out/index.html``: each query with its top-k products.

    Args:
        summary: results of :func:`snaplook.index.query_index`.
        out: the results folder (thumbnails go to ``out/thumbs``).
        index: the index that was searched.

    Returns:
        the page's path.
    """
    from snaplook.io_utils import write_text_atomic

    out = Path(out)
    thumbs = _Thumbs(out)
    queries = [
        {
            "name": r.query.name,
            "thumb": thumbs.link(r.query),
            "category": r.category,
            "confidence": r.confidence,
            "cards": [_card(h, thumbs) for h in r.hits],
        }
        for r in summary.results
    ]
    html = _render(
        "query.html",
        title=f"snaplook query · {index.meta.get('backbone')} · k={summary.k}",
        note=_weights_note(index),
        k=summary.k,
        where=summary.where,
        restrict=summary.restrict,
        n_allowed=summary.n_allowed,
        queries=queries,
        skipped=[s.path.name if hasattr(s.path, "name") else str(s.path) for s in summary.skipped],
    )
    write_text_atomic(out / PAGE_FILE, html)
    return out / PAGE_FILE


def write_look_page(
    summary: LookSummary,
    out: str | Path,
    *,
    index: Index,
    frames: Sequence[tuple[int, float | None, np.ndarray]] = (),
    crops_dir: str | Path | None = None,
) -> Path:
    """Write ``out/index.html`` for a look: timeline, artists' crops and products, fused list.

    Args:
        summary: the look so far (crops, hits, fused rankings).
        out: the folder the page goes in (thumbnails in ``out/thumbs``).
        index: the index that was searched.
        frames: (frame number, time in seconds, thumbnail RGB uint8) of the examined
            frames, for the timeline.
        crops_dir: where the crop files are now, if not yet at their ``crop.path`` (``look``
            assembles its folder under a temporary name).

    Returns:
        the page's path.
    """
    from snaplook.io_utils import write_text_atomic

    out = Path(out)
    thumbs = _Thumbs(out)
    crop_frames = {c.frame for c in summary.crops}
    people = {r.frame: len(r.detections) for r in summary.selection.frames}
    step = max(1, -(-len(frames) // MAX_TIMELINE))
    timeline = [
        {
            "frame": frame,
            "time": "" if time_s is None else f"{time_s:.1f} s",
            "thumb": thumbs.link(image, name=f"frame:{frame}"),
            "people": people.get(frame, 0),
            "used": frame in crop_frames,
        }
        for frame, time_s, image in list(frames)[::step]
    ]
    artists = []
    for artist in sorted({c.artist for c in summary.crops}):
        crops = [
            {
                "kind": c.kind,
                "frame": c.frame,
                "time": "" if c.time_s is None else f"{c.time_s:.1f} s",
                "thumb": thumbs.link(Path(crops_dir) / c.path.name if crops_dir else c.path),
                "category": summary.categories.get(str(c.path)),
                "cards": [_card(h, thumbs) for h in summary.crop_hits.get(str(c.path), [])],
            }
            for c in summary.crops
            if c.artist == artist
        ]
        fused = [
            {"card": _card(f.hit, thumbs), "votes": f.votes, "best": f.best_distance}
            for f in summary.fused.get(artist, [])
        ]
        artists.append({"artist": artist, "crops": crops, "fused": fused})
    html = _render(
        "look.html",
        title=f"snaplook look · {summary.video.name}",
        note=_weights_note(index),
        video=summary.video.name,
        k=summary.k,
        where=summary.where,
        restrict=summary.restrict,
        timeline=timeline,
        n_frames=len(frames),
        artists=artists,
    )
    write_text_atomic(out / PAGE_FILE, html)
    return out / PAGE_FILE
