"""`--engine ray` on a local Ray cluster (2 CPUs): the same index folder as the local engine,
and a worker killed mid-run loses and duplicates no rows. Marked ``ray`` (a cluster start
costs seconds): ``pytest -m "not ray"`` leaves them out."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import test_shards
from conftest import shard_bytes
from PIL import Image
from test_shards import RowEmbedder, _gallery

from snaplook.errors import SnaplookError
from snaplook.index import load_index
from snaplook.indexing import build_index

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from snaplook.distributed import RayEngine  # noqa: E402

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():  # type: ignore[no-untyped-def]
    """One local cluster for the module, its workers importing this checkout."""
    # The stand-in embedders live in test modules the workers cannot import: Ray's own
    # cloudpickle ships them by value.
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(test_shards)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    python_path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": python_path}},
    )
    yield
    ray.shutdown()


def _first_time(marker: str) -> bool:
    """True for the first caller on this machine (the marker file did not exist yet)."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


class FaultyEmbedder(RowEmbedder):
    """Once, kills its own worker process (SIGKILL) on the batch holding ``kill_on``; once,
    raises (a bug, not a dead process) on the batch holding ``raise_on`` (8x8 images are
    told apart by their mean grey level)."""

    def __init__(self, markers: Path, kill_on: float, raise_on: float) -> None:
        super().__init__()
        self.markers = str(markers)
        self.kill_on, self.raise_on = kill_on, raise_on

    def embed(self, images: np.ndarray) -> np.ndarray:
        means = {round(float(m), 3) for m in images.mean(axis=(1, 2, 3))}
        if self.kill_on in means and _first_time(self.markers + ".killed"):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.raise_on in means and _first_time(self.markers + ".raised"):
            raise RuntimeError("flaky worker")
        return super().embed(images)


class OfflineEmbedder(RowEmbedder):
    """Fails the way a worker without the weights file does."""

    def embed(self, images: np.ndarray) -> np.ndarray:
        raise SnaplookError("weights file /nope/w.h5 not found on this worker; copy it there.")


def _build(root: Path, out: Path, engine, embedder=None):  # type: ignore[no-untyped-def]
    return build_index(
        root,
        out,
        embedder=embedder or RowEmbedder(),
        batch_size=3,
        shard_rows=4,
        engine=engine,
    )


@pytest.mark.usefixtures("cluster")
def test_ray_engine_user_error_in_a_worker_is_one_line(tmp_path: Path) -> None:
    root = _gallery(tmp_path / "g", 3)

    with pytest.raises(SnaplookError, match=r"^weights file /nope/w.h5 not found on this worker"):
        _build(root, tmp_path / "ray", RayEngine(workers=1), OfflineEmbedder())
    assert not (tmp_path / "ray").exists()
    # Runs first: the tests after it get actors only if this failed run freed its own.


@pytest.mark.usefixtures("cluster")
def test_ray_engine_writes_the_local_engines_index(tmp_path: Path) -> None:
    root = _gallery(tmp_path / "g", 14)
    (root / "img_006b.png").write_text("not an image\n", encoding="utf-8")

    summary = _build(root, tmp_path / "ray", RayEngine(workers=2))
    local = _build(root, tmp_path / "local", "local")

    assert (summary.n_indexed, summary.n_embedded) == (local.n_indexed, 14)
    assert [s.path.name for s in summary.skipped] == ["img_006b.png"]
    assert load_index(tmp_path / "ray").manifest == load_index(tmp_path / "local").manifest
    assert shard_bytes(tmp_path / "ray") == shard_bytes(tmp_path / "local")
    assert (tmp_path / "ray" / "skipped.csv").read_text() == (
        tmp_path / "local" / "skipped.csv"
    ).read_text()
    assert not (tmp_path / "ray.partial").exists()


@pytest.mark.usefixtures("cluster")
def test_ray_engine_killed_and_failing_workers_lose_and_duplicate_no_rows(
    tmp_path: Path, caplog
) -> None:
    root = _gallery(tmp_path / "g", 12)
    prepared = RowEmbedder()
    means = [
        round(float(prepared.prepare(np.asarray(Image.open(p).convert("RGB"))).mean()), 3)
        for p in sorted(root.iterdir())
    ]
    # Batches of 3: a worker dies in batch 0, another batch raises once.
    embedder = FaultyEmbedder(tmp_path / "fault", kill_on=means[1], raise_on=means[7])

    summary = _build(root, tmp_path / "ray", RayEngine(workers=2), embedder)
    _build(root, tmp_path / "local", "local")

    assert (tmp_path / "fault.killed").exists() and (tmp_path / "fault.raised").exists()
    # Ray restarted the dead actor and ran its batch again; the batch that raised came
    # back as an error and was retried in a second pass.
    assert "missing after attempt 1 of 3 (batch 2: RuntimeError: flaky worker)" in caplog.text
    index = load_index(tmp_path / "ray")
    paths = [r.path for r in index.manifest]
    assert summary.n_indexed == len(paths) == len(set(paths)) == 12
    assert paths == sorted(p.name for p in root.iterdir())
    assert shard_bytes(tmp_path / "ray") == shard_bytes(tmp_path / "local")


@pytest.mark.usefixtures("cluster")
def test_cli_index_engine_ray_matches_local_with_a_real_network(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from snaplook.cli import app

    root = _gallery(tmp_path / "g", 4)
    common = ["--backbone", "mobilenet_v2", "--weights", "random", "--runtime", "keras"]
    common += ["--batch-size", "2", "-q"]
    runs = {}
    for engine, extra in (("ray", ["--workers", "1"]), ("local", [])):
        out = tmp_path / engine
        result = CliRunner().invoke(
            app, ["index", str(root), "--out", str(out), "--engine", engine, *extra, *common]
        )
        assert result.exit_code == 0, result.output
        assert "Indexed 4 images" in result.stdout and "1 shard written" in result.stdout
        runs[engine] = load_index(out)

    assert runs["ray"].manifest == runs["local"].manifest
    np.testing.assert_allclose(
        np.asarray(runs["ray"].features), np.asarray(runs["local"].features), rtol=0, atol=1e-6
    )


@pytest.mark.usefixtures("cluster")
def test_ray_engine_takes_an_embedder_that_already_ran_on_openvino(tmp_path: Path) -> None:
    from snaplook.features import Embedder

    root = _gallery(tmp_path / "g", 4)
    embedder = Embedder("mobilenet_v2", weights="random")
    size = embedder.input_size
    embedder.embed(np.zeros((1, size, size, 3), dtype=np.uint8))  # compiles the model
    assert embedder.resolved_runtime() == "openvino" and embedder.compiled_ is not None

    # The actors get the settings without the compiled model (which cannot be pickled).
    summary = _build(root, tmp_path / "ray", RayEngine(workers=1), embedder)
    _build(root, tmp_path / "local", "local", embedder)

    assert summary.n_embedded == 4
    ray_index, local_index = load_index(tmp_path / "ray"), load_index(tmp_path / "local")
    assert ray_index.manifest == local_index.manifest
    np.testing.assert_allclose(
        np.asarray(ray_index.features), np.asarray(local_index.features), rtol=0, atol=1e-6
    )
    assert embedder.compiled_ is not None  # the caller's embedder keeps its model


def test_cli_index_unreachable_ray_address_is_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from snaplook.cli import app

    root = _gallery(tmp_path / "g", 2)
    args = ["index", str(root), "--out", str(tmp_path / "idx"), "--weights", "random", "-q"]

    result = CliRunner().invoke(app, [*args, "--engine", "ray", "--address", "127.0.0.1:1"])

    assert result.exit_code == 1
    assert result.stderr.startswith("Error: cannot reach the Ray cluster at '127.0.0.1:1'")
    assert "Traceback" not in result.output
    assert not (tmp_path / "idx").exists() and not (tmp_path / "idx.partial").exists()
