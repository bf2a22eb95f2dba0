"""Tests for snaplook.look: the `look` chain end to end on the real video, and fusion."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image
from typer.testing import CliRunner

from snaplook.artists import ARTISTS_HEADER
from snaplook.cli import app
from snaplook.look import FUSED_HEADER, LOOKS_HEADER, fuse_hits

runner = CliRunner()


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def small_index(tmp_path_factory) -> Path:
    """An index of 4 generated images on seeded random MobileNetV2 weights (cheap to build)."""
    from snaplook.indexing import build_index

    root = tmp_path_factory.mktemp("look_gallery")
    colours = [(200, 30, 30), (20, 20, 20), (120, 120, 130), (30, 60, 200)]
    for i, colour in enumerate(colours):
        make_image(root / "gallery" / f"item{i}.png", colour, seed=i)
    out = root / "index"
    build_index(root / "gallery", out, backbone="mobilenet_v2", weights="random")
    return out


def test_look_cli_real_video_end_to_end(real_video, small_index, tmp_path, monkeypatch):
    # An earlier `snaplook crop` result where look used to write its crops: look must
    # leave it alone and keep its own crops in its results folder (issue 15.6).
    monkeypatch.chdir(tmp_path)
    earlier = Path("output/lead_artist") / real_video.stem
    earlier.mkdir(parents=True)
    (earlier / "artists.csv").write_text(",".join(ARTISTS_HEADER) + "\n")
    (earlier / "artist1_photo_person.png").write_bytes(b"crop's own file")
    out = tmp_path / "looks"
    crops_out = out / "crops"
    # Frames at 0, 10, 20, 30 s: nobody, a woman at the table, nobody, a man in black.
    args = ["look", str(real_video), "-k", "3", "--index", str(small_index), "--every", "10"]
    args += ["--max-frames", "4", "--out", str(out), "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in earlier.iterdir()) == ["artist1_photo_person.png", "artists.csv"]
    assert (earlier / "artist1_photo_person.png").read_bytes() == b"crop's own file"

    artists = _read(crops_out / "artists.csv")
    assert list(artists[0]) == list(ARTISTS_HEADER)
    assert {r["artist"] for r in artists} == {"1", "2"}
    assert {r["frame"] for r in artists} == {"100", "300"}  # 10 fps: 10 s and 30 s
    assert {r["time_s"] for r in artists} == {"10.000", "30.000"}
    assert "person" in {r["kind"] for r in artists}
    assert {r["source"] for r in artists} == {str(real_video)}
    assert _read(out / "skipped.csv") == [] and _read(crops_out / "skipped.csv") == []
    detections = _read(crops_out / "detections.csv")
    assert [(r["frame"], r["n_people"]) for r in detections if r["n_people"] == "0"] == [
        ("0", "0"),
        ("200", "0"),
    ]

    looks = _read(out / "looks.csv")
    assert list(looks[0]) == list(LOOKS_HEADER)
    assert len(looks) == 3 * len(artists)
    by_crop = {str(crops_out / r["path"]): r for r in artists}
    for hit in looks:
        crop = by_crop[hit["crop"]]  # every hit traces back to a row of artists.csv
        assert Path(hit["crop"]).is_file()
        for col in ("artist", "frame", "time_s", "x", "y", "w", "h", "kind"):
            assert hit[col] == crop[col]
        assert hit["video"] == str(real_video)
        assert Path(hit["gallery_path"]).is_file()
        assert 0.0 <= float(hit["distance"]) <= 2.0
    for crop in by_crop:
        ranks = [int(h["rank"]) for h in looks if h["crop"] == crop]
        assert ranks == [1, 2, 3]

    fused = _read(out / "looks_fused.csv")
    assert list(fused[0]) == list(FUSED_HEADER)
    for artist in ("1", "2"):
        mine = [f for f in fused if f["artist"] == artist]
        assert [int(f["rank"]) for f in mine] == [1, 2, 3]
        n_crops = sum(1 for r in artists if r["artist"] == artist)
        assert all(f["n_crops"] == str(n_crops) for f in mine)
        votes = [int(f["votes"]) for f in mine]
        assert votes == sorted(votes, reverse=True) and 1 <= votes[0] <= n_crops

    grids = sorted(p.name for p in out.glob("*.png"))
    expected = {f"{Path(r['path']).stem}_grid.png" for r in artists}
    assert set(grids) == expected | {"artist1_fused_grid.png", "artist2_fused_grid.png"}
    assert "Queried" in result.output or result.output == ""


def test_look_cli_missing_index_fails_cleanly(real_video, tmp_path):
    result = runner.invoke(app, ["look", str(real_video), "--index", str(tmp_path / "none")])
    assert result.exit_code == 1
    assert "no index here" in result.output
    assert "Traceback" not in result.output


def _empty_room(path: Path, n_frames: int = 10) -> Path:
    """A 2-second MJPG video of a grey wall with noise (nobody in it), 5 fps."""
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (160, 120))
    rng = np.random.default_rng(0)
    for _ in range(n_frames):
        frame = np.full((120, 160, 3), 180, np.uint8) + rng.integers(0, 6, (120, 160, 3), np.uint8)
        writer.write(frame)
    writer.release()
    return path


def test_look_nobody_in_video_writes_empty_csvs(small_index, tmp_path):
    video = _empty_room(tmp_path / "empty_room.avi")
    out, crops_out = tmp_path / "looks", tmp_path / "lead"
    args = ["look", str(video), "--index", str(small_index), "--every", "0.5"]
    result = runner.invoke(app, args + ["--out", str(out), "--crops-out", str(crops_out)])
    assert result.exit_code == 0, result.output
    assert "No people found in 4 frame(s)" in result.output
    assert (out / "looks.csv").read_text().strip() == ",".join(LOOKS_HEADER)
    assert (out / "looks_fused.csv").read_text().strip() == ",".join(FUSED_HEADER)
    assert (crops_out / "artists.csv").read_text().strip() == ",".join(ARTISTS_HEADER)
    assert list(out.glob("*.png")) == []


def test_fuse_hits_votes_then_distance():
    rows = np.array([[3, 1, 2], [1, 3, 4], [1, 5, 6]])
    dists = np.array([[0.1, 0.2, 0.3], [0.15, 0.5, 0.6], [0.25, 0.28, 0.4]])
    fused = fuse_hits(dists, rows, k=3)
    assert [f[0] for f in fused] == [1, 3, 5]  # 3 votes, then 2 votes, then the closest single
    assert fused[0][1] == 3 and fused[0][2] == pytest.approx(0.2) and fused[0][3] == 0.15
    assert fused[1][1] == 2 and fused[1][2] == pytest.approx(0.3)


def test_look_cli_refuses_to_replace_crops_without_overwrite(small_index, tmp_path):
    video = _empty_room(tmp_path / "empty_room.avi")
    crops_out = tmp_path / "lead_artist" / "clip"  # written by `snaplook crop` earlier
    crops_out.mkdir(parents=True)
    (crops_out / "artists.csv").write_text(",".join(ARTISTS_HEADER) + "\n1,0,,1,2,3,4\n")
    args = ["look", str(video), "--index", str(small_index), "--out", str(tmp_path / "looks")]
    args += ["--crops-out", str(crops_out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert "already holds lead-artist crops" in result.output and "--overwrite" in result.output
    assert "Traceback" not in result.output
    assert (crops_out / "artists.csv").read_text().endswith("1,0,,1,2,3,4\n")
    assert not (tmp_path / "looks").exists()

    result = runner.invoke(app, args + ["--overwrite"])
    assert result.exit_code == 0, result.output
    assert (crops_out / "artists.csv").read_text().strip() == ",".join(ARTISTS_HEADER)

    inside = runner.invoke(app, args[:-1] + [str(tmp_path / "looks" / "mine")])
    assert inside.exit_code == 1 and "overlap" in inside.output


def test_look_truncated_video_lists_what_was_skipped(small_index, tmp_path):
    video = _empty_room(tmp_path / "cut.avi")
    data = bytearray(video.read_bytes())
    jpegs = [i for i in range(len(data) - 1) if data[i : i + 2] == b"\xff\xd8"]
    # Frames 4 to 9 cut off (a damaged middle is decoded past since issue 22): decoding stops.
    video.write_bytes(bytes(data[: jpegs[4] + 600]))
    out = tmp_path / "looks"
    args = ["look", str(video), "--index", str(small_index), "--every", "0.2", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    (row,) = _read(out / "skipped.csv")
    assert row["path"] == str(video)
    stopped = re.search(r"decoding stopped after (\d+) of 10 frames", row["reason"])
    assert stopped and 4 <= int(stopped.group(1)) < 10, row["reason"]
    assert "may be truncated" in row["reason"]
    assert _read(out / "crops" / "skipped.csv") == [row]
    assert "skipped.csv" in result.output
