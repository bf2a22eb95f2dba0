"""Tests for snaplook.video and `snaplook extract`: generated clips with known cuts, real video."""

from __future__ import annotations

import csv
import logging
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from snaplook.cli import app
from snaplook.errors import SnaplookError
from snaplook.video import (
    FRAMES_CSV_HEADER,
    _Clock,
    detect_scenes,
    dhash,
    extract_frames,
    extract_videos,
    frame_filename,
    iter_frames,
)

FPS = 10
SECONDS = 6
SIZE = (128, 96)  # width, height
RED, GREEN, BLUE = (40, 40, 200), (40, 180, 40), (200, 60, 30)  # BGR


def _texture(seed: int) -> np.ndarray:
    """A fixed blocky grey pattern, so frames have edges (sharpness, dHash) and stay static."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(-50, 50, size=(SIZE[1] // 16, SIZE[0] // 16, 1))
    return np.kron(blocks, np.ones((16, 16, 1))).astype(np.int16)


def write_clip(
    path: Path,
    colours: list[tuple[float, tuple[int, int, int]]],
    *,
    fps: int = FPS,
    seconds: float = SECONDS,
    motion: bool = False,
) -> Path:
    """Write an mp4v clip; ``colours`` lists (start time in s, BGR colour) of each shot.

    Every frame gets fresh sensor-like noise; ``motion`` adds a white square crossing the
    frame, so static stretches are not bit-identical.
    """
    rng = np.random.default_rng(1)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, SIZE)
    assert writer.isOpened()
    n = round(seconds * fps)
    for i in range(n):
        t = i / fps
        shot = max(k for k, (start, _) in enumerate(colours) if start <= t + 1e-9)
        img = np.full((SIZE[1], SIZE[0], 3), colours[shot][1], dtype=np.int16) + _texture(shot)
        img += rng.normal(0, 4, img.shape).astype(np.int16)
        if motion:
            x = int((SIZE[0] - 24) * i / n)
            img[30:54, x : x + 24] = 255
        writer.write(np.clip(img, 0, 255).astype(np.uint8))
    writer.release()
    return path


_MP4_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts"}


def make_vfr(src: Path, dst: Path, slow_from: int) -> Path:
    """Copy an OpenCV-written mp4 so frames from ``slow_from`` on last twice as long (VFR).

    cv2.VideoWriter only writes constant frame rates; this rewrites the one-entry sample
    time table (``stts``) into two entries and scales the durations. The ``moov`` box sits
    after ``mdat`` in OpenCV's files, so growing it moves no sample offsets.
    """
    data = bytearray(src.read_bytes())
    boxes: dict[bytes, int] = {}
    chain_to_stts: list[int] = []

    def walk(off: int, end: int, chain: list[int]) -> None:
        while off < end:
            size, kind = struct.unpack(">I4s", data[off : off + 8])
            boxes[kind] = off
            if kind == b"stts":
                chain_to_stts.extend(chain)
            if kind in _MP4_CONTAINERS:
                walk(off + 8, off + size, [*chain, off])
            off += size

    walk(0, len(data), [])
    stts = boxes[b"stts"]
    assert struct.unpack(">I", data[stts + 12 : stts + 16])[0] == 1
    assert boxes[b"moov"] > boxes[b"mdat"]
    count, delta = struct.unpack(">II", data[stts + 16 : stts + 24])
    data[stts + 12 : stts + 24] = struct.pack(
        ">IIIII", 2, slow_from, delta, count - slow_from, 2 * delta
    )
    for off in [*chain_to_stts, stts]:
        data[off : off + 4] = struct.pack(">I", struct.unpack(">I", data[off : off + 4])[0] + 8)
    scale = (2 * count - slow_from) / count
    # Version-0 duration fields: mvhd, tkhd, elst in movie units, mdhd in media units.
    for kind, at in ((b"mvhd", 24), (b"tkhd", 28), (b"mdhd", 24), (b"elst", 16)):
        off = boxes[kind] + at
        old = struct.unpack(">I", data[off : off + 4])[0]
        data[off : off + 4] = struct.pack(">I", round(old * scale))
    dst.write_bytes(bytes(data))
    return dst


@pytest.fixture(scope="module")
def cut_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 s at 10 fps: red 0-2 s, green 2-4 s, blue 4-6 s (cuts at frames 20 and 40)."""
    path = tmp_path_factory.mktemp("clips") / "cuts.mp4"
    return write_clip(path, [(0.0, RED), (2.0, GREEN), (4.0, BLUE)], motion=True)


@pytest.fixture(scope="module")
def static_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clips") / "static.mp4", [(0.0, GREEN)])


def test_iter_frames_every_1_gives_one_frame_per_second(cut_clip: Path) -> None:
    frames = list(iter_frames(cut_clip, every=1.0))
    assert len(frames) == SECONDS
    assert [f.index for f in frames] == list(range(SECONDS))
    assert [f.frame for f in frames] == [10 * k for k in range(SECONDS)]
    assert np.allclose([f.time_s for f in frames], range(SECONDS), atol=1 / FPS)
    assert {f.reason for f in frames} == {"interval"}
    assert frames[0].image is not None and frames[0].image.shape == (SIZE[1], SIZE[0], 3)
    assert frames[0].image.dtype == np.uint8
    # RGB order: the first shot is red (BGR (40, 40, 200)).
    assert frames[0].image[..., 0].mean() > frames[0].image[..., 2].mean() + 100


def test_iter_frames_every_half_second_and_max_frames(cut_clip: Path) -> None:
    times = [f.time_s for f in iter_frames(cut_clip, every=0.5)]
    assert np.allclose(times, np.arange(0, SECONDS, 0.5), atol=1 / FPS)
    assert len(list(iter_frames(cut_clip, every=0.5, max_frames=3))) == 3


def test_iter_frames_variable_frame_rate_uses_container_times(tmp_path: Path) -> None:
    # 40 frames: 20 at 0.1 s, then 20 at 0.2 s (6 s). The container's average fps is 6.67,
    # so frame number / fps would put frame 10 at 1.5 s; the container says 1.0 s.
    cfr = write_clip(tmp_path / "cfr.mp4", [(0.0, RED), (2.0, GREEN)], seconds=4)
    vfr = make_vfr(cfr, tmp_path / "vfr.mp4", slow_from=20)
    frames = list(iter_frames(vfr, every=1.0))
    assert [f.frame for f in frames] == [0, 10, 20, 25, 30, 35]
    assert [f.time_s for f in frames] == pytest.approx([0, 1, 2, 3, 4, 5], abs=1e-6)
    assert frame_filename(frames[3].frame, frames[3].time_s) == "f000025_t0003.000.jpg"


def test_detect_scenes_finds_cuts_within_one_frame(cut_clip: Path) -> None:
    scenes = detect_scenes(cut_clip)
    assert len(scenes) == 3
    assert scenes[0].start_frame == 0
    assert abs(scenes[1].start_frame - 20) <= 1 and abs(scenes[2].start_frame - 40) <= 1
    assert abs(scenes[1].start_s - 2.0) <= 1 / FPS + 1e-6
    assert abs(scenes[2].start_s - 4.0) <= 1 / FPS + 1e-6
    assert scenes[-1].end_frame == SECONDS * FPS


def test_detect_scenes_flash_does_not_hide_the_next_cut(tmp_path: Path) -> None:
    # A one-frame white flash at 1.0 s, back to red at 1.1 s (within the 0.5 s minimum scene
    # length, so not a cut), then a real cut to blue at 2.5 s.
    white = (250, 250, 250)
    clip = write_clip(
        tmp_path / "flash.mp4", [(0.0, RED), (1.0, white), (1.1, RED), (2.5, BLUE)], seconds=4
    )
    starts = [s.start_frame for s in detect_scenes(clip)]
    assert len(starts) == 3 and starts[:2] == [0, 10]
    assert abs(starts[2] - 25) <= 1


def test_detect_scenes_static_clip_is_one_scene(static_clip: Path) -> None:
    scenes = detect_scenes(static_clip)
    assert [(s.start_frame, s.end_frame) for s in scenes] == [(0, SECONDS * FPS)]


def test_iter_frames_scenes_only_keeps_one_frame_per_scene(cut_clip: Path) -> None:
    frames = list(iter_frames(cut_clip, every=None, scenes=True))
    assert [f.reason for f in frames] == ["scene"] * 3
    assert [f.scene for f in frames] == [0, 1, 2]
    # The sharpest frame of each scene's first second (cuts at frames 20 and 40, +-1).
    for frame, start in zip(frames, (0, 20, 40)):
        assert start - 1 <= frame.frame < start + FPS + 1
    assert list(iter_frames(cut_clip, every=0, scenes=True))[1].frame == frames[1].frame


def test_iter_frames_scenes_with_interval_merges_in_video_order(cut_clip: Path) -> None:
    frames = list(iter_frames(cut_clip, every=1.0, scenes=True))
    numbers = [f.frame for f in frames]
    assert numbers == sorted(set(numbers))
    assert [f.index for f in frames] == list(range(len(frames)))
    interval = [f for f in frames if "interval" in f.reason]
    scene = [f for f in frames if "scene" in f.reason]
    assert len(interval) == SECONDS and len(scene) == 3
    assert all(f.reason in ("interval", "scene", "interval+scene") for f in frames)


def test_iter_frames_dedup_static_clip_keeps_one(static_clip: Path, tmp_path: Path) -> None:
    assert len(list(iter_frames(static_clip, every=1.0, dedup=6))) == 1
    assert len(list(iter_frames(static_clip, every=1.0))) == SECONDS
    # Three static shots: one frame each survives.
    shots = write_clip(tmp_path / "shots.mp4", [(0.0, RED), (2.0, GREEN), (4.0, BLUE)])
    assert [f.frame for f in iter_frames(shots, every=1.0, dedup=6)] == [0, 20, 40]


def test_dhash_tells_structure_apart_and_flat_is_zero() -> None:
    a = np.clip(np.full((96, 128, 3), 120, np.int16) + _texture(0), 0, 255).astype(np.uint8)
    b = np.clip(np.full((96, 128, 3), 120, np.int16) + _texture(1), 0, 255).astype(np.uint8)
    assert dhash(a) == dhash(a.copy())
    assert (dhash(a) ^ dhash(b)).bit_count() > 10
    assert dhash(np.full((96, 128, 3), 7, np.uint8)) == 0


def test_clock_falls_back_to_fps_when_container_gives_zeros(caplog) -> None:
    clock = _Clock(Path("v.avi"), 25.0)
    with caplog.at_level(logging.WARNING, logger="snaplook"):
        times = [clock.time_of(0.0, i) for i in range(4)]
    assert times == pytest.approx([0.0, 0.04, 0.08, 0.12])
    assert "no usable timestamps" in caplog.text
    clock = _Clock(Path("v.mp4"), 10.0)
    assert [clock.time_of(ms, i) for i, ms in enumerate([0, 100, 100, 300])] == pytest.approx(
        [0.0, 0.1, 0.2, 0.3]
    )


def test_iter_frames_real_video_increasing_timestamps(real_video: Path) -> None:
    frames = list(iter_frames(real_video, every=0.5, max_frames=6))
    times = [f.time_s for f in frames]
    assert len(frames) == 6
    assert all(b > a for a, b in zip(times, times[1:]))
    assert times == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5], abs=0.1)
    assert frames[0].image.shape == (432, 768, 3)


def test_extract_frames_out_writes_files_and_csv(cut_clip: Path, tmp_path: Path) -> None:
    out = tmp_path / "frames" / "cuts"
    frames = extract_frames(cut_clip, every=2.0, out=out)
    names = [frame_filename(f, t) for f, t in ((0, 0.0), (20, 2.0), (40, 4.0))]
    assert names[1] == "f000020_t0002.000.jpg"
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "frames.csv", "summary.json"])
    assert [f.path for f in frames] == [out / n for n in names]
    assert all(f.image is None for f in frames)
    with open(out / "frames.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == FRAMES_CSV_HEADER == ("index", "frame", "time_s", "path", "reason")
    assert rows[2] == ["1", "20", "2.000", names[1], "interval"]
    # A rerun replaces the folder whole: no file of the first run survives.
    extract_frames(cut_clip, every=3.0, out=out, image_format="png")
    assert sorted(p.name for p in out.iterdir()) == [
        "f000000_t0000.000.png",
        "f000030_t0003.000.png",
        "frames.csv",
        "summary.json",
    ]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_extract_frames_failed_run_keeps_previous_folder(cut_clip: Path, tmp_path: Path) -> None:
    out = tmp_path / "cuts"
    extract_frames(cut_clip, every=2.0, out=out)
    before = sorted(p.name for p in out.iterdir())

    def boom(seconds: int) -> None:
        if seconds >= 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_frames(cut_clip, every=1.0, out=out, on_progress=boom)
    assert sorted(p.name for p in out.iterdir()) == before
    # No temporary folder is left beside it.
    assert [p.name for p in tmp_path.iterdir()] == ["cuts"]


def test_extract_frames_in_memory_keeps_images(static_clip: Path) -> None:
    frames = extract_frames(static_clip, every=2.0)
    assert [f.frame for f in frames] == [0, 20, 40]
    assert all(f.path is None and f.image is not None for f in frames)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every": 0}, "--every must be > 0"),
        ({"every": -1, "scenes": True}, "--every must be > 0"),
        ({"max_frames": 0}, "--max-frames must be at least 1"),
        ({"dedup": 65}, "--dedup is a Hamming distance"),
        ({"image_format": "gif"}, "--format must be one of jpg, png"),
    ],
)
def test_extract_frames_bad_options_raise(cut_clip: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(SnaplookError, match=message):
        extract_frames(cut_clip, **kwargs)


def test_iter_frames_bad_input_fails_at_the_call(cut_clip: Path, tmp_path: Path) -> None:
    with pytest.raises(SnaplookError, match="--every must be > 0"):
        iter_frames(cut_clip, every=0)
    with pytest.raises(SnaplookError, match="no such file"):
        iter_frames(tmp_path / "missing.mp4")


def test_extract_videos_reports_progress_in_video_seconds(cut_clip: Path, tmp_path: Path) -> None:
    totals: list[int] = []
    done: list[int] = []
    results = extract_videos(
        cut_clip, out_root=tmp_path, on_start=totals.append, on_progress=done.append
    )
    assert totals == [SECONDS]
    assert done == sorted(done) and done[0] == 0 and done[-1] == SECONDS
    assert set(range(SECONDS)) <= set(done)
    assert results[0].out == tmp_path / "cuts" and results[0].n_decoded == SECONDS * FPS


def test_extract_videos_folder_writes_one_folder_per_video(tmp_path: Path) -> None:
    src = tmp_path / "videos"
    src.mkdir()
    write_clip(src / "a.mp4", [(0.0, RED)], seconds=2)
    write_clip(src / "b.mp4", [(0.0, BLUE)], seconds=3)
    (src / "broken.mp4").write_text("not a video")
    seen: list[int] = []
    results = extract_videos(src, out_root=tmp_path / "out", on_start=seen.append)
    assert [r.video.name for r in results] == ["a.mp4", "b.mp4", "broken.mp4"]
    assert [len(r.frames) for r in results] == [2, 3, 0]
    assert "not a video" in (results[2].error or "")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a", "b", "skipped.csv"]
    assert seen == []  # the broken file has no duration, so the total is unknown


runner = CliRunner()


def test_extract_cli_end_to_end(cut_clip: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["extract", str(cut_clip), "--out", str(out), "--every", "1", "--scenes", "-q"]
    )
    assert result.exit_code == 0, result.output
    folder = out / "cuts"
    with open(folder / "frames.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["index", "frame", "time_s", "path", "reason"]
    assert len(rows) >= SECONDS and sum("scene" in r["reason"] for r in rows) == 3
    assert all((folder / r["path"]).is_file() for r in rows)
    assert cv2.imread(str(folder / rows[0]["path"])).shape == (SIZE[1], SIZE[0], 3)
    assert "kept" in result.output and "frames.csv" in result.output


def test_extract_cli_scenes_only_with_every_0(cut_clip: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["extract", str(cut_clip), "--out", str(tmp_path), "--every", "0", "--scenes"]
    )
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "cuts").glob("*.jpg"))) == 3


def _zero_frame_video(path: Path) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, SIZE)
    writer.release()
    return path


@pytest.mark.parametrize(
    ("make", "args", "message"),
    [
        (lambda d: d / "missing.mp4", [], "no such file"),
        (
            lambda d: (d / "notes.mp4", (d / "notes.mp4").write_text("hello"))[0],
            [],
            "not a video file",
        ),
        (lambda d: _zero_frame_video(d / "zero.avi"), [], "no decodable frames"),
        (lambda d: d, [], "no videos found"),
    ],
)
def test_extract_cli_bad_inputs_exit_1(tmp_path: Path, make, args: list[str], message: str) -> None:
    src = tmp_path / "in"
    src.mkdir()
    video = make(src)
    out = tmp_path / "out"
    result = runner.invoke(app, ["extract", str(video), "--out", str(out), *args])
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not out.exists() or not any(out.rglob("frames.csv"))


@pytest.mark.parametrize("name", ["photo.jpg", "photo_renamed.mp4"])
def test_extract_refuses_a_still_image_by_content(tmp_path: Path, name: str) -> None:
    photo = tmp_path / name
    ok, encoded = cv2.imencode(".jpg", np.full((96, 128, 3), 128, np.uint8))
    photo.write_bytes(encoded.tobytes())
    out = tmp_path / "out"

    result = runner.invoke(app, ["extract", str(photo), "--out", str(out)])

    assert result.exit_code == 1, result.output
    assert f"Error: {photo}: is a JPEG image, not a video" in result.stderr
    assert "Traceback" not in result.output
    assert not out.exists() or not any(out.rglob("frames.csv"))


def test_extract_cli_folder_lists_skipped_videos_once(tmp_path: Path) -> None:
    src = tmp_path / "vids"
    src.mkdir()
    write_clip(src / "good.mp4", [(0.0, RED)], seconds=1)
    (src / "broken.mp4").write_text("not a video")
    out = tmp_path / "frames"

    result = runner.invoke(app, ["extract", str(src), "--out", str(out), "-q"])

    assert result.exit_code == 0, result.output
    with open(out / "skipped.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(Path(r["path"]).name, "not a video file" in r["reason"]) for r in rows] == [
        ("broken.mp4", True)
    ]
    # The reason is given once, naming the file once; then the tally with the list.
    assert result.stderr.count(str(src / "broken.mp4")) == 1
    assert f"Skipped 1 unreadable file(s); listed in {out / 'skipped.csv'}." in result.stderr
    assert (out / "good" / "frames.csv").is_file()
    assert result.stdout.strip().splitlines() == [
        f"Extracted 1 frame from 1 of 2 videos into {out}/."
    ]
