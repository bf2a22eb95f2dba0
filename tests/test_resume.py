"""Resumable, interruptible, exclusive `snaplook index`: kill it, Ctrl-C it, run it twice.

The kill test runs the real command in subprocesses (random MobileNetV2 weights, 40 tiny
images, batches of 4) and checks that after SIGKILLs and a Ctrl-C the rerun writes the
same shard bytes as an uninterrupted run. The library tests use a cheap stand-in
embedder so the checkpoint logic is covered without TensorFlow.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import shard_bytes
from PIL import Image
from typer.testing import CliRunner

from snaplook.cli import app
from snaplook.errors import SnaplookError
from snaplook.features import Embedder
from snaplook.index import load_index
from snaplook.indexing import build_index
from snaplook.io_utils import exclusive_lock

#: The real command, each batch held back by ``BATCH_PAUSE_S`` before it starts: OpenVINO
#: embeds a batch of 4 in milliseconds, so without the pause a Ctrl-C sent after a
#: checkpoint could land when every batch is finished (seen in CI), and there would be
#: nothing left to resume.
BATCH_PAUSE_S = 0.15
SNAPLOOK = [
    sys.executable,
    "-c",
    "import time\n"
    "from snaplook.features import Embedder\n"
    "start = Embedder._embed_start\n"
    "def paused(self, images):\n"
    f"    time.sleep({BATCH_PAUSE_S})\n"
    "    return start(self, images)\n"
    "Embedder._embed_start = paused\n"
    "from snaplook.cli import app\n"
    "app()",
]
N_IMAGES = 40
BATCH = 4
#: The kill test is about checkpoints, not the network: MobileNetV2 (random weights, Keras
#: runtime as everywhere in the suite) keeps its five runs cheap; bench_resume.py kills
#: the default ResNet50 at random moments.
KILL_BACKBONE = "mobilenet_v2"


def _gallery(root: Path, n: int = N_IMAGES) -> Path:
    """``n`` tiny images with distinct content, plus one text file posing as an image."""
    rng = np.random.default_rng(7)
    for i in range(n):
        arr = rng.integers(0, 255, size=(12, 16, 3), dtype=np.uint8)
        root.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / f"img_{i:03d}.png")
    (root / "img_017b.png").write_text("not an image\n", encoding="utf-8")
    return root


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


class FakeEmbedder(Embedder):
    """A fast deterministic stand-in: features from the pixels of a 16x16 thumbnail.

    Each row also depends on the batch it was computed in (like float results of a real
    network may), so a resume that regrouped images would change the bytes.
    """

    def __init__(self, *, on_batch=None) -> None:  # type: ignore[no-untyped-def]
        super().__init__("resnet50", weights="random")
        self.on_batch = on_batch
        self.n_batches = 0

    def prepare(self, image: np.ndarray) -> np.ndarray:
        from snaplook.transform_utils import resize_to_square

        return resize_to_square(image, 16)

    def embed(self, images: np.ndarray) -> np.ndarray:
        if self.on_batch is not None:
            self.on_batch(self.n_batches)
        self.n_batches += 1
        flat = images.reshape(len(images), -1).astype(np.float32) / 255.0
        out = np.zeros((len(images), self.feature_dim), dtype=np.float32)
        out[:, : flat.shape[1]] = flat
        out[:, -1] = flat.sum() / 1000.0  # depends on the whole batch
        return out


def _crash_at(batch: int):  # type: ignore[no-untyped-def]
    def on_batch(n: int) -> None:
        if n == batch:
            raise RuntimeError("simulated crash")

    return on_batch


def _chunks(partial: Path) -> list[str]:
    return sorted(p.name for p in partial.glob("batch-*.json"))


# --- library ---------------------------------------------------------------------------


def test_build_index_resumes_after_failure_byte_identical(tmp_path: Path) -> None:
    gallery = _gallery(tmp_path / "g", 18)
    ref = build_index(gallery, tmp_path / "ref", embedder=FakeEmbedder(), batch_size=BATCH)

    with pytest.raises(RuntimeError):
        build_index(
            gallery,
            tmp_path / "out",
            embedder=FakeEmbedder(on_batch=_crash_at(3)),
            batch_size=BATCH,
        )
    partial = tmp_path / "out.partial"
    assert _chunks(partial) == [f"batch-{b:06d}.json" for b in range(3)]
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "out.lock").exists()

    rerun_embedder = FakeEmbedder()
    summary = build_index(gallery, tmp_path / "out", embedder=rerun_embedder, batch_size=BATCH)
    # 19 files in 5 batches of 4: batches 0-2 (12 images) reused, 3-4 embedded (the text
    # file, last in sorted order, is skipped).
    assert rerun_embedder.n_batches == 2
    assert summary.n_resumed == 12
    assert summary.n_embedded == 6
    assert summary.n_indexed == ref.n_indexed == 18
    assert [s.path.name for s in summary.skipped] == ["img_017b.png"]
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "ref")
    assert not partial.exists()


def test_build_index_update_resumes_byte_identical(tmp_path: Path) -> None:
    gallery = _gallery(tmp_path / "g", 6)
    for out in ("ref", "out"):
        build_index(gallery, tmp_path / out, embedder=FakeEmbedder(), batch_size=BATCH)
    rng = np.random.default_rng(1)
    for i in range(9):  # new files; the old rows are copied, not embedded again
        Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(
            gallery / f"new_{i}.png"
        )
    ref = build_index(
        gallery, tmp_path / "ref", embedder=FakeEmbedder(), batch_size=BATCH, update=True
    )
    assert (ref.n_embedded, ref.n_indexed) == (9, 15)
    with pytest.raises(RuntimeError):
        build_index(
            gallery,
            tmp_path / "out",
            embedder=FakeEmbedder(on_batch=_crash_at(1)),
            batch_size=BATCH,
            update=True,
        )
    summary = build_index(
        gallery, tmp_path / "out", embedder=FakeEmbedder(), batch_size=BATCH, update=True
    )
    # to embed: the text file (skipped again) and 9 new files; batch 0 held 3 of them.
    assert (summary.n_resumed, summary.n_embedded, summary.n_indexed) == (3, 6, 15)
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "ref")


def test_build_index_other_plan_starts_afresh(tmp_path: Path, caplog) -> None:
    gallery = _gallery(tmp_path / "g", 9)
    with pytest.raises(RuntimeError):
        build_index(
            gallery,
            tmp_path / "out",
            batch_size=BATCH,
            embedder=FakeEmbedder(on_batch=_crash_at(1)),
        )
    assert len(_chunks(tmp_path / "out.partial")) == 1
    embedder = FakeEmbedder()
    build_index(gallery, tmp_path / "out", embedder=embedder, batch_size=3)  # other batches
    assert embedder.n_batches == 3  # 9 images in batches of 3 (the 4th: the text file)
    assert "starting over" in caplog.text
    ref = build_index(gallery, tmp_path / "ref", embedder=FakeEmbedder(), batch_size=3)
    assert ref.n_indexed == 9
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "ref")


def test_build_index_damaged_checkpoint_is_redone(tmp_path: Path) -> None:
    gallery = _gallery(tmp_path / "g", 10)
    ref = build_index(gallery, tmp_path / "ref", embedder=FakeEmbedder(), batch_size=BATCH)
    with pytest.raises(RuntimeError):
        build_index(
            gallery,
            tmp_path / "out",
            batch_size=BATCH,
            embedder=FakeEmbedder(on_batch=_crash_at(2)),
        )
    partial = tmp_path / "out.partial"
    # A kill in the middle of a write leaves a temporary file; a damaged chunk fails its hash.
    (partial / ".batch-000002.npy.x1y2.tmp").write_bytes(b"half a file")
    chunk = partial / "batch-000001.npy"
    chunk.write_bytes(chunk.read_bytes()[:-8] + b"\x00" * 8)
    embedder = FakeEmbedder()
    summary = build_index(gallery, tmp_path / "out", embedder=embedder, batch_size=BATCH)
    assert embedder.n_batches == 2  # batch 0 reused; 1 (damaged) and 2 embedded again
    assert summary.n_resumed == 4
    assert ref.n_indexed == summary.n_indexed == 10
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "ref")


def test_build_index_disk_full_keeps_checkpoint_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from snaplook import io_utils

    gallery = _gallery(tmp_path / "g", 8)
    real_save = io_utils.save_npy_atomic
    calls = []

    def save_then_fill_disk(path, array):  # type: ignore[no-untyped-def]
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(path, array)

    monkeypatch.setattr(io_utils, "save_npy_atomic", save_then_fill_disk)
    with pytest.raises(SnaplookError, match=r"No space left on device.*4 images are checkpointed"):
        build_index(gallery, tmp_path / "out", embedder=FakeEmbedder(), batch_size=BATCH)
    monkeypatch.setattr(io_utils, "save_npy_atomic", real_save)
    summary = build_index(gallery, tmp_path / "out", embedder=FakeEmbedder(), batch_size=BATCH)
    assert (summary.n_resumed, summary.n_embedded, summary.n_indexed) == (4, 4, 8)


def test_build_index_ctrl_c_stops_after_current_batch(tmp_path: Path, caplog) -> None:
    gallery = _gallery(tmp_path / "g", 12)

    def ctrl_c_during_batch_1(n: int) -> None:
        if n == 1:
            os.kill(os.getpid(), signal.SIGINT)

    embedder = FakeEmbedder(on_batch=ctrl_c_during_batch_1)
    with pytest.raises(KeyboardInterrupt):
        build_index(gallery, tmp_path / "out", embedder=embedder, batch_size=BATCH)
    assert embedder.n_batches == 2  # batch 1 was finished, batch 2 never started
    assert _chunks(tmp_path / "out.partial") == ["batch-000000.json", "batch-000001.json"]
    assert "run the same command again to resume" in caplog.text
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    summary = build_index(gallery, tmp_path / "out", embedder=FakeEmbedder(), batch_size=BATCH)
    assert summary.n_resumed == 8 and summary.n_indexed == 12


def test_deferred_sigint_first_press_flags_second_interrupts() -> None:
    from snaplook.io_utils import deferred_sigint

    with pytest.raises(KeyboardInterrupt):
        with deferred_sigint() as interrupted:
            assert not interrupted()
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # the handler runs between bytecodes
            assert interrupted()
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
            pytest.fail("the second Ctrl-C did not interrupt")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_exclusive_lock_refuses_live_owner_and_takes_over_dead_one(tmp_path: Path) -> None:
    lock = tmp_path / "index.lock"
    with exclusive_lock(lock, what="the index x"):
        assert lock.read_text().split() == [str(os.getpid()), socket.gethostname()]
        with pytest.raises(SnaplookError, match=rf"another snaplook process \(pid {os.getpid()}"):
            with exclusive_lock(lock, what="the index x"):
                pass
    assert not lock.exists()
    lock.write_text(f"{_dead_pid()} {socket.gethostname()}\n")
    with exclusive_lock(lock, what="the index x"):
        assert lock.read_text().split()[0] == str(os.getpid())
    assert not lock.exists()


# --- the command, killed ---------------------------------------------------------------


def _start(gallery: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [
            *SNAPLOOK,
            "index",
            str(gallery),
            "--out",
            str(out),
            "--backbone",
            KILL_BACKBONE,
            "--weights",
            "random",
            "--batch-size",
            str(BATCH),
            "-q",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_for_chunks(proc: subprocess.Popen, partial: Path, n: int, timeout: float = 240) -> int:
    """Poll until ``partial`` holds at least ``n`` finished batches; return how many."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = len(_chunks(partial)) if partial.is_dir() else 0
        if found >= n:
            return found
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"index exited early ({proc.returncode}): {out} {err}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no {n} checkpoints in {partial} after {timeout} s")


def _wait_for_lock(proc: subprocess.Popen, lock: Path, timeout: float = 240) -> None:
    """Poll until ``proc`` holds ``lock``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lock.is_file() and lock.read_text().split()[:1] == [str(proc.pid)]:
            return
        if proc.poll() is not None:
            pytest.fail(f"index exited early ({proc.returncode}): {proc.communicate()}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"{proc.pid} did not take {lock} in {timeout} s")


def test_index_killed_interrupted_and_locked_resumes_byte_identical(tmp_path: Path) -> None:
    gallery = _gallery(tmp_path / "gallery")
    out, partial, lock = tmp_path / "index", tmp_path / "index.partial", tmp_path / "index.lock"
    n_batches = -(-(N_IMAGES + 1) // BATCH)

    # 1. SIGKILL right after the first checkpoint.
    proc = _start(gallery, out)
    _wait_for_chunks(proc, partial, 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and lock.exists()  # a killed run cannot clean up its lock
    assert len(_chunks(partial)) >= 1  # its finished batch survived the kill

    # 2. Rerun (takes over the dead run's lock); a second run meanwhile is refused (tried
    #    while the first loads its model, seconds, whatever the machine's speed);
    #    SIGKILL half-way.
    proc = _start(gallery, out)
    _wait_for_lock(proc, lock)
    refused = CliRunner().invoke(
        app, ["index", str(gallery), "--out", str(out), "--weights", "random", "-q"]
    )
    assert refused.exit_code == 1
    assert f"another snaplook process (pid {proc.pid})" in refused.stderr
    assert "Traceback" not in refused.output
    _wait_for_chunks(proc, partial, n_batches // 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    _, stderr = proc.communicate()
    assert "taking over the stale lock" in stderr

    # 3. Rerun and Ctrl-C: stops after the current batch, says how to resume, exits 130.
    proc = _start(gallery, out)
    at_signal = _wait_for_chunks(proc, partial, len(_chunks(partial)) + 1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "run the same command again to resume" in stderr
    assert "Traceback" not in stderr
    assert not lock.exists()  # released on the way out
    assert not out.exists()
    done = _chunks(partial)
    assert at_signal <= len(done) < n_batches
    rows_done = sum(len(json.loads((partial / c).read_text())["rows"]) for c in done)

    # 4. A dead process's lock, then the rerun that finishes the job.
    lock.write_text(f"{_dead_pid()} {socket.gethostname()}\n")
    result = CliRunner().invoke(
        app,
        [
            "index",
            str(gallery),
            "--out",
            str(out),
            "--backbone",
            KILL_BACKBONE,
            "--weights",
            "random",
            "--batch-size",
            str(BATCH),
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    said = " ".join(result.stdout.split())  # rich wraps long lines
    m = re.search(r"\((\d+) embedded, .*?, (\d+) resumed from the checkpoint\)", said)
    assert m, said
    assert (int(m[1]), int(m[2])) == (N_IMAGES - rows_done, rows_done)
    assert not partial.exists() and not lock.exists()

    clean = CliRunner().invoke(
        app,
        [
            "index",
            str(gallery),
            "--out",
            str(tmp_path / "clean"),
            "--backbone",
            KILL_BACKBONE,
            "--weights",
            "random",
            "--batch-size",
            str(BATCH),
            "-q",
        ],
    )
    assert clean.exit_code == 0, clean.output
    assert shard_bytes(out) == shard_bytes(tmp_path / "clean")
    assert load_index(out).features.shape == (N_IMAGES, 1280)
