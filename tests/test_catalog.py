"""Tests for snaplook.catalog: the join at index time, --where filters, --restrict auto.

End to end through the CLI on a 12-image generated gallery (6 products x 2 views) with a
seeded random MobileNetV2: the assertions are about which rows may come back and what
the files hold, never about retrieval quality.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image, write_gallery
from shared_model import build_model_shared
from typer.testing import CliRunner

from snaplook import features
from snaplook.catalog import (
    CategoryGuess,
    parse_where,
    read_catalog,
    vote_categories,
)
from snaplook.cli import app
from snaplook.index import cosine_knn, load_index
from snaplook.io_utils import read_csv
from snaplook.look import fuse_hits

runner = CliRunner()
MODEL = ["--backbone", "mobilenet_v2", "--weights", "random", "-q"]
HEADER = "image,product_id,title,price,currency,category,body,gender,url"


def _product(i: int) -> dict[str, str]:
    """Item i of conftest's gallery as a product: even items are tops, odd ones trousers."""
    return {
        "product_id": f"P{i:02d}",
        "title": f"Item {i}",
        "price": f"{10 * (i + 1)}.00",
        "currency": "EUR",
        "category": "Tops" if i % 2 == 0 else "Trousers",
        "body": "upper" if i % 2 == 0 else "lower",
        "gender": "women" if i < 3 else "men",
        "url": f"https://shop.example/p/{i}",
    }


def _rows(root: Path) -> list[str]:
    lines = []
    for path in sorted(root.rglob("*.png")):
        p = _product(int(path.stem[4:6]))
        rel = path.relative_to(root).as_posix()
        lines.append(",".join([rel, *p.values()]))
    return lines


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _shared(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(features, "build_model", build_model_shared)


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The gallery, its catalogue (one extra row without an image) and an index of both."""
    base = tmp_path_factory.mktemp("shop")
    root = write_gallery(base / "gallery")
    catalog = _write(
        base / "products.csv",
        [HEADER, *_rows(root), "gone/x.png,P99,Ghost,5,EUR,Tops,upper,women,"],
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(features, "build_model", build_model_shared)
        args = ["index", str(root), "-o", str(base / "index"), "--catalog", str(catalog), *MODEL]
        result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return {"root": root, "index": base / "index", "catalog": catalog, "base": base}


# --- the join ------------------------------------------------------------------------------


def test_index_catalog_joined_and_stored(shop) -> None:
    meta = json.loads((shop["index"] / "meta.json").read_text())
    assert meta["catalog"]["rows"] == 13
    assert meta["catalog"]["products"] == 7
    assert meta["catalog"]["gallery_matched"] == 12
    assert meta["catalog"]["gallery_without_product"] == 0
    assert meta["catalog"]["catalog_without_image"] == 1
    unmatched = read_csv(shop["index"] / "catalog_unmatched.csv")
    assert unmatched == [{"line": "14", "image": "gone/x.png", "product_id": "P99"}]
    products = load_index(shop["index"]).products()
    manifest = load_index(shop["index"]).manifest
    for row, product in zip(manifest, products.rows):
        assert product["image"] == row.path
        assert product["product_id"] == f"P{int(Path(row.path).stem[4:6]):02d}"


def test_index_catalog_missing_rows_kept_and_counted(tmp_path: Path) -> None:
    root = write_gallery(tmp_path / "g")
    lines = _rows(root)
    catalog = _write(tmp_path / "p.csv", [HEADER, *lines[:8]])  # items 0-3 only
    out = tmp_path / "index"
    result = runner.invoke(
        app, ["index", str(root), "-o", str(out), "--catalog", str(catalog)] + MODEL
    )
    assert result.exit_code == 0, result.output
    assert "8 gallery images matched, 4 without a product" in result.output.replace("\n", " ")
    products = load_index(out).products()
    assert len(products) == 12
    assert sum(p is None for p in products.rows) == 4
    # A query still returns the unmatched images, with empty product columns.
    query = tmp_path / "q.png"
    shutil.copy(root / "tops" / "item04_v0.png", query)
    res = tmp_path / "res"
    result = runner.invoke(
        app,
        [
            "query",
            str(query),
            "--index",
            str(out),
            "-o",
            str(res),
            "-k",
            "12",
            "--no-plot",
            "--no-page",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = read_csv(res / "results.csv")
    assert len(rows) == 12
    assert sum(r["product_id"] == "" for r in rows) == 4
    assert {r["product_id"] for r in rows if "item04" in r["path"]} == {""}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("dup", "line 4: duplicate image 'bottoms/item01_v0.png' (also on line 2)"),
        ("fields", "line 3: 3 fields, the header has 9"),
        ("price", "line 3: price 'cheap' is not a number"),
        ("nokey", "line 1: no 'product_id' column"),
        ("empty_id", "line 2: empty 'product_id'"),
    ],
)
def test_index_bad_catalog_one_clear_error_nothing_written(
    tmp_path: Path, body: str, message: str
) -> None:
    root = write_gallery(tmp_path / "g")
    lines = _rows(root)
    if body == "dup":
        lines = [lines[0], lines[1], lines[0]]
    elif body == "fields":
        lines = [lines[0], "tops/item00_v0.png,P00,oops"]
    elif body == "price":
        lines = [lines[0], lines[1].replace(",20.00,", ",cheap,")]
    elif body == "empty_id":
        lines = [lines[0].replace(",P01,", ",,")]
    header = HEADER.replace("product_id", "sku") if body == "nokey" else HEADER
    catalog = _write(tmp_path / "p.csv", [header, *lines])
    out = tmp_path / "index"
    result = runner.invoke(
        app, ["index", str(root), "-o", str(out), "--catalog", str(catalog)] + MODEL
    )
    assert result.exit_code == 1
    assert result.output.count("Error:") == 1
    assert message in result.output.replace("\n", "")
    assert str(catalog) in result.output.replace("\n", "")
    assert "Traceback" not in result.output
    assert not out.exists()


def test_index_parquet_catalog_with_named_image_column(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = write_gallery(tmp_path / "g")
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    table = pa.table(
        {
            "file": paths,
            "product_id": [f"P{int(Path(p).stem[4:6]):02d}" for p in paths],
            "price": [float(10 * (int(Path(p).stem[4:6]) + 1)) for p in paths],
            "category": [None if "item05" in p else "x" for p in paths],
        }
    )
    pq.write_table(table, tmp_path / "p.parquet")
    out = tmp_path / "index"
    args = ["index", str(root), "-o", str(out), "--catalog", str(tmp_path / "p.parquet")]
    result = runner.invoke(app, args + ["--catalog-image-column", "file", *MODEL])
    assert result.exit_code == 0, result.output
    products = load_index(out).products()
    assert products.columns == ["image", "product_id", "price", "category"]
    assert [p["image"] for p in products.rows] == [r.path for r in load_index(out).manifest]
    assert {p["price"] for p in products.rows} == {"10.0", "20.0", "30.0", "40.0", "50.0", "60.0"}
    assert [p["category"] for p in products.rows if p["product_id"] == "P05"] == ["", ""]

    # --update without --catalog joins the stored catalogue to the new gallery.
    make_image(root / "tops" / "new.png", (1, 2, 3))
    result = runner.invoke(app, ["index", str(root), "-o", str(out), "--update", *MODEL])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "meta.json").read_text())
    assert meta["catalog"]["gallery_matched"] == 12
    assert meta["catalog"]["gallery_without_product"] == 1


# --- filters -------------------------------------------------------------------------------

# (condition, products it lets through); prices are 10, 20, ... 60 for P00..P05.
FILTERS = [
    ("category=tops", {"P00", "P02", "P04"}),
    ("category!=Tops", {"P01", "P03", "P05"}),
    ("price<30", {"P00", "P01"}),
    ("price<=30", {"P00", "P01", "P02"}),
    ("price>40", {"P04", "P05"}),
    ("price>=40", {"P03", "P04", "P05"}),
    ("price=30", {"P02"}),
    ("gender in women,kids", {"P00", "P01", "P02"}),
    ("category in [Trousers]", {"P01", "P03", "P05"}),
]


@pytest.mark.parametrize(("where", "allowed"), FILTERS)
def test_query_where_each_operator(shop, tmp_path: Path, where: str, allowed: set[str]) -> None:
    query = shop["root"] / "tops" / "item00_v0.png"
    out = tmp_path / "res"
    args = ["query", str(query), "--index", str(shop["index"]), "-o", str(out), "-k", "5"]
    result = runner.invoke(app, args + ["--where", where, "--no-plot", "--no-page", "-q"])
    assert result.exit_code == 0, result.output
    rows = read_csv(out / "results.csv")
    assert {r["product_id"] for r in rows} <= allowed
    assert len(rows) == min(5, 2 * len(allowed))  # two gallery images per product
    doc = json.loads((out / "results.json").read_text())
    assert doc["where"] == [where]
    assert doc["n_allowed"] == 2 * len(allowed)
    if len(rows) < 5:
        assert "fewer than 5 results" in result.output.replace("\n", " ")


def test_query_where_combined_exact_k_and_nearest_first(shop, tmp_path: Path) -> None:
    query = shop["root"] / "tops" / "item00_v0.png"
    out = tmp_path / "res"
    args = ["query", str(query), "--index", str(shop["index"]), "-o", str(out), "-k", "3"]
    args += ["--where", "category=Trousers", "--where", "price<=40", "--no-plot", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = read_csv(out / "results.csv")
    assert {r["product_id"] for r in rows} <= {"P01", "P03"}
    assert len(rows) == 3
    distances = [float(r["distance"]) for r in rows]
    assert distances == sorted(distances)
    assert [r["rank"] for r in rows] == ["1", "2", "3"]


def test_query_where_no_match_writes_empty_results(shop, tmp_path: Path) -> None:
    query = shop["root"] / "tops" / "item00_v0.png"
    out = tmp_path / "res"
    args = ["query", str(query), "--index", str(shop["index"]), "-o", str(out)]
    result = runner.invoke(app, args + ["--where", "category=Shoes", "--no-plot", "-q"])
    assert result.exit_code == 0, result.output
    assert read_csv(out / "results.csv") == []
    assert "only 0 gallery images match" in result.output.replace("\n", " ")
    html = (out / "index.html").read_text()
    assert "no gallery image matches the filters" in html


@pytest.mark.parametrize(
    ("where", "code", "message"),
    [
        ("price<cheap", 2, "needs a number"),
        ("nonsense", 2, "is not COLUMN=VALUE"),
        ("colour=red", 1, "the catalogue has no column 'colour'"),
    ],
)
def test_query_where_bad_condition(shop, tmp_path: Path, where: str, code: int, message: str):
    query = shop["root"] / "tops" / "item00_v0.png"
    args = ["query", str(query), "--index", str(shop["index"]), "-o", str(tmp_path / "r")]
    result = runner.invoke(app, args + ["--where", where, "-q"])
    assert result.exit_code == code
    assert message in result.output.replace("\n", " ")
    assert not (tmp_path / "r").exists()


def test_query_where_without_catalog_refused(tmp_path: Path) -> None:
    root = write_gallery(tmp_path / "g")
    out = tmp_path / "index"
    assert runner.invoke(app, ["index", str(root), "-o", str(out), *MODEL]).exit_code == 0
    args = ["query", str(root / "tops"), "--index", str(out), "--where", "price<5", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert "--where needs a catalogue" in result.output.replace("\n", " ")
    result = runner.invoke(
        app,
        [
            "query",
            str(root / "tops"),
            "--index",
            str(out),
            "--restrict",
            "auto",
            "-q",
            "-o",
            str(tmp_path / "r"),
        ],
    )
    assert result.exit_code == 1
    assert "no catalogue" in result.output


def test_query_restrict_bad_value_is_usage_error(shop) -> None:
    result = runner.invoke(
        app, ["query", str(shop["root"]), "--index", str(shop["index"]), "--restrict", "maybe"]
    )
    assert result.exit_code == 2


# --- --restrict auto -----------------------------------------------------------------------


def test_query_restrict_auto_searches_within_predicted_category(shop, tmp_path: Path) -> None:
    out = tmp_path / "res"
    args = ["query", str(shop["root"]), "--index", str(shop["index"]), "-o", str(out), "-k", "8"]
    result = runner.invoke(app, args + ["--restrict", "auto", "--no-plot", "-q"])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "results.json").read_text())
    assert doc["restrict"] == "auto"
    for r in doc["results"]:
        assert r["category"] in ("Tops", "Trousers")
        assert 0 < r["confidence"] <= 1
        # Restricted to the predicted category: 6 images each, so 6 of k=8 come back.
        assert r["n_hits"] == 6
        assert {h["product"]["category"] for h in r["hits"]} == {r["category"]}


def test_cosine_knn_allowed_mask_pads_and_matches_subset() -> None:
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(50, 8)).astype(np.float32)
    queries = rng.normal(size=(4, 8)).astype(np.float32)
    allowed = np.zeros(50, dtype=bool)
    allowed[[3, 7, 11, 40]] = True
    for block_rows in (2, 8192):
        d, rows = cosine_knn(queries, gallery, k=6, allowed=allowed, block_rows=block_rows)
        assert d.shape == rows.shape == (4, 6)
        assert (rows[:, 4:] == -1).all() and np.isinf(d[:, 4:]).all()
        sub_d, sub_rows = cosine_knn(queries, gallery[allowed], k=4)
        np.testing.assert_array_equal(rows[:, :4], np.flatnonzero(allowed)[sub_rows])
        np.testing.assert_allclose(d[:, :4], sub_d, atol=1e-6)
    d, rows = cosine_knn(queries, gallery, k=3, allowed=np.zeros(50, dtype=bool))
    assert (rows == -1).all() and np.isinf(d).all()


def test_parse_where_grammar() -> None:
    c = parse_where("price <= 49.9")
    assert (c.column, c.op, c.values) == ("price", "<=", ("49.9",))
    assert c.matches("49.90") and not c.matches("50") and not c.matches("") and not c.matches("n/a")
    c = parse_where("brand in ('Acme', Zed)")
    assert c.values == ("Acme", "Zed") and c.matches("acme") and not c.matches("Other")
    assert parse_where("size==M").op == "="
    assert parse_where("colour != 'dark red'").values == ("dark red",)
    for bad in ("price<", "in a,b", "price<<3", "=3"):
        with pytest.raises(ValueError):
            parse_where(bad)


def test_vote_categories_weighted_by_rank() -> None:
    cats = ["A", "B", "B", "", "a", "B"]
    rows = np.array([[0, 1, 2, 3], [1, 0, 4, -1], [3, -1, -1, -1], [0, 1, 2, 5]])
    guesses = vote_categories(rows, cats)
    # A at rank 1 (1) beats B at ranks 2 and 3 (1/2 + 1/3).
    assert guesses[0].category == "A"
    assert guesses[0].confidence == pytest.approx(1 / (1 + 1 / 2 + 1 / 3))
    assert guesses[1] == CategoryGuess("B", pytest.approx(1 / (1 + 1 / 2 + 1 / 3)))
    assert guesses[2] == CategoryGuess(None, 0.0)
    # B at ranks 2, 3 and 4 (1.083) beats A at rank 1.
    assert guesses[3].category == "B"


def test_fuse_hits_by_product_counts_images_of_one_product_once() -> None:
    # Crop 1 retrieves two images of product X (rows 0, 1) and Y (row 2); crop 2 Y then X.
    rows = np.array([[0, 1, 2], [2, 3, -1]])
    distances = np.array([[0.1, 0.2, 0.3], [0.05, 0.4, np.inf]])
    keys = ["X", "X", "Y", "X"]
    fused = fuse_hits(distances, rows, k=5, keys=keys)
    assert [(row, votes) for row, votes, _, _ in fused] == [(2, 2), (0, 2)]
    assert fused[0][2] == pytest.approx((0.3 + 0.05) / 2)  # Y: nearer on average
    assert fused[1][2] == pytest.approx((0.1 + 0.4) / 2)  # X: its best image per crop
    by_image = fuse_hits(distances, rows, k=5)
    assert len(by_image) == 4  # without keys every image is an item


def test_read_catalog_absolute_paths_and_blank_lines(tmp_path: Path) -> None:
    root = tmp_path / "g"
    text = f"image,product_id\n{root / 'a.png'},A\n\n./b/c.png,B\n"
    catalog = read_catalog(_write(tmp_path / "p.csv", [text]), root=root)
    assert [r["image"] for r in catalog.rows] == ["a.png", "b/c.png"]
    assert catalog.lines == [2, 4]


def test_query_results_csv_neutralises_formula_titles(tmp_path: Path) -> None:
    # Issue 22: catalogue text that a spreadsheet runs as a formula was written as-is into
    # results.csv; now it gets a leading ' there, and results.json keeps the raw text.
    root = write_gallery(tmp_path / "g")
    lines = [HEADER]
    for line in _rows(root):
        cells = line.split(",")
        cells[2] = '=HYPERLINK("https://evil.example")' if cells[1] == "P00" else "-5 off"
        lines.append(",".join(f'"{c.replace(chr(34), 2 * chr(34))}"' for c in cells))
    catalog = _write(tmp_path / "p.csv", lines)
    out = tmp_path / "index"
    args = ["index", str(root), "-o", str(out), "--catalog", str(catalog), *MODEL]
    assert runner.invoke(app, args).exit_code == 0
    query = root / "tops" / "item00_v0.png"
    res = tmp_path / "res"
    args = ["query", str(query), "--index", str(out), "-o", str(res), "-k", "12", "--no-plot"]
    result = runner.invoke(app, [*args, "-q"])

    assert result.exit_code == 0, result.output
    titles = {r["product_id"]: r["title"] for r in read_csv(res / "results.csv")}
    assert titles["P00"] == '\'=HYPERLINK("https://evil.example")'
    assert titles["P01"] == "'-5 off"
    raw = json.loads((res / "results.json").read_text(encoding="utf-8"))
    raw_titles = {
        h["product"]["product_id"]: h["product"]["title"] for r in raw["results"] for h in r["hits"]
    }
    assert raw_titles["P00"] == '=HYPERLINK("https://evil.example")'
