"""Shared fixtures: generated images, paths into the real test media, log hygiene.

Topic-specific fixtures (generated videos, In-shop trees, bad-input corpus) live in
their own test modules or helper files, not here.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The suite runs the default runtime (OpenVINO on a CPU). Its first use of a backbone +
# weights converts the Keras model (a few seconds); one converted-model cache for the whole
# session means each random model converts once, not once per test, and nothing is written
# to ~/.keras. An explicit SNAPLOOK_CACHE_DIR is kept (to reuse conversions across runs).
if "SNAPLOOK_CACHE_DIR" not in os.environ:
    _SESSION_CACHE = tempfile.mkdtemp(prefix="snaplook-test-models-")
    os.environ["SNAPLOOK_CACHE_DIR"] = _SESSION_CACHE
    atexit.register(shutil.rmtree, _SESSION_CACHE, ignore_errors=True)

REPO = Path(__file__).resolve().parents[1]
# Real photos and a real video (not in the repository): $SNAPLOOK_TESTDATA, by default the
# project's shared folder beside the clone.
TESTDATA = Path(os.environ.get("SNAPLOOK_TESTDATA") or REPO.parent / "shared" / "testdata")
REQUIRE_TESTDATA = os.environ.get("SNAPLOOK_REQUIRE_TESTDATA") == "1"


def testdata_path(*parts: str) -> Path:
    """A path under the real test media ($SNAPLOOK_TESTDATA); skips when absent, fails in CI
    (SNAPLOOK_REQUIRE_TESTDATA=1)."""
    path = TESTDATA.joinpath(*parts)
    if not path.exists():
        message = (
            f"real test media not found at {path} (set SNAPLOOK_TESTDATA to the folder with "
            "PROVENANCE.md, people/ and video/)"
        )
        if REQUIRE_TESTDATA:
            pytest.fail(message + "; SNAPLOOK_REQUIRE_TESTDATA=1 requires it")
        pytest.skip(message)
    return path


def make_image(path: Path, colour: tuple[int, int, int], *, size=(64, 48), seed: int = 0) -> Path:
    """Write a small image: a coloured rectangle with a seeded noise texture."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = np.full((h, w, 3), colour, dtype=np.float32)
    arr[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] *= 0.6
    arr += rng.normal(0, 12, arr.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path)
    return path


#: Six well-separated colours; a gallery holds two noisy variants of each.
COLOURS = [
    (200, 30, 30),
    (30, 160, 60),
    (30, 60, 200),
    (220, 200, 40),
    (20, 20, 20),
    (230, 130, 170),
]


def write_gallery(root: Path, *, subfolders: bool = True) -> Path:
    """Write 12 small images (6 colours x 2 variants), in tops/ and bottoms/ or flat."""
    for i, colour in enumerate(COLOURS):
        for v in range(2):
            sub = ("tops" if i % 2 == 0 else "bottoms") if subfolders else ""
            make_image(root / sub / f"item{i:02d}_v{v}.png", colour, seed=i * 10 + v)
    return root


def shard_bytes(index_dir: Path) -> dict[str, bytes]:
    """The bytes of every file in an index's ``features/`` folder (shards and manifests)."""
    return {p.name: p.read_bytes() for p in sorted((index_dir / "features").iterdir())}


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """12 small generated images (6 colours x 2 variants) in two sub-folders."""
    return write_gallery(tmp_path / "gallery")


@pytest.fixture
def people_dir() -> Path:
    return testdata_path("people")


@pytest.fixture
def real_video() -> Path:
    return testdata_path("video", "one-by-one-person-detection.mp4")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "allow_error_logs: the test expects ERROR log records")
    config.addinivalue_line("markers", "ray: starts a local Ray cluster (seconds); -m 'not ray'")


@pytest.fixture(autouse=True)
def _fail_on_unexpected_error_logs(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
):
    """Fail a test that logs at ERROR or above, unless marked ``allow_error_logs``."""
    # A CLI run (CliRunner) installs its own handler on the "snaplook" logger and stops
    # propagation; restore the logger afterwards so later tests' caplog still sees records.
    logger = logging.getLogger("snaplook")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    caplog.set_level(logging.WARNING, logger="snaplook")
    yield
    logger.handlers[:], logger.propagate = saved[0], saved[1]
    logger.setLevel(saved[2])
    if request.node.get_closest_marker("allow_error_logs"):
        return
    errors = [r for r in caplog.get_records("call") if r.levelno >= logging.ERROR]
    if errors:
        pytest.fail("unexpected ERROR log: " + "; ".join(r.getMessage() for r in errors))
