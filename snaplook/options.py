"""Every setting a user can choose: the defaults, the choice lists and the shared groups.

One source of truth for the command line and the library: ``cli.py`` builds its options from
these names, and the step modules import their defaults from here. Tuning constants that no
command offers (detector widths, loss margins, scene windows) stay beside the code they tune,
with their measurements. Imports nothing of snaplook.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: Root of what the commands write (``query``: ``<root>/<backbone>``; ``demo``: all of it).
DEFAULT_OUTPUT_ROOT = Path("output")
#: ``snaplook features``: the matrix written (its manifest goes beside it).
DEFAULT_FEATURES_FILE = Path("output/features.npy")
#: ``snaplook demo``: the folder holding ``train/`` (the gallery) and ``test/`` (the queries).
DEFAULT_DEMO_DATA = Path("data")

# --- model: which network embeds an image, and how (features, runtime, transform_utils) ---

#: Names of the backbones ``snaplook.features.BACKBONES`` describes, in its order.
BACKBONE_NAMES = (
    "resnet50",
    "vgg16",
    "mobilenet_v2",
    "densenet121",
    "efficientnet_b0",
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
)
DEFAULT_BACKBONE = "resnet50"
#: ``--weights`` names besides a weights file path: ImageNet, or seeded random (tests only).
WEIGHTS_NAMES = ("imagenet", "random")
DEFAULT_WEIGHTS = "imagenet"
POOLINGS = ("avg", "max", "gem")
#: The pooling of a backbone without a measured default of its own. A backbone may carry one
#: (``features.Backbone.pooling``): GeM for efficientnet_lite0, measured best there by
#: benchmarks/bench_quality.py (real photos, ImageNet weights; see the README).
DEFAULT_POOLING = "avg"
#: What indexes and feature caches that recorded no pooling were built with.
LEGACY_POOLING = "avg"
#: GeM's exponent (Radenovic et al. 2018): 1 is average pooling, large p tends to max.
DEFAULT_GEM_P = 3.0
#: ``index --whiten``: none, pca (the dimension rule's size) or pca:DIM.
DEFAULT_WHITEN = "none"
#: ``index --dba`` / ``query --qe``: gallery neighbours added (0: none).
DEFAULT_DBA = 0
DEFAULT_QE = 0
#: ``--tta``: test-time augmentation of each image: none, or flip (the image and its
#: mirror image, descriptors averaged before normalisation; twice the compute).
TTAS = ("none", "flip")
DEFAULT_TTA = "none"
DEFAULT_BATCH_SIZE = 32
#: Seeds random weights, samples and training unless a seed is given.
DEFAULT_SEED = 0
#: "auto": OpenVINO on a CPU, Keras when TensorFlow sees a GPU; "openvino"; "keras" (reference).
RUNTIMES = ("auto", "openvino", "keras")
DEFAULT_RUNTIME = "auto"
#: ``--precision`` values. "auto": bf16 where the CPU computes it natively, else fp32
#: (see ``snaplook.runtime.resolve_precision``).
PRECISIONS = ("fp32", "bf16", "int8", "auto")
DEFAULT_PRECISION = "fp32"
#: How an image is fitted into the square model input. "pad" keeps the whole garment
#: (the image is scaled so its longer side fits, then padded); "crop" scales the shorter
#: side and cuts the centre, losing the ends of long garments.
RESIZE_MODES = ("pad", "crop")
DEFAULT_RESIZE_MODE = "pad"
#: Default folder of the feature cache of ``evaluate`` and ``train`` (``<key>.npy`` /
#: ``<key>.json`` pairs).
DEFAULT_CACHE_DIR = Path("output/cache/features")

# --- index: building and searching (index, indexing, ann, catalog, distributed) ---

DEFAULT_INDEX_DIR = Path("output/index")
DEFAULT_K = 5
#: Rows per feature shard: 16,384 x 2048 float32 is 128 MiB, so a 10 M-image index is
#: about 610 files and an ``--update`` that touches a few rows rewrites a few of them.
DEFAULT_SHARD_ROWS = 16384
#: ``--ann`` keywords; any other value is a FAISS index-factory string.
ANN_KINDS = ("auto", "none", "hnsw", "ivfpq")
DEFAULT_ANN = "auto"
#: ``auto``: exact search below this many rows (one BLAS scan is fast enough there) ...
AUTO_EXACT_BELOW = 100_000
#: ... HNSW below this many, IVF-PQ (64 bytes a row) from here on: at 1M rows IVF-PQ
#: built 20x faster, in 1/17 of the bytes, and searched faster at recall@10 >= 0.95
#: (bench_ann.py, README "Approximate search"); at 100k HNSW was ahead.
AUTO_HNSW_BELOW = 500_000
#: HNSW search breadth (``--ef``).
DEFAULT_EF = 64
#: IVF lists visited per query unless --nprobe says otherwise (capped at the list
#: count): recall@10 0.93 at 100k rows (256 lists), 0.97 at 1M (1,024) in bench_ann.py.
DEFAULT_NPROBE = 32
#: Restriction modes of ``query`` / ``look``: none, or auto (each query's category is
#: predicted from its nearest catalogue neighbours).
RESTRICT_MODES = ("none", "auto")
DEFAULT_RESTRICT = "none"
#: The catalogue column naming the image (relative to the indexed folder), by default.
DEFAULT_IMAGE_COLUMN = "image"
#: ``--engine``: this process, or a Ray Data actor pool.
ENGINES = ("local", "ray")
DEFAULT_ENGINE = "local"
DEFAULT_CPUS_PER_WORKER = 1.0
DEFAULT_GPUS_PER_WORKER = 0.0
#: ``snaplook map``: a seeded sample of at most this many images, drawn here.
DEFAULT_MAP_IMAGES = 500
DEFAULT_MAP_DIR = Path("output/maps")
DEFAULT_MAP_THUMB_SIZE = 48

# --- video and people (video, artists, look) ---

#: Seconds between interval frames of ``extract``.
DEFAULT_EXTRACT_EVERY = 1.0
#: Root folder of `snaplook extract`; each video gets ``<root>/<video-stem>/``.
DEFAULT_FRAMES_ROOT = Path("output/frames")
IMAGE_FORMATS = ("jpg", "png")
DEFAULT_FORMAT = "jpg"
#: JPEG quality (1-100); ignored for PNG, which is lossless.
DEFAULT_QUALITY = 95
#: Smallest HSV-histogram (Bhattacharyya) distance between consecutive frames that counts
#: as a cut. Hard cuts score 0.4-1.0; a static camera with people walking by stays under
#: 0.17 on the test video (measured over its 1394 frames).
DEFAULT_SCENE_THRESHOLD = 0.3
#: Maximum dHash Hamming distance (of 64 bits) for `--dedup` to call two frames alike.
DEFAULT_DEDUP = 6
DEFAULT_LEAD_ARTIST_ROOT = Path("output/lead_artist")
DEFAULT_MAX_ARTISTS = 2
#: People shorter than this fraction of the frame height are ignored (extras, background).
DEFAULT_MIN_SIZE = 0.15
#: "auto": NanoDet when fetched (`snaplook models fetch nanodet`), else SSDLite when fetched,
#: else the built-in OpenCV HOG + Haar fallback; also nanodet, ssdlite, hog ("builtin"
#: before issue 23) or a YOLO-style .onnx.
DEFAULT_DETECTOR = "auto"
DEFAULT_LOOKS_ROOT = Path("output/looks")
#: Seconds between the frames `look` examines (the `extract` default).
DEFAULT_LOOK_EVERY = 1.0

# --- evaluate ---

PROTOCOLS = ("inshop", "consumer2shop", "folders")
DEFAULT_PROTOCOL = "inshop"
#: Consumer-to-shop splits that can be evaluated. Consumer-to-shop has no query/gallery
#: column: the evaluated split's consumer images are the queries and its shop images the
#: gallery.
C2S_SUBSETS = ("test", "val")
DEFAULT_C2S_SUBSET = "test"
#: What the model sees of each image: the whole image, or its ground-truth box.
CROPS = ("none", "gt")
DEFAULT_CROP = "none"
#: Recall@K cut-offs.
DEFAULT_KS = (1, 5, 10, 20, 30, 50)
#: How gallery images at exactly the same distance are ordered. "pessimistic" puts the
#: query's non-matching images before its matching ones (a tie never helps a score, so a
#: collapsed embedding cannot score well by luck of order); "gallery-order" keeps the
#: gallery order (what a stable argsort, e.g. ``cosine_knn``, returns).
TIE_RULES = ("pessimistic", "gallery-order")
DEFAULT_TIES = "pessimistic"
#: Feature normalisations before ranking: "l2" ranks by cosine distance; "centered"
#: subtracts the gallery mean first, then L2 (cosine around the gallery centre); "none"
#: ranks raw features by Euclidean distance.
NORMALIZATIONS = ("l2", "centered", "none")
DEFAULT_NORMALIZATION = "l2"
DEFAULT_EVAL_ROOT = Path("output/eval")
#: Queries drawn in each of the worst and random grids.
DEFAULT_N_EXAMPLES = 8
#: ``evaluate-detector``: people taller than this (pixels) get a recall of their own (issue
#: 23's "recall for people taller than 100 px": smaller people are hard for every detector).
DEFAULT_TALL_PX = 100

# --- train ---

LOSSES = ("triplet", "proxy-anchor")
DEFAULT_LOSS = "triplet"
DEFAULT_DIM = 512
DEFAULT_HIDDEN = 0
DEFAULT_EPOCHS = 30
#: P items x K images per batch.
DEFAULT_BATCH = (16, 4)
#: Adam learning rate of the head (the Proxy-Anchor proxies learn faster, see
#: ``snaplook.train.PROXY_LR_SCALE``).
DEFAULT_LR = 1e-3
DEFAULT_VAL_FRACTION = 0.1
#: Epochs without a better validation Recall@1 before training stops.
DEFAULT_PATIENCE = 5
DEFAULT_HEADS_DIR = Path("output/heads")


@dataclass(frozen=True)
class SearchSettings:
    """How a query searches an index: exact or approximate, and over which rows.

    ``nprobe`` and ``ef`` None mean :data:`DEFAULT_NPROBE` and :data:`DEFAULT_EF`; ``where``
    holds catalogue filters (``snaplook.catalog.parse_where``), all of which must hold.
    """

    exact: bool = False
    nprobe: int | None = None
    ef: int | None = None
    where: tuple[str, ...] = ()
    restrict: str = DEFAULT_RESTRICT


@dataclass(frozen=True)
class RayOptions:
    """Where ``--engine ray`` runs: the cluster to join (None: start a local one), the actor
    count (None: all CPUs) and the resources of each actor."""

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: float = DEFAULT_CPUS_PER_WORKER
    gpus_per_worker: float = DEFAULT_GPUS_PER_WORKER

    def is_default(self) -> bool:
        """True when nothing was chosen (``--engine local`` takes no Ray option)."""
        return self == RayOptions()
