"""Matplotlib figures of results it is given: retrieval grids, t-SNE maps, recall curves.

Headless: figures are drawn through matplotlib's object API (``Figure`` on an Agg canvas),
never through pyplot, so a notebook's backend is left as it was. Every function writes a
PNG atomically and returns its path. Nothing here computes results.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

HIT_COLOUR = "#1a9641"
MISS_COLOUR = "#d7191c"
THUMB_SIZE = 224


def _figure(**kwargs: Any) -> Any:
    """A ``matplotlib.figure.Figure`` on its own Agg canvas (no pyplot, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _thumbnail(image: str | Path | np.ndarray, size: int = THUMB_SIZE) -> np.ndarray:
    """An RGB uint8 thumbnail, or a grey placeholder when the file cannot be read."""
    import numpy as np

    from snaplook.errors import SnaplookError
    from snaplook.io_utils import read_image
    from snaplook.transform_utils import resize_to_square

    if isinstance(image, (str, Path)):
        try:
            image = read_image(image, min_size=size)
        except SnaplookError as exc:
            logger.warning("cannot draw %s", exc)
            return np.full((size, size, 3), 200, dtype=np.uint8)
    return resize_to_square(image, size, mode="pad")


def _shorten(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters with an ellipsis in the middle, so a file name
    keeps its end (``..._v1.png``) and a cut is always visible."""
    if len(text) <= width:
        return text
    head = (width - 1 + 1) // 2
    tail = width - 1 - head
    return text[:head] + "\u2026" + (text[-tail:] if tail > 0 else "")


def format_distances(distances: Sequence[float], *, min_decimals: int = 3) -> list[str]:
    """Distances with the fewest decimals (at least ``min_decimals``, at most 8) that tell
    apart every two distances that differ: random weights put all of a query's neighbours
    within 0.001, where 3 decimals would print them all the same."""
    values = [float(d) for d in distances]
    distinct = len(set(values))
    for decimals in range(min_decimals, 9):
        labels = [f"{d:.{decimals}f}" for d in values]
        if len(set(labels)) == distinct:
            return labels
    return [f"{d:.8f}" for d in values]


def _name_of(image: Any) -> str | None:
    return Path(image).name if isinstance(image, (str, Path)) else None


def _captions(fig: Any) -> str:
    """Every panel's title and label, one panel a line, for the PNG's Description chunk."""
    lines = []
    for ax in fig.axes:
        parts = [t.replace("\n", " ") for t in (ax.get_title(), ax.get_xlabel(), ax.get_ylabel())]
        if any(parts):
            lines.append(" | ".join(parts))
    return "\n".join(lines)


def _save(fig: Any, out: str | Path, *, dpi: int = 100, title: str = "") -> Path:
    from snaplook.io_utils import atomic_path

    out = Path(out)
    with atomic_path(out) as tmp:
        # Title and panel captions also go into the PNG's text chunks, where image viewers,
        # search tools (and tests) can read them without looking at pixels.
        metadata = {"Title": title, "Description": _captions(fig)}
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight", metadata=metadata)
    return out


def _outline(ax: Any, colour: str, width: float = 6) -> None:
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_edgecolor(colour)
        spine.set_linewidth(width)


def plot_retrieval_grid(
    query: str | Path | np.ndarray,
    results: Sequence[str | Path | np.ndarray],
    out: str | Path,
    *,
    distances: Sequence[float] | None = None,
    hits: Sequence[bool] | None = None,
    labels: Sequence[str] | None = None,
    query_label: str | None = None,
    title: str = "",
) -> Path:
    """Draw one row: the query, then its results with rank and distance.

    Args:
        query: query image (path or RGB uint8 array).
        results: retrieved images, nearest first.
        out: PNG path to write.
        distances: cosine distance per result, shown under it.
        hits: per result, True outlines it green (same item), False red; None: no colour.
        labels: text per result (e.g. item id), shown under it.
        query_label: text under the query.
        title: figure title.

    Returns:
        ``out``.
    """
    n = len(results) + 1
    fig = _figure(figsize=(2.2 * n, 2.9))
    axes = fig.subplots(1, n, squeeze=False)
    axes = axes[0]
    axes[0].imshow(_thumbnail(query))
    query_name = _name_of(query)
    axes[0].set_title(
        f"query\n{_shorten(query_name, 28)}" if query_name else "query",
        fontsize=8,
        fontweight="bold",
    )
    if query_label:
        axes[0].set_xlabel(_shorten(query_label, 30), fontsize=8)
    _outline(axes[0], "#2b83ba", 3)
    shown = format_distances(distances) if distances is not None else None
    for i, (ax, res) in enumerate(zip(axes[1:], results)):
        ax.imshow(_thumbnail(res))
        text = f"#{i + 1}"
        if shown is not None:
            text += f"  d={shown[i]}"
        ax.set_title(text, fontsize=9)
        sub = str(labels[i]) if labels is not None else (_name_of(res) or "")
        # Per line: a product label is "id · price" over its title.
        ax.set_xlabel("\n".join(_shorten(line, 28) for line in sub.splitlines()), fontsize=7)
        if hits is not None:
            _outline(ax, HIT_COLOUR if hits[i] else MISS_COLOUR)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, out, title=title)


def plot_retrieval_rows(
    rows: Sequence[dict[str, Any]],
    out: str | Path,
    *,
    title: str = "",
) -> Path:
    """Several retrieval rows in one figure (e.g. the worst queries of an evaluation).

    Args:
        rows: dicts with keys ``query`` (path/array), ``results`` (list), and optional
            ``distances``, ``hits``, ``labels``, ``query_label``, ``query_name`` (the
            panel's title; default: the query's file name).
        out: PNG path to write.
    """
    if not rows:
        fig = _figure(figsize=(4, 1))
        ax = fig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, "no queries", ha="center", va="center")
        return _save(fig, out)
    ncols = 1 + max(len(r["results"]) for r in rows)
    # Constrained layout: with the default subplot margins a tall figure (many rows) kept a
    # fixed 12% of its height blank between the title and the first row.
    fig = _figure(figsize=(1.9 * ncols, 2.2 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for r, row in enumerate(rows):
        axes[r][0].imshow(_thumbnail(row["query"], 160))
        query_name = row.get("query_name") or _name_of(row["query"]) or "query"
        axes[r][0].set_title(_shorten(query_name, 24), fontsize=7, fontweight="bold")
        axes[r][0].set_ylabel(_shorten(str(row.get("query_label", "")), 24), fontsize=7)
        _outline(axes[r][0], "#2b83ba", 3)
        shown = format_distances(row["distances"]) if row.get("distances") is not None else None
        for c in range(1, ncols):
            ax = axes[r][c]
            if c - 1 >= len(row["results"]):
                ax.axis("off")
                continue
            ax.imshow(_thumbnail(row["results"][c - 1], 160))
            parts = [f"#{c}"]
            if shown is not None:
                parts.append(shown[c - 1])
            ax.set_title(" ".join(parts), fontsize=7)
            if row.get("labels") is not None:
                ax.set_xlabel(_shorten(str(row["labels"][c - 1]), 20), fontsize=6)
            if row.get("hits") is not None:
                _outline(ax, HIT_COLOUR if row["hits"][c - 1] else MISS_COLOUR, 4)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, out, title=title)


def plot_tsne(
    features: np.ndarray,
    images: Sequence[str | Path | np.ndarray],
    out: str | Path,
    *,
    seed: int = 0,
    thumb_size: int = 48,
    title: str = "t-SNE of the gallery",
) -> Path:
    """Map embeddings to 2-D with t-SNE and draw each image's thumbnail at its point.

    Args:
        features: ndarray of shape (n, d), n >= 2.
        images: n images (paths or arrays), in the order of ``features``.
        out: PNG path to write.
        seed: t-SNE random state (the map is deterministic for a given seed).
    """
    import numpy as np
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage
    from sklearn.manifold import TSNE

    features = np.asarray(features, dtype=np.float32)
    n = len(features)
    if n < 2:
        raise ValueError("t-SNE needs at least 2 points")
    perplexity = float(min(30, max(1, (n - 1) // 3)))
    coords = TSNE(
        n_components=2, perplexity=perplexity, random_state=seed, init="pca", metric="cosine"
    ).fit_transform(features)
    fig = _figure(figsize=(10, 10))
    ax = fig.subplots()
    ax.scatter(coords[:, 0], coords[:, 1], s=2, alpha=0)
    for (x, y), image in zip(coords, images):
        box = OffsetImage(_thumbnail(image, thumb_size), zoom=1.0)
        ax.add_artist(AnnotationBbox(box, (x, y), frameon=False))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    return _save(fig, out, title=title)


def plot_recall_curve(
    curves: dict[str, dict[int, float]],
    out: str | Path,
    *,
    title: str = "Recall@K",
    ylabel: str = "Recall@K (hit rate)",
) -> Path:
    """Draw Recall@K against K, one line per named setting.

    Args:
        curves: name -> {k: recall in [0, 1]}.
        out: PNG path to write.
    """
    fig = _figure(figsize=(6, 4))
    ax = fig.subplots()
    for name, curve in curves.items():
        ks = sorted(curve)
        ax.plot(ks, [curve[k] for k in ks], marker="o", label=name)
    ax.set_xlabel("K")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    if len(curves) > 1 or any(curves):
        ax.legend(fontsize=8)
    return _save(fig, out, title=title)


def plot_training_curves(
    history: Sequence[dict[str, Any]],
    out: str | Path,
    *,
    title: str = "Training",
    baseline: float | None = None,
) -> Path:
    """Draw training loss and validation Recall@1 per epoch (two panels, best epoch marked).

    Args:
        history: one dict per epoch with "epoch", "loss", "val_recall_at_1" (None when
            there is no validation) and optionally "best".
        out: PNG path to write.
        title: figure title.
        baseline: validation Recall@1 of the raw features, drawn as a dashed line.
    """
    from matplotlib.ticker import MaxNLocator

    fig = _figure(figsize=(10, 4))
    ax_loss, ax_r1 = fig.subplots(1, 2)
    for ax in (ax_loss, ax_r1):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    epochs = [h["epoch"] for h in history]
    ax_loss.plot(epochs, [h["loss"] for h in history], marker="o", markersize=3)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_loss.grid(alpha=0.3)
    val = [h for h in history if h.get("val_recall_at_1") is not None]
    if val:
        ax_r1.plot(
            [h["epoch"] for h in val],
            [h["val_recall_at_1"] for h in val],
            marker="o",
            markersize=3,
            label="head",
        )
        best = [h for h in val if h.get("best")]
        if best:
            b = best[-1]
            ax_r1.scatter(
                [b["epoch"]],
                [b["val_recall_at_1"]],
                s=80,
                facecolors="none",
                edgecolors=HIT_COLOUR,
                label="best",
            )
    if baseline is not None:
        ax_r1.axhline(baseline, linestyle="--", color="grey", label="raw features")
    ax_r1.set_xlabel("epoch")
    ax_r1.set_ylabel("validation Recall@1")
    ax_r1.set_ylim(0, 1.02)
    ax_r1.grid(alpha=0.3)
    if val or baseline is not None:
        ax_r1.legend(fontsize=8)
    else:
        ax_r1.text(0.5, 0.5, "no validation", ha="center", va="center", transform=ax_r1.transAxes)
    fig.suptitle(title)
    return _save(fig, out, title=title)
