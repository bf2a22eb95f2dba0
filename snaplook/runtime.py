"""The OpenVINO runtime: converted-model cache, explicit precision (fp32, bf16, int8), inference.

A Keras backbone is converted once to OpenVINO IR (``.xml`` + ``.bin``) and cached; int8
models are quantized once with NNCF on a seeded sample of the user's own images and cached
too. Every compile names its precision: OpenVINO would otherwise run bf16 on AMX CPUs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import random
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snaplook.errors import SnaplookError
from snaplook.options import PRECISIONS
from snaplook.transform_utils import CAFFE_BGR_MEAN

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

#: Images of the gallery an int8 model is calibrated on (a seeded sample; all if fewer).
CALIBRATION_IMAGES = 128
#: Overrides the CPU flags read from /proc/cpuinfo (space-separated), to simulate a CPU.
CPU_FLAGS_ENV = "SNAPLOOK_CPU_FLAGS"
#: CPU flags that give OpenVINO native bf16 arithmetic (AMX tiles or AVX-512 BF16 dot products).
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
#: OpenVINO's names for the precisions it is asked to compute in.
_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (lower case), from ``$SNAPLOOK_CPU_FLAGS`` or /proc/cpuinfo.

    Empty when neither tells (not Linux); callers then ask OpenVINO.
    """
    env = os.environ.get(CPU_FLAGS_ENV)
    if env is not None:
        return frozenset(env.lower().split())
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].lower().split())
    except OSError:
        pass
    return frozenset()


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def bf16_support() -> str | None:
    """How this CPU computes bf16 natively ("amx_bf16" or "avx512_bf16"), or None.

    Reads :func:`cpu_flags`; where they are unknown (not Linux, no override), OpenVINO's
    ``OPTIMIZATION_CAPABILITIES`` decides.
    """
    flags = cpu_flags()
    if flags:
        return next((f for f in BF16_FLAGS if f in flags), None)
    return (
        "openvino" if "BF16" in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES") else None
    )


def resolve_precision(precision: str, runtime: str) -> str:
    """The precision a run computes in: "fp32", "bf16" or "int8".

    Args:
        precision: one of :data:`PRECISIONS`.
        runtime: the resolved runtime, "openvino" or "keras" (fp32 only).

    Raises:
        SnaplookError: an unknown precision; bf16 on a CPU without native bf16; bf16 or
            int8 with the Keras runtime.
    """
    if precision not in PRECISIONS:
        raise SnaplookError(
            f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}."
        )
    if precision == "auto":
        return "bf16" if runtime == "openvino" and bf16_support() else "fp32"
    if precision != "fp32" and runtime != "openvino":
        raise SnaplookError(
            f"--precision {precision} needs the OpenVINO runtime, not {runtime}; drop "
            "--runtime keras (and SNAPLOOK_RUNTIME=keras) or use --precision fp32."
        )
    if precision == "bf16" and not bf16_support():
        raise SnaplookError(
            f"--precision bf16 needs a CPU with AMX or AVX512-BF16, and this one "
            f"({cpu_model()}) has neither; use --precision fp32 (exact) or int8."
        )
    return precision


def openvino_version() -> str:
    """The installed OpenVINO version (part of every cached model's name)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("openvino")
    except PackageNotFoundError:  # pragma: no cover - a source build of OpenVINO
        import openvino

        return openvino.get_version().split("-")[0]


def openvino_available() -> bool:
    """Whether the ``openvino`` package can be imported."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


_CORE: Any = None


def _core() -> Any:
    global _CORE
    if _CORE is None:
        import openvino as ov

        _CORE = ov.Core()
    return _CORE


def ir_path(cache_dir: Path, stem: str, stored: str) -> Path:
    """``<cache_dir>/<stem>-<stored>-ov<version>.xml``: one file per model, precision, OpenVINO.

    ``stored`` is the precision of the weights in the IR: "fp32" (compiled as fp32 or
    bf16) or "int8-<calibration digest>".
    """
    return cache_dir / f"{stem}-{stored}-ov{openvino_version()}.xml"


def read_cached_ir(path: Path) -> Any | None:
    """The cached IR at ``path`` (``.xml`` + ``.bin``), or None if absent or unreadable.

    An unreadable pair (truncated, from a crashed writer) is reported with a warning and
    ignored, so the caller builds it again.
    """
    if not path.is_file():
        return None
    try:
        return _core().read_model(str(path))
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses with C++ text
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        logger.warning(
            "cached OpenVINO model %s is unreadable (%s); building it again", path, first
        )
        return None


def save_ir_atomic(model: Any, path: Path) -> Path:
    """Write ``model`` as ``path`` (.xml) + its .bin without ever exposing half a pair.

    The pair is saved under temporary names, then the .bin and last the .xml are renamed
    into place: an .xml on disk always has its finished .bin beside it.
    """
    import openvino as ov

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.xml")
    try:
        ov.save_model(model, str(tmp), compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp.with_suffix(".bin")):
            leftover.unlink(missing_ok=True)
    return path


def convert_keras(model: Any) -> Any:
    """Convert a Keras model (TensorFlow backend) with its weights to an OpenVINO model."""
    import openvino as ov

    try:
        with warnings.catch_warnings():
            # Keras warns that the converter's traced call passes a tuple, not a tensor.
            warnings.filterwarnings("ignore", message="The structure of `inputs`")
            return ov.convert_model(model)
    except Exception as exc:
        raise SnaplookError(
            f"OpenVINO {openvino_version()} could not convert the Keras model "
            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}); "
            "run with --runtime keras."
        ) from exc


#: The ``transform_utils.PREPROCESSORS`` as OpenVINO preprocessing steps, computed in
#: float32 as ``(x - mean) / scale`` per channel: (swap RGB to BGR first, mean, scale), the
#: means and scales in the channel order after the swap (BGR for caffe).
_PREPROCESSING = {
    "caffe": (True, CAFFE_BGR_MEAN, None),
    "torch": (
        False,
        (0.485 * 255, 0.456 * 255, 0.406 * 255),
        (0.229 * 255, 0.224 * 255, 0.225 * 255),
    ),
    "tf": (False, (127.5,) * 3, (127.5,) * 3),
    "none": (False, None, None),
    "lite": (False, (127.0,) * 3, (128.0,) * 3),
}


def with_preprocessing(model: Any, kind: str) -> Any:
    """``model`` taking RGB uint8 images (n, s, s, 3), with the preprocessing ``kind`` of
    :data:`snaplook.transform_utils.PREPROCESSORS` compiled into the graph.

    OpenVINO then converts, swaps and normalises the pixels on its own threads, in the same
    pass that feeds the first layer, instead of NumPy writing a float32 copy of every batch
    on the Python thread (about 0.4 ms an image at 224 px, 1-2% of the CPU at fp32 and
    more at int8). The model and its cached IR keep their float32 input; this is applied
    at every compile and costs milliseconds.
    """
    import openvino as ov
    from openvino.preprocess import PrePostProcessor

    swap, mean, scale = _PREPROCESSING[kind]
    ppp = PrePostProcessor(model)
    ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
    ppp.input().model().set_layout(ov.Layout("NHWC"))
    steps = ppp.input().preprocess().convert_element_type(ov.Type.f32)
    if swap:
        steps.reverse_channels()
    if mean is not None:
        steps.mean(list(mean))
    if scale is not None:
        steps.scale(list(scale))
    return ppp.build()


def sample_calibration(paths: Sequence[str | Path], *, seed: int, n: int = CALIBRATION_IMAGES):
    """A seeded sample of up to ``n`` of ``paths`` (sorted first, so order does not matter).

    Returns:
        list of Path, sorted.
    """
    unique = sorted({Path(p) for p in paths})
    if len(unique) <= n:
        return unique
    return sorted(random.Random(seed).sample(unique, n))


def calibration_digest(paths: Sequence[Path]) -> str:
    """SHA-256 (24 hex) over the contents of the calibration images: the int8 model's key.

    Unreadable files count by name only, so a sample is still keyed (they are skipped
    when calibrating).
    """
    from snaplook.io_utils import file_sha256

    h = hashlib.sha256()
    for p in paths:
        try:
            h.update(file_sha256(p).encode())
        except OSError:
            h.update(f"missing:{p.name}".encode())
    return h.hexdigest()[:24]


def check_calibration(record: dict[str, Any], target: Path) -> None:
    """Refuse to quantize from calibration images that differ from those ``record`` names.

    Args:
        record: ``{"sha256", "images", "seed"}`` as an index's ``meta.json`` records it.
        target: the cached int8 model that is missing, for the message.

    Raises:
        SnaplookError: the images are missing or changed (another int8 model would result).
    """
    images = [Path(p) for p in record.get("images", [])]
    if images and calibration_digest(images) == record.get("sha256"):
        return
    raise SnaplookError(
        f"the int8 model {target.name} is not in the cache ({target.parent}) and the "
        f"{len(images)} gallery images it was calibrated on are missing or changed; rebuild "
        "the index, or copy that .xml/.bin pair from the machine that built it."
    )


def quantize_int8(model: Any, images: Sequence[np.ndarray]) -> Any:
    """Post-training int8 quantization (NNCF, default preset) of an OpenVINO model.

    Args:
        model: the fp32 OpenVINO model.
        images: preprocessed calibration inputs, each ndarray of shape (1, s, s, 3) float32.

    Raises:
        SnaplookError: no calibration images.
    """
    if not images:
        raise SnaplookError(
            "--precision int8 needs readable gallery images to calibrate on; none could be read."
        )
    import nncf

    nncf_logger = logging.getLogger("nncf")
    level = nncf_logger.level
    nncf_logger.setLevel(logging.WARNING)  # per-step INFO lines
    captured = io.StringIO()
    try:
        # NNCF draws rich progress bars on stdout, which belongs to the CLI's results.
        with contextlib.redirect_stdout(captured):
            return nncf.quantize(
                model,
                nncf.Dataset(list(images)),
                subset_size=len(images),
                fast_bias_correction=True,
            )
    finally:
        nncf_logger.setLevel(level)
        logger.debug("NNCF output: %s", captured.getvalue()[-2000:])


#: Images per inference request, per precision: large enough to keep a stream's cores
#: busy inside a layer, small enough that two requests overlap Python's work between batches
#: (benchmarks/run.py times 4, 8 and 16).
CHUNK_IMAGES = {"fp32": 8, "bf16": 16, "int8": 16}


class PendingFeatures:
    """Features of a batch queued by :meth:`CompiledModel.start`; :meth:`result` waits."""

    done = False  # still running (``features._Ready`` is the finished twin)

    def __init__(self, model: CompiledModel, n_images: int) -> None:
        self.model_ = model
        self.n_images = n_images
        self.parts_: dict[int, np.ndarray] = {}
        self.errors_: list[str] = []

    def result(self) -> np.ndarray:
        """Wait for the batch; ndarray of shape (n, d), float32.

        Raises:
            SnaplookError: OpenVINO failed on the batch (the message names the error).
        """
        import numpy as np

        self.model_._collect_all(self)
        if self.errors_:
            raise SnaplookError(f"OpenVINO inference failed: {self.errors_[0]}")
        return np.concatenate([self.parts_[s] for s in sorted(self.parts_)])


class CompiledModel:
    """A backbone compiled for the CPU at one precision, run as asynchronous requests.

    Compiled with OpenVINO's throughput hint: the cores are split into streams (OpenVINO
    picks how many; two on a 2-core CPU) that each run one request at a time on their own
    threads, so a decoding thread that takes a core stalls one stream, not every core at a
    barrier. Two requests per stream take turns: while one runs, the next chunk of images
    is queued on the other, so no stream waits for Python. Not thread-safe (one caller).

    Args:
        model: an OpenVINO model with input (n, s, s, 3) and output (n, d): RGB uint8
            images after :func:`with_preprocessing`, float32 before.
        precision: "fp32", "bf16" or "int8" (int8 models compute their non-quantized
            layers in f32).
        threads: inference threads, default=the CPUs this process may use.
    """

    def __init__(self, model: Any, precision: str, *, threads: int | None = None) -> None:
        self.precision = precision
        self.chunk = CHUNK_IMAGES[precision]
        config = {
            # Explicit, always: on AMX CPUs OpenVINO's default hint is bf16.
            "INFERENCE_PRECISION_HINT": _HINTS[precision],
            # Streams of a few cores each, every stream with its own queue of requests:
            # measured steadier and faster than one stream over all cores when decoding
            # shares the CPU (benchmarks/run.py, row a).
            "PERFORMANCE_HINT": "THROUGHPUT",
            "INFERENCE_NUM_THREADS": threads or cpu_threads(),
        }
        if config["INFERENCE_NUM_THREADS"] < _usable_cpus():
            # Fewer threads than cores means other processes share them (Ray actors):
            # OpenVINO would pin every such process's threads to the same first cores.
            config["ENABLE_CPU_PINNING"] = False
        self.compiled_ = _core().compile_model(model, "CPU", config)
        self.streams = max(1, int(self.compiled_.get_property("NUM_STREAMS")))
        n_requests = 2 * max(self.streams, int(self.compiled_.get_property(
            "OPTIMAL_NUMBER_OF_INFER_REQUESTS")))  # fmt: skip
        self.requests_ = [self.compiled_.create_infer_request() for _ in range(n_requests)]
        self.owners_: list[tuple[PendingFeatures, int] | None] = [None] * len(self.requests_)
        self.turn_ = 0

    def _collect(self, i: int) -> None:
        import numpy as np

        owner, self.owners_[i] = self.owners_[i], None
        if owner is None:
            return
        pending, start = owner
        try:
            self.requests_[i].wait()
            out = np.array(self.requests_[i].get_output_tensor(0).data, dtype=np.float32)
            pending.parts_[start] = out.reshape(out.shape[0], -1)
        except Exception as exc:  # OpenVINO's RuntimeError with C++ text
            pending.errors_.append(_message(exc))

    def _collect_all(self, pending: PendingFeatures) -> None:
        for i, owner in enumerate(self.owners_):
            if owner is not None and owner[0] is pending:
                self._collect(i)

    def start(self, batch: np.ndarray, *, chunk: int | None = None) -> PendingFeatures:
        """Queue a batch (n, s, s, 3) of the model's input type in chunks of ``chunk`` images.

        Returns when its last chunk is queued (after the chunks before it have run, two
        per stream at most in flight), with a :class:`PendingFeatures` whose ``result()``
        waits. A batch smaller than a chunk per stream is split across the streams, so a
        few query images still use every core.
        """
        import numpy as np

        chunk = chunk or min(self.chunk, max(1, -(-len(batch) // self.streams)))
        pending = PendingFeatures(self, len(batch))
        for start in range(0, len(batch), chunk):
            i, self.turn_ = self.turn_, (self.turn_ + 1) % len(self.requests_)
            self._collect(i)  # the request's previous chunk (of this or an earlier batch)
            part = np.ascontiguousarray(batch[start : start + chunk])
            try:
                self.requests_[i].start_async({0: part})
            except Exception as exc:  # a shape the model cannot take, for one
                pending.errors_.append(_message(exc))
                continue
            self.owners_[i] = (pending, start)
        return pending

    def infer(self, batch: np.ndarray, *, chunk: int | None = None) -> np.ndarray:
        """Features of a batch (n, s, s, 3) of the model's input type: (n, d) float32."""
        return self.start(batch, chunk=chunk).result()


def _message(exc: BaseException) -> str:
    """The informative line of an OpenVINO exception (its first names the C++ source file)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Exception from", "Check '"))]
    return (useful or lines or [type(exc).__name__])[0][:300]


def cpu_threads() -> int:
    """Inference threads by default: the CPUs this process may run on (a Ray actor sets
    its own share)."""
    return _usable_cpus()


def _usable_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def load_or_build_ir(
    path: Path,
    build: Callable[[], Any],
    *,
    what: str,
    level: int = logging.INFO,
) -> Any:
    """The OpenVINO model cached at ``path``, or ``build()`` saved there first.

    Args:
        path: the IR's .xml path (see :func:`ir_path`).
        build: makes the model when the cache has none (convert or quantize).
        what: how the log line names the one-time work ("converting resnet50").
        level: of that log line: info for a conversion (seconds, shown under --verbose),
            warning for slower work the user should expect (int8 quantization).
    """
    model = read_cached_ir(path)
    if model is not None:
        logger.debug("loaded cached OpenVINO model %s", path)
        return model
    logger.log(level, "%s for OpenVINO, once for these settings; cached at %s", what, path)
    model = build()
    save_ir_atomic(model, path)
    return model
