"""Keras for snaplook: a quiet import (TensorFlow backend), Keras' weights cache and the
GeM pooling layer.

Used by :mod:`snaplook.features` and :mod:`snaplook.lite0`; knows no backbone table (the
callers name the file, where it comes from and its MD5).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from snaplook.errors import SnaplookError

logger = logging.getLogger(__name__)

#: Where Keras' application weights are published.
KERAS_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"


def keras_cache_dir() -> Path:
    """Folder where Keras caches downloaded weights (``$KERAS_HOME/models``)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def _quiet_tensorflow() -> None:
    # TensorFlow prints C++ info lines (CUDA probing, CPU features) at import; a CLI user
    # should see only snaplook's own messages.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def import_keras() -> Any:
    """Import Keras (TensorFlow backend) quietly and return the module."""
    _quiet_tensorflow()
    if "keras" in sys.modules:
        return sys.modules["keras"]
    with _native_stderr_silenced():
        import keras
        import tensorflow as tf

        # Device discovery prints absl/CUDA probing lines ("failed call to cuInit") from
        # C++ straight to fd 2, ignoring TF_CPP_MIN_LOG_LEVEL; do it here, silenced.
        tf.config.list_physical_devices()
    return keras


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null while native code prints its start-up chatter.

    Python exceptions still propagate; only C/C++ writes to stderr are dropped. Off with
    SNAPLOOK_DEBUG=1, or when stderr is not a real file (pytest capture, CliRunner).
    """
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        fd = -1
    if fd < 0 or os.environ.get("SNAPLOOK_DEBUG"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, fd)
        os.close(saved)


def cached_weights(file_name: str) -> Path | None:
    """Path of ``file_name`` in Keras' weights cache, or None if it is not there."""
    path = keras_cache_dir() / file_name
    return path if path.is_file() else None


def fetch_weights(file_name: str, *, origin: str | None, md5: str | None, name: str) -> Path:
    """Return the path of ``file_name`` in Keras' cache, downloading it once if missing.

    Args:
        file_name: the file's name in the cache.
        origin: URL to download it from; None: ``KERAS_WEIGHTS_URL + file_name``.
        md5: MD5 the download is checked against (None: not checked).
        name: the backbone, for messages.

    Raises:
        SnaplookError: the download failed (offline); the message says where to put the
            file and how to pass ``--weights PATH``.
    """
    cached = cached_weights(file_name)
    if cached is not None:
        return cached
    keras = import_keras()
    url = origin or f"{KERAS_WEIGHTS_URL}{file_name}"
    logger.info(
        "ImageNet weights for %s are not cached: downloading them once from %s into %s",
        name,
        url,
        keras_cache_dir(),
    )
    # Keras prints "Downloading data from ..." and a progress bar on stdout, which holds
    # only results; they go to the log (shown with --verbose) instead.
    keras_says = io.StringIO()
    # Keras falls back to /tmp/.keras when the cache folder does not exist yet; create it so
    # the file lands where cached_weights() and the messages look.
    with contextlib.suppress(OSError):
        keras_cache_dir().mkdir(parents=True, exist_ok=True)
    try:
        # cache_dir given: Keras reads $KERAS_HOME only at import (and may fall back to
        # /tmp/.keras); the file must land where keras_cache_dir() and the messages say.
        with contextlib.redirect_stdout(keras_says):
            path = keras.utils.get_file(
                file_name,
                url,
                cache_subdir="models",
                file_hash=md5,
                cache_dir=str(keras_cache_dir().parent),
            )
    except Exception as exc:  # Keras raises a bare Exception on any fetch failure
        raise SnaplookError(_offline_message(file_name, origin, name, exc)) from exc
    finally:
        for line in keras_says.getvalue().replace("\r", "\n").splitlines():
            if line.strip():
                logger.debug("keras: %s", line.strip())
    logger.info("wrote %s", path)
    return Path(path)


def _offline_message(file_name: str, origin: str | None, name: str, exc: BaseException) -> str:
    target = keras_cache_dir() / file_name
    where = origin or "the Keras applications release"
    return (
        f"could not fetch the ImageNet weights for {name} ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0] if str(exc) else 'no network?'}). Download {where} on a "
        f"machine with network access and copy it to {target}, or pass --weights PATH "
        "(or --weights random for a pipeline test without meaningful results)."
    )


def gem_pooling(p: float, *, eps: float, name: str = "gem_pool") -> Any:
    """A Keras layer pooling (n, h, w, c) feature maps to (n, c) by generalised mean.

    ``mean(max(x, eps) ** p) ** (1 / p)`` over h and w (Radenovic et al. 2018); p=1 is
    average pooling, large p tends to max pooling. Built from Keras ops, so OpenVINO
    converts it into the graph with the backbone.
    """
    keras = import_keras()
    ops = keras.ops

    class GeMPooling2D(keras.layers.Layer):
        def call(self, x: Any) -> Any:
            powered = ops.power(ops.maximum(x, eps), p)
            return ops.power(ops.mean(powered, axis=(1, 2)), 1.0 / p)

        def compute_output_shape(self, input_shape: Any) -> Any:
            return (input_shape[0], input_shape[3])

    return GeMPooling2D(name=name)
