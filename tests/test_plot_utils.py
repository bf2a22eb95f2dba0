"""Tests for snaplook.plot_utils: figures render headless (Agg canvas) to PNGs of plausible size,
leaving matplotlib's global backend alone."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image
from PIL import Image

from snaplook.plot_utils import (
    plot_recall_curve,
    plot_retrieval_grid,
    plot_retrieval_rows,
    plot_tsne,
)


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    colours = [(200, 30, 30), (30, 160, 60), (30, 60, 200), (220, 200, 40), (20, 20, 20)]
    return [make_image(tmp_path / "img" / f"{i}.png", c, seed=i) for i, c in enumerate(colours)]


def test_plot_retrieval_grid_writes_one_row_png(tmp_path: Path, images: list[Path]) -> None:
    out = plot_retrieval_grid(
        images[0],
        images[1:4],
        tmp_path / "grids" / "q_grid.png",
        distances=[0.01, 0.2, 0.35],
        hits=[True, False, True],
        labels=["id_01", "id_02", "id_01"],
        query_label="id_01",
        title="resnet50 · k=3 · random weights",
    )

    assert out == tmp_path / "grids" / "q_grid.png"
    width, height = _png_size(out)
    # 4 panels at 2.2 x 2.9 inches, 100 dpi, tight bounding box.
    assert 600 <= width <= 900
    assert 200 <= height <= 320
    assert [p.name for p in out.parent.iterdir()] == ["q_grid.png"]  # no temp file left


def test_plot_retrieval_grid_leaves_the_backend_and_pyplot_alone(
    tmp_path: Path, images: list[Path]
) -> None:
    # A notebook's backend must survive a plot (issue 21: no matplotlib.use(..., force=True)).
    code = (
        "import sys, matplotlib\n"
        "matplotlib.use('svg')\n"
        "from snaplook.plot_utils import plot_retrieval_grid\n"
        f"plot_retrieval_grid({str(images[0])!r}, [{str(images[1])!r}], "
        f"{str(tmp_path / 'g.png')!r})\n"
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert _png_size(tmp_path / "g.png")[0] > 0


def test_plot_retrieval_grid_arrays_and_unreadable_result(
    tmp_path: Path, images: list[Path], caplog
) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"")
    query = np.full((40, 90, 3), 128, dtype=np.uint8)

    out = plot_retrieval_grid(query, [images[1], broken], tmp_path / "g.png")

    width, height = _png_size(out)
    assert 400 <= width <= 680
    assert 200 <= height <= 320
    assert "cannot draw" in caplog.text and "broken.jpg" in caplog.text
    assert all(r.levelno == logging.WARNING for r in caplog.records if "cannot draw" in r.msg)


def test_plot_retrieval_rows_size_grows_with_rows(tmp_path: Path, images: list[Path]) -> None:
    rows = [
        {"query": images[0], "results": images[1:4], "distances": [0.1, 0.2, 0.3]},
        {"query": images[1], "results": images[2:4], "hits": [True, False], "labels": ["a", "b"]},
    ]

    out = plot_retrieval_rows(rows, tmp_path / "rows.png", title="worst queries")
    empty = plot_retrieval_rows([], tmp_path / "empty.png")

    width, height = _png_size(out)
    assert 550 <= width <= 800  # 4 columns at 1.9 inches
    assert 300 <= height <= 460  # 2 rows at 2.2 inches
    assert _png_size(empty)[0] <= 420


def test_plot_recall_curve_writes_png(tmp_path: Path) -> None:
    curves = {"raw": {1: 0.2, 5: 0.5, 10: 0.7}, "head": {1: 0.3, 5: 0.6, 10: 0.8}}

    out = plot_recall_curve(curves, tmp_path / "recall.png")

    width, height = _png_size(out)
    assert 450 <= width <= 620
    assert 300 <= height <= 420


def test_plot_tsne_writes_png(tmp_path: Path, images: list[Path]) -> None:
    features = np.random.default_rng(0).normal(size=(len(images), 16)).astype(np.float32)

    out = plot_tsne(features, images, tmp_path / "tsne.png", thumb_size=32)

    width, height = _png_size(out)
    assert 700 <= width <= 1000
    assert 700 <= height <= 1000


def test_plot_tsne_needs_two_points(tmp_path: Path, images: list[Path]) -> None:
    with pytest.raises(ValueError, match="at least 2 points"):
        plot_tsne(np.zeros((1, 4)), images[:1], tmp_path / "t.png")


def _captions(path: Path) -> list[str]:
    with Image.open(path) as img:
        return img.text["Description"].splitlines()


def test_shorten_keeps_both_ends_with_an_ellipsis() -> None:
    from snaplook.plot_utils import _shorten

    assert _shorten("short.png", 20) == "short.png"
    cut = _shorten("a_very_long_product_name_v1.png", 20)
    assert len(cut) == 20 and "\u2026" in cut
    assert cut.startswith("a_very_lo") and cut.endswith("e_v1.png")


def test_format_distances_adds_digits_until_ranks_differ() -> None:
    from snaplook.plot_utils import format_distances

    assert format_distances([0.1, 0.25]) == ["0.100", "0.250"]
    # Random weights: every neighbour within 0.001; equal distances stay equal.
    assert format_distances([0.00101, 0.00102, 0.00102, 0.0013]) == [
        "0.00101",
        "0.00102",
        "0.00102",
        "0.00130",
    ]


def test_plot_retrieval_grid_titles_query_by_file_name_and_marks_cuts(
    tmp_path: Path, images: list[Path]
) -> None:
    query = tmp_path / "img" / "the_query_v1.png"
    query.write_bytes(images[0].read_bytes())
    long_result = tmp_path / "img" / "the_gallery_item_with_a_long_name_v0.png"
    long_result.write_bytes(images[1].read_bytes())

    out = plot_retrieval_grid(
        query, [long_result, images[2]], tmp_path / "g.png", distances=[0.001011, 0.001012]
    )

    captions = _captions(out)
    assert captions[0].startswith("query the_query_v1.png | ")
    result_title, result_label, _ = captions[1].split(" | ")
    assert result_title == "#1  d=0.001011"
    assert len(result_label) == 28 and "\u2026" in result_label
    assert result_label.startswith("the_gallery_") and result_label.endswith("name_v0.png")
    assert captions[2].startswith("#2  d=0.001012 | 2.png")


def test_plot_retrieval_rows_has_no_blank_band_and_names_queries(
    tmp_path: Path, images: list[Path]
) -> None:
    rows = [
        {
            "query": images[0],
            "results": images[1:5],
            "distances": [0.1, 0.2, 0.3, 0.4],
            "hits": [True, False, False, False],
            "labels": ["id_01", "id_02", "id_03", "id_04"],
            "query_label": "id_01 (hit@1)",
        }
        for _ in range(8)
    ]

    out = plot_retrieval_rows(rows, tmp_path / "worst.png", title="8 worst queries")

    with Image.open(out) as img:
        grey = np.asarray(img.convert("L"))
    blank = (grey >= 250).all(axis=1)
    longest = run = 0
    for is_blank in blank:
        run = run + 1 if is_blank else 0
        longest = max(longest, run)
    # Rows are about 200 px tall; the old fixed margins left ~150 px blank under the title.
    assert longest < 40, longest
    assert sum(c.startswith("0.png |") for c in _captions(out)) == 8
