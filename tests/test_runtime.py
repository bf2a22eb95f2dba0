"""The LiteRT fast path gives Keras' features, caches its converted model, and streams in order.

MobileNetV2 stands in for ResNet50 here: its conversion takes a third of the time and the
code path is the same; benchmarks/run.py compares ResNet50 on a larger set.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image

from snaplook import features
from snaplook.errors import SnaplookError
from snaplook.features import Embedder, embed_images, iter_embeddings, resolve_runtime

BACKBONE = "mobilenet_v2"
pytest.importorskip("ai_edge_litert")


@pytest.fixture(scope="module")
def litert_cache(tmp_path_factory: pytest.TempPathFactory):
    """A private model cache for this module: the conversion runs once, in the first test."""
    cache = tmp_path_factory.mktemp("snaplook-cache")
    old = os.environ.get(features.CACHE_DIR_ENV)
    os.environ[features.CACHE_DIR_ENV] = str(cache)
    yield cache
    if old is None:
        del os.environ[features.CACHE_DIR_ENV]
    else:
        os.environ[features.CACHE_DIR_ENV] = old


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("photos")
    colours = [(200, 30, 30), (30, 160, 60), (30, 60, 200)]
    return [
        make_image(root / f"photo{i}.jpg", c, size=(600, 450), seed=i)
        for i, c in enumerate(colours)
    ]


def _max_relative_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a - b).max(axis=1) / np.abs(b).max(axis=1)


def test_embedder_litert_matches_keras(litert_cache: Path, photos: list[Path]):
    keras_embedder = Embedder(BACKBONE, weights="random", runtime="keras")
    litert_embedder = Embedder(BACKBONE, weights="random", runtime="litert")

    reference, kept = embed_images(photos, keras_embedder)
    fast, fast_kept = embed_images(photos, litert_embedder)

    assert keras_embedder.resolved_runtime() == "keras"
    assert keras_embedder.interpreter_ is None and keras_embedder.model_ is not None
    assert litert_embedder.resolved_runtime() == "litert"
    assert reference.shape == fast.shape == (3, 1280)
    assert kept == fast_kept == photos
    assert _max_relative_diff(fast, reference).max() <= 1e-4
    # the runtime is not part of what produced the features
    assert litert_embedder.identity() == keras_embedder.identity()
    assert list(litert_cache.glob("*.tflite")) == [litert_embedder.tflite_path()]


def test_embedder_litert_reuses_cached_model(
    litert_cache: Path, photos: list[Path], monkeypatch: pytest.MonkeyPatch
):
    first = Embedder(BACKBONE, weights="random", runtime="litert")
    expected, _ = embed_images(photos[:2], first)
    cached = first.tflite_path()
    stamp = cached.stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again instead of using the cache")

    monkeypatch.setattr(features, "convert_to_tflite", no_conversion)
    second = Embedder(BACKBONE, weights="random", runtime="litert")
    again, _ = embed_images(photos[:2], second)

    assert second.tflite_path() == cached
    assert cached.stat().st_mtime_ns == stamp
    assert second.model_ is None  # Keras was not needed
    np.testing.assert_array_equal(again, expected)


def test_embedder_litert_other_seed_gets_its_own_cache_file(litert_cache: Path):
    assert (
        Embedder(BACKBONE, weights="random", seed=1).tflite_path()
        != Embedder(BACKBONE, weights="random", seed=0).tflite_path()
    )


def test_iter_embeddings_keeps_order_and_skips_with_prefetch(
    litert_cache: Path, photos: list[Path], tmp_path: Path
):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    paths = [photos[0], bad, photos[1], photos[2], photos[0]]
    embedder = Embedder(BACKBONE, weights="random", runtime="litert")
    skipped, progress = [], []

    batches = list(
        iter_embeddings(
            paths, embedder, batch_size=2, on_skip=skipped.append, on_progress=progress.append
        )
    )

    assert [p for b in batches for p in b.paths] == [photos[0], photos[1], photos[2], photos[0]]
    assert [s.path for s in skipped] == [bad]
    assert progress == [2, 4, 5]
    assert all(b.sizes == [(600, 450)] * len(b.paths) for b in batches)
    feats = np.concatenate([b.features for b in batches])
    np.testing.assert_allclose(feats[0], feats[3], rtol=0, atol=0)
    single, _ = embed_images([photos[1]], embedder)
    np.testing.assert_array_equal(feats[1], single[0])


def test_iter_embeddings_stops_early_without_hanging(litert_cache: Path, photos: list[Path]):
    embedder = Embedder(BACKBONE, weights="random", runtime="litert")
    stream = iter_embeddings(photos * 40, embedder, batch_size=1)
    first = next(stream)
    stream.close()

    assert first.paths == [photos[0]]


def test_resolve_runtime_reads_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(features.RUNTIME_ENV, "keras")
    assert resolve_runtime("auto") == "keras"
    assert resolve_runtime("litert") == "litert"
    monkeypatch.setenv(features.RUNTIME_ENV, "tpu")
    with pytest.raises(SnaplookError, match="SNAPLOOK_RUNTIME='tpu'"):
        resolve_runtime("auto")
    with pytest.raises(SnaplookError, match="unknown runtime 'fast'"):
        Embedder(BACKBONE, weights="random", runtime="fast")
