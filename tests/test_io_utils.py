"""Tests for snaplook.io_utils: discovery, robust image reading, atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from bad_images import (
    write_16bit_grey_png,
    write_16bit_rgb_png,
    write_cmyk_jpeg,
    write_exif_rotated_jpeg,
    write_grey_png,
    write_palette_png,
    write_png_header_only,
    write_rgba_png,
    write_text_as_image,
    write_truncated_jpeg,
    write_zero_byte,
)
from conftest import make_image
from PIL import Image, ImageFile

from snaplook.errors import SnaplookError
from snaplook.io_utils import (
    MAX_IMAGE_PIXELS,
    atomic_path,
    find_images,
    find_videos,
    load_npy,
    make_temp_dir,
    manifest_row,
    read_image,
    read_image_with_size,
    read_manifest,
    replace_dir,
    save_npy_atomic,
    write_csv_atomic,
    write_json_atomic,
    write_manifest,
)


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


# --- find_images -------------------------------------------------------------------------


def test_find_images_recursive_case_insensitive_sorted(tmp_path: Path) -> None:
    for rel in [
        "b/z.JPG",
        "b/a.png",
        "a.Jpeg",
        "c/d/e.TIF",
        "c/deep.webp",
        "m.bmp",
        "n.tiff",
        "notes.txt",
        "clip.mp4",
        "anim.gif",
        "noext",
    ]:
        _touch(tmp_path / rel)

    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]

    assert found == ["a.Jpeg", "b/a.png", "b/z.JPG", "c/d/e.TIF", "c/deep.webp", "m.bmp", "n.tiff"]


def test_find_images_skips_hidden_files_and_folders(tmp_path: Path) -> None:
    _touch(tmp_path / "shown.jpg")
    _touch(tmp_path / ".hidden.jpg")
    _touch(tmp_path / "._shown.jpg")  # macOS resource fork
    _touch(tmp_path / ".thumbnails" / "t.jpg")
    _touch(tmp_path / "sub" / ".cache" / "c.png")

    assert find_images(tmp_path) == [tmp_path / "shown.jpg"]


def test_find_images_symlink_loop_terminates(tmp_path: Path) -> None:
    _touch(tmp_path / "a" / "x.png")
    os.symlink(tmp_path, tmp_path / "a" / "loop")  # a/loop -> root: a cycle
    os.symlink(tmp_path / "a" / "x.png", tmp_path / "link.png")  # a symlinked file

    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]

    assert found == ["a/x.png", "link.png"]


def test_find_images_single_file_and_empty_folder(tmp_path: Path) -> None:
    image = _touch(tmp_path / "one.jpg")
    (tmp_path / "empty").mkdir()

    assert find_images(image) == [image]
    assert find_images(tmp_path / "empty") == []


def test_find_images_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(SnaplookError, match="no such file or folder"):
        find_images(tmp_path / "nope")


def test_find_videos_lists_only_videos(tmp_path: Path) -> None:
    _touch(tmp_path / "b.MP4")
    _touch(tmp_path / "a" / "c.mkv")
    _touch(tmp_path / "d.jpg")

    assert [p.name for p in find_videos(tmp_path)] == ["c.mkv", "b.MP4"]


# --- read_image: modes and orientation ---------------------------------------------------


def test_read_image_exif_orientation_6_rotates(tmp_path: Path) -> None:
    path = write_exif_rotated_jpeg(tmp_path / "rot.jpg", size=(64, 32))

    image, size = read_image_with_size(path)

    # Stored 64 wide x 32 high; orientation 6 = turn 90 degrees clockwise to view.
    assert image.shape == (64, 32, 3)
    assert size == (32, 64)
    # The stored top-left (red) quarter lands top-right after the clockwise turn.
    top_right = image[:32, 16:].reshape(-1, 3).mean(axis=0)
    top_left = image[:32, :16].reshape(-1, 3).mean(axis=0)
    bottom = image[32:].reshape(-1, 3).mean(axis=0)
    assert top_right[0] > 200 and top_right[2] < 60
    assert top_left[2] > 200 and top_left[0] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_read_image_grey_to_rgb(tmp_path: Path) -> None:
    image = read_image(write_grey_png(tmp_path / "g.png"))

    assert image.shape == (6, 8, 3)
    assert image.dtype == np.uint8
    assert np.all(image == 77)


def test_read_image_rgba_composited_on_white(tmp_path: Path) -> None:
    image = read_image(write_rgba_png(tmp_path / "rgba.png", size=(20, 10)))

    assert image.shape == (10, 20, 3)
    assert np.all(image[:, :10] == (255, 0, 0))
    # Fully transparent black pixels become the white backdrop, not black.
    assert np.all(image[:, 10:] == 255)


def test_read_image_palette_to_rgb(tmp_path: Path) -> None:
    image = read_image(write_palette_png(tmp_path / "p.png"))

    assert image.shape == (4, 6, 3)
    assert np.all(image[:, :3] == (0, 200, 0))
    assert np.all(image[:, 3:] == (0, 0, 200))


def test_read_image_cmyk_jpeg_to_rgb(tmp_path: Path) -> None:
    image = read_image(write_cmyk_jpeg(tmp_path / "cmyk.jpg", size=(40, 30)))

    assert image.shape == (30, 40, 3)
    assert image.dtype == np.uint8
    mean = image.reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(mean, (255, 0, 0), atol=8)


def test_read_image_16bit_grey_png_scaled(tmp_path: Path) -> None:
    image = read_image(write_16bit_grey_png(tmp_path / "g16.png"))

    assert image.shape == (3, 4, 3)
    assert image.dtype == np.uint8
    assert np.all(image[0] == 255)  # 65535 -> 255, not clipped garbage
    assert np.all(image[1] == 0)
    assert np.all(image[2] == 128)  # 32896 / 257 = 128


def test_read_image_16bit_rgb_png_scaled(tmp_path: Path) -> None:
    image = read_image(write_16bit_rgb_png(tmp_path / "rgb16.png"))

    assert image.shape == (4, 5, 3)
    assert np.all(image == (255, 0, 128))


def test_read_image_draft_keeps_min_size_and_reports_file_size(tmp_path: Path) -> None:
    path = make_image(tmp_path / "big.jpg", (120, 60, 200), size=(1000, 800))

    image, size = read_image_with_size(path, min_size=224)

    assert size == (1000, 800)
    assert min(image.shape[:2]) >= 224
    assert image.shape[:2] == (400, 500)  # JPEG DCT scale 1/2 (1/4 would go under 224)


def test_read_image_draft_with_exif_rotation_reports_upright_size(tmp_path: Path) -> None:
    path = write_exif_rotated_jpeg(tmp_path / "big_rot.jpg", size=(1000, 600))

    image, size = read_image_with_size(path, min_size=224)

    assert size == (600, 1000)  # upright, at the file's full resolution
    assert image.shape == (500, 300, 3)  # decoded at 1/2 scale, then turned upright


# --- read_image: refusals ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "writer", "message"),
    [
        ("zero.jpg", write_zero_byte, "empty file"),
        ("text.png", write_text_as_image, "not an image file"),
        ("cut.jpg", write_truncated_jpeg, "truncated"),
    ],
)
def test_read_image_bad_file_raises_naming_it(
    tmp_path: Path, name: str, writer, message: str
) -> None:
    path = writer(tmp_path / name)

    with pytest.raises(SnaplookError, match=message) as info:
        read_image(path)

    assert str(path) in str(info.value)


def test_read_image_missing_file_and_folder_raise(tmp_path: Path) -> None:
    with pytest.raises(SnaplookError, match="nope.jpg: cannot read"):
        read_image(tmp_path / "nope.jpg")
    with pytest.raises(SnaplookError, match="is a folder"):
        read_image(tmp_path)


def test_read_image_decompression_bomb_refused(tmp_path: Path, monkeypatch) -> None:
    path = write_png_header_only(tmp_path / "bomb.png", 60000, 60000)
    assert path.stat().st_size < 100  # the header claims 10.8 GB of pixels

    def no_decode(self):  # the refusal must come before any pixel buffer is made
        raise AssertionError("decoded a decompression bomb")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(SnaplookError, match="decompression bomb") as info:
        read_image(path)
    assert str(path) in str(info.value)

    # Without Pillow's own guard, snaplook's limit still refuses it before decoding.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(SnaplookError, match="60000x60000 pixels is over the limit"):
        read_image(path)


def test_read_image_over_snaplook_limit_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    side = int(MAX_IMAGE_PIXELS**0.5) + 1
    path = write_png_header_only(tmp_path / "wide.png", side, side)

    with pytest.raises(SnaplookError, match=f"{side}x{side} pixels is over the limit"):
        read_image(path)


# --- atomic writes -----------------------------------------------------------------------


def test_atomic_writers_leave_no_temp_files(tmp_path: Path) -> None:
    write_json_atomic(tmp_path / "a.json", {"k": [1, 2]})
    write_csv_atomic(tmp_path / "b.csv", ("x", "y"), [(1, 2), (3, 4)])
    save_npy_atomic(tmp_path / "c.npy", np.arange(6, dtype=np.float32).reshape(2, 3))

    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.csv", "c.npy"]
    assert json.loads((tmp_path / "a.json").read_text()) == {"k": [1, 2]}
    assert (tmp_path / "b.csv").read_text().splitlines() == ["x,y", "1,2", "3,4"]
    np.testing.assert_array_equal(load_npy(tmp_path / "c.npy"), [[0, 1, 2], [3, 4, 5]])


def test_atomic_path_failure_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "t.txt"
    target.write_text("old")

    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")

    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["t.txt"]


def test_atomic_path_and_temp_dir_get_umask_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)

    write_json_atomic(tmp_path / "m.json", {})
    folder = make_temp_dir(tmp_path / "index")

    # mkstemp/mkdtemp make 0600/0700 entries; results must be readable like any other file.
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask


def test_replace_dir_swaps_folders(tmp_path: Path) -> None:
    final = tmp_path / "index"
    final.mkdir()
    (final / "old.txt").write_text("old")
    tmp = make_temp_dir(final)
    (tmp / "new.txt").write_text("new")

    replace_dir(tmp, final)

    assert [p.name for p in final.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["index"]  # no temp or .old leftovers


def test_replace_dir_creates_missing_target(tmp_path: Path) -> None:
    tmp = make_temp_dir(tmp_path / "out" / "index")
    (tmp / "f").write_text("1")

    replace_dir(tmp, tmp_path / "out" / "index")

    assert (tmp_path / "out" / "index" / "f").read_text() == "1"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["index"]


def test_load_npy_refuses_pickled_array(tmp_path: Path) -> None:
    path = tmp_path / "obj.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)

    with pytest.raises(SnaplookError, match="never unpickles"):
        load_npy(path)
    with pytest.raises(SnaplookError, match="file not found"):
        load_npy(tmp_path / "missing.npy")


def test_manifest_round_trip(tmp_path: Path) -> None:
    image = make_image(tmp_path / "g" / "x.png", (10, 20, 30))
    row = manifest_row(image, tmp_path / "g", 0, (64, 48))

    write_manifest(tmp_path / "manifest.csv", [row])
    back = read_manifest(tmp_path / "manifest.csv")

    assert back[0].path == "x.png"
    assert (back[0].width, back[0].height, back[0].bytes) == (64, 48, image.stat().st_size)
    assert back[0].mtime == pytest.approx(image.stat().st_mtime, abs=1e-6)
    assert len(back[0].sha1) == 40


def test_read_manifest_malformed_raises(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text("row,path\n0,x.png\n")

    with pytest.raises(SnaplookError, match="malformed"):
        read_manifest(tmp_path / "manifest.csv")


def test_find_images_lists_dangling_and_looping_symlinks_for_the_reader(tmp_path: Path) -> None:
    os.symlink(tmp_path / "missing.jpg", tmp_path / "dangling.jpg")
    os.symlink(tmp_path / "b.jpg", tmp_path / "a.jpg")
    os.symlink(tmp_path / "a.jpg", tmp_path / "b.jpg")

    found = [p.name for p in find_images(tmp_path)]

    assert found == ["a.jpg", "b.jpg", "dangling.jpg"]  # read_image then says why
