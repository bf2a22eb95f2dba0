"""One seeded random ResNet50 per test process, shared by the tests that only need *a* model.

Building a ResNet50 costs seconds on a CPU; with ``--weights random`` the network is a
pure function of its seed (test_features.py checks that with fresh builds), so tests of
plumbing (index folders, CLI output, --update) reuse one model per (backbone, seed,
pooling) instead of building one per command. They run the default runtime (OpenVINO on a
CPU), whose converted model is cached once per session (tests/conftest.py).
"""

from __future__ import annotations

from typing import Any

import pytest

from snaplook import features
from snaplook.options import DEFAULT_POOLING

_MODELS: dict[tuple[str, int, str, Any], Any] = {}
_REAL_BUILD_MODEL = features.build_model


def build_model_shared(
    backbone: str, weights: features.WeightsSpec, *, pooling: str = DEFAULT_POOLING, **gem: Any
):
    """``features.build_model``, but random-weight models are built once and reused."""
    if weights.kind != "random":
        return _REAL_BUILD_MODEL(backbone, weights, pooling=pooling, **gem)
    key = (backbone, weights.seed, pooling, gem.get("gem_p"))
    if key not in _MODELS:
        _MODELS[key] = _REAL_BUILD_MODEL(backbone, weights, pooling=pooling, **gem)
    return _MODELS[key]


def build_model_fresh(
    backbone: str, weights: features.WeightsSpec, *, pooling: str = DEFAULT_POOLING, **gem: Any
):
    """The real ``features.build_model`` (a new network every call)."""
    return _REAL_BUILD_MODEL(backbone, weights, pooling=pooling, **gem)


@pytest.fixture
def shared_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Embedders in this test reuse the process-wide random models (default runtime)."""
    monkeypatch.setattr(features, "build_model", build_model_shared)
