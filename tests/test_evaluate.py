"""Tests for snaplook.evaluate and snaplook.datasets: protocol files, the feature cache,
`snaplook evaluate`. The ranking metrics are tested in test_metrics.py."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image
from typer.testing import CliRunner

from snaplook import datasets
from snaplook import evaluate as ev
from snaplook.errors import SnaplookError
from snaplook.features import Embedder, embed_cached

HEADER = "image_name item_id evaluation_status"
BBOX_HEADER = "image_name clothes_type pose_type x_1 y_1 x_2 y_2"
#: item -> (category, colour); the last item has a query but no gallery image.
ITEMS = {
    "id_00000001": ("Dresses", (200, 30, 30)),
    "id_00000002": ("Dresses", (30, 160, 60)),
    "id_00000003": ("Dresses", (30, 60, 200)),
    "id_00000004": ("Dresses", (220, 200, 40)),
    "id_00000005": ("Tees", (20, 20, 20)),
    "id_00000006": ("Tees", (230, 130, 170)),
    "id_00000007": ("Tees", (120, 240, 240)),
    "id_00000008": ("Tees", (90, 60, 30)),
}
NO_GALLERY_ITEM = "id_00000008"
MISSING_IMAGE = "img/Tees/id_00000007/03_3_back.jpg"


def write_listing(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text(f"{len(rows)}\n{header}\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def make_inshop_tree(root: Path) -> Path:
    """A tiny DeepFashion In-shop tree: img/<category>/<item>/<file>.jpg, partition, boxes.

    8 items, 1 query each; 2 gallery images per item except the last (none); one listed
    gallery image is missing on disk; 2 training items.
    """
    rows: list[str] = []
    boxes: list[str] = []

    def add(item: str, category: str, colour, name: str, status: str, seed: int) -> None:
        rel = f"img/{category}/{item}/{name}"
        rows.append(f"{rel} {item} {status}")
        boxes.append(f"{rel} 1 1 4 3 60 45")
        if rel != MISSING_IMAGE:
            make_image(root / rel, colour, size=(64, 48), seed=seed)

    for n, (item, (category, colour)) in enumerate(ITEMS.items()):
        add(item, category, colour, "01_1_front.jpg", "query", 100 + n)
        if item != NO_GALLERY_ITEM:
            add(item, category, colour, "02_2_side.jpg", "gallery", 200 + n)
            add(item, category, colour, "03_3_back.jpg", "gallery", 300 + n)
    for n, item in enumerate(("id_00000090", "id_00000091")):
        for v in range(2):
            add(item, "Tees", (10 * n, 100, 100), f"0{v}_1_front.jpg", "train", 400 + 2 * n + v)
    write_listing(root / "list_eval_partition.txt", HEADER, rows)
    write_listing(root / "list_bbox_inshop.txt", BBOX_HEADER, boxes)
    return root


@pytest.fixture(scope="module")
def inshop_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_inshop_tree(tmp_path_factory.mktemp("inshop"))


class FakeEmbedder:
    """Embedder stand-in: the mean colour of the image, and a count of embedded images."""

    input_size = 16
    feature_dim = 3

    def __init__(self, tag: str = "fake") -> None:
        self.tag = tag
        self.embedded = 0

    def identity(self) -> dict:
        return {"backbone": self.tag, "weights": {"name": "none"}, "pooling": "avg"}

    def prepare(self, image: np.ndarray) -> np.ndarray:
        from snaplook.transform_utils import resize_to_square

        return resize_to_square(image, self.input_size, mode="crop")

    def embed(self, images) -> np.ndarray:
        self.embedded += len(images)
        return np.stack([im.reshape(-1, 3).mean(axis=0) for im in images]).astype(np.float32)


# --- protocol files ---------------------------------------------------------------------


def test_load_split_inshop_lists_items_categories_and_boxes(inshop_root):
    split = datasets.load_split(inshop_root, bbox=inshop_root / "list_bbox_inshop.txt")
    assert split.counts() == {
        "train_images": 4,
        "query_images": 8,
        "gallery_images": 13,
        "query_items": 8,
        "gallery_items": 7,
        "missing_images": 1,
    }
    assert split.missing == [MISSING_IMAGE]
    first = split.query[0]
    assert first == datasets.Sample(
        "img/Dresses/id_00000001/01_1_front.jpg", "id_00000001", "Dresses", (4, 3, 56, 42)
    )
    assert {s.category for s in split.gallery} == {"Dresses", "Tees"}


def test_load_split_strict_fails_on_missing_image(inshop_root):
    with pytest.raises(SnaplookError, match="1 image.*missing.*--strict"):
        datasets.load_split(inshop_root, strict=True)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["x", HEADER, "img/a/b/c.jpg id_1 query"], "line 1: expected the number of entries"),
        (["1", "name id status", "img/a/b/c.jpg id_1 query"], "line 2: expected the header"),
        (
            ["2", HEADER, "img/a/b/c.jpg id_1 query", "img/a/b/d.jpg id_1"],
            "line 4: expected 3 columns, found 2",
        ),
        (["1", HEADER, "img/a/b/c.jpg id_1 probe"], "line 3: unknown evaluation_status 'probe'"),
        (
            ["3", HEADER, "img/a/b/c.jpg id_1 query"],
            "line 1: declares 3 entries but the file has 1",
        ),
    ],
)
def test_load_split_malformed_partition_names_the_line(tmp_path, lines, message):
    (tmp_path / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(SnaplookError, match=message):
        datasets.load_split(tmp_path)


def test_load_split_missing_partition_says_how_to_pass_it(tmp_path):
    with pytest.raises(SnaplookError, match="list_eval_partition.txt not found.*--partition"):
        datasets.load_split(tmp_path)


def test_read_bbox_file_rejects_non_integer_corner(tmp_path):
    path = write_listing(tmp_path / "b.txt", BBOX_HEADER, ["img/a/b/c.jpg 1 1 0 0 x 9"])
    with pytest.raises(SnaplookError, match="line 3: box corners must be integers"):
        datasets.read_bbox_file(path)


def test_load_split_consumer2shop_dedupes_queries_and_gallery(tmp_path):
    header = "image_pair_name_1 image_pair_name_2 item_id evaluation_status"
    rows = [
        "img/T/id_1/comsumer_01.jpg img/T/id_1/shop_01.jpg id_1 test",
        "img/T/id_1/comsumer_01.jpg img/T/id_1/shop_02.jpg id_1 test",
        "img/T/id_2/comsumer_01.jpg img/T/id_2/shop_01.jpg id_2 train",
        "img/T/id_3/comsumer_01.jpg img/T/id_3/shop_01.jpg id_3 val",
    ]
    write_listing(tmp_path / "list_eval_partition.txt", header, rows)
    for row in rows:
        for rel in row.split()[:2]:
            make_image(tmp_path / rel, (10, 20, 30))
    split = datasets.load_split(tmp_path, protocol="consumer2shop")
    assert [s.path for s in split.query] == ["img/T/id_1/comsumer_01.jpg"]
    assert [s.path for s in split.gallery] == ["img/T/id_1/shop_01.jpg", "img/T/id_1/shop_02.jpg"]
    assert len(split.train) == 2
    val = datasets.load_split(tmp_path, protocol="consumer2shop", subset="val")
    assert [s.item for s in val.query] == ["id_3"]


def test_load_split_folders_is_leave_one_out(image_folder):
    split = datasets.load_split(image_folder, protocol="folders")
    assert split.leave_one_out
    assert split.query is split.gallery
    assert len(split.query) == 12
    assert {s.item for s in split.query} == {"tops", "bottoms"}


def test_resolve_bbox_finds_the_protocols_box_file_for_gt_crops(inshop_root):
    found = datasets.resolve_bbox(inshop_root, "inshop", None, "gt")
    assert found == inshop_root / "list_bbox_inshop.txt"
    assert datasets.resolve_bbox(inshop_root, "inshop", None, "none") is None
    assert datasets.resolve_bbox(inshop_root, "inshop", "mine.txt", "gt") == "mine.txt"


def test_resolve_bbox_without_a_box_file_says_what_to_pass(tmp_path):
    with pytest.raises(SnaplookError, match="--crop gt needs list_bbox_consumer2shop.txt.*--bbox"):
        datasets.resolve_bbox(tmp_path, "consumer2shop", None, "gt")
    with pytest.raises(SnaplookError, match="the folders protocol has none"):
        datasets.resolve_bbox(tmp_path, "folders", None, "gt")


def test_check_crop_rejects_unknown_crop():
    datasets.check_crop("gt")
    with pytest.raises(SnaplookError, match="unknown crop 'box'; choose none or gt"):
        datasets.check_crop("box")


# --- feature cache ----------------------------------------------------------------------


def test_embed_cached_reuses_cache_and_zeroes_unreadable_images(tmp_path):
    a = make_image(tmp_path / "a.png", (200, 0, 0))
    b = make_image(tmp_path / "b.png", (0, 0, 200))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    images = [(b, None), (a, (0, 0, 32, 24)), (bad, None), (a, (0, 0, 32, 24))]
    embedder = FakeEmbedder()
    skipped = []
    feats = embed_cached(images, embedder, cache_dir=tmp_path / "cache", on_skip=skipped.append)
    assert feats.shape == (4, 3)
    assert embedder.embedded == 2  # duplicates embedded once, the bad file not at all
    assert feats[2].tolist() == [0.0, 0.0, 0.0]
    assert feats[1].tolist() == feats[3].tolist()
    assert feats[0][2] > 150 > feats[0][0]
    assert [s.path.name for s in skipped] == ["bad.jpg"]
    (npy,) = (tmp_path / "cache").glob("*.npy")
    record = json.loads(npy.with_suffix(".json").read_text())
    assert (record["n_images"], record["n_skipped"], record["cropped"]) == (3, 1, 1)
    assert not list((tmp_path / "cache").glob("*.parts"))

    again = FakeEmbedder()
    skipped2 = []
    feats2 = embed_cached(images, again, cache_dir=tmp_path / "cache", on_skip=skipped2.append)
    assert again.embedded == 0
    np.testing.assert_array_equal(feats, feats2)
    assert len(skipped2) == 1

    # A touched file, another box or another model is a new key.
    os.utime(b, ns=(1, 1))
    embed_cached(images, again, cache_dir=tmp_path / "cache")
    assert again.embedded == 2
    embed_cached(images, FakeEmbedder("other"), cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3


def test_embed_cached_resumes_from_checkpoint_after_interruption(tmp_path, monkeypatch):
    import snaplook.features as features

    monkeypatch.setattr(features, "CACHE_CHUNK_IMAGES", 2)
    images = [(make_image(tmp_path / f"{i}.png", (40 * i, 0, 0)), None) for i in range(5)]

    class Interrupted(FakeEmbedder):
        def embed(self, batch):
            if self.embedded >= 2:
                raise KeyboardInterrupt
            return super().embed(batch)

    with pytest.raises(KeyboardInterrupt):
        embed_cached(images, Interrupted(), cache_dir=tmp_path / "cache", batch_size=1)
    (parts,) = (tmp_path / "cache").glob("*.parts")
    assert sorted(p.name for p in parts.glob("*.npy")) == ["batch-000000.npy"]
    resumed = FakeEmbedder()
    feats = embed_cached(images, resumed, cache_dir=tmp_path / "cache", batch_size=1)
    assert resumed.embedded == 3  # the first chunk of 2 came from the checkpoint
    np.testing.assert_allclose(feats, embed_cached(images, FakeEmbedder(), cache_dir=tmp_path))
    assert not parts.exists()


def test_evaluate_with_fake_embedder_on_folders(image_folder, tmp_path):
    report = ev.folders(
        image_folder,
        embedder=FakeEmbedder(),
        out=tmp_path / "report",
        cache_dir=tmp_path / "cache",
        ks=(1, 3),
        n_examples=2,
    )
    assert report.counts["query_images"] == 12
    assert report.counts["gallery_images_searched"] == 11
    assert report.config["leave_one_out"] is True
    assert set(report.per_category) == {"tops", "bottoms"}
    assert report.recall_at_k[1] <= report.recall_at_k[3]
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == [
        "per_query.csv",
        "random_queries_grid.png",
        "recall_at_k.png",
        "report.json",
        "report.md",
        "worst_queries_grid.png",
    ]


def test_evaluate_counts_unreadable_images_and_strict_fails(image_folder, tmp_path):
    (image_folder / "tops" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    kwargs = dict(embedder=FakeEmbedder(), cache_dir=tmp_path / "cache", ks=(1,), n_examples=1)
    report = ev.folders(image_folder, out=tmp_path / "report", **kwargs)
    # Leave-one-out: the broken file is neither a query nor a gallery image.
    assert report.counts["query_images"] == 13
    assert report.counts["unreadable_query_images"] == 1
    assert report.counts["queries_ranked"] == 12
    assert report.counts["gallery_images_searched"] == 11
    statuses = {r["query"]: r["status"] for r in report.per_query}
    assert statuses["tops/broken.jpg"] == "unreadable"
    assert "broken.jpg" in (tmp_path / "report" / "skipped.csv").read_text()
    with pytest.raises(SnaplookError, match="1 evaluated image.*could not be read.*--strict"):
        ev.folders(image_folder, out=tmp_path / "strict", strict=True, **kwargs)
    assert not (tmp_path / "strict").exists()


# --- the command ------------------------------------------------------------------------


def run_cli(args: list[str]):
    from snaplook.cli import app

    return CliRunner().invoke(app, args)


@pytest.fixture(scope="module")
def cli_run(inshop_root, tmp_path_factory):
    """One `snaplook evaluate` on the tiny tree with seeded random MobileNetV2 weights."""
    work = tmp_path_factory.mktemp("eval")
    out, cache = work / "report", work / "cache"
    args = [
        "evaluate",
        str(inshop_root),
        "--crop",
        "gt",
        "--backbone",
        "mobilenet_v2",
        "--weights",
        "random",
        # avg, pinned: a random MobileNetV2's activations (~1e-11) fall under GeM's clamp,
        # so its GeM features would all be equal and every rank would tie.
        "--pooling",
        "avg",
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
        "--k",
        "1,2,5,10",
        "--examples",
        "3",
        "--quiet",
    ]
    return run_cli(args), out, cache, args


def test_evaluate_cli_inshop_report_counts(cli_run):
    result, out, _, _ = cli_run
    assert result.exit_code == 0, result.output
    assert "Random weights" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["query_images"] == 8
    assert report["counts"]["gallery_images"] == 13
    assert report["counts"]["missing_images"] == 1
    assert report["counts"]["queries_without_gallery_match"] == 1
    assert report["counts"]["queries_evaluated"] == 7
    assert report["config"]["crop"] == "gt"
    assert report["config"]["backbone"] == "mobilenet_v2"
    assert report["config"]["weights"] == {"name": "random", "seed": 0}
    assert report["config"]["preprocessing"] == "tf"
    assert report["config"]["feature_cache"]["images_embedded"] == 21  # 8 queries + 13 gallery
    recalls = [report["metrics"]["recall_at_k"][k] for k in ("1", "2", "5", "10")]
    assert recalls == sorted(recalls)
    assert recalls[-1] == 1.0  # 13 gallery images, every item has 2: a hit within 10
    assert set(report["per_category"]) == {"Dresses", "Tees"}
    assert report["per_category"]["Tees"]["n_without_match"] == 1
    with open(out / "skipped.csv", newline="") as fh:
        skipped = list(csv.DictReader(fh))
    assert [(r["path"], r["reason"]) for r in skipped] == [
        (MISSING_IMAGE, "listed in the partition file but missing")
    ]
    md = (out / "report.md").read_text()
    assert "DeepFashion hit rate" in md and "MMFashion averaged recall" in md
    for name in ("recall_at_k.png", "worst_queries_grid.png", "random_queries_grid.png"):
        assert (out / name).stat().st_size > 1000


def test_evaluate_cli_per_query_csv_matches_report(cli_run):
    _, out, _, _ = cli_run
    report = json.loads((out / "report.json").read_text())
    with open(out / "per_query.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8
    ok = [r for r in rows if r["status"] == "ok"]
    assert [r["item"] for r in rows if r["status"] == "no_gallery_match"] == [NO_GALLERY_ITEM]
    for k in (1, 2, 5, 10):
        hit_rate = sum(int(r["first_hit_rank"]) <= k for r in ok) / len(ok)
        assert report["metrics"]["recall_at_k"][str(k)] == pytest.approx(hit_rate)
    assert report["metrics"]["map"] == pytest.approx(np.mean([float(r["ap"]) for r in ok]), 1e-5)


def test_evaluate_cli_second_run_reuses_cached_features(cli_run, monkeypatch):
    _, out, cache, args = cli_run
    (npy,) = cache.glob("*.npy")
    mtime = npy.stat().st_mtime_ns

    def no_embedding(self, images):
        raise AssertionError("embedded again instead of using the cache")

    monkeypatch.setattr(Embedder, "embed", no_embedding)
    args = [a if a != "1,2,5,10" else "1,3" for a in args]
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    assert npy.stat().st_mtime_ns == mtime
    report = json.loads((out / "report.json").read_text())
    assert list(report["metrics"]["recall_at_k"]) == ["1", "3"]
    assert report["config"]["feature_cache"]["images_embedded"] == 0


def test_evaluate_cli_compares_settings(cli_run, tmp_path):
    _, _, cache, args = cli_run
    args = args[: args.index("--out")] + [
        "--out",
        str(tmp_path / "cmp"),
        "--cache-dir",
        str(cache),
        "--norm",
        "l2,none",
        "--examples",
        "1",
        "--quiet",
    ]
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["setting"] for r in table["settings"]] == [
        "mobilenet_v2-avg-l2",
        "mobilenet_v2-avg-none",
    ]
    assert (tmp_path / "cmp" / "mobilenet_v2-avg-none" / "report.json").is_file()
    assert "| mobilenet_v2-avg-none | 7 |" in (tmp_path / "cmp" / "compare.md").read_text()


def test_evaluate_cli_malformed_partition_exits_1_naming_the_line(tmp_path):
    write_listing(
        tmp_path / "list_eval_partition.txt",
        HEADER,
        ["img/a/id_1/x.jpg id_1 query", "img/a/id_1/y.jpg id_1 gallery extra"],
    )
    result = run_cli(["evaluate", str(tmp_path), "--weights", "random"])
    assert result.exit_code == 1
    assert "line 4: expected 3 columns, found 4" in result.output
    assert "Traceback" not in result.output


def test_evaluate_cli_strict_fails_on_missing_image(inshop_root, tmp_path):
    result = run_cli(
        ["evaluate", str(inshop_root), "--weights", "random", "--strict", "--out", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert "1 image(s) listed in" in result.output and "--strict" in result.output
    assert "Traceback" not in result.output


def test_warn_ks_over_gallery_names_the_cut_offs(image_folder, caplog):
    split = datasets.load_split(image_folder, protocol="folders")  # leave-one-out: 11 others

    with caplog.at_level("WARNING", logger="snaplook.evaluate"):
        over = ev.warn_ks_over_gallery(split, (1, 5, 10, 20, 50))

    assert over == [20, 50]
    assert [r.getMessage() for r in caplog.records] == [
        "K=20,50 exceed the gallery (11 images per query): Recall@K there only says whether a "
        "query has any match; use --k values up to 11"
    ]
    assert ev.warn_ks_over_gallery(split, (1, 11)) == []


def test_evaluate_cli_table_is_never_cut_and_names_the_csv(cli_run, tmp_path):
    _, _, cache, args = cli_run
    args = args[: args.index("--out")] + [
        "--out",
        str(tmp_path / "cmp"),
        "--cache-dir",
        str(cache),
        "--norm",
        "l2,centered,none",
        "--k",
        "1,5,50",
        "--examples",
        "0",
    ]

    result = run_cli(args)  # features from the cache: nothing is embedded again

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "Retrieval (Recall@K = hit rate, %)"
    assert lines[1].split() == ["setting", "queries", "R@1", "R@5", "R@50", "mAP", "MAP@R"]
    table = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    for row, setting in zip(lines[2:5], table["settings"]):
        cells = row.split()
        assert cells[0] == setting["setting"]  # "mobilenet_v2-avg-centered", whole
        assert cells[2] == f"{100 * setting['recall_at_k']['1']:.2f}"
        assert cells[4] == "100.00"  # K=50 over a gallery of 13: every query hits
    assert "per_query.csv" in lines[-1] and str(tmp_path / "cmp") in lines[-1]
    assert "K=50 exceeds the gallery (13 images per query)" in result.stderr
    # One timestamp format in every JSON file snaplook writes: UTC, ISO 8601, seconds.
    import re

    report = json.loads((tmp_path / "cmp" / "mobilenet_v2-avg-l2" / "report.json").read_text())
    cache_json = json.loads(next(cache.glob("*.json")).read_text())
    for created in (report["config"]["created"], cache_json["created"]):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", created), created
    assert "\u2026" not in result.stdout
