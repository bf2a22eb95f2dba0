"""End-to-end tests of the core commands (index, query, features, demo) and of start-up cost."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, make_image, write_gallery
from shared_model import build_model_shared, shared_model  # noqa: F401
from typer.testing import CliRunner

from snaplook import features, plot_utils
from snaplook.cli import app
from snaplook.errors import SnaplookError
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
    assert np.load(idx / "features.npy").shape == (12, 2048)
    assert len(read_manifest(idx / "manifest.csv")) == 12
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
    assert list(rows[0]) == ["query", "rank", "path", "distance"]
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
    (broken / "features.npy").write_bytes(b"\x93NUMPY garbage")

    result = _run("query", tmp_path, "--index", broken)

    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ")
    assert "features.npy" in result.stderr
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
    assert "Skipped 1 unreadable file(s)" in lenient.stderr
    assert strict.exit_code == 1
    assert "bad.jpg: empty file (0 bytes)" in strict.stderr
    assert "Error: --strict: failing because inputs were skipped." in strict.stderr
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
    rows = {m.path: i for i, m in enumerate(read_manifest(idx / "manifest.csv"))}
    index_feats = np.load(idx / "features.npy")
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
        "ImageNet weights are not cached and cannot be downloaded (offline): running on seeded "
        "random weights, which show the pipeline working, not retrieval quality."
    ]
    assert np.load(out / "index" / "features.npy").shape == (6, 2048)
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
        "         'skimage', 'ai_edge_litert', 'scipy', 'openvino', 'nncf')\n"
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
