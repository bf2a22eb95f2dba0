"""`evaluate` with training-free post-processing (issue 24): --whiten, --dba, --qe; the
ranking equals snaplook.postprocess on the same features, leave-one-out refits per query."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image
from typer.testing import CliRunner

from snaplook import datasets
from snaplook import evaluate as ev
from snaplook import postprocess as pp
from snaplook.cli import app
from snaplook.errors import SnaplookError
from snaplook.metrics import evaluate_embeddings, rank_metrics


class PixelEmbedder:
    """Embedder stand-in: the image's 4 x 4 RGB thumbnail (48-d), enough for whitening."""

    input_size = 16
    feature_dim = 48

    def identity(self) -> dict:
        return {"backbone": "pixels", "weights": {"name": "none"}, "pooling": "avg"}

    def prepare(self, image: np.ndarray) -> np.ndarray:
        from snaplook.transform_utils import resize_to_square

        return resize_to_square(image, self.input_size, mode="crop")

    def embed(self, images) -> np.ndarray:
        images = np.asarray(images, dtype=np.float32)
        return images.reshape(len(images), 4, 4, 4, 4, 3).mean(axis=(2, 4)).reshape(len(images), -1)


@pytest.fixture(scope="module")
def folders_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 labels x 3 noisy copies = 36 images (whitening's rule allows 11 dimensions)."""
    root = tmp_path_factory.mktemp("folders")
    rng = np.random.default_rng(0)
    for label in range(12):
        colour = tuple(int(c) for c in rng.integers(20, 235, size=3))
        for copy in range(3):
            make_image(root / f"label{label:02d}" / f"{copy}.png", colour, seed=100 * label + copy)
    return root


def _features(root: Path) -> tuple[np.ndarray, list[str]]:
    from snaplook.io_utils import read_image

    split = datasets.load_split(root, protocol="folders")
    embedder = PixelEmbedder()
    images = [embedder.prepare(read_image(root / s.path)) for s in split.gallery]
    return embedder.embed(np.stack(images)), [s.item for s in split.gallery]


@pytest.mark.parametrize(
    "post",
    [
        pp.Postprocessing(whiten=None),
        pp.Postprocessing(whiten=None, dba=1, qe=1),
        pp.Postprocessing(dba=2),
    ],
)
def test_evaluate_leave_one_out_refits_without_each_query(folders_root, tmp_path, post):
    report = ev.evaluate(
        folders_root,
        protocol="folders",
        embedder=PixelEmbedder(),
        postprocessing=post,
        ks=(1, 5),
        cache_dir=tmp_path / "cache",
        out=tmp_path / "report",
        n_examples=1,
    )

    feats, ids = _features(folders_root)
    expected = rank_metrics(
        pp.leave_one_out_distances(feats, post), ids, ids, ks=(1, 5), exclude=np.eye(36, dtype=bool)
    ).summary()
    assert report.metrics["recall_at_k"] == pytest.approx(expected["recall_at_k"])
    assert report.metrics["map"] == pytest.approx(expected["map"])
    assert report.config["setting"] == f"pixels-avg-l2+{post.name()}"
    assert report.config["postprocessing"]["fitted_on"] == "gallery without each query"
    written = json.loads((tmp_path / "report" / "report.json").read_text())
    assert written["config"]["postprocessing"]["dba"] == post.dba
    assert "| post-processing | whitening" in (tmp_path / "report" / "report.md").read_text()


def test_evaluate_query_expansion_alone_is_not_refitted(folders_root, tmp_path):
    post = pp.Postprocessing(qe=2)
    report = ev.evaluate(
        folders_root,
        protocol="folders",
        embedder=PixelEmbedder(),
        postprocessing=post,
        ks=(1,),
        cache_dir=tmp_path / "cache",
        out=tmp_path / "report",
        n_examples=0,
    )
    feats, ids = _features(folders_root)
    q, g, _ = pp.postprocess_features(feats, feats, post, leave_one_out=True)
    expected = evaluate_embeddings(q, ids, g, ids, ks=(1,), leave_one_out=True).summary()
    assert report.metrics["recall_at_k"] == pytest.approx(expected["recall_at_k"])
    assert report.config["postprocessing"]["fitted_on"] is None


def test_evaluate_without_postprocessing_keeps_its_report(folders_root, tmp_path):
    report = ev.evaluate(
        folders_root,
        protocol="folders",
        embedder=PixelEmbedder(),
        ks=(1,),
        cache_dir=tmp_path / "cache",
        out=tmp_path / "report",
        n_examples=0,
    )
    assert "postprocessing" not in report.config
    assert report.config["setting"] == "pixels-avg-l2"


def test_evaluate_postprocessing_needs_l2(folders_root, tmp_path):
    with pytest.raises(SnaplookError, match="--norm centered"):
        ev.evaluate(
            folders_root,
            protocol="folders",
            embedder=PixelEmbedder(),
            normalization="centered",
            postprocessing=pp.Postprocessing(qe=1),
            out=tmp_path / "report",
        )


def test_postprocessing_grid_and_its_errors():
    grid = pp.postprocessing_grid(["none", "pca:16"], ["0", "1"], ["1"])
    assert [p.name() for p in grid] == ["dba1", "dba1-qe1", "pca16-dba1", "pca16-dba1-qe1"]
    assert pp.postprocessing_grid() == [pp.Postprocessing()]
    with pytest.raises(SnaplookError, match="--qe: 'x'"):
        pp.postprocessing_grid(qes=["x"])
    with pytest.raises(SnaplookError, match="--whiten"):
        pp.postprocessing_grid(whitens=["zca"])


def test_evaluate_cli_compares_postprocessing_settings(folders_root, tmp_path, monkeypatch):
    monkeypatch.setenv("SNAPLOOK_RUNTIME", "keras")
    out = tmp_path / "cmp"
    args = ["evaluate", str(folders_root), "--protocol", "folders", "--backbone", "mobilenet_v2"]
    args += ["--weights", "random", "--pooling", "avg"]  # random MobileNetV2: GeM is constant
    args += ["--whiten", "none,pca", "--qe", "1", "--k", "1,5"]
    args += ["--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--examples", "0"]

    result = CliRunner().invoke(app, args)

    assert result.exit_code == 0, result.output
    compare = json.loads((out / "compare.json").read_text())
    names = [s["setting"] for s in compare["settings"]]
    assert names == ["mobilenet_v2-avg-l2+qe1", "mobilenet_v2-avg-l2+pca-qe1"]
    assert "pca-qe1" in result.output


def test_evaluate_cli_bad_postprocessing_value_exits_1(folders_root, tmp_path):
    args = ["evaluate", str(folders_root), "--protocol", "folders", "--dba", "two"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "r")])
    assert result.exit_code == 1
    assert "--dba: 'two' is not a number of neighbours" in result.output


def test_evaluate_compares_tta_in_one_table(folders_root, tmp_path, monkeypatch):
    from shared_model import build_model_shared

    from snaplook import features

    monkeypatch.setattr(features, "build_model", build_model_shared)
    comparison = ev.evaluate_settings(
        folders_root,
        protocol="folders",
        backbones=["mobilenet_v2"],
        poolings=["avg"],  # a random MobileNetV2's GeM features are constant
        ttas=["none", "flip"],
        weights="random",
        out=tmp_path / "eval",
        cache_dir=tmp_path / "cache",
        ks=(1,),
        n_examples=0,
    )
    table = json.loads(comparison.files["compare_json"].read_text())
    settings = [(row["setting"], row["tta"]) for row in table["settings"]]
    assert settings == [("mobilenet_v2-avg-l2", "none"), ("mobilenet_v2-avg-l2+flip", "flip")]
    # The flip row ranks flip features: the cache holds one embedding per TTA.
    plain, flip = (r.config["feature_cache"]["images_embedded"] for r in comparison.reports)
    assert plain == flip == 36
    with pytest.raises(SnaplookError, match="unknown --tta 'blur'"):
        ev.evaluate_settings(folders_root, protocol="folders", ttas=["blur"], weights="random")
