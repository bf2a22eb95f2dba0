"""Issue 22: special files, undecodable names, damaged videos, the kernel lock, temp
leftovers and spreadsheet-safe CSVs (io_utils and video)."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, make_image

from snaplook import io_utils
from snaplook.errors import SnaplookError
from snaplook.io_utils import (
    exclusive_lock,
    find_images,
    make_temp_dir,
    read_image,
    write_csv_atomic,
    write_skipped,
)

# Each special-file case runs in a child process with a deadline and a memory limit: on
# the old code a FIFO blocks open() for ever and /dev/zero grows memory until killed.
_DEADLINE_S = 60


def _run_guarded(code: str, cwd: Path) -> subprocess.CompletedProcess:
    limit = (
        "import resource; resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))\n"
        if sys.platform.startswith("linux")
        else ""
    )
    return subprocess.run(
        [sys.executable, "-c", limit + code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=_DEADLINE_S,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_fifo_and_dev_zero_named_like_images_are_skipped_not_read(tmp_path: Path) -> None:
    make_image(tmp_path / "ok.jpg", (200, 10, 10))
    os.mkfifo(tmp_path / "x.jpg")
    os.symlink("/dev/zero", tmp_path / "y.jpg")
    code = """
import json, sys
from snaplook.errors import SnaplookError
from snaplook.io_utils import find_images, read_image
skipped = []
found = [p.name for p in find_images('.', on_skip=lambda p, why: skipped.append((p.name, why)))]
errors = {}
for name in ('x.jpg', 'y.jpg'):
    try:
        read_image(name)
    except SnaplookError as exc:
        errors[name] = str(exc)
print(json.dumps({'found': found, 'skipped': sorted(skipped), 'errors': errors}))
"""
    try:
        done = _run_guarded(code, tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail("reading a FIFO named x.jpg hung")
    assert done.returncode == 0, done.stderr
    said = json.loads(done.stdout)
    assert said["found"] == ["ok.jpg"]
    assert [name for name, _ in said["skipped"]] == ["x.jpg", "y.jpg"]
    assert "x.jpg: is a FIFO (named pipe), not a regular file" in said["skipped"][0][1]
    assert "y.jpg: is a character device, not a regular file" in said["skipped"][1][1]
    assert "is a FIFO (named pipe), not a regular file" in said["errors"]["x.jpg"]
    assert "is a character device" in said["errors"]["y.jpg"]


def test_read_image_over_the_size_cap_is_refused(tmp_path: Path, monkeypatch) -> None:
    path = make_image(tmp_path / "big.jpg", (10, 200, 10))
    monkeypatch.setitem(io_utils.INPUT_CAPS, "image", 100)

    with pytest.raises(SnaplookError, match=r"big.jpg: .* is over snaplook's 100 bytes limit"):
        read_image(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_read_manifest_refuses_a_fifo(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "manifest.csv")
    code = """
from snaplook.errors import SnaplookError
from snaplook.io_utils import read_manifest
try:
    read_manifest('manifest.csv')
except SnaplookError as exc:
    print(exc)
"""
    try:
        done = _run_guarded(code, tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail("reading a FIFO named manifest.csv hung")
    assert "manifest.csv: is a FIFO (named pipe), not a regular file" in done.stdout


def test_non_utf8_image_name_is_skipped_and_listed_escaped(tmp_path: Path) -> None:
    make_image(tmp_path / "ok.png", (10, 10, 200))
    bad = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9.png"))
    shutil.copy(tmp_path / "ok.png", bad)
    skipped: list[tuple[Path, str]] = []

    found = find_images(tmp_path, on_skip=lambda p, why: skipped.append((p, why)))

    assert found == [tmp_path / "ok.png"]
    assert [p for p, _ in skipped] == [bad]
    assert "caf\\xe9.png: file name is not valid UTF-8" in skipped[0][1]
    write_skipped(tmp_path / "skipped.csv", skipped)
    with open(tmp_path / "skipped.csv", newline="", encoding="utf-8") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["path"].endswith("/caf\\xe9.png")
    with pytest.raises(SnaplookError, match="not valid UTF-8"):
        read_image(bad)


def _clip(path: Path, n_frames: int = 60, fps: int = 10) -> Path:
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (160, 120))
    rng = np.random.default_rng(0)
    for i in range(n_frames):
        frame = np.full((120, 160, 3), 40 + 3 * i, np.uint8)
        writer.write(frame + rng.integers(0, 6, frame.shape, np.uint8))
    writer.release()
    return path


def test_extract_non_utf8_video_name_does_not_crash(tmp_path: Path) -> None:
    src = tmp_path / "videos"
    src.mkdir()
    clip = _clip(tmp_path / "clip.avi", n_frames=20)
    shutil.copy(clip, Path(os.fsdecode(bytes(src) + b"/caf\xe9.avi")))
    code = f"""
from snaplook.video import extract_videos
(r,) = extract_videos({str(src)!r}, out_root={str(tmp_path / "out")!r}, every=1.0)
print(len(r.frames), r.out.name)
"""
    done = _run_guarded(code, tmp_path)  # a segfault (exit -11) on the old code

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "caf\\xe9"]
    assert (tmp_path / "out" / "caf\\xe9" / "frames.csv").is_file()


def test_damaged_middle_of_a_video_is_decoded_past(tmp_path: Path) -> None:
    from snaplook.video import extract_videos

    video = _clip(tmp_path / "cut.avi")
    data = bytearray(video.read_bytes())
    jpegs = [i for i in range(len(data) - 1) if data[i : i + 2] == b"\xff\xd8"]
    data[jpegs[20] : jpegs[20] + 600] = bytes(600)  # frame 20 of 60 destroyed
    video.write_bytes(bytes(data))

    (result,) = extract_videos(video, out_root=tmp_path / "out", every=0.5)

    # The old code stopped at frame 20 ("decoding stopped after 20 of 60 frames").
    assert result.n_decoded >= 58  # 60 less the destroyed frame (and the last, in AVI)
    assert [(s.first_frame, s.n_frames, s.start_s, s.end_s) for s in result.lost] == [
        (20, 1, 2.0, 2.1)
    ]
    summary = json.loads((tmp_path / "out" / "cut" / "summary.json").read_text())
    assert summary["frames_lost"] == 1 and summary["lost"][0]["start_s"] == 2.0
    assert [f.time_s for f in result.frames][-1] == 5.5


def test_damaged_real_video_keeps_most_frames(real_video: Path, tmp_path: Path, caplog) -> None:
    from snaplook.video import iter_frames

    video = tmp_path / "damaged.mp4"
    data = bytearray(real_video.read_bytes())
    at = int(len(data) * 0.3)
    data[at : at + 300_000] = np.random.default_rng(0).bytes(300_000)
    video.write_bytes(bytes(data))
    lost: list[tuple[int, float, str]] = []

    frames = list(iter_frames(video, every=10.0, on_skip=lambda *a: lost.append(a)))

    # 410 of 1394 frames before; OpenCV reading alone gets 1216.
    assert frames[-1].time_s >= 130
    ((first, start_s, reason),) = lost
    assert 400 <= first <= 420 and "could not be decoded" in reason
    assert "decoding went on after them" in reason


def test_lock_file_of_a_live_unrelated_pid_does_not_block(tmp_path: Path) -> None:
    # A pid lock is stale when its pid is reused by another program; the old code refused
    # for ever. The kernel lock knows nobody holds it.
    import socket

    lock = tmp_path / "index.lock"
    lock.write_text(f"{os.getppid()} {socket.gethostname()}\n")

    with exclusive_lock(lock, what="the index x"):
        assert lock.read_text().split()[0] == str(os.getpid())
    assert list(tmp_path.iterdir()) == []  # nothing left beside the output


def test_lock_is_held_by_one_process_at_a_time(tmp_path: Path) -> None:
    lock, log = tmp_path / "index.lock", tmp_path / "log"
    code = f"""
import os, time
from pathlib import Path
from snaplook.errors import SnaplookError
from snaplook.io_utils import exclusive_lock
deadline = time.time() + 20
while time.time() < deadline:
    try:
        with exclusive_lock(Path({str(lock)!r}), what="x"):
            with open({str(log)!r}, "a") as fh:
                fh.write(f"in {{os.getpid()}}\\n"); fh.flush(); time.sleep(0.05)
                fh.write(f"out {{os.getpid()}}\\n")
            break
    except SnaplookError:
        time.sleep(0.01)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(5)]
    for proc in procs:
        assert proc.wait(timeout=_DEADLINE_S) == 0
    events = log.read_text().split("\n")[:-1]
    assert len(events) == 10
    for i in range(0, 10, 2):  # never two holders: each "in" is followed by its "out"
        assert events[i].split()[1] == events[i + 1].split()[1]


def test_make_temp_dir_removes_leftovers_of_a_killed_run(tmp_path: Path) -> None:
    out = tmp_path / "frames"
    dead = tmp_path / ".frames.0badcafe.tmp"
    alive = tmp_path / ".frames.00c0ffee.tmp"
    other = tmp_path / ".look.deadbeef.tmp"
    for folder in (dead, alive, other):
        folder.mkdir()
        (folder / "f.jpg").write_bytes(b"x")
        os.utime(folder, (time.time() - 60, time.time() - 60))
    fd = os.open(alive, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a live run still building it
    try:
        tmp = make_temp_dir(out)
    finally:
        os.close(fd)

    assert not dead.exists()
    assert alive.is_dir() and other.is_dir()
    assert tmp.is_dir() and tmp.name.startswith(".frames.")


def test_spreadsheet_csv_neutralises_formulas_and_keeps_numbers(tmp_path: Path) -> None:
    cells = ["=1+1", "+x", "-cmd|' /c calc'!A0", "@SUM(A1)", "\tx", "\rx", "-0.5", -0.5, "a=b"]
    write_csv_atomic(tmp_path / "r.csv", ["c"] * len(cells), [cells], spreadsheet=True)
    write_csv_atomic(tmp_path / "m.csv", ["c"] * len(cells), [cells])

    with open(tmp_path / "r.csv", newline="", encoding="utf-8") as fh:
        row = list(csv.reader(fh))[1]
    assert row == [
        "'=1+1",
        "'+x",
        "'-cmd|' /c calc'!A0",
        "'@SUM(A1)",
        "'\tx",
        "'\rx",
        "-0.5",
        "-0.5",
        "a=b",
    ]
    with open(tmp_path / "m.csv", newline="", encoding="utf-8") as fh:
        assert list(csv.reader(fh))[1][0] == "=1+1"  # machine-read files stay exact


# --- item 4: query's results folder all-or-nothing ----------------------------------------


def _query_fixture(tmp_path: Path):  # type: ignore[no-untyped-def]
    from snaplook.index import Hit, QueryResult, QuerySummary, load_index

    idx = tmp_path / "idx"
    idx.mkdir()
    np.save(idx / "features.npy", np.eye(2, 4, dtype=np.float32), allow_pickle=False)
    (idx / "manifest.csv").write_text(
        "row,path,width,height,bytes,mtime,sha1\n"
        + "".join(f"{i},img{i}.png,10,10,100,1.0,{'0' * 40}\n" for i in range(2))
    )
    meta = {"format_version": 1, "backbone": "resnet50", "count": 2, "feature_dim": 4}
    (idx / "meta.json").write_text(json.dumps(meta))
    gallery = make_image(tmp_path / "g" / "img0.png", (90, 90, 90))

    def summary(*names: str) -> QuerySummary:
        queries = [make_image(tmp_path / "q" / n, (200, 30, 30)) for n in names]
        return QuerySummary([QueryResult(q, [Hit(1, 0, gallery, 0.25)]) for q in queries], 1, [])

    return load_index(idx), summary


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _write(summary, out: Path, index) -> None:  # type: ignore[no-untyped-def]
    from snaplook.page import write_query_page
    from snaplook.results import query_page, write_query_results

    view = query_page(summary, index=index)
    write_query_results(
        summary, out, index=index, write_page=lambda folder: write_query_page(view, folder)
    )


def test_query_results_failure_keeps_the_old_folder_whole(tmp_path: Path, monkeypatch) -> None:
    # Old code: results.csv/.json were already new when the grids or the page failed.
    index, summary = _query_fixture(tmp_path)
    out = tmp_path / "res"
    _write(summary("a.png"), out, index)
    before = _snapshot(out)
    assert {"results.csv", "results.json", "skipped.csv", "index.html", "a_grid.png"} <= set(before)

    import snaplook.plot_utils

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise SnaplookError("disk full while drawing")

    monkeypatch.setattr(snaplook.plot_utils, "plot_retrieval_grid", broken)
    with pytest.raises(SnaplookError, match="disk full"):
        _write(summary("b.png", "c.png"), out, index)

    assert _snapshot(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".res.")]  # no temp left


def test_query_results_success_leaves_no_file_of_an_earlier_run(tmp_path: Path) -> None:
    # Old code: a_grid.png and the old thumbnails stayed beside the new results.
    index, summary = _query_fixture(tmp_path)
    out = tmp_path / "res"
    _write(summary("a.png"), out, index)
    old_thumbs = {p.name for p in (out / "thumbs").iterdir()}
    (out / "thumbs" / "0000000000000000.jpg").write_bytes(b"old")

    done = summary("b.png")
    _write(done, out, index)

    names = {p.name for p in out.iterdir()}
    assert names == {
        "results.csv",
        "results.json",
        "skipped.csv",
        "index.html",
        "b_grid.png",
        "thumbs",
    }
    assert "0000000000000000.jpg" not in {p.name for p in (out / "thumbs").iterdir()}
    assert (
        done.out == out and done.grids == [out / "b_grid.png"] and done.page == out / "index.html"
    )
    assert old_thumbs  # the first run did write thumbnails


def test_query_results_refuse_a_folder_that_is_not_a_results_folder(tmp_path: Path) -> None:
    index, summary = _query_fixture(tmp_path)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")

    with pytest.raises(SnaplookError, match="holds files but no results.csv"):
        _write(summary("a.png"), out, index)
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]


@pytest.mark.parametrize(
    ("n_allowed", "restrict", "said"),
    [
        (None, "none", "the approximate search found fewer candidates"),
        (None, "auto", "--restrict auto searched only their predicted category"),
        (1, "none", "only 1 gallery images match the --where filters"),
    ],
)
def test_query_short_results_message_names_the_real_cause(
    tmp_path: Path, capsys, n_allowed, restrict, said
) -> None:
    # Old code: "only None gallery images match the --where filters" with no --where given.
    from snaplook import cli
    from snaplook.index import QueryResult, QuerySummary

    summary = QuerySummary(
        [QueryResult(tmp_path / "q.png", [])], 5, [], restrict=restrict, n_allowed=n_allowed
    )
    cli._print_results(summary, quiet=True, final=False)

    err = capsys.readouterr().err
    assert said in err and "None" not in err


# --- the input gate in the other readers (catalogue, partition, checkpoint) ---------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
@pytest.mark.parametrize("reader", ["catalog", "partition", "checkpoint"])
def test_readers_refuse_a_fifo_without_hanging(tmp_path: Path, reader: str) -> None:
    # Old code: reading the partition file or the checkpoint's plan.json blocked for ever;
    # the catalogue reader said "no such file" of a FIFO.
    if reader == "catalog":
        os.mkfifo(tmp_path / "catalog.csv")
        code = "from snaplook.catalog import read_catalog\nread_catalog('catalog.csv')"
        expect = "catalog.csv: is a FIFO (named pipe)"
    elif reader == "partition":
        os.mkfifo(tmp_path / "list_eval_partition.txt")
        code = (
            "from snaplook.datasets import load_split\n"
            "load_split('.', protocol='inshop', partition='list_eval_partition.txt')"
        )
        expect = "list_eval_partition.txt: is a FIFO (named pipe)"
    else:
        (tmp_path / "ck").mkdir()
        os.mkfifo(tmp_path / "ck" / "plan.json")
        code = (
            "from pathlib import Path\nfrom snaplook.checkpoint import Checkpoint\n"
            "c = Checkpoint(Path('ck'), {'batch_size': 2}, n_images=4, feature_dim=3)\n"
            "print('resumed', c.resume())"
        )
        expect = "resumed {}"
    wrapped = (
        "from snaplook.errors import SnaplookError\ntry:\n"
        + "".join(f"    {line}\n" for line in code.splitlines())
        + "except SnaplookError as exc:\n    print(exc)\n"
    )
    try:
        done = _run_guarded(wrapped, tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the {reader} reader hung on a FIFO")
    assert expect in done.stdout, done.stderr[-2000:]


def test_folders_protocol_missing_image_message_names_no_partition(tmp_path: Path, caplog) -> None:
    # Old code: "1 image(s) listed in None are missing under ...".
    from snaplook.datasets import load_split

    for label in ("a", "b"):
        for i in range(2):
            make_image(tmp_path / label / f"{i}.jpg", (10, 20, 30))
    (tmp_path / "a" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")

    with caplog.at_level("WARNING", logger="snaplook.datasets"):
        split = load_split(tmp_path, protocol="folders")

    assert split.missing == ["a/gone.jpg"]
    assert "1 image(s) found in the folders are missing" in caplog.text
    assert "None" not in caplog.text


# --- heads: head.json fields typed, the weights file's shapes checked before Keras --------


@pytest.fixture(scope="module")
def saved_head(tmp_path_factory) -> Path:
    from snaplook import train

    rng = np.random.default_rng(0)
    x = (np.repeat(rng.normal(size=(6, 16)), 3, axis=0) + rng.normal(size=(18, 16))).astype(
        np.float32
    )
    ids = [f"item{i // 3}" for i in range(18)]
    folder = tmp_path_factory.mktemp("head") / "h"
    train.fit_head(x, ids, dim=4, hidden=8, epochs=1, batch=(3, 2)).save(folder)
    return folder


def _head_copy(saved_head: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "h"
    shutil.copytree(saved_head, folder)
    return folder


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(input_dim="16"), "field input_dim must be an integer from 1 to 65536"),
        (lambda m: m.update(dim=None), "field dim must be an integer .*, got null"),
        (lambda m: m.update(hidden=10**12), "field hidden must be an integer"),
        (lambda m: m.update(source=[1]), "field source must be an object or null, got a list"),
        (lambda m: m.update(history=[1]), r"field history\[0\] must be an epoch record"),
        (lambda m: m.update(weights_sha256=5), "field weights_sha256 must be text or null"),
    ],
)
def test_head_json_malformed_field_is_named(saved_head, tmp_path: Path, edit, message) -> None:
    # Old code: int("16") passed, null dims and bad history gave the catch-all "unexpected
    # TypeError ... report it", a huge dim made Keras allocate it.
    from snaplook.train import Head

    folder = _head_copy(saved_head, tmp_path)
    meta = json.loads((folder / "head.json").read_text())
    edit(meta)
    (folder / "head.json").write_text(json.dumps(meta))

    with pytest.raises(SnaplookError, match=message) as info:
        Head.load(folder)
    assert "head.json" in str(info.value) and "\n" not in str(info.value)


def test_head_json_nested_too_deeply_is_one_line(saved_head, tmp_path: Path) -> None:
    from snaplook.train import Head

    folder = _head_copy(saved_head, tmp_path)
    (folder / "head.json").write_text("[" * 100_000 + "]" * 100_000)

    with pytest.raises(SnaplookError, match="nests too deeply"):
        Head.load(folder)


def test_crafted_head_weights_declaring_a_huge_array_are_refused_before_keras(
    saved_head, tmp_path: Path
) -> None:
    # Old code: Keras read the declared 20000 x 20000 float32 (1.6 GB) dataset from a file
    # of a few KB (unallocated gzip chunks read as zeros), driving RSS to gigabytes.
    import h5py

    folder = _head_copy(saved_head, tmp_path)
    weights = folder / "head.weights.h5"
    with h5py.File(weights, "r+") as fh:
        names: list[str] = []
        fh.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        big = next(n for n in names if fh[n].ndim == 2)
        del fh[big]
        fh.create_dataset(
            big, shape=(20000, 20000), dtype="float32", chunks=(1000, 1000), compression="gzip"
        )
    assert weights.stat().st_size < 1 << 20
    code = f"""
from snaplook.errors import SnaplookError
from snaplook.train import Head
try:
    Head.load({str(folder)!r})
except SnaplookError as exc:
    print(exc)
"""
    done = _run_guarded(code, tmp_path)

    assert "do not fit the head its head.json describes" in done.stdout, done.stderr[-2000:]
    assert "(20000, 20000)" in done.stdout


def test_head_weights_with_an_extra_dataset_are_refused(saved_head, tmp_path: Path) -> None:
    import h5py

    from snaplook.train import Head

    folder = _head_copy(saved_head, tmp_path)
    with h5py.File(folder / "head.weights.h5", "r+") as fh:
        fh.create_dataset("extra", data=np.zeros(3, np.float32))

    with pytest.raises(SnaplookError, match="do not fit the head"):
        Head.load(folder)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_query_folder_fifo_is_listed_as_skipped(tmp_path: Path) -> None:
    # Old code: the FIFO was listed as a query and reading it blocked for ever.
    from snaplook.features import Embedder
    from snaplook.index import query_index

    class TinyEmbedder(Embedder):
        def __init__(self) -> None:
            super().__init__("resnet50", weights="random")

        @property
        def feature_dim(self) -> int:
            return 4

        def prepare(self, image: np.ndarray) -> np.ndarray:
            return image[:2, :2].astype(np.float32)

        def embed(self, images: np.ndarray) -> np.ndarray:
            return images.reshape(len(images), -1)[:, :4] + 1.0

    index, _ = _query_fixture(tmp_path)
    queries = tmp_path / "queries"
    make_image(queries / "a.png", (200, 30, 30))
    os.mkfifo(queries / "x.jpg")

    summary = query_index(queries, index, k=1, embedder=TinyEmbedder())

    assert [r.query.name for r in summary.results] == ["a.png"]
    assert [Path(s.path).name for s in summary.skipped] == ["x.jpg"]
    assert "is a FIFO (named pipe)" in summary.skipped[0].reason
