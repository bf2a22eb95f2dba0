"""snaplook: "shop the look" retrieval for fashion, from video frames to a cosine k-NN gallery.

The public API is re-exported here and imported lazily, so ``import snaplook`` (and
``snaplook --help``) stays instant; TensorFlow loads only when a model is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS = {
    "SnaplookError": "snaplook.errors",
    "find_images": "snaplook.io_utils",
    "find_videos": "snaplook.io_utils",
    "read_image": "snaplook.io_utils",
    "resize_to_square": "snaplook.transform_utils",
    "preprocess_caffe": "snaplook.transform_utils",
    "Embedder": "snaplook.features",
    "embed_images": "snaplook.features",
    "embed_arrays": "snaplook.features",
    "iter_embeddings": "snaplook.features",
    "build_index": "snaplook.indexing",
    "load_index": "snaplook.index",
    "query_index": "snaplook.index",
    "write_query_results": "snaplook.results",
    "cosine_knn": "snaplook.index",
    "Index": "snaplook.index",
    "build_ann": "snaplook.ann",
    "load_ann": "snaplook.ann",
    "plot_retrieval_grid": "snaplook.plot_utils",
    "plot_tsne": "snaplook.plot_utils",
    "load_split": "snaplook.datasets",
    "rank_metrics": "snaplook.metrics",
    "evaluate_embeddings": "snaplook.metrics",
    "Frame": "snaplook.video",
    "Scene": "snaplook.video",
    "VideoFrames": "snaplook.video",
    "iter_frames": "snaplook.video",
    "extract_frames": "snaplook.video",
    "extract_videos": "snaplook.video",
    "detect_scenes": "snaplook.video",
    # `look` itself is not re-exported: `snaplook.look` is its module's name
    # (use `from snaplook.look import look`).
    "PersonDetector": "snaplook.artists",
    "Detection": "snaplook.artists",
    "FrameDetections": "snaplook.artists",
    "detect_people": "snaplook.artists",
    "select_lead_artists": "snaplook.artists",
    "extract_clothes": "snaplook.artists",
    "write_lead_artists": "snaplook.artists",
    "crop_artists": "snaplook.artists",
    "fit_head": "snaplook.train",
    "train_head": "snaplook.train",
    "load_head": "snaplook.train",
    "Head": "snaplook.train",
    "with_head": "snaplook.features",
    "read_catalog": "snaplook.catalog",
    "parse_where": "snaplook.catalog",
    "write_query_page": "snaplook.page",
    "write_look_page": "snaplook.page",
    "index_gallery": "snaplook.indexing",
    "fit_whitening": "snaplook.postprocess",
    "Postprocessing": "snaplook.postprocess",
    "evaluate_detectors": "snaplook.detect_eval",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'snaplook' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
