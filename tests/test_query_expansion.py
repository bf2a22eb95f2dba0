"""`query --qe K` (issue 24): alpha-query expansion through the index's own search."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import write_gallery
from shared_model import build_model_shared
from typer.testing import CliRunner

from snaplook import features
from snaplook import postprocess as pp
from snaplook.cli import app
from snaplook.index import load_index, query_index
from snaplook.indexing import build_index


@pytest.fixture(scope="module")
def gallery_index(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("qe_index")
    root = write_gallery(base / "gallery")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(features, "build_model", build_model_shared)
        build_index(root, base / "index", weights="random", batch_size=6)
        yield root, base / "index", mp


def test_query_index_qe_ranks_by_the_expanded_query(gallery_index) -> None:
    root, out, _ = gallery_index
    queries = [root / "tops" / "item02_v1.png", root / "bottoms" / "item05_v0.png"]
    index = load_index(out)

    summary = query_index(queries, index, k=4, qe=2, exact=True)

    embedder = index.embedder()
    raw = features.embed_images(queries, embedder)[0]
    gallery = np.asarray(index.features)
    expanded = pp.query_expansion(raw / np.linalg.norm(raw, axis=1, keepdims=True), gallery, k=2)
    rows, sims = pp.nearest_neighbours(expanded, gallery, 4)
    for result, want_rows, want_sims in zip(summary.results, rows, sims, strict=True):
        assert [index.gallery_path(r) for r in want_rows] == [h.path for h in result.hits]
        np.testing.assert_allclose([h.distance for h in result.hits], 1 - want_sims, atol=1e-5)


def test_query_index_qe_zero_is_plain_query(gallery_index) -> None:
    root, out, _ = gallery_index
    query = [root / "tops" / "item00_v0.png"]
    plain = query_index(query, out, k=3)
    zero = query_index(query, out, k=3, qe=0)
    assert [h.path for h in plain.results[0].hits] == [h.path for h in zero.results[0].hits]


def test_cli_query_qe(gallery_index, tmp_path: Path) -> None:
    root, out, _ = gallery_index
    args = ["query", str(root / "tops" / "item02_v1.png"), "--index", str(out), "-k", "2"]
    result = CliRunner().invoke(app, [*args, "--qe", "1", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "results.csv").is_file()
    bad = CliRunner().invoke(app, [*args, "--qe", "-1", "--out", str(tmp_path / "r2")])
    assert bad.exit_code == 2
