"""Tests for snaplook.ann: FAISS approximate search, its checks on load, and the CLI options."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_gallery
from shared_model import shared_model  # noqa: F401
from typer.testing import CliRunner

from snaplook import ann
from snaplook.cli import app
from snaplook.errors import SnaplookError
from snaplook.index import cosine_knn, load_index
from snaplook.io_utils import read_csv

N, D, K = 3000, 64, 10


def _clustered(n: int, d: int, *, seed: int) -> np.ndarray:
    """Unit rows around 30 seeded centres, like features of a gallery of garment kinds."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(30, d))
    x = centres[rng.integers(0, 30, n)] + 0.6 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _write_index(out: Path, features: np.ndarray, spec: str) -> Path:
    """A hand-made index folder over ``features`` with the FAISS index ``spec``."""
    out.mkdir(parents=True)
    n, d = features.shape
    np.save(out / "features.npy", features, allow_pickle=False)
    (out / "manifest.csv").write_text(
        "row,path,width,height,bytes,mtime,sha1\n"
        + "".join(f"{i},img{i}.png,10,10,100,1.0,{'0' * 40}\n" for i in range(n))
    )
    block = ann.build_ann(features, out, spec=spec, seed=0)
    meta = {"format_version": 1, "count": n, "feature_dim": d, "ann": block}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


@pytest.fixture(scope="module")
def gallery() -> tuple[np.ndarray, np.ndarray]:
    features = _clustered(N, D, seed=0)
    rng = np.random.default_rng(1)
    queries = features[rng.choice(N, 100, replace=False)] + 0.05 * rng.normal(size=(100, D))
    return features, (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def built(tmp_path_factory, gallery) -> dict[str, Path]:
    """The gallery indexed once per kind."""
    base = tmp_path_factory.mktemp("ann")
    return {spec: _write_index(base / spec, gallery[0], spec) for spec in ("hnsw", "ivfpq")}


def _recall(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(w)) / len(w) for g, w in zip(got, want)]))


@pytest.mark.parametrize(
    ("spec", "factory"), [("hnsw", "HNSW32"), ("ivfpq", "RR64,IVF64,PQ32x4fs")]
)
def test_search_reaches_recall_at_10_against_exact(built, gallery, spec, factory) -> None:
    features, queries = gallery
    index = load_index(built[spec])
    want_d, want = cosine_knn(queries, features, k=K, normalized_gallery=True)

    got_d, got = index.search(queries, K)
    exact_d, exact = index.search(queries, K, exact=True)

    assert index.ann_ is not None and index.meta["ann"]["factory"] == factory
    assert got.shape == got_d.shape == (100, K)
    assert _recall(got, want) >= 0.95
    np.testing.assert_array_equal(exact, want)
    # Re-ranked exactly: each distance is the true 1 - cos of its row, ascending.
    true_d = 1.0 - np.einsum("md,mkd->mk", queries, features[got])
    np.testing.assert_allclose(got_d, true_d, atol=1e-5)
    assert (np.diff(got_d, axis=1) >= 0).all()


def test_search_ivfpq_nprobe_one_visits_fewer_lists(built, gallery) -> None:
    features, queries = gallery
    index = load_index(built["ivfpq"])
    _, want = cosine_knn(queries, features, k=K, normalized_gallery=True)

    low = _recall(index.search(queries, K, nprobe=1)[1], want)
    high = _recall(index.search(queries, K, nprobe=64)[1], want)

    assert low < high
    assert high >= 0.99


@pytest.mark.parametrize("spec", ["hnsw", "ivfpq"])
def test_search_allowed_rows_only_padded_when_short(built, gallery, spec, monkeypatch) -> None:
    features, queries = gallery
    index = load_index(built[spec])
    allowed = np.zeros(N, dtype=bool)
    allowed[::3] = True
    keep = np.flatnonzero(allowed)
    _, want = cosine_knn(queries, features[keep], k=K, normalized_gallery=True)

    # Below the threshold the subset is searched exactly; above it through FAISS's selector.
    exact_d, exact = index.search(queries, K, allowed=allowed)
    monkeypatch.setattr(ann, "AUTO_EXACT_BELOW", 10)
    approx_d, approx = index.search(queries, K, allowed=allowed)

    np.testing.assert_array_equal(exact, keep[want])
    assert allowed[approx].all()
    assert _recall(approx, keep[want]) >= 0.9
    few = np.zeros(N, dtype=bool)
    few[[5, 7]] = True
    d, rows = index.search(queries[:2], K, allowed=few)
    assert rows.shape == (2, K)
    assert set(rows[0, :2]) == {5, 7} and (rows[:, 2:] == -1).all()
    assert np.isinf(d[:, 2:]).all() and np.isfinite(d[:, :2]).all()


def test_search_allowed_wrong_shape_raises(built, gallery) -> None:
    index = load_index(built["hnsw"])

    with pytest.raises(SnaplookError, match=r"allowed must be a bool array of shape \(3000,\)"):
        index.search(gallery[1], K, allowed=np.ones(10, dtype=bool))


def _swap_file(tmp_path: Path, built, gallery, what: str) -> Path:
    features = gallery[0]
    out = tmp_path / "idx"
    shutil.copytree(built["hnsw"], out)
    if what == "rows":
        other = _write_index(tmp_path / "other", features[:2000], "hnsw")
    elif what == "dim":
        other = _write_index(tmp_path / "other", _clustered(N, 32, seed=0), "hnsw")
    elif what == "swapped":  # same size, other vectors
        other = _write_index(tmp_path / "other", _clustered(N, D, seed=5), "hnsw")
    if what == "features":  # the features changed under the FAISS file
        np.save(out / "features.npy", _clustered(N, D, seed=5), allow_pickle=False)
    else:
        shutil.copy(other / "ann.faiss", out / "ann.faiss")
    if what in ("rows", "dim"):  # a digest that matches: the structural checks speak
        meta = json.loads((out / "meta.json").read_text())
        meta["ann"]["sha256"] = _sha(out)
        (out / "meta.json").write_text(json.dumps(meta))
    return out


def _sha(out: Path) -> str:
    import hashlib

    return hashlib.sha256((out / "ann.faiss").read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("rows", "holds 2000 rows but features.npy has 3000"),
        ("dim", "has dimension 32 but features.npy has 64"),
        ("swapped", "not the file this index was built with"),
        ("features", "was built over other features"),
    ],
)
def test_load_index_faiss_file_of_other_features_refused(
    tmp_path, built, gallery, what, message
) -> None:
    out = _swap_file(tmp_path, built, gallery, what)

    with pytest.raises(SnaplookError, match=message) as info:
        load_index(out)
    assert "\n" not in str(info.value)
    assert len(load_index(out, ann=False)) == N  # exact search still works


def test_saved_files_are_faiss_and_json_never_pickle(built) -> None:
    for folder in built.values():
        head = (folder / "ann.faiss").read_bytes()[:4]
        assert head.isalpha() and head[:1] == b"I"  # a FAISS fourcc, not pickle's b"\x80"
        assert json.loads((folder / "meta.json").read_text())["ann"]["file"] == "ann.faiss"
    source = Path(ann.__file__).read_text()
    assert "pickle" not in source.replace("never pickle", "")


@pytest.mark.parametrize(
    ("spec", "n", "d", "factory"),
    [
        ("auto", 99_999, 2048, None),
        ("auto", 100_000, 2048, "PCA256,HNSW32"),
        ("auto", 500_000, 2048, "PCAR256,IVF512,PQ128x4fs"),
        ("hnsw", 9_999, 2048, "HNSW32"),
        ("auto", 100_000, 256, "HNSW32"),
        ("auto", 10_000_000, 2048, "PCAR256,IVF4096,PQ128x4fs"),
        ("auto", 10_000_000, 256, "RR256,IVF4096,PQ128x4fs"),
        ("none", 10_000_000, 256, None),
        ("ivfpq", 3000, 64, "RR64,IVF64,PQ32x4fs"),
        ("IVF16,Flat", 3000, 64, "IVF16,Flat"),
    ],
)
def test_plan_ann_chooses_by_size(spec, n, d, factory) -> None:
    plan = ann.plan_ann(spec, n, d)

    assert (plan.factory if plan else None) == factory


@pytest.mark.parametrize(
    ("spec", "n", "message"),
    [
        ("IVF12,Bogus", 3000, "neither one of auto, none, hnsw, ivfpq nor a FAISS"),
        ("ivfpq", 12, "needs at least 1,000 images"),
        ("IDMap,Flat", 3000, "IDMap indexes are not supported"),
    ],
)
def test_plan_ann_bad_spec_raises(spec, n, message) -> None:
    with pytest.raises(SnaplookError, match=message):
        ann.plan_ann(spec, n, 64)


@pytest.mark.usefixtures("shared_model")
def test_cli_index_ann_then_query_matches_exact(tmp_path: Path) -> None:
    root = write_gallery(tmp_path / "g")
    out = tmp_path / "idx"
    runner = CliRunner()

    built = runner.invoke(
        app, ["index", str(root), "--out", str(out), "--weights", "random", "--ann", "hnsw"]
    )
    approx = runner.invoke(
        app, ["query", str(root), "--index", str(out), "-k", "3", "--no-plot", "-o",
              str(tmp_path / "a"), "--ef", "16"]
    )  # fmt: skip
    exact = runner.invoke(
        app, ["query", str(root), "--index", str(out), "-k", "3", "--no-plot", "-o",
              str(tmp_path / "e"), "--exact"]
    )  # fmt: skip
    updated = runner.invoke(
        app, ["index", str(root), "--out", str(out), "--weights", "random", "--update"]
    )

    assert built.exit_code == 0, built.output
    assert "Approximate search: HNSW32" in built.stdout
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["ann"]["kind"], meta["ann"]["ntotal"]) == ("hnsw", 12)
    assert approx.exit_code == 0 and exact.exit_code == 0, approx.output + exact.output
    got, want = read_csv(tmp_path / "a" / "results.csv"), read_csv(tmp_path / "e" / "results.csv")
    assert len(got) == 36
    assert [r["path"] for r in got] == [r["path"] for r in want]
    assert updated.exit_code == 0, updated.output
    assert json.loads((out / "meta.json").read_text())["ann"]["kind"] == "hnsw"  # kept

    runner.invoke(app, ["index", str(root), "--out", str(out), "--weights", "random",
                        "--ann", "none"])  # fmt: skip
    assert not (out / "ann.faiss").exists()
    assert json.loads((out / "meta.json").read_text())["ann"]["kind"] == "exact"


@pytest.mark.parametrize(
    "args",
    [
        ["index", "g", "--ann", "IVF12,Bogus"],
        ["index", "g", "--ann", ""],
        ["query", "q", "--nprobe", "0"],
        ["query", "q", "--ef", "-3"],
        ["look", "v.mp4", "--nprobe", "0"],
    ],
)
def test_cli_bad_ann_options_are_usage_errors(tmp_path, args, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("g").mkdir()
    Path("v.mp4").write_bytes(b"")

    result = CliRunner().invoke(app, args)

    assert result.exit_code == 2, result.output
    assert "--ann" in result.output or "--nprobe" in result.output or "--ef" in result.output
    assert "Traceback" not in result.output


def test_cli_query_swapped_faiss_file_one_line_error(tmp_path, built, gallery) -> None:
    out = _swap_file(tmp_path, built, gallery, "swapped")
    (tmp_path / "q.png").write_bytes(b"")

    result = CliRunner().invoke(app, ["query", str(tmp_path / "q.png"), "--index", str(out)])

    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    assert "not the file this index was built with" in lines[0]


# --- issue 22 item 6: ann.file confined to the folder, its digest checked before FAISS --------


def _with_ann_field(tmp_path: Path, built, **fields) -> Path:
    out = tmp_path / "idx"
    shutil.copytree(built["hnsw"], out)
    meta = json.loads((out / "meta.json").read_text())
    meta["ann"].update(fields)
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def _never_read_by_faiss(monkeypatch) -> list[str]:
    import faiss

    opened: list[str] = []
    real = faiss.read_index
    monkeypatch.setattr(faiss, "read_index", lambda p, *a: opened.append(p) or real(p, *a))
    return opened


@pytest.mark.parametrize("name", ["../outside.faiss", "/tmp/outside.faiss", "sub/ann.faiss", 7])
def test_ann_file_outside_the_folder_is_refused_before_faiss(
    tmp_path, built, monkeypatch, name
) -> None:
    # Old code: FAISS read ../outside.faiss (a valid index of other features) and used it.
    outside = tmp_path / "outside.faiss"
    shutil.copy(built["hnsw"] / "ann.faiss", outside)
    out = _with_ann_field(tmp_path, built, file=name)
    opened = _never_read_by_faiss(monkeypatch)

    with pytest.raises(SnaplookError, match="field ann.file") as info:
        load_index(out)
    assert "meta.json" in str(info.value)
    assert opened == []


def test_ann_file_symlinked_out_of_the_folder_is_refused(tmp_path, built, monkeypatch) -> None:
    outside = tmp_path / "elsewhere.faiss"
    out = _with_ann_field(tmp_path, built)
    shutil.move(out / "ann.faiss", outside)
    (out / "ann.faiss").symlink_to(outside)
    opened = _never_read_by_faiss(monkeypatch)

    with pytest.raises(SnaplookError, match="leads out of the index folder"):
        load_index(out)
    assert opened == []


def test_ann_file_digest_checked_before_faiss_and_bytes_never_echoed(
    tmp_path, built, monkeypatch
) -> None:
    # Old code: FAISS parsed the swapped file first, and its error quoted the file's bytes.
    out = _with_ann_field(tmp_path, built)
    (out / "ann.faiss").write_bytes(b"SECRETBYTES-not-a-faiss-index" * 4)
    opened = _never_read_by_faiss(monkeypatch)

    with pytest.raises(SnaplookError, match="SHA-256 differs") as info:
        load_index(out)
    assert opened == [] and "SECRET" not in str(info.value)

    # Even with a matching digest (a crafted meta.json) FAISS's words are not repeated.
    out = _with_ann_field(tmp_path / "b", built)
    (out / "ann.faiss").write_bytes(b"SECRETBYTES-not-a-faiss-index" * 4)
    meta = json.loads((out / "meta.json").read_text())
    meta["ann"]["sha256"] = _sha(out)
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(SnaplookError, match="not a readable FAISS index") as info:
        load_index(out)
    assert "SECRET" not in str(info.value)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"sha256": None}, "ann.sha256"),
        ({"sha256": "zz"}, "ann.sha256"),
        ({"file": None}, "ann.file"),
    ],
)
def test_ann_block_malformed_fields_are_named(tmp_path, built, fields, field) -> None:
    out = _with_ann_field(tmp_path, built, **fields)

    with pytest.raises(SnaplookError, match=f"field {field}"):
        load_index(out)
