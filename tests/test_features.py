"""Tests for snaplook.features: seeded random weights, weights files, offline ImageNet, batching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image
from shared_model import build_model_fresh, build_model_shared, shared_model  # noqa: F401
from typer.testing import CliRunner

from snaplook import features
from snaplook._keras import import_keras
from snaplook.cli import app
from snaplook.errors import SnaplookError
from snaplook.features import (
    Embedder,
    WeightsSpec,
    embed_arrays,
    embed_images,
    get_backbone,
)
from snaplook.index import load_index
from snaplook.io_utils import file_sha256, read_image
from snaplook.transform_utils import l2_normalize, preprocess_caffe, resize_to_square


def _prepared(n: int, seed: int = 0) -> np.ndarray:
    """n prepared (224x224 uint8 RGB) images with some structure."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 56, 56, 3), dtype=np.uint8)
    return np.stack([resize_to_square(im, 224) for im in images])


@pytest.fixture
def keras_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAPLOOK_RUNTIME", "keras")


@pytest.mark.usefixtures("keras_runtime")
def test_embedder_random_weights_deterministic_per_seed(monkeypatch) -> None:
    images = _prepared(2)
    # The process-wide seed-0 model may have been built after other Keras work; a fresh
    # build must still carry the same weights, and another seed other weights.
    monkeypatch.setattr(features, "build_model", build_model_shared)
    shared = Embedder(weights="random", seed=0).embed(images)
    monkeypatch.setattr(features, "build_model", build_model_fresh)
    fresh = Embedder(weights="random", seed=0).embed(images)
    other = Embedder(weights="random", seed=1).embed(images)

    assert shared.shape == (2, 2048)
    assert shared.dtype == np.float32
    assert np.all(np.isfinite(shared))
    np.testing.assert_array_equal(fresh, shared)
    cos = np.sum(l2_normalize(other) * l2_normalize(shared), axis=1)
    assert np.abs(other - shared).max() > 1e-2
    assert np.all(cos < 0.9999)


@pytest.mark.usefixtures("shared_model")
def test_cli_index_weights_file_round_trip(tmp_path: Path) -> None:
    gallery = tmp_path / "g"
    paths = [
        make_image(gallery / f"{i}.png", c, seed=i)
        for i, c in enumerate([(200, 30, 30), (30, 60, 200)])
    ]
    model = features.build_model("resnet50", WeightsSpec("random", seed=0))
    weights = tmp_path / "w.weights.h5"
    model.save_weights(str(weights))

    result = CliRunner().invoke(
        app, ["index", str(gallery), "--out", str(tmp_path / "idx"), "--weights", str(weights)]
    )

    assert result.exit_code == 0, result.output
    got = np.asarray(load_index(tmp_path / "idx").features)
    batch = np.stack([resize_to_square(read_image(p), 224) for p in paths])
    expected = l2_normalize(np.asarray(model(preprocess_caffe(batch), training=False)))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert meta["weights"] == {
        "name": "file",
        "sha256": file_sha256(weights),
        "path": str(weights.resolve()),
    }


@pytest.mark.usefixtures("keras_runtime")
def test_embedder_weights_file_not_fitting_raises(tmp_path: Path) -> None:
    bogus = tmp_path / "other.weights.h5"
    bogus.write_bytes(b"not an HDF5 file")

    with pytest.raises(SnaplookError, match="cannot load weights from .*other.weights.h5"):
        Embedder(weights=bogus).embed(_prepared(1))


def test_weights_spec_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(SnaplookError, match="weights file .*nope.h5 not found"):
        Embedder(weights=tmp_path / "nope.h5")


def test_get_backbone_unknown_lists_known() -> None:
    with pytest.raises(SnaplookError, match="unknown backbone 'resnet51'.*resnet50"):
        get_backbone("resnet51")
    with pytest.raises(SnaplookError, match="unknown pooling"):
        Embedder(weights="random", pooling="sum")


def test_cli_index_offline_imagenet_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, image_folder: Path
) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    keras = import_keras()
    calls = []

    def no_network(fname, origin=None, **kwargs):
        calls.append(origin)
        raise Exception(
            f"URL fetch failure on {origin}: None -- [Errno -2] Name or service not known"
        )

    monkeypatch.setattr(keras.utils, "get_file", no_network)
    out = tmp_path / "idx"

    result = CliRunner().invoke(app, ["index", str(image_folder), "--out", str(out)])

    assert result.exit_code == 1
    assert calls and calls[0].endswith("resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    cached = (
        tmp_path / "keras_home" / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    )
    assert lines[0].startswith("Error: could not fetch the ImageNet weights for resnet50")
    assert str(cached) in lines[0]
    assert "--weights PATH" in lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not list(tmp_path.glob("idx*"))  # no index, checkpoint or lock left behind


@pytest.mark.usefixtures("shared_model")
def test_embed_images_skips_bad_files_keeps_order(tmp_path: Path) -> None:
    a = make_image(tmp_path / "a.png", (200, 30, 30), seed=1)
    bad = tmp_path / "b.jpg"
    bad.write_bytes(b"")
    c = make_image(tmp_path / "c.png", (30, 60, 200), seed=2)
    skipped, progress = [], []

    feats, kept = embed_images(
        [a, bad, c],
        Embedder(weights="random"),
        batch_size=2,
        on_skip=skipped.append,
        on_progress=progress.append,
    )

    assert kept == [a, c]
    assert feats.shape == (2, 2048)
    assert [s.path for s in skipped] == [bad]
    assert "empty file" in skipped[0].reason
    assert progress == [2, 3]


@pytest.mark.usefixtures("shared_model")
def test_embed_arrays_any_sizes_and_empty() -> None:
    embedder = Embedder(weights="random")
    images = [np.zeros((30, 80, 3), np.uint8), np.full((90, 20, 3), 128, np.uint8)]

    feats = embed_arrays(images, embedder, batch_size=1)

    assert feats.shape == (2, 2048)
    assert feats.dtype == np.float32
    assert embed_arrays([], embedder).shape == (0, 2048)


def test_fetch_imagenet_weights_keeps_keras_download_lines_off_stdout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import dataclasses
    import logging

    # A real Keras get_file download, from a file:// origin (no network needed).
    source = tmp_path / "remote" / "weights.h5"
    source.parent.mkdir()
    source.write_bytes(b"not really weights, but a file to download")
    spec = dataclasses.replace(
        features.BACKBONES["resnet50"], weights_origin=source.as_uri(), weights_md5=None
    )
    monkeypatch.setitem(features.BACKBONES, "resnet50", spec)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    log = logging.getLogger("snaplook._keras")
    log.addHandler(handler)
    monkeypatch.setattr(log, "level", logging.DEBUG)
    try:
        path = features.fetch_imagenet_weights("resnet50")
    finally:
        log.removeHandler(handler)

    assert path == tmp_path / "keras" / "models" / spec.weights_file
    assert path.read_bytes() == source.read_bytes()
    assert capsys.readouterr().out == ""
    messages = [r.getMessage() for r in records]
    assert any(m.startswith("keras: Downloading data from file://") for m in messages)
    assert any("downloading them once" in m for m in messages)


class _MeanColour:
    """Embedder stand-in (no Keras): the mean colour of each prepared image."""

    input_size = 16
    feature_dim = 3

    def prepare(self, image: np.ndarray) -> np.ndarray:
        return resize_to_square(image, self.input_size, mode="crop")

    def embed(self, images: np.ndarray) -> np.ndarray:
        return images.reshape(len(images), -1, 3).mean(axis=1).astype(np.float32)


def test_iter_embeddings_crops_boxes_and_reports_positions(tmp_path: Path) -> None:
    from snaplook.transform_utils import crop_box

    a = make_image(tmp_path / "a.png", (200, 30, 30), size=(64, 48), seed=1)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    box = (0, 0, 20, 10)
    skipped: list[features.Skipped] = []

    batches = list(
        features.iter_embeddings(
            [(a, box), bad, a], _MeanColour(), batch_size=2, on_skip=skipped.append
        )
    )

    assert [b.positions for b in batches] == [[0], [2]]
    assert batches[0].skipped == [(1, skipped[0].reason)]
    assert [s.path for s in skipped] == [bad]
    assert batches[0].paths == [a] and batches[0].sizes == [(64, 48)]
    embedder = _MeanColour()
    expected = features.embed_arrays(
        [crop_box(read_image(a), box), read_image(a)], embedder, batch_size=1
    )
    got = np.concatenate([b.features for b in batches])
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_embed_arrays_propagates_errors() -> None:
    class Failing(_MeanColour):
        def prepare(self, image: np.ndarray) -> np.ndarray:
            raise SnaplookError("cannot prepare")

    with pytest.raises(SnaplookError, match="cannot prepare"):
        features.embed_arrays([np.zeros((4, 4, 3), np.uint8)], Failing())


def test_is_random_weights_reads_every_form() -> None:
    assert features.is_random_weights("random")
    assert features.is_random_weights(Embedder(weights="random"))
    assert features.is_random_weights(WeightsSpec("random", seed=3))
    assert features.is_random_weights({"name": "random", "seed": 0})
    assert features.is_random_weights({"weights": {"name": "random"}, "backbone": "resnet50"})
    assert not features.is_random_weights({"weights": {"name": "imagenet"}})
    assert not features.is_random_weights(WeightsSpec("imagenet"))
    assert not features.is_random_weights(None)


def test_embed_cached_starts_over_from_an_old_parts_folder(tmp_path: Path) -> None:
    class Stand(_MeanColour):
        def identity(self) -> dict:
            return {"backbone": "mean-colour", "weights": {"name": "none"}}

    images = [(make_image(tmp_path / f"{i}.png", (60 * i, 0, 0)), None) for i in range(3)]
    key, _ = features.feature_cache_key(images, Stand())
    # The layout before issue 21: <key>.parts/000000.npy + 000000.json (no plan.json).
    old = tmp_path / "cache" / f"{key}.parts"
    old.mkdir(parents=True)
    np.save(old / "000000.npy", np.full((3, 3), 7, np.float32))
    (old / "000000.json").write_text("[]")

    feats = features.embed_cached(images, Stand(), cache_dir=tmp_path / "cache")

    np.testing.assert_allclose(
        feats, features.embed_arrays([read_image(p) for p, _ in images], Stand())
    )
    assert not old.exists()
