"""OpenVINO runtime: Keras' features at fp32, its model cache, precision checks and identity.

MobileNetV2 stands in for ResNet50 where a model is converted here (a third of the time,
same code path); benchmarks/run.py measures ResNet50. Nothing here depends on the CPU
model: bf16 support is simulated through ``$SNAPLOOK_CPU_FLAGS``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image, write_gallery
from shared_model import build_model_shared
from typer.testing import CliRunner

from snaplook import features, runtime
from snaplook.cli import app
from snaplook.errors import SnaplookError
from snaplook.features import Embedder, embed_images, iter_embeddings, resolve_runtime
from snaplook.index import load_index, query_index
from snaplook.indexing import build_index

pytest.importorskip("openvino")
BACKBONE = "mobilenet_v2"
NO_BF16 = "fpu sse2 avx2 fma avx512f"
WITH_BF16 = NO_BF16 + " avx512_bf16"


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory):
    """A private model cache for this module, so its conversions are counted here."""
    cache = tmp_path_factory.mktemp("ov-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(features.CACHE_DIR_ENV, str(cache))
        mp.setattr(features, "build_model", build_model_shared)
        yield cache


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


def test_openvino_fp32_matches_keras(model_cache: Path, photos: list[Path]):
    keras_embedder = Embedder(BACKBONE, weights="random", runtime="keras")
    ov_embedder = Embedder(BACKBONE, weights="random", runtime="openvino")

    reference, kept = embed_images(photos, keras_embedder)
    fast, fast_kept = embed_images(photos, ov_embedder)

    assert ov_embedder.resolved_runtime() == "openvino"
    assert ov_embedder.resolved_precision() == "fp32"
    assert reference.shape == fast.shape == (3, 1280)
    assert kept == fast_kept == photos
    assert _max_relative_diff(fast, reference).max() <= 1e-4
    assert ov_embedder.identity() == keras_embedder.identity()  # the runtime is not identity
    assert sorted(p.name for p in model_cache.glob("*.xml")) == [ov_embedder.ir_path().name]
    assert ov_embedder.ir_path().name.endswith(f"-fp32-ov{runtime.openvino_version()}.xml")
    assert ov_embedder.ir_path().with_suffix(".bin").stat().st_size > 1_000_000


def test_second_run_reads_the_cache_without_converting(
    model_cache: Path, photos: list[Path], monkeypatch: pytest.MonkeyPatch
):
    first = Embedder(BACKBONE, weights="random")
    expected, _ = embed_images(photos[:2], first)
    stamp = first.ir_path().stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again instead of using the cache")

    monkeypatch.setattr(runtime, "convert_keras", no_conversion)
    second = Embedder(BACKBONE, weights="random")
    again, _ = embed_images(photos[:2], second)

    assert first.ir_path().stat().st_mtime_ns == stamp
    assert second.model_ is None  # Keras was not needed
    np.testing.assert_array_equal(again, expected)


def test_cache_of_another_openvino_version_is_not_reused(
    model_cache: Path, photos: list[Path], monkeypatch: pytest.MonkeyPatch
):
    embed_images(photos[:1], Embedder(BACKBONE, weights="random"))  # today's version cached
    monkeypatch.setattr(runtime, "openvino_version", lambda: "2099.1.0")
    other = Embedder(BACKBONE, weights="random")

    assert other.ir_path().name.endswith("-fp32-ov2099.1.0.xml")
    assert not other.ir_path().exists()
    embed_images(photos[:1], other)
    assert other.ir_path().is_file()  # converted again, for that version


def test_corrupt_cached_model_is_rebuilt_with_a_warning(
    model_cache: Path, photos: list[Path], caplog: pytest.LogCaptureFixture, tmp_path: Path
):
    first = Embedder(BACKBONE, weights="random", seed=3)
    expected, _ = embed_images(photos[:1], first)
    bin_path = first.ir_path().with_suffix(".bin")
    bin_path.write_bytes(bin_path.read_bytes()[:1000])  # truncated weights

    again, _ = embed_images(photos[:1], Embedder(BACKBONE, weights="random", seed=3))

    assert any("is unreadable" in r.getMessage() for r in caplog.records)
    assert bin_path.stat().st_size > 1_000_000
    np.testing.assert_allclose(again, expected, rtol=1e-6, atol=1e-6)


def test_bf16_without_native_support_fails_with_one_line(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(runtime.CPU_FLAGS_ENV, NO_BF16)

    with pytest.raises(SnaplookError, match="needs a CPU with AMX or AVX512-BF16") as err:
        Embedder(BACKBONE, weights="random", precision="bf16").identity()
    assert "\n" not in str(err.value)
    assert Embedder(BACKBONE, weights="random", precision="auto").resolved_precision() == "fp32"
    monkeypatch.setenv(runtime.CPU_FLAGS_ENV, WITH_BF16)
    assert Embedder(BACKBONE, weights="random", precision="auto").resolved_precision() == "bf16"
    with pytest.raises(SnaplookError, match="needs the OpenVINO runtime"):
        Embedder(BACKBONE, weights="random", runtime="keras", precision="bf16").identity()


def test_cli_bf16_without_native_support_is_one_error_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    monkeypatch.setenv(runtime.CPU_FLAGS_ENV, NO_BF16)
    gallery = write_gallery(tmp_path / "g", subfolders=False)

    result = CliRunner().invoke(
        app,
        ["index", str(gallery), "--out", str(tmp_path / "i"), "--weights", "random",
         "--backbone", BACKBONE, "--precision", "bf16"],
    )  # fmt: skip

    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --precision bf16 needs a CPU")
    assert not (tmp_path / "i").exists()
    bad = CliRunner().invoke(app, ["index", str(gallery), "--precision", "fp16"])
    assert bad.exit_code == 2


def test_bf16_features_close_to_fp32_when_simulated_support(
    model_cache: Path, photos: list[Path], monkeypatch: pytest.MonkeyPatch
):
    # Where the CPU really lacks bf16, OpenVINO emulates it: still close, only slower.
    monkeypatch.setenv(runtime.CPU_FLAGS_ENV, WITH_BF16)
    # Average pooling: a random MobileNetV2's GeM features are constant (see below).
    exact, _ = embed_images(photos, Embedder(BACKBONE, weights="random", pooling="avg"))
    half = Embedder(BACKBONE, weights="random", precision="bf16", pooling="avg")
    approx, _ = embed_images(photos, half)

    assert half.identity()["precision"] == "bf16"
    assert half.ir_path() == Embedder(BACKBONE, weights="random", pooling="avg").ir_path()
    err = _max_relative_diff(approx, exact)
    assert 0 < err.max() < 0.05  # bf16 really ran (not exact), and stayed close


def test_index_at_one_precision_refuses_queries_and_updates_at_another(
    model_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv(runtime.CPU_FLAGS_ENV, WITH_BF16)
    gallery = write_gallery(tmp_path / "g", subfolders=False)
    out = tmp_path / "idx"
    build_index(gallery, out, backbone=BACKBONE, weights="random", precision="bf16")
    index = load_index(out)

    assert index.meta["precision"] == "bf16"
    with pytest.raises(SnaplookError, match="built at --precision bf16; querying it at fp32"):
        index.embedder(precision="fp32")
    assert index.embedder().resolved_precision() == "bf16"  # default: the index's
    assert index.embedder(precision="auto").resolved_precision() == "bf16"
    with pytest.raises(SnaplookError, match="--update cannot mix features of two precisions"):
        build_index(gallery, out, backbone=BACKBONE, weights="random", update=True)
    summary = query_index(sorted(gallery.glob("*.png"))[:2], index, k=1)
    assert [r.hits[0].distance for r in summary.results] == pytest.approx([0, 0], abs=1e-5)

    result = CliRunner().invoke(
        app, ["query", str(gallery), "--index", str(out), "--precision", "fp32", "--no-plot"]
    )
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: the index was built at --precision bf16")


def test_int8_is_calibrated_on_the_gallery_cached_and_recorded(
    model_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # ResNet50 (already converted for other tests of the session): a random MobileNetV2's
    # features are ~1e-11, below int8's resolution.
    gallery = write_gallery(tmp_path / "g", subfolders=False)
    out = tmp_path / "idx8"
    build_index(gallery, out, weights="random", precision="int8")
    meta = json.loads((out / "meta.json").read_text())
    fp32 = Embedder(weights="random")
    exact, _ = embed_images(sorted(gallery.glob("*.png")), fp32)

    assert meta["precision"] == "int8"
    assert len(meta["calibration"]["images"]) == 12 and len(meta["calibration"]["sha256"]) == 24
    int8_irs = list(model_cache.glob(f"*-int8-{meta['calibration']['sha256']}-ov*.xml"))
    assert len(int8_irs) == 1
    rows = np.asarray(load_index(out).features)
    cos = np.sum(rows * exact / np.linalg.norm(exact, axis=1, keepdims=True), axis=1)
    assert cos.min() > 0.9 and _max_relative_diff(rows, exact).max() > 0  # quantized, close

    def no_quantization(*args, **kwargs):
        raise AssertionError("quantized again instead of using the cache")

    monkeypatch.setattr(runtime, "quantize_int8", no_quantization)
    summary = query_index(sorted(gallery.glob("*.png"))[:3], load_index(out), k=1)
    assert [r.hits[0].path.name for r in summary.results] == [
        p.name for p in sorted(gallery.glob("*.png"))[:3]
    ]


def test_runtime_choice_is_explained_under_verbose(
    model_cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    gallery = write_gallery(tmp_path / "g", subfolders=False)
    caplog.set_level(logging.INFO, logger="snaplook")

    result = CliRunner().invoke(
        app,
        ["--verbose", "features", str(gallery), "-o", str(tmp_path / "f.npy"),
         "--weights", "random", "--backbone", BACKBONE],
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    explained = [line for line in result.stderr.splitlines() if "runtime: openvino (" in line]
    assert len(explained) == 1, result.stderr
    assert "precision fp32" in explained[0]
    assert np.load(tmp_path / "f.npy").shape == (12, 1280)


def test_iter_embeddings_keeps_order_and_skips_with_parallel_decode(
    model_cache: Path, photos: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(features, "DECODE_THREADS", 3)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    paths = [photos[0], bad, photos[1], photos[2], photos[0]]
    embedder = Embedder(BACKBONE, weights="random")
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
    np.testing.assert_allclose(feats[0], feats[3], rtol=1e-6, atol=1e-6)


def test_iter_embeddings_stops_early_without_hanging(model_cache: Path, photos: list[Path]):
    embedder = Embedder(BACKBONE, weights="random")
    stream = iter_embeddings(photos * 40, embedder, batch_size=1)
    first = next(stream)
    stream.close()

    assert first.paths == [photos[0]]


def test_resolve_runtime_reads_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(features.RUNTIME_ENV, "keras")
    assert resolve_runtime("auto") == "keras"
    assert resolve_runtime("openvino") == "openvino"
    monkeypatch.delenv(features.RUNTIME_ENV)
    assert resolve_runtime("auto") == "openvino"  # no GPU in CI
    monkeypatch.setenv(features.RUNTIME_ENV, "litert")
    with pytest.raises(SnaplookError, match="SNAPLOOK_RUNTIME='litert'"):
        resolve_runtime("auto")
    with pytest.raises(SnaplookError, match="unknown precision 'fp16'"):
        Embedder(BACKBONE, weights="random", precision="fp16")


def _identity_model(size: int = 8):
    """An OpenVINO model that returns its float32 input (n, size, size, 3) flattened."""
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([-1, size, size, 3], np.float32, name="images")
    flat = ops.reshape(x, ops.constant(np.array([0, -1], dtype=np.int64)), special_zero=True)
    return ov.Model([flat], [x], "identity")


@pytest.mark.parametrize("kind", sorted(runtime._PREPROCESSING))
def test_preprocessing_in_the_graph_equals_numpy_preprocessing(kind: str):
    from snaplook.transform_utils import PREPROCESSORS

    pixels = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    compiled = runtime.CompiledModel(
        runtime.with_preprocessing(_identity_model(), kind), "fp32", threads=1
    )

    got = compiled.infer(pixels)

    want = PREPROCESSORS[kind](pixels).reshape(3, -1)
    assert got.shape == (3, 8 * 8 * 3)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    if kind == "caffe":  # BGR order: pixel (0, 0)'s blue comes first
        assert got[0, 0] == pytest.approx(pixels[0, 0, 0, 2] - 103.939, abs=1e-4)


def test_small_batches_are_split_across_streams_without_changing_rows():
    pixels = np.random.default_rng(1).integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    compiled = runtime.CompiledModel(
        runtime.with_preprocessing(_identity_model(), "none"), "fp32", threads=2
    )
    assert compiled.streams >= 1
    assert len(compiled.requests_) >= 2 * compiled.streams

    whole = compiled.infer(pixels)
    one_by_one = np.concatenate([compiled.infer(pixels[i : i + 1]) for i in range(5)])
    by_twos = compiled.infer(pixels, chunk=2)

    expected = pixels.reshape(5, -1).astype(np.float32)
    np.testing.assert_array_equal(whole, expected)
    np.testing.assert_array_equal(one_by_one, expected)
    np.testing.assert_array_equal(by_twos, expected)


def test_fewer_threads_than_cpus_are_not_pinned(monkeypatch: pytest.MonkeyPatch):
    # A Ray actor runs one thread per CPU it reserved; OpenVINO would pin the thread of
    # every actor on the machine to the same first core (two actors ran at the speed of one).
    monkeypatch.setattr(runtime, "_usable_cpus", lambda: 4)
    model = runtime.with_preprocessing(_identity_model(), "none")

    share = runtime.CompiledModel(model, "fp32", threads=1)
    whole = runtime.CompiledModel(model, "fp32")

    assert share.compiled_.get_property("INFERENCE_NUM_THREADS") == 1
    assert share.compiled_.get_property("ENABLE_CPU_PINNING") is False
    assert whole.compiled_.get_property("ENABLE_CPU_PINNING") == runtime._core().get_property(
        "CPU", "ENABLE_CPU_PINNING"
    )


# --- GeM pooling (issue 24) -------------------------------------------------------------


def test_gem_pooling_in_openvino_equals_numpy_gem():
    import openvino as ov

    from snaplook._keras import gem_pooling, import_keras
    from snaplook.postprocess import GEM_EPS, gem_pool

    keras = import_keras()
    inputs = keras.Input((7, 5, 16))
    model = keras.Model(inputs, gem_pooling(3.0, eps=GEM_EPS)(inputs))
    compiled = ov.Core().compile_model(
        runtime.convert_keras(model), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    rng = np.random.default_rng(0)
    # ReLU-like maps: zeros (clamped to eps) and positive activations of a wide range.
    maps = np.maximum(rng.normal(0.5, 1.5, (4, 7, 5, 16)), 0).astype(np.float32)

    got = compiled(maps)[0]

    assert got.shape == (4, 16)
    np.testing.assert_allclose(got, gem_pool(maps, p=3.0), rtol=1e-5, atol=1e-5)


def test_gem_embedder_openvino_matches_keras_and_records_p(
    photos: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import shared_model

    # The real build_model (the module's stand-in knows no gem_p), and a cache of its own.
    monkeypatch.setattr(features, "build_model", shared_model._REAL_BUILD_MODEL)
    monkeypatch.setenv(features.CACHE_DIR_ENV, str(tmp_path))
    # ResNet50: a random MobileNetV2's activations (~1e-11) all fall under GeM's clamp, so
    # its GeM features are constant and would compare nothing.
    backbone = "resnet50"
    keras_gem = Embedder(backbone, weights="random", pooling="gem", runtime="keras")
    ov_gem = Embedder(backbone, weights="random", pooling="gem", runtime="openvino")

    reference, _ = embed_images(photos, keras_gem)
    fast, _ = embed_images(photos, ov_gem)
    keras_avg = Embedder(backbone, weights="random", pooling="avg", runtime="keras")
    avg, _ = embed_images(photos[:1], keras_avg)

    assert fast.shape == (3, 2048)
    assert _max_relative_diff(fast[:1], fast[1:2]).max() > 1e-2  # not constant features
    assert _max_relative_diff(fast, reference).max() <= 1e-4
    assert _max_relative_diff(fast[:1], avg).max() > 1e-2  # GeM is not average pooling
    assert ov_gem.identity()["pooling"] == "gem" and ov_gem.identity()["gem_p"] == 3.0
    assert "gem_p" not in Embedder(weights="random", pooling="avg").identity()
    assert f"{backbone}-random0-" in ov_gem.ir_path().name
    assert "-224-gem3-" in ov_gem.ir_path().name
    with pytest.raises(SnaplookError, match="--gem-p must be a positive number"):
        Embedder(weights="random", pooling="gem", gem_p=0)
