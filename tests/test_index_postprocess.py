"""`index --whiten/--dba/--refit` and `index --pooling/--gem-p` (issue 24): the search vectors
an index stores, the whitening queries go through, and what `--update` keeps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image
from shared_model import build_model_shared
from typer.testing import CliRunner

from snaplook import features
from snaplook import postprocess as pp
from snaplook.cli import app
from snaplook.errors import SnaplookError
from snaplook.index import load_index, query_index
from snaplook.indexing import build_index, index_gallery
from snaplook.io_utils import read_image

# 30 images: the dimension rule (3 images per dimension) allows 10 whitened dimensions.
N_IMAGES = 30


def _write_images(root: Path, n: int, *, first: int = 0) -> Path:
    rng = np.random.default_rng(first)
    for i in range(first, first + n):
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        make_image(root / f"img{i:03d}.png", colour, seed=i)
    return root


@pytest.fixture(scope="module")
def model_patch():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(features, "build_model", build_model_shared)
        yield mp


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_images(tmp_path_factory.mktemp("pp") / "gallery", N_IMAGES)


def _build(root: Path, out: Path, **kwargs) -> None:
    build_index(root, out, weights="random", batch_size=8, **kwargs)


def test_whitened_index_round_trips_the_numpy_transform(model_patch, gallery, tmp_path):
    out = tmp_path / "index"
    _build(gallery, out, whiten="pca")
    index = load_index(out)

    raw = np.asarray(index.features)
    want = pp.fit_whitening(raw)  # the rule's dimension: 30 // 3 = 10
    assert index.whitening_.dim == want.dim == 10
    np.testing.assert_allclose(index.whitening_.projection_, want.projection_, atol=1e-6)
    assert index.vectors.shape == (N_IMAGES, 10)
    np.testing.assert_allclose(np.asarray(index.vectors), want.transform(raw), atol=1e-6)
    record = index.meta["postprocess"]
    assert record["whitening"]["sha256"] == want.digest()
    assert (record["whiten"], record["dba"], record["dim"]) == ("pca", 0, 10)

    # A query goes through the same whitening: the distances are numpy's.
    queries = [gallery / "img004.png", gallery / "img017.png"]
    summary = query_index(queries, index, k=3, exact=True)
    q = want.transform(features.embed_images(queries, index.embedder())[0])
    rows, sims = pp.nearest_neighbours(q, want.transform(raw), 3)
    for result, want_rows, want_sims in zip(summary.results, rows, sims, strict=True):
        assert [h.row for h in result.hits] == list(want_rows)
        np.testing.assert_allclose([h.distance for h in result.hits], 1 - want_sims, atol=1e-5)
    assert summary.results[0].hits[0].path == queries[0]  # each finds itself first


def test_dba_index_is_deterministic_and_equals_numpy(model_patch, gallery, tmp_path):
    _build(gallery, tmp_path / "a", whiten="pca:8", dba=2)
    _build(gallery, tmp_path / "b", whiten="pca:8", dba=2)
    a, b = (tmp_path / name / pp.SEARCH_FILE for name in ("a", "b"))
    assert a.read_bytes() == b.read_bytes()

    index = load_index(tmp_path / "a")
    whitened = pp.fit_whitening(np.asarray(index.features), dim=8).transform(index.features)
    want = pp.database_augmentation(whitened, k=2)
    np.testing.assert_allclose(np.asarray(index.vectors), want, atol=1e-6)
    assert not (tmp_path / "a" / "search.plain.npy").exists()


def test_dba_alone_keeps_the_dimension_and_has_no_whitening(model_patch, gallery, tmp_path):
    _build(gallery, tmp_path / "index", dba=1)
    index = load_index(tmp_path / "index")
    assert index.whitening_ is None and not (tmp_path / "index" / pp.WHITEN_FILE).exists()
    want = pp.database_augmentation(np.asarray(index.features), k=1)
    np.testing.assert_allclose(np.asarray(index.vectors), want, atol=1e-6)


def test_update_keeps_the_whitening_unless_refit(model_patch, tmp_path, caplog):
    root = _write_images(tmp_path / "gallery", N_IMAGES)
    out = tmp_path / "index"
    index_gallery(root, out, weights="random", whiten="pca")
    fitted = (out / pp.WHITEN_FILE).read_bytes()
    digest = load_index(out).meta["postprocess"]["whitening"]["sha256"]
    _write_images(root, 6, first=N_IMAGES)

    index_gallery(root, out, update=True)  # --whiten left out: the index's own, kept
    kept = load_index(out)
    assert len(kept) == N_IMAGES + 6
    assert kept.meta["postprocess"]["whitening"]["sha256"] == digest
    assert (out / pp.WHITEN_FILE).read_bytes() == fitted
    np.testing.assert_allclose(
        np.asarray(kept.vectors), kept.whitening_.transform(kept.features), atol=1e-6
    )
    assert "keeps the whitening" in caplog.text

    index_gallery(root, out, update=True, refit=True)
    refit = load_index(out)
    want = pp.fit_whitening(np.asarray(refit.features))
    assert refit.whitening_.n_fit == N_IMAGES + 6 and refit.whitening_.dim == 12
    assert refit.meta["postprocess"]["whitening"]["sha256"] == want.digest() != digest


def test_update_without_whiten_options_keeps_a_plain_index_plain(model_patch, gallery, tmp_path):
    out = tmp_path / "index"
    index_gallery(gallery, out, weights="random")
    before = (out / "meta.json").read_text()
    index_gallery(gallery, out, update=True)
    meta = json.loads((out / "meta.json").read_text())
    assert "postprocess" not in meta and "postprocess" not in before
    assert not (out / pp.SEARCH_FILE).exists()
    index = load_index(out)
    assert index.vectors is index.features and index.whitening_ is None


def test_refit_and_whitening_errors(model_patch, gallery, tmp_path):
    out = tmp_path / "index"
    with pytest.raises(SnaplookError, match="--refit"):
        index_gallery(gallery, out, weights="random", refit=True)
    index_gallery(gallery, out, weights="random")
    with pytest.raises(SnaplookError, match="not whitened"):
        index_gallery(gallery, out, update=True, refit=True)
    small = _write_images(tmp_path / "small", 12)
    with pytest.raises(SnaplookError, match="whitening needs at least 25 gallery images"):
        index_gallery(small, tmp_path / "small_index", weights="random", whiten="pca")
    assert not (tmp_path / "small_index").exists()  # refused before anything was written


def test_damaged_search_file_is_refused(model_patch, gallery, tmp_path):
    out = tmp_path / "index"
    _build(gallery, out, whiten="pca")
    np.save(out / pp.SEARCH_FILE, np.zeros((3, 10), dtype=np.float32))
    with pytest.raises(SnaplookError, match="expected float32 of shape \\(30, 10\\)"):
        load_index(out)
    _build(gallery, out, whiten="pca")
    np.savez(out / pp.WHITEN_FILE, format_version=np.array(1))
    with pytest.raises(SnaplookError, match="whiten.npz"):
        load_index(out)


def test_index_pooling_gem_recorded_and_update_refuses_another(model_patch, gallery, tmp_path):
    out = tmp_path / "index"
    index_gallery(gallery, out, weights="random", pooling="gem", gem_p=4.0)
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["pooling"], meta["gem_p"]) == ("gem", 4.0)
    assert load_index(out).embedder().gem_p == 4.0  # queries use the index's exponent
    index_gallery(gallery, out, update=True)  # pooling and p left out: the index's
    with pytest.raises(SnaplookError, match="pooling='gem', not 'avg'"):
        index_gallery(gallery, out, update=True, pooling="avg")
    with pytest.raises(SnaplookError, match="gem_p=4.0, not 3.0"):
        index_gallery(gallery, out, update=True, gem_p=3.0)
    with pytest.raises(SnaplookError, match="--gem-p sets GeM's exponent"):
        index_gallery(gallery, tmp_path / "avg", weights="random", pooling="avg", gem_p=2.0)


def test_cli_index_whiten_dba_then_query_qe(model_patch, gallery, tmp_path):
    out = tmp_path / "index"
    runner = CliRunner()
    args = ["index", str(gallery), "--out", str(out), "--weights", "random", "--quiet"]
    result = runner.invoke(app, [*args, "--whiten", "pca:8", "--dba", "1"])
    assert result.exit_code == 0, result.output
    assert load_index(out).vectors.shape == (N_IMAGES, 8)
    query = ["query", str(gallery / "img003.png"), "--index", str(out), "-k", "2"]
    result = runner.invoke(app, [*query, "--qe", "1", "--out", str(tmp_path / "r"), "--quiet"])
    assert result.exit_code == 0, result.output
    rows = (tmp_path / "r" / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and "img003.png" in rows[1]
    result = runner.invoke(app, [*args, "--whiten", "pca:x"])
    assert result.exit_code == 1 and "pca:DIM" in result.output


def test_tta_flip_averages_the_image_and_its_mirror(model_patch, gallery, tmp_path):
    paths = [gallery / "img001.png", gallery / "img002.png"]
    plain = features.Embedder(weights="random")
    flip = features.Embedder(weights="random", tta="flip")
    images = np.stack([plain.prepare(read_image(p)) for p in paths])
    want = (plain.embed(images) + plain.embed(images[:, :, ::-1].copy())) / 2
    np.testing.assert_allclose(flip.embed(images), want, rtol=1e-4, atol=1e-5)
    assert flip.identity()["tta"] == "flip" and "tta" not in plain.identity()

    out = tmp_path / "index"
    index_gallery(gallery, out, weights="random", tta="flip")
    index = load_index(out)
    assert index.meta["tta"] == "flip" and index.embedder().tta == "flip"
    hits = query_index([paths[0]], index, k=1).results[0].hits
    assert hits[0].path == paths[0] and hits[0].distance < 1e-5  # the query flips too
    with pytest.raises(SnaplookError, match="tta='flip', not 'none'"):
        index_gallery(gallery, out, update=True, tta="none")


def test_default_pooling_is_the_backbones_measured_one():
    # GeM where bench_quality measured it best (efficientnet_lite0), avg elsewhere.
    assert features.Embedder("efficientnet_lite0").pooling == "gem"
    assert features.Embedder("efficientnet_lite1").pooling == "avg"
    assert features.Embedder("resnet50").pooling == "avg"
    assert features.Embedder("efficientnet_lite0", pooling="avg").pooling == "avg"
    # An index that recorded no pooling was built with avg, whatever the backbone.
    from snaplook.index import recorded_settings

    assert recorded_settings({"backbone": "efficientnet_lite0"})["pooling"] == "avg"


def test_evaluate_uses_and_names_the_backbones_default_pooling(tmp_path):
    from snaplook import evaluate as ev

    root = tmp_path / "folders"
    for label in range(2):
        _write_images(root / f"label{label}", 2, first=10 * label)
    comparison = ev.evaluate_settings(
        root,
        protocol="folders",
        backbones=["efficientnet_lite0", "mobilenet_v2"],
        weights="random",
        out=tmp_path / "eval",
        cache_dir=tmp_path / "cache",
        ks=(1,),
        n_examples=0,
    )
    assert [(r.config["setting"], r.config["pooling"]) for r in comparison.reports] == [
        ("efficientnet_lite0-gem-l2", "gem"),
        ("mobilenet_v2-avg-l2", "avg"),
    ]
    with pytest.raises(SnaplookError, match="unknown pooling 'sum'"):
        ev.evaluate_settings(root, protocol="folders", poolings=["sum"], weights="random")


def test_index_from_before_issue_24_loads_and_queries_unchanged(model_patch, gallery, tmp_path):
    out = tmp_path / "index"
    _build(gallery, out, pooling="avg")
    query = [gallery / "img007.png"]
    before = query_index(query, out, k=4, exact=True).results[0].hits
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert not {"gem_p", "tta", "postprocess"} & set(meta)  # avg, no TTA: nothing new recorded
    del meta["pooling"]  # the oldest indexes recorded no pooling: avg
    meta_path.write_text(json.dumps(meta))

    index = load_index(out)
    assert index.vectors is index.features and index.whitening_ is None
    embedder = index.embedder()
    assert (embedder.pooling, embedder.tta) == ("avg", "none")
    after = query_index(query, index, k=4, exact=True).results[0].hits
    assert [(h.row, h.distance) for h in after] == [(h.row, h.distance) for h in before]
