"""Learn a retrieval embedding on top of frozen backbone features: a small head.

The head is a small Keras model on cached backbone features (L2 normalisation, centring
on the training mean, an optional hidden layer, a linear projection, L2 normalisation),
trained with batch-hard triplet loss or Proxy-Anchor loss over P items x K images per
batch, validated every epoch on held-out training items by Recall@1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snaplook import __version__
from snaplook.datasets import Sample, Split, check_crop, load_split, read_bbox_file, resolve_bbox
from snaplook.errors import SnaplookError
from snaplook.features import Embedder, embed_cached, is_random_weights
from snaplook.io_utils import timestamp
from snaplook.options import (
    DEFAULT_BACKBONE,
    DEFAULT_BATCH,
    DEFAULT_BATCH_SIZE,
    DEFAULT_CACHE_DIR,
    DEFAULT_DIM,
    DEFAULT_EPOCHS,
    DEFAULT_HEADS_DIR,
    DEFAULT_HIDDEN,
    DEFAULT_LOSS,
    DEFAULT_LR,
    DEFAULT_PATIENCE,
    DEFAULT_SEED,
    DEFAULT_VAL_FRACTION,
    DEFAULT_WEIGHTS,
    LOSSES,
)
from snaplook.results import describe_weights

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

PROXY_LR_SCALE = 100.0
#: Fewer held-out items than this make validation Recall@1 too coarse to pick an epoch
#: (2 items can score 100% at epoch 1 and stop training early): a warning says so.
MIN_VAL_ITEMS = 10
#: Triplet margin on Euclidean distances between unit vectors (range 0..2).
DEFAULT_MARGIN = 0.2
#: Proxy-Anchor scale and margin (Kim et al. 2020 defaults).
DEFAULT_ALPHA = 32.0
DEFAULT_DELTA = 0.1
HEAD_WEIGHTS = "head.weights.h5"
HEAD_JSON = "head.json"
HEAD_FORMAT_VERSION = 1


# --------------------------------------------------------------------------- losses


def _tf() -> Any:
    from snaplook._keras import import_keras

    import_keras()  # quiet TensorFlow's start-up lines
    import tensorflow as tf

    return tf


def _tf_graph() -> Any:
    # Called while tf.function traces the losses: no os.environ access (AutoGraph warns).
    import tensorflow as tf

    return tf


def pairwise_distances(embeddings: Any) -> Any:
    """Euclidean distances between all rows of ``embeddings``.

    Args:
        embeddings: tensor or ndarray of shape (n, d).

    Returns:
        tensor of shape (n, n), float32; the diagonal is 0.
    """
    tf = _tf_graph()
    e = tf.convert_to_tensor(embeddings, dtype=tf.float32)
    sq = tf.reduce_sum(e * e, axis=1)
    d2 = sq[:, None] - 2.0 * tf.matmul(e, e, transpose_b=True) + sq[None, :]
    d2 = tf.maximum(d2, 0.0)
    # sqrt has an infinite gradient at 0: take it only where the distance is positive.
    zero = tf.cast(d2 <= 1e-12, tf.float32)
    d = tf.sqrt(d2 + zero * 1e-12) * (1.0 - zero)
    return tf.linalg.set_diag(d, tf.zeros(tf.shape(d)[0]))


def mine_batch_hard(distances: Any, labels: Any) -> tuple[Any, Any, Any, Any]:
    """For each anchor, the hardest positive (farthest same label) and hardest negative.

    Args:
        distances: tensor or ndarray of shape (n, n), pairwise distances.
        labels: tensor or ndarray of shape (n,), integer labels.

    Returns:
        (positive_index, positive_distance, negative_index, negative_distance), each of
        shape (n,). An anchor without a positive gets itself (distance 0); one without a
        negative gets itself and distance +inf-like (1e9), so it adds no loss.
    """
    tf = _tf_graph()
    d = tf.convert_to_tensor(distances, dtype=tf.float32)
    y = tf.convert_to_tensor(labels)
    n = tf.shape(d)[0]
    same = tf.equal(y[:, None], y[None, :])
    not_self = tf.logical_not(tf.eye(n, dtype=tf.bool))
    pos_mask = tf.logical_and(same, not_self)
    neg_mask = tf.logical_not(same)
    big = tf.constant(1e9, tf.float32)
    pos_d = tf.where(pos_mask, d, -1.0)
    pos_i = tf.argmax(pos_d, axis=1, output_type=tf.int32)
    has_pos = tf.reduce_any(pos_mask, axis=1)
    neg_d = tf.where(neg_mask, d, big)
    neg_i = tf.argmin(neg_d, axis=1, output_type=tf.int32)
    has_neg = tf.reduce_any(neg_mask, axis=1)
    self_i = tf.range(n, dtype=tf.int32)
    pos_i = tf.where(has_pos, pos_i, self_i)
    neg_i = tf.where(has_neg, neg_i, self_i)
    pos_dist = tf.where(has_pos, tf.reduce_max(pos_d, axis=1), 0.0)
    neg_dist = tf.where(has_neg, tf.reduce_min(neg_d, axis=1), big)
    return pos_i, pos_dist, neg_i, neg_dist


def triplet_batch_hard_loss(embeddings: Any, labels: Any, *, margin: float = DEFAULT_MARGIN) -> Any:
    """Batch-hard triplet loss (Hermans et al. 2017): mean of relu(d(a,p) - d(a,n) + margin).

    Each anchor is paired with its hardest positive and hardest negative in the batch
    (see :func:`mine_batch_hard`).

    Args:
        embeddings: tensor of shape (n, d) (the head's unit vectors).
        labels: tensor of shape (n,), integer item labels.
        margin: float, default=0.2.

    Returns:
        scalar tensor.
    """
    tf = _tf_graph()
    _, pos, _, neg = mine_batch_hard(pairwise_distances(embeddings), labels)
    return tf.reduce_mean(tf.nn.relu(pos - neg + margin))


def proxy_anchor_loss(
    embeddings: Any,
    labels: Any,
    proxies: Any,
    *,
    alpha: float = DEFAULT_ALPHA,
    delta: float = DEFAULT_DELTA,
) -> Any:
    """Proxy-Anchor loss (Kim et al., CVPR 2020).

    ``1/|P+| sum_{p in P+} log(1 + sum_{x in X+_p} exp(-alpha (s(x,p) - delta)))
    + 1/|P| sum_{p in P} log(1 + sum_{x in X-_p} exp(alpha (s(x,p) + delta)))``, where
    s is cosine similarity, P all proxies, P+ the proxies with a positive in the batch.

    Args:
        embeddings: tensor or ndarray of shape (n, d).
        labels: tensor or ndarray of shape (n,), integer labels in [0, n_proxies).
        proxies: tensor, variable or ndarray of shape (n_proxies, d).
        alpha: float, default=32.
        delta: float, default=0.1.

    Returns:
        scalar tensor.
    """
    tf = _tf_graph()
    e = tf.math.l2_normalize(tf.convert_to_tensor(embeddings, dtype=tf.float32), axis=1)
    p = tf.math.l2_normalize(tf.convert_to_tensor(proxies, dtype=tf.float32), axis=1)
    sim = tf.matmul(e, p, transpose_b=True)  # (n, C)
    pos = tf.one_hot(tf.convert_to_tensor(labels), tf.shape(p)[0], dtype=tf.float32)
    neg = 1.0 - pos
    pos_sum = tf.reduce_sum(tf.exp(-alpha * (sim - delta)) * pos, axis=0)
    neg_sum = tf.reduce_sum(tf.exp(alpha * (sim + delta)) * neg, axis=0)
    with_pos = tf.cast(tf.reduce_sum(pos, axis=0) > 0, tf.float32)
    n_pos = tf.maximum(tf.reduce_sum(with_pos), 1.0)
    pos_term = tf.reduce_sum(tf.math.log1p(pos_sum) * with_pos) / n_pos
    neg_term = tf.reduce_mean(tf.math.log1p(neg_sum))
    return pos_term + neg_term


# --------------------------------------------------------------------------- sampling


def sample_pk_batches(
    labels: Sequence[int] | np.ndarray,
    *,
    p: int,
    k: int,
    n_batches: int,
    seed: int = DEFAULT_SEED,
) -> np.ndarray:
    """Draw batches of P distinct items x K images each (seeded).

    Items with fewer than K images are drawn with replacement; the others without.

    Args:
        labels: ndarray of shape (n,), integer item label of each image.
        p: items per batch (at most the number of distinct labels).
        k: images per item.
        n_batches: batches to draw.
        seed: int, default=0.

    Returns:
        ndarray of shape (n_batches, p * k), int64 row indices into ``labels``, grouped
        item by item (K consecutive rows share a label).
    """
    import numpy as np

    labels = np.asarray(labels)
    items, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if p > len(items):
        raise SnaplookError(f"P={p} items per batch, but only {len(items)} items to draw from.")
    rng = np.random.default_rng(seed)
    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    width = int(counts.max())
    # (n_items, width) table of row indices, padded with -1.
    table = np.full((len(items), width), -1, dtype=np.int64)
    col = np.arange(len(order)) - np.repeat(starts, counts)
    table[inverse[order], col] = order
    chosen = np.stack([rng.choice(len(items), size=p, replace=False) for _ in range(n_batches)])
    flat = chosen.reshape(-1)
    keys = rng.random((len(flat), width))
    keys[table[flat] < 0] = np.inf
    picks = np.argsort(keys, axis=1)[:, :k] if width >= k else np.zeros((len(flat), k), int)
    short = counts[flat] < k
    if short.any():
        picks[short] = (rng.random((int(short.sum()), k)) * counts[flat][short, None]).astype(int)
    rows = table[flat[:, None], picks]
    return rows.reshape(n_batches, p * k)


# --------------------------------------------------------------------------- head


def _build_model(input_dim: int, dim: int, hidden: int, mean: np.ndarray | None) -> Any:
    keras = _keras()
    import numpy as np

    class Center(keras.layers.Layer):
        """Subtract a fixed mean (the training features' mean), stored with the weights."""

        def build(self, input_shape: Any) -> None:
            self.mean = self.add_weight(
                shape=(input_shape[-1],), initializer="zeros", trainable=False, name="mean"
            )

        def call(self, x: Any) -> Any:
            return x - self.mean

    inputs = keras.Input(shape=(input_dim,), name="features")
    x = keras.layers.UnitNormalization(name="l2_in")(inputs)
    center = Center(name="center")
    x = center(x)
    # Re-normalising after centring (the "centre + L2" trick) spreads the features that
    # a post-ReLU backbone packs into one orthant.
    x = keras.layers.UnitNormalization(name="l2_centered")(x)
    if hidden:
        x = keras.layers.Dense(hidden, activation="relu", name="hidden")(x)
    x = keras.layers.Dense(dim, name="projection")(x)
    outputs = keras.layers.UnitNormalization(name="l2_out")(x)
    model = keras.Model(inputs, outputs, name="snaplook_head")
    if mean is not None:
        center.mean.assign(np.asarray(mean, dtype=np.float32))
    return model


def _keras() -> Any:
    from snaplook._keras import import_keras

    return import_keras()


def _l2(x: np.ndarray) -> np.ndarray:
    from snaplook.transform_utils import l2_normalize

    return l2_normalize(x)


@dataclass
class EpochRecord:
    """One training epoch: mean loss, validation Recall@1, wall time, whether it is the best."""

    epoch: int
    loss: float
    val_recall_at_1: float | None
    seconds: float
    best: bool = False


@dataclass
class Head:
    """A trained embedding head: frozen-backbone features in, unit ``dim``-d vectors out.

    Build one with :func:`fit_head` or :meth:`Head.load`.

    Attributes:
        config: architecture and training settings (input_dim, dim, hidden, loss, ...).
        info: training record (best epoch, validation metrics, counts, source features).
        history: one :class:`EpochRecord` per epoch run.
        name: a short name (the folder name once saved).
    """

    config: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)
    history: list[EpochRecord] = field(default_factory=list)
    name: str = "head"
    model_: Any = field(default=None, repr=False)

    @property
    def input_dim(self) -> int:
        return int(self.config["input_dim"])

    @property
    def output_dim(self) -> int:
        return int(self.config["dim"])

    def transform(self, features: np.ndarray, *, batch_size: int = 8192) -> np.ndarray:
        """Map backbone features to the learned embedding.

        Args:
            features: ndarray of shape (n, input_dim), raw or normalised backbone features.
            batch_size: rows per forward pass.

        Returns:
            ndarray of shape (n, dim), float32, unit rows.

        Raises:
            SnaplookError: ``features`` of another dimension than the head was trained on.
        """
        import numpy as np

        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.input_dim:
            raise SnaplookError(
                f"head {self.name!r} takes {self.input_dim}-d features "
                f"({self.config.get('source', {}).get('backbone', 'its backbone')}), got "
                f"shape {features.shape}; use the backbone the head was trained on."
            )
        if len(features) == 0:
            return np.zeros((0, self.output_dim), dtype=np.float32)
        out = [
            np.asarray(self.model_(features[i : i + batch_size], training=False))
            for i in range(0, len(features), batch_size)
        ]
        return np.concatenate(out).astype(np.float32)

    def weights_sha256(self) -> str:
        """SHA-256 of the head's weight values (independent of the HDF5 container)."""
        import numpy as np

        digest = hashlib.sha256()
        for w in self.model_.get_weights():
            digest.update(np.ascontiguousarray(w, dtype=np.float32).tobytes())
        return digest.hexdigest()

    def identity(self) -> dict[str, Any]:
        """What an index records about the head: name, weights digest, dims, loss."""
        return {
            "name": self.name,
            "sha256": self.weights_sha256(),
            "input_dim": self.input_dim,
            "dim": self.output_dim,
            "loss": self.config.get("loss"),
        }

    def check_source(self, identity: dict[str, Any]) -> None:
        """Refuse features from another backbone, pooling, dimension or weights.

        Args:
            identity: an :meth:`Embedder.identity` (without a head).

        Raises:
            SnaplookError: naming the first setting that differs.
        """
        source = self.config.get("source") or {}
        if identity.get("feature_dim") != self.input_dim:
            raise SnaplookError(
                f"head {self.name!r} takes {self.input_dim}-d features, but backbone "
                f"{identity.get('backbone')!r} gives {identity.get('feature_dim')}-d; pass "
                f"--backbone {source.get('backbone', '?')} (the head's) or train a head for it."
            )
        for key in ("backbone", "pooling", "preprocessing", "input_size"):
            if key in source and source[key] != identity.get(key):
                raise SnaplookError(
                    f"head {self.name!r} was trained on {key}={source[key]!r} features, not "
                    f"{identity.get(key)!r}; use the head's settings or train a head for these."
                )
        want, got = source.get("weights") or {}, identity.get("weights") or {}
        if want and _weights_key(want) != _weights_key(got):
            raise SnaplookError(
                f"head {self.name!r} was trained on features from weights "
                f"{describe_weights(want, form='hash')}, not "
                f"{describe_weights(got, form='hash')}; pass the same --weights (and --seed) it "
                "was trained with."
            )

    def save(self, out: str | Path) -> Path:
        """Write ``head.weights.h5`` and ``head.json`` into the folder ``out`` (atomically).

        Returns:
            the folder.
        """
        from snaplook.io_utils import atomic_path, write_json_atomic

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.name = out.name
        with atomic_path(out / HEAD_WEIGHTS) as tmp:
            # Keras insists on the .weights.h5 suffix.
            tmp_named = tmp.with_name(tmp.name + ".weights.h5")
            self.model_.save_weights(str(tmp_named))
            tmp_named.replace(tmp)
        write_json_atomic(out / HEAD_JSON, self.to_json())
        return out

    def to_json(self) -> dict[str, Any]:
        """The content of ``head.json``."""
        return {
            "format_version": HEAD_FORMAT_VERSION,
            "snaplook_version": __version__,
            "name": self.name,
            "weights_sha256": self.weights_sha256(),
            **self.config,
            **self.info,
            "history": [vars(r) for r in self.history],
        }

    @classmethod
    def load(cls, path: str | Path) -> Head:
        """Load a head folder (or its ``head.json`` / ``head.weights.h5``).

        ``head.json`` is read through the input gate and its fields are checked;
        the weights file's declared datasets are checked against the dims in
        ``head.json`` (:func:`check_head_weights`) before Keras reads a byte of it.

        Raises:
            SnaplookError: missing or malformed files (one line naming the file and the
                field), a newer format, weights that do not fit the recorded architecture
                or whose digest changed.
        """
        from snaplook.io_utils import check_input

        path = Path(path)
        folder = path.parent if path.is_file() else path
        meta_path, weights_path = folder / HEAD_JSON, folder / HEAD_WEIGHTS
        for p in (meta_path, weights_path):
            if not p.is_file():
                raise SnaplookError(
                    f"{p} not found: --head takes a folder written by `snaplook train` "
                    f"(with {HEAD_JSON} and {HEAD_WEIGHTS})."
                )
        meta = _read_head_json(meta_path)
        input_dim, dim, hidden = meta["input_dim"], meta["dim"], meta["hidden"]
        check_input(weights_path, kind="head")
        model = _build_model(input_dim, dim, hidden, None)
        check_head_weights(weights_path, [tuple(w.shape) for w in model.weights])
        try:
            model.load_weights(str(weights_path))
        except Exception as exc:
            raise SnaplookError(
                f"cannot load {weights_path} into the head {meta_path} describes "
                f"({type(exc).__name__}); retrain the head."
            ) from exc
        config = {key: meta[key] for key in _CONFIG_KEYS if key in meta}
        info = {k: v for k, v in meta.items() if k not in _CONFIG_KEYS and k not in _NOT_INFO}
        history = [EpochRecord(**r) for r in meta.get("history", [])]
        head = cls(config=config, info=info, history=history, name=folder.name, model_=model)
        want = meta.get("weights_sha256")
        if want and head.weights_sha256() != want:
            raise SnaplookError(
                f"{weights_path} does not match {meta_path} (weights digest changed); "
                "retrain the head or restore both files together."
            )
        return head


#: The widest head snaplook loads: backbone features are at most 2048-d, heads narrower;
#: a larger dim in a crafted head.json would make Keras allocate gigabytes.
MAX_HEAD_DIM = 65_536
#: Most datasets a head's weights file may declare (the model has at most 5).
_MAX_H5_OBJECTS = 256


def _read_head_json(meta_path: Path) -> dict[str, Any]:
    """``head.json``, read through the input gate, with the fields :meth:`Head.load` uses
    checked (types and ranges).

    Raises:
        SnaplookError: one line naming the file and the first wrong field.
    """
    from snaplook.index import field_error, read_json_object

    fix = "retrain the head"
    meta = read_json_object(meta_path, fix=fix)
    version = meta.get("format_version")
    if type(version) is not int:
        raise SnaplookError(f"{meta_path} has no format_version; not a snaplook head.")
    if version > HEAD_FORMAT_VERSION:
        raise SnaplookError(
            f"{meta_path} has head format {version}, newer than this snaplook understands "
            f"({HEAD_FORMAT_VERSION}); upgrade snaplook."
        )
    for name, low in (("input_dim", 1), ("dim", 1), ("hidden", 0)):
        value = meta.get(name)
        if type(value) is not int or not low <= value <= MAX_HEAD_DIM:
            want = f"an integer from {low} to {MAX_HEAD_DIM}"
            raise field_error(meta_path, name, want, value, fix)
    for name, kind, want in (
        ("source", dict, "an object"),
        ("weights_sha256", str, "text"),
        ("loss", str, "text"),
        ("history", list, "a list"),
    ):
        if meta.get(name) is not None and not isinstance(meta[name], kind):
            raise field_error(meta_path, name, f"{want} or null", meta[name], fix)
    fields = {f.name for f in dataclasses.fields(EpochRecord)}
    for i, record in enumerate(meta.get("history") or []):
        if not isinstance(record, dict) or not set(record) <= fields or "epoch" not in record:
            raise field_error(meta_path, f"history[{i}]", "an epoch record", record, fix)
    return meta


def check_head_weights(path: Path, shapes: Sequence[tuple[int, ...]]) -> None:
    """Refuse a head weights file whose datasets are not exactly the model's weights.

    Reads only the HDF5 metadata (h5py), never the data: a crafted file that declares a
    huge dataset, or more datasets than the head has, is refused before Keras would read
    it into memory.

    Args:
        path: the ``head.weights.h5`` file.
        shapes: the shapes of the model's weights (from ``head.json``'s dims).

    Raises:
        SnaplookError: the file is not HDF5, or its datasets (count, shapes, float32
            dtype) differ from ``shapes``; one line naming the file.
    """
    import h5py
    import numpy as np

    found: list[tuple[int, ...]] = []
    odd: list[str] = []

    def visit(name: str, obj: Any) -> bool | None:
        if isinstance(obj, h5py.Dataset):
            found.append(tuple(int(n) for n in obj.shape))
            if obj.dtype != np.float32:
                odd.append(f"{name} holds {obj.dtype}")
        return True if len(found) > _MAX_H5_OBJECTS else None  # True stops the walk

    try:
        with h5py.File(path, "r") as fh:
            fh.visititems(visit)
    except (OSError, ValueError, RuntimeError) as exc:
        raise SnaplookError(f"{path}: not a readable HDF5 weights file; retrain the head.") from exc
    if odd or sorted(found) != sorted(tuple(s) for s in shapes):
        got = odd[0] if odd else f"{len(found)} arrays of shapes {sorted(found)[:6]}"
        raise SnaplookError(
            f"{path}: its weights ({got[:200]}) do not fit the head its head.json describes "
            f"({len(shapes)} float32 arrays of shapes {sorted(shapes)}); refusing to load it. "
            "Retrain the head or restore both files together."
        )


_CONFIG_KEYS = (
    "input_dim",
    "dim",
    "hidden",
    "loss",
    "epochs",
    "batch",
    "lr",
    "val_fraction",
    "seed",
    "patience",
    "margin",
    "alpha",
    "delta",
    "source",
)
_NOT_INFO = ("format_version", "snaplook_version", "name", "weights_sha256", "history")


def _weights_key(weights: dict[str, Any]) -> tuple[Any, ...]:
    if is_random_weights(weights):
        return ("random", weights.get("seed"))
    kind = weights.get("name")
    return (kind if kind != "file" else "imagenet-or-file", weights.get("sha256"))


def load_head(path: str | Path) -> Head:
    """Load a head written by :meth:`Head.save` (see :meth:`Head.load`)."""
    return Head.load(path)


# --------------------------------------------------------------------------- fitting


def recall_at_1_leave_one_out(features: np.ndarray, labels: Sequence[Any] | np.ndarray) -> float:
    """Share of rows whose nearest other row (cosine) has the same label.

    Computed by :func:`snaplook.metrics.evaluate_embeddings` (leave-one-out, its default
    pessimistic tie rule), so validation numbers mean what ``snaplook evaluate`` reports.

    Args:
        features: ndarray of shape (n, d).
        labels: ndarray of shape (n,).

    Returns:
        float in [0, 1] (0 when no row has another row of its label).
    """
    from snaplook.metrics import evaluate_embeddings

    if len(features) < 2:
        return 0.0
    metrics = evaluate_embeddings(
        features, labels, features, labels, ks=(1,), leave_one_out=True, top_n=1
    )
    value = metrics.summary()["recall_at_k"][1]
    return 0.0 if value is None else float(value)


def split_train_val(
    labels: np.ndarray, *, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out a seeded share of the items (not images) for validation.

    Returns:
        (train_rows, val_rows): int64 row indices; no item is on both sides.
    """
    import numpy as np

    items = np.unique(labels)
    n_val = int(round(len(items) * val_fraction)) if val_fraction > 0 else 0
    if val_fraction > 0:
        n_val = min(max(n_val, 2), len(items) - 2)
    rng = np.random.default_rng(seed + 1)
    val_items = set(rng.choice(items, size=max(n_val, 0), replace=False).tolist())
    is_val = np.fromiter((x in val_items for x in labels.tolist()), bool, len(labels))
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def _usable_rows(ids: np.ndarray, k: int, p: int) -> tuple[np.ndarray, dict[str, int]]:
    """Rows of items with at least 2 images, after checking there are enough of them."""
    import numpy as np

    items, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    usable = counts >= 2
    n_items, n_usable = len(items), int(usable.sum())
    stats = {
        "items": n_items,
        "images": len(ids),
        "usable_items": n_usable,
        "dropped_single_image_items": n_items - n_usable,
    }
    if n_usable < 2 or n_usable * 2 < n_items:
        raise SnaplookError(
            f"only {n_usable} of {n_items} training items have 2 or more images; metric "
            "learning needs several images per item (check the partition file and the "
            "item ids)."
        )
    if n_usable < n_items:
        logger.warning(
            "%d training items have a single image and are left out (%d usable)",
            n_items - n_usable,
            n_usable,
        )
    median = int(np.median(counts[usable]))
    if k > median:
        raise SnaplookError(
            f"--batch asks for K={k} images per item, but the median usable training item "
            f"has {median} (max {int(counts.max())}); use K <= {median}, e.g. --batch "
            f"{p}x{median}."
        )
    return np.flatnonzero(usable[inverse]), stats


def fit_head(
    train_feats: np.ndarray,
    train_ids: Sequence[Any] | np.ndarray,
    *,
    loss: str = DEFAULT_LOSS,
    dim: int = DEFAULT_DIM,
    hidden: int = DEFAULT_HIDDEN,
    epochs: int = DEFAULT_EPOCHS,
    batch: tuple[int, int] = DEFAULT_BATCH,
    lr: float = DEFAULT_LR,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = DEFAULT_SEED,
    patience: int = DEFAULT_PATIENCE,
    margin: float = DEFAULT_MARGIN,
    source: dict[str, Any] | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> Head:
    """Train an embedding head on backbone features with item labels.

    A seeded share of the items (``val_fraction``) is held out; after every epoch the
    head's leave-one-out Recall@1 on them is measured, the best epoch's weights are
    kept, and training stops when it has not improved for ``patience`` epochs. An epoch
    is ``n_images / (P*K)`` batches. Ctrl-C (KeyboardInterrupt) stops training and
    returns the best head so far (``head.info["interrupted"]`` is True).

    Args:
        train_feats: ndarray of shape (n, d), backbone features (raw or normalised).
        train_ids: sequence of length n, the item id of each row.
        loss: "triplet" (batch-hard) or "proxy-anchor", default="triplet".
        dim: output dimension, default=512.
        hidden: width of an optional ReLU hidden layer (0: none), default=0.
        epochs: maximum epochs, default=30.
        batch: (P items, K images per item), default=(16, 4).
        lr: Adam learning rate, default=1e-3.
        val_fraction: share of items held out for validation (0: none; then the last
            epoch is kept), default=0.1.
        seed: seeds the split, the sampler and the initial weights, default=0.
        patience: epochs without improvement before stopping, default=5.
        margin: triplet margin, default=0.2.
        source: identity of the features (``Embedder.identity()``), recorded in the head.
        on_epoch: called with each :class:`EpochRecord`.

    Returns:
        :class:`Head`.

    Raises:
        SnaplookError: bad settings, too few items with 2+ images, K larger than most
            items have, P larger than the training items, ids and features of other lengths.
    """
    import numpy as np

    feats = np.asarray(train_feats, dtype=np.float32)
    ids = np.asarray([str(x) for x in train_ids])
    settings = _FitSettings(
        loss=loss,
        dim=dim,
        hidden=hidden,
        epochs=epochs,
        batch=batch,
        lr=lr,
        val_fraction=val_fraction,
        seed=seed,
        patience=patience,
        margin=margin,
    )
    settings.check(feats, ids)
    data = _training_data(feats, ids, batch=batch, val_fraction=val_fraction, seed=seed)
    keras = _keras()
    tf = _tf()
    keras.utils.set_random_seed(seed)
    model = _build_model(feats.shape[1], dim, hidden, _l2(data.x_train).mean(axis=0))
    step = _make_step(model, data, settings, tf=tf, keras=keras)
    run = _run_epochs(model, step, data, settings, on_epoch=on_epoch, tf=tf)
    model.set_weights(run.best_weights)
    return Head(
        config=settings.config(int(feats.shape[1]), source),
        info=_fit_info(run, data, source),
        history=run.history,
        model_=model,
    )


@dataclass(frozen=True)
class _FitSettings:
    """The training settings of :func:`fit_head` (see there), checked by :meth:`check`."""

    loss: str
    dim: int
    hidden: int
    epochs: int
    batch: tuple[int, int]
    lr: float
    val_fraction: float
    seed: int
    patience: int
    margin: float

    def check(self, feats: np.ndarray, ids: np.ndarray) -> None:
        """Raise on features and ids that do not pair up, or on a bad setting."""
        if feats.ndim != 2 or len(feats) != len(ids):
            raise SnaplookError(
                f"train_feats of shape {feats.shape} and {len(ids)} ids: expected (n, d) "
                "features and one id per row."
            )
        if self.loss not in LOSSES:
            raise SnaplookError(f"unknown loss {self.loss!r}; choose one of: {', '.join(LOSSES)}.")
        p, k = self.batch
        if p < 2 or k < 2:
            raise SnaplookError(
                f"--batch {p}x{k}: need at least 2 items (P) and 2 images per item (K), e.g. 16x4."
            )
        if self.dim < 1 or self.hidden < 0 or self.epochs < 1 or not self.lr > 0:
            raise SnaplookError(
                f"--dim {self.dim}, --hidden {self.hidden}, --epochs {self.epochs}, "
                f"--lr {self.lr}: need dim >= 1, hidden >= 0, epochs >= 1 and lr > 0."
            )
        if not 0 <= self.val_fraction < 1:
            raise SnaplookError(f"--val-fraction must be in [0, 1), got {self.val_fraction}.")

    def config(self, input_dim: int, source: dict[str, Any] | None) -> dict[str, Any]:
        """The head's ``config`` (the architecture and training part of ``head.json``)."""
        p, k = self.batch
        return {
            "input_dim": input_dim,
            "dim": self.dim,
            "hidden": self.hidden,
            "loss": self.loss,
            "epochs": self.epochs,
            "batch": [p, k],
            "lr": self.lr,
            "val_fraction": self.val_fraction,
            "seed": self.seed,
            "patience": self.patience,
            "margin": self.margin,
            "alpha": DEFAULT_ALPHA,
            "delta": DEFAULT_DELTA,
            "source": source or {},
        }


def _fit_info(
    run: _EpochsRun, data: _TrainingData, source: dict[str, Any] | None
) -> dict[str, Any]:
    """The head's training record (``info``): best epoch, validation Recall@1, counts."""
    return {
        "created": timestamp(),
        "best_epoch": run.best_epoch,
        "epochs_run": len(run.history),
        "stopped_early": run.stopped_early,
        "interrupted": run.interrupted,
        "val_metrics": {
            "recall_at_1": run.history[run.best_epoch - 1].val_recall_at_1,
            "raw_recall_at_1": data.raw_val_recall,
            "protocol": "leave-one-out over held-out training items (cosine)",
        },
        "counts": data.counts,
        # What the backbone features came from, in words, for anyone reading head.json.
        "backbone_weights": describe_weights((source or {}).get("weights"), form="label"),
    }


@dataclass(frozen=True)
class _TrainingData:
    """Rows to train on and held-out validation rows, with labels and counts.

    ``x_train`` (n_train, d) float32 with ``train_labels`` in [0, n_train_items);
    ``x_val`` / ``y_val`` the held-out items' rows; ``raw_val_recall`` the validation
    Recall@1 of the raw features (None without validation items).
    """

    x_train: np.ndarray
    train_labels: np.ndarray
    n_train_items: int
    x_val: np.ndarray
    y_val: np.ndarray
    counts: dict[str, int]
    raw_val_recall: float | None

    def val_recall(self, model: Any) -> float | None:
        """Validation Recall@1 of ``model``'s embedding (None without validation items)."""
        import numpy as np

        if not len(self.y_val):
            return None
        return recall_at_1_leave_one_out(np.asarray(model(self.x_val, training=False)), self.y_val)


def _training_data(
    feats: np.ndarray, ids: np.ndarray, *, batch: tuple[int, int], val_fraction: float, seed: int
) -> _TrainingData:
    """Drop single-image items, hold out validation items, and check P still fits."""
    import numpy as np

    p, k = batch
    usable, counts = _usable_rows(ids, k, p)
    feats, ids = feats[usable], ids[usable]
    _, labels = np.unique(ids, return_inverse=True)
    train_rows, val_rows = split_train_val(labels, val_fraction=val_fraction, seed=seed)
    _, train_labels = np.unique(labels[train_rows], return_inverse=True)
    n_train_items = int(train_labels.max()) + 1
    if p > n_train_items:
        raise SnaplookError(
            f"--batch asks for P={p} items per batch, but only {n_train_items} items are left "
            f"for training after holding out validation items; use P <= {n_train_items}."
        )
    x_val, y_val = feats[val_rows], labels[val_rows]
    counts.update(
        train_items=n_train_items,
        train_images=len(train_rows),
        val_items=len(np.unique(y_val)),
        val_images=len(val_rows),
    )
    if 0 < counts["val_items"] < MIN_VAL_ITEMS:
        logger.warning(
            "validation holds only %d items (%d images), fewer than %d: its Recall@1 is too "
            "coarse to choose the best epoch or to stop early; use a larger --val-fraction or "
            "more training items",
            counts["val_items"],
            counts["val_images"],
            MIN_VAL_ITEMS,
        )
    return _TrainingData(
        x_train=feats[train_rows],
        train_labels=train_labels,
        n_train_items=n_train_items,
        x_val=x_val,
        y_val=y_val,
        counts=counts,
        raw_val_recall=recall_at_1_leave_one_out(x_val, y_val) if len(val_rows) else None,
    )


@dataclass
class _EpochsRun:
    """What the epoch loop ended with: its history and the best epoch's weights."""

    history: list[EpochRecord]
    best_epoch: int
    best_weights: Any
    stopped_early: bool = False
    interrupted: bool = False


def _run_epochs(
    model: Any,
    step: Callable[[Any], Any],
    data: _TrainingData,
    settings: _FitSettings,
    *,
    on_epoch: Callable[[EpochRecord], None] | None,
    tf: Any,
) -> _EpochsRun:
    """Train epoch by epoch, keeping the best validation Recall@1's weights (or the last)."""
    p, k = settings.batch
    seed, patience = settings.seed, settings.patience
    n_batches = max(1, math.ceil(len(data.x_train) / (p * k)))
    run = _EpochsRun(history=[], best_epoch=0, best_weights=None)
    best_r = -1.0
    try:
        for epoch in range(1, settings.epochs + 1):
            started = time.perf_counter()
            batches = sample_pk_batches(
                data.train_labels, p=p, k=k, n_batches=n_batches, seed=seed * 100_003 + epoch
            )
            total = 0.0
            for rows in batches:
                total += float(step(tf.constant(rows, dtype=tf.int32)))
            r1 = data.val_recall(model)
            score = r1 if r1 is not None else float(epoch)
            record = EpochRecord(epoch, total / n_batches, r1, time.perf_counter() - started)
            if score > best_r:
                best_r, run.best_epoch, run.best_weights = score, epoch, model.get_weights()
                record.best = True
            run.history.append(record)
            if on_epoch is not None:
                on_epoch(record)
            if r1 is not None and epoch - run.best_epoch >= patience:
                run.stopped_early = True
                logger.info("validation Recall@1 stalled for %d epochs: stopping", patience)
                break
    except KeyboardInterrupt:
        if run.best_weights is None:
            raise
        run.interrupted = True
        logger.warning("interrupted: keeping the best head so far (epoch %d)", run.best_epoch)
    return run


def _make_step(
    model: Any, data: _TrainingData, settings: _FitSettings, *, tf: Any, keras: Any
) -> Callable[[Any], Any]:
    """One compiled training step: a batch of row indices in, the loss value out."""
    feats = tf.constant(data.x_train)
    labels = tf.constant(data.train_labels.astype("int32"))
    loss, lr, margin, seed = settings.loss, settings.lr, settings.margin, settings.seed
    head_vars = model.trainable_variables
    opt = keras.optimizers.Adam(learning_rate=lr)
    opt.build(head_vars)
    if loss == "triplet":

        @tf.function
        def step(rows: Any) -> Any:
            xb, yb = tf.gather(feats, rows), tf.gather(labels, rows)
            with tf.GradientTape() as tape:
                value = triplet_batch_hard_loss(model(xb, training=True), yb, margin=margin)
            opt.apply_gradients(zip(tape.gradient(value, head_vars), head_vars))
            return value

        return step

    init = keras.initializers.HeUniform(seed=seed)
    proxies = tf.Variable(init((data.n_train_items, model.output_shape[-1])), name="proxies")
    proxy_opt = keras.optimizers.Adam(learning_rate=lr * PROXY_LR_SCALE)
    proxy_opt.build([proxies])

    @tf.function
    def proxy_step(rows: Any) -> Any:
        xb, yb = tf.gather(feats, rows), tf.gather(labels, rows)
        with tf.GradientTape() as tape:
            value = proxy_anchor_loss(model(xb, training=True), yb, proxies)
        grads = tape.gradient(value, [*head_vars, proxies])
        opt.apply_gradients(zip(grads[:-1], head_vars))
        proxy_opt.apply_gradients([(grads[-1], proxies)])
        return value

    return proxy_step


# --------------------------------------------------------------------------- from a dataset

TRAINING_CSV_HEADER = ("epoch", "loss", "val_recall_at_1", "seconds", "best")


@dataclass
class TrainSummary:
    """What :func:`train_head` did.

    Attributes:
        head: the trained (best-epoch) head.
        out: the head folder written.
        files: name -> path of each file written.
        n_embedded: training images embedded in this run (0 when the cache was warm).
        n_unreadable: training images that could not be read (left out).
        seconds: {"embedding": ..., "training": ...}.
    """

    head: Head
    out: Path
    files: dict[str, Path]
    n_embedded: int
    n_unreadable: int
    seconds: dict[str, float]

    @property
    def interrupted(self) -> bool:
        return bool(self.head.info.get("interrupted"))


def default_head_dir(
    root: str | Path, *, protocol: str, backbone: str, loss: str, dim: int
) -> Path:
    """``output/heads/<root name>-<protocol>-<backbone>-<loss>-d<dim>``."""
    return DEFAULT_HEADS_DIR / f"{Path(root).name}-{protocol}-{backbone}-{loss}-d{dim}"


def parse_batch(text: str) -> tuple[int, int]:
    """Read a ``--batch`` value "PxK" (e.g. "16x4") into (P, K).

    Raises:
        SnaplookError: not two positive integers joined by x.
    """
    parts = text.lower().replace("×", "x").replace("*", "x").split("x")
    if len(parts) != 2 or not all(
        p.strip().isascii() and p.strip().isdigit() and int(p) > 0 for p in parts
    ):
        raise SnaplookError(
            f"--batch {text!r}: expected P items x K images per item, e.g. --batch 16x4."
        )
    return int(parts[0]), int(parts[1])


def train_head(
    root: str | Path,
    *,
    protocol: str = "inshop",
    partition: str | Path | None = None,
    bbox: str | Path | None = None,
    crop: str = "none",
    backbone: str | None = None,
    weights: str | Path | None = None,
    pooling: str | None = None,
    loss: str = DEFAULT_LOSS,
    dim: int = DEFAULT_DIM,
    hidden: int = DEFAULT_HIDDEN,
    epochs: int = DEFAULT_EPOCHS,
    batch: tuple[int, int] = DEFAULT_BATCH,
    lr: float = DEFAULT_LR,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    patience: int = DEFAULT_PATIENCE,
    seed: int = DEFAULT_SEED,
    out: str | Path | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int | None = None,
    strict: bool = False,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> TrainSummary:
    """Embed a dataset's training split (through the feature cache) and train a head on it.

    The training images are those the protocol marks "train" (In-shop, Consumer-to-shop:
    consumer and shop images of the train pairs); for "folders" every image is a training
    image (``ROOT/<label>/<images>``: the label is the item). Test (query/gallery) items are
    never seen: validation holds out a share of the training items. Writes, atomically,
    into ``out``: ``head.weights.h5``, ``head.json``, ``training.csv`` and ``training.png``.
    On Ctrl-C the best head so far is written and ``summary.interrupted`` is True.

    Args:
        root: dataset root (see :func:`snaplook.datasets.load_split`).
        protocol: "inshop" (default), "consumer2shop" or "folders".
        partition, strict: see :func:`snaplook.datasets.load_split`.
        bbox: box file; default for ``crop="gt"``: ``list_bbox_<protocol>.txt`` under
            ``root`` or ``root/Anno``.
        crop: "none" (whole image, default) or "gt" (crop each training image to its
            ground-truth box, as ``snaplook evaluate --crop gt`` does; a head trained on
            crops should be evaluated on crops).
        backbone, weights, pooling, seed: the embedder (defaults: resnet50, imagenet, avg,
            0); ``seed`` also seeds training.
        loss, dim, hidden, epochs, batch, lr, val_fraction, patience: see :func:`fit_head`.
        out: head folder; default :func:`default_head_dir`.
        cache_dir: feature cache, default="output/cache/features".
        batch_size: images per forward pass when embedding.
        on_start, on_progress: embedding progress (on_start gets 0 when cached).
        on_epoch: called with each :class:`EpochRecord`.

    Returns:
        :class:`TrainSummary`.

    Raises:
        SnaplookError: bad protocol files, no training images, the errors of
            :func:`fit_head`.
    """
    # Long on purpose: over 80 lines only through its signature and docstring; the keyword
    # parameters are the public API (the CLI and tests call it with them), the stages helpers.
    root = Path(root)
    check_crop(crop)
    embedder = Embedder(
        backbone or DEFAULT_BACKBONE,
        weights=weights if weights is not None else DEFAULT_WEIGHTS,
        pooling=pooling,  # None: the backbone's own
        seed=seed,
    )
    images = _training_images(
        root, protocol=protocol, partition=partition, bbox=bbox, crop=crop, strict=strict
    )
    out = (
        Path(out)
        if out is not None
        else default_head_dir(
            root, protocol=images.split.protocol, backbone=embedder.backbone, loss=loss, dim=dim
        )
    )
    identity = embedder.identity()
    embedded = _embed_training_images(
        images,
        embedder,
        cache_dir=cache_dir,
        batch_size=batch_size,
        strict=strict,
        on_start=on_start,
        on_progress=on_progress,
    )
    t0 = time.perf_counter()
    head = fit_head(
        embedded.features,
        embedded.ids,
        loss=loss,
        dim=dim,
        hidden=hidden,
        epochs=epochs,
        batch=batch,
        lr=lr,
        val_fraction=val_fraction,
        seed=seed,
        patience=patience,
        source={key: identity[key] for key in _SOURCE_KEYS if key in identity},
        on_epoch=on_epoch,
    )
    train_seconds = time.perf_counter() - t0
    head.info["dataset"] = images.info(root, crop=crop, n_unreadable=embedded.n_unreadable)
    head.info["seconds"] = {
        "embedding": round(embedded.seconds, 3),
        "training": round(train_seconds, 3),
    }
    files = _write_head_folder(head, out)
    return TrainSummary(
        head=head,
        out=out,
        files=files,
        n_embedded=embedded.n_embedded,
        n_unreadable=embedded.n_unreadable,
        seconds={"embedding": embedded.seconds, "training": train_seconds},
    )


@dataclass(frozen=True)
class _TrainingImages:
    """A split's training samples and the ground-truth boxes they are cropped to."""

    split: Split
    samples: list[Sample]
    bbox: str | Path | None
    boxes: dict[str, tuple[int, int, int, int]]

    def info(self, root: Path, *, crop: str, n_unreadable: int) -> dict[str, Any]:
        """``head.json``'s ``dataset``: where the training images came from."""
        split, bbox = self.split, self.bbox
        return {
            "root": str(root.resolve()),
            "protocol": split.protocol,
            "partition": str(split.partition.resolve()) if split.partition else None,
            "crop": crop,
            "bbox": str(Path(bbox).resolve()) if bbox else None,
            "unboxed_images": sum(s.path not in self.boxes for s in self.samples) if bbox else None,
            "unreadable_images": n_unreadable,
        }


def _training_images(
    root: Path,
    *,
    protocol: str,
    partition: str | Path | None,
    bbox: str | Path | None,
    crop: str,
    strict: bool,
) -> _TrainingImages:
    """The protocol's training images ("folders": every image), never query/gallery items."""
    split = load_split(root, protocol=protocol, partition=partition, strict=strict)
    samples = split.train if split.protocol != "folders" else split.query
    bbox = resolve_bbox(root, split.protocol, bbox, crop) if crop == "gt" else None
    boxes = read_bbox_file(bbox) if bbox is not None else {}
    if not samples:
        raise SnaplookError(
            f"{split.partition or root}: no training images (evaluation_status train); "
            "a head is trained on the train split only, never on query/gallery items."
        )
    return _TrainingImages(split, samples, bbox, boxes)


@dataclass(frozen=True)
class _EmbeddedImages:
    """Backbone features of the readable training images and their item ids."""

    features: np.ndarray
    ids: list[str]
    n_embedded: int
    n_unreadable: int
    seconds: float


def _embed_training_images(
    images: _TrainingImages,
    embedder: Any,
    *,
    cache_dir: str | Path | None,
    batch_size: int | None,
    strict: bool,
    on_start: Callable[[int], None] | None,
    on_progress: Callable[[int], None] | None,
) -> _EmbeddedImages:
    """Embed the training images through the feature cache; leave unreadable ones out."""
    import numpy as np

    split, samples = images.split, images.samples
    to_embed = [0]

    def started(n: int) -> None:
        to_embed[0] = n
        if on_start is not None:
            on_start(n)

    t0 = time.perf_counter()
    skipped: list[Any] = []
    matrix = embed_cached(
        [(split.root / s.path, images.boxes.get(s.path)) for s in samples],
        embedder,
        cache_dir=cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR,
        batch_size=batch_size or DEFAULT_BATCH_SIZE,
        on_skip=skipped.append,
        on_start=started,
        on_progress=on_progress,
    )
    seconds = time.perf_counter() - t0
    unreadable = {str(Path(s.path).resolve()) for s in skipped}
    if unreadable and strict:
        raise SnaplookError(
            f"{len(unreadable)} training image(s) could not be read (first: "
            f"{sorted(unreadable)[0]}); --strict stops here."
        )
    keep = np.array([str((split.root / s.path).resolve()) not in unreadable for s in samples])
    return _EmbeddedImages(
        features=matrix[keep],
        ids=[s.item for s, k in zip(samples, keep) if k],
        n_embedded=to_embed[0],
        n_unreadable=int((~keep).sum()),
        seconds=seconds,
    )


def _write_head_folder(head: Head, out: Path) -> dict[str, Path]:
    """Write the head's files into a temporary folder, then replace ``out`` with it."""
    import shutil

    from snaplook.io_utils import make_temp_dir, replace_dir, write_json_atomic

    tmp = make_temp_dir(out)
    try:
        files = write_head_outputs(head, tmp)
        head.name = out.name
        write_json_atomic(tmp / HEAD_JSON, head.to_json())  # with the final name
        replace_dir(tmp, out, marker=HEAD_JSON)
        logger.info("wrote %s (%s)", out, ", ".join(sorted(p.name for p in files.values())))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {name: out / path.name for name, path in files.items()}


_SOURCE_KEYS = (
    "backbone",
    "weights",
    "input_size",
    "preprocessing",
    "resize",
    "pooling",
    "feature_dim",
)


def write_head_outputs(head: Head, out: str | Path) -> dict[str, Path]:
    """Save the head and its training record: head files, ``training.csv``, ``training.png``.

    Returns:
        name -> path of each file written.
    """
    from snaplook.io_utils import write_csv_atomic
    from snaplook.plot_utils import plot_training_curves

    out = Path(out)
    head.save(out)
    rows = [
        (
            r.epoch,
            f"{r.loss:.6f}",
            "" if r.val_recall_at_1 is None else f"{r.val_recall_at_1:.6f}",
            f"{r.seconds:.3f}",
            int(r.best),
        )
        for r in head.history
    ]
    write_csv_atomic(out / "training.csv", TRAINING_CSV_HEADER, rows)
    plot_training_curves(
        [vars(r) for r in head.history],
        out / "training.png",
        title=f"{head.config.get('loss')} head, dim {head.output_dim} "
        f"(best epoch {head.info.get('best_epoch')})\n"
        f"{(head.config.get('source') or {}).get('backbone', '?')} features, "
        + describe_weights((head.config.get("source") or {}).get("weights"), form="label"),
        baseline=(head.info.get("val_metrics") or {}).get("raw_recall_at_1"),
    )
    return {
        "weights": out / HEAD_WEIGHTS,
        "head_json": out / HEAD_JSON,
        "training_csv": out / "training.csv",
        "training_png": out / "training.png",
    }
