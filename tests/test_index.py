"""Tests for snaplook.index: the index folder, exact cosine k-NN, --update, bad inputs."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from bad_images import write_gallery_with_bad_inputs
from conftest import make_image, write_gallery
from shared_model import build_model_shared, shared_model  # noqa: F401
from typer.testing import CliRunner

from snaplook import __version__, features
from snaplook.cli import app
from snaplook.errors import SnaplookError
from snaplook.index import (
    Hit,
    QueryResult,
    QuerySummary,
    cosine_knn,
    load_index,
    query_index,
)
from snaplook.indexing import build_index
from snaplook.io_utils import file_sha256, read_csv, read_manifest
from snaplook.page import write_query_page
from snaplook.results import query_page, write_query_results


@pytest.fixture(scope="module")
def gallery_index(tmp_path_factory: pytest.TempPathFactory):
    """The conftest ``image_folder`` layout (12 images, two sub-folders), indexed once."""
    base = tmp_path_factory.mktemp("gallery_index")
    root = base / "gallery"
    write_gallery(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(features, "build_model", build_model_shared)
        summary = build_index(root, base / "index", weights="random", batch_size=5)
    return root, base / "index", summary


# --- build_index -------------------------------------------------------------------------


def test_build_index_writes_features_manifest_meta(gallery_index) -> None:
    root, out, summary = gallery_index

    feats = np.load(out / "features" / "shard-00000.npy", allow_pickle=False)
    manifest = read_manifest(out / "features" / "shard-00000.csv")
    meta = json.loads((out / "meta.json").read_text())

    assert (summary.n_indexed, summary.n_embedded, summary.skipped) == (12, 12, [])
    assert feats.shape == (12, 2048)
    assert feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    assert [r.row for r in manifest] == list(range(12))
    assert [r.path for r in manifest] == sorted(
        f"{'tops' if i % 2 == 0 else 'bottoms'}/item{i:02d}_v{v}.png"
        for i in range(6)
        for v in range(2)
    )
    first = root / manifest[0].path
    assert (manifest[0].width, manifest[0].height) == (64, 48)
    assert manifest[0].bytes == first.stat().st_size
    assert meta["format_version"] == 2
    assert (meta["shard_rows"], [(s["name"], s["rows"]) for s in meta["shards"]]) == (
        16384,
        [("shard-00000", 12)],
    )
    assert meta["shards"][0]["sha256"] == file_sha256(out / "features" / "shard-00000.npy")
    assert meta["snaplook_version"] == __version__
    assert meta["backbone"] == "resnet50"
    assert meta["weights"] == {"name": "random", "seed": 0}
    assert (meta["input_size"], meta["preprocessing"], meta["resize"]) == (224, "caffe", "pad")
    assert (meta["pooling"], meta["feature_dim"], meta["count"]) == ("avg", 2048, 12)
    assert (meta["metric"], meta["l2_normalized"], meta["skipped"]) == ("cosine", True, 0)
    assert meta["root"] == str(root.resolve())
    assert read_csv(out / "skipped.csv") == []
    assert sorted(p.name for p in out.iterdir()) == ["features", "meta.json", "skipped.csv"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["gallery", "index"]


@pytest.mark.usefixtures("shared_model")
def test_query_index_gallery_image_comes_back_first(gallery_index) -> None:
    root, out, _ = gallery_index
    queries = [root / "tops" / "item02_v1.png", root / "bottoms" / "item05_v0.png"]

    summary = query_index(queries, out, k=3)

    assert summary.k == 3
    assert [r.query for r in summary.results] == queries
    for result in summary.results:
        assert [h.rank for h in result.hits] == [1, 2, 3]
        assert result.hits[0].path == result.query
        assert result.hits[0].distance < 1e-5
        distances = [h.distance for h in result.hits]
        assert distances == sorted(distances)


@pytest.mark.usefixtures("shared_model")
def test_query_index_k_over_gallery_clamped_with_warning(gallery_index, caplog) -> None:
    root, out, _ = gallery_index
    caplog.set_level(logging.WARNING, logger="snaplook")

    summary = query_index([root / "tops" / "item00_v0.png"], out, k=50)

    assert summary.k == 12
    assert len(summary.results[0].hits) == 12
    assert "k=50 is larger than the gallery (12 images); using k=12" in caplog.text


def test_query_index_other_backbone_refused(gallery_index) -> None:
    root, out, _ = gallery_index

    with pytest.raises(SnaplookError, match="built with backbone 'resnet50'.*'vgg16'"):
        query_index(root, out, backbone="vgg16")


def test_load_index_resolves_gallery_paths(gallery_index) -> None:
    root, out, _ = gallery_index

    index = load_index(out)

    assert len(index) == 12
    assert index.gallery_path(0) == root.resolve() / index.manifest[0].path
    assert all(index.gallery_path(i).is_file() for i in range(len(index)))


# --- cosine_knn --------------------------------------------------------------------------


@pytest.mark.parametrize("block_rows", [8192, 16, 7])
def test_cosine_knn_equals_sklearn_brute_cosine(block_rows: int) -> None:
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(3)
    gallery = rng.normal(size=(100, 24)).astype(np.float32)
    queries = rng.normal(size=(9, 24)).astype(np.float32)
    nn = NearestNeighbors(n_neighbors=6, metric="cosine", algorithm="brute").fit(gallery)
    want_dist, want_idx = nn.kneighbors(queries)

    dist, idx = cosine_knn(queries, gallery, k=6, block_rows=block_rows)

    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(dist, want_dist, atol=1e-5)
    assert dist.dtype == np.float32


def test_cosine_knn_normalized_gallery_and_k_clamped() -> None:
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(4)
    gallery = rng.normal(size=(5, 8)).astype(np.float32)
    unit = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = rng.normal(size=(3, 8)).astype(np.float32)
    want_dist, want_idx = (
        NearestNeighbors(n_neighbors=5, metric="cosine", algorithm="brute")
        .fit(gallery)
        .kneighbors(queries)
    )

    dist, idx = cosine_knn(queries, unit, k=50, normalized_gallery=True, block_rows=2)

    assert idx.shape == dist.shape == (3, 5)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(dist, want_dist, atol=1e-5)


def test_cosine_knn_identical_vector_distance_zero_and_ties_by_row() -> None:
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [1.0, 1.0]], dtype=np.float32)

    dist, idx = cosine_knn(np.array([[3.0, 0.0]]), gallery, k=4)

    assert idx[0].tolist() == [0, 2, 3, 1]  # rows 0 and 2 tie at distance 0: row order
    np.testing.assert_allclose(dist[0], [0.0, 0.0, 1 - np.sqrt(0.5), 1.0], atol=1e-6)


# --- --update ----------------------------------------------------------------------------


@pytest.mark.usefixtures("shared_model")
def test_build_index_update_equals_full_rebuild(tmp_path: Path) -> None:
    root = tmp_path / "g"
    make_image(root / "a.png", (200, 30, 30), seed=1)
    make_image(root / "b.bmp", (30, 160, 60), seed=2)  # BMP: same size whatever the pixels
    make_image(root / "c.png", (30, 60, 200), seed=3)
    make_image(root / "sub" / "d.png", (220, 200, 40), seed=4)
    first = build_index(root, tmp_path / "idx", weights="random", batch_size=4)
    assert first.n_embedded == 4

    size_b = (root / "b.bmp").stat().st_size
    make_image(root / "b.bmp", (20, 20, 20), seed=5)  # same size, other content
    assert (root / "b.bmp").stat().st_size == size_b
    make_image(root / "c.png", (230, 130, 170), size=(80, 40), seed=6)  # other size
    (root / "sub" / "d.png").unlink()
    make_image(root / "sub" / "e.png", (90, 90, 90), seed=7)  # new
    st = (root / "a.png").stat()
    os.utime(root / "a.png", (st.st_atime, st.st_mtime + 5))  # touched, same bytes

    updated = build_index(root, tmp_path / "idx", weights="random", batch_size=4, update=True)
    full = build_index(root, tmp_path / "full", weights="random", batch_size=4)

    assert updated.n_embedded == 3  # b, c and e; a's SHA-1 shows it unchanged
    assert (updated.n_indexed, full.n_indexed) == (4, 4)
    got, want = load_index(tmp_path / "idx").manifest, load_index(tmp_path / "full").manifest
    assert [r.path for r in got] == ["a.png", "b.bmp", "c.png", "sub/e.png"]
    assert got == want
    assert (got[2].width, got[2].height) == (80, 40)
    np.testing.assert_allclose(
        np.asarray(load_index(tmp_path / "idx").features),
        np.asarray(load_index(tmp_path / "full").features),
        atol=1e-5,
    )


@pytest.mark.usefixtures("shared_model")
def test_build_index_update_other_weights_refused(tmp_path: Path) -> None:
    make_image(tmp_path / "g" / "a.png", (200, 30, 30))
    build_index(tmp_path / "g", tmp_path / "idx", weights="random")

    with pytest.raises(SnaplookError, match="built with weights=.*--update needs the same"):
        build_index(tmp_path / "g", tmp_path / "idx", weights="random", seed=1, update=True)


# --- bad inputs --------------------------------------------------------------------------


@pytest.mark.usefixtures("shared_model")
def test_cli_index_gallery_with_bad_inputs_skips_them(tmp_path: Path) -> None:
    names = write_gallery_with_bad_inputs(tmp_path / "g")
    out = tmp_path / "idx"

    result = CliRunner().invoke(
        app, ["index", str(tmp_path / "g"), "--out", str(out), "--weights", "random"]
    )

    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert "Indexed 5 images" in result.stdout
    assert f"Skipped 3 unreadable file(s); listed in {out / 'skipped.csv'}" in result.stderr
    # CMYK, 16-bit and RGBA images are good images, not skips.
    assert [r.path for r in load_index(out).manifest] == names["good"]
    skipped = read_csv(out / "skipped.csv")
    assert sorted(Path(s["path"]).name for s in skipped) == names["bad"]
    reasons = {Path(s["path"]).name: s["reason"] for s in skipped}
    assert "empty file" in reasons["f_zero.jpg"]
    assert "not an image file" in reasons["g_text.png"]
    assert "truncated" in reasons["h_truncated.jpg"]
    assert json.loads((out / "meta.json").read_text())["skipped"] == 3
    assert load_index(out).features.shape == (5, 2048)


def test_build_index_no_images_raises(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()

    with pytest.raises(SnaplookError, match="no images found"):
        build_index(tmp_path / "empty", tmp_path / "idx", weights="random")
    assert not (tmp_path / "idx").exists()


# --- load_index --------------------------------------------------------------------------


def _hand_made_index(out: Path, n: int = 3, d: int = 4) -> Path:
    out.mkdir(parents=True)
    feats = np.eye(n, d, dtype=np.float32)
    np.save(out / "features.npy", feats, allow_pickle=False)
    (out / "manifest.csv").write_text(
        "row,path,width,height,bytes,mtime,sha1\n"
        + "".join(f"{i},img{i}.png,10,10,100,1.0,{'0' * 40}\n" for i in range(n))
    )
    meta = {"format_version": 1, "backbone": "resnet50", "count": n, "feature_dim": d}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def test_load_index_hand_made_index_loads(tmp_path: Path) -> None:
    index = load_index(_hand_made_index(tmp_path / "idx"))

    assert len(index) == 3
    assert index.features.shape == (3, 4)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: shutil.rmtree(p), "no index here"),
        (lambda p: (p / "meta.json").unlink(), "meta.json is missing"),
        (lambda p: (p / "meta.json").write_text("{not json"), "not valid JSON"),
        (lambda p: (p / "meta.json").write_text('{"count": 3}'), "no format_version"),
        (lambda p: (p / "features.npy").write_bytes(b"garbage"), "features.npy"),
        (lambda p: (p / "features.npy").unlink(), "features.npy: file not found"),
        (lambda p: (p / "manifest.csv").unlink(), "manifest.csv is missing"),
        (
            lambda p: np.save(p / "features.npy", np.zeros((2, 4), np.float32)),
            "features.npy has 2 rows, manifest.csv 3, meta.json says 3",
        ),
        (
            lambda p: np.save(p / "features.npy", np.zeros((3, 4), np.float64)),
            "expected float32",
        ),
    ],
)
def test_load_index_missing_or_corrupt_raises(tmp_path: Path, damage, message: str) -> None:
    out = _hand_made_index(tmp_path / "idx")
    damage(out)

    with pytest.raises(SnaplookError, match=message):
        load_index(out)


# --- write_query_results -----------------------------------------------------------------


def test_write_query_results_same_stems_get_distinct_grids(tmp_path: Path) -> None:
    index = load_index(_hand_made_index(tmp_path / "idx"))
    queries = [
        make_image(tmp_path / "q" / "a" / "x.png", (200, 30, 30)),
        make_image(tmp_path / "q" / "b" / "x.png", (30, 160, 60)),
        make_image(tmp_path / "q" / "b" / "x.jpg", (30, 60, 200)),
    ]
    gallery = make_image(tmp_path / "g" / "img0.png", (90, 90, 90))
    summary = QuerySummary(
        results=[QueryResult(q, [Hit(1, 0, gallery, 0.25)]) for q in queries], k=1, skipped=[]
    )
    out = tmp_path / "res"

    write_query_results(summary, out, index=index, title_note=" · random weights")
    write_query_page(query_page(summary, index=index), out)

    assert summary.grids == [
        out / "q__a__x_grid.png",
        out / "q__b__x_grid.png",
        out / "q__b__x-2_grid.png",
    ]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [g.name for g in summary.grids]
        + ["results.csv", "results.json", "skipped.csv", "index.html", "thumbs"]
    )
    assert len(read_csv(out / "results.csv")) == 3
