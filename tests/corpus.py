"""Generate snaplook's bad-input corpus: images, videos, partition files and index folders.

Every input is made here from a few lines of code (no binary files are committed);
``corpus_cases.csv`` says what each one must do. ``python tests/corpus.py DIR`` writes
the whole corpus into DIR to look at by hand; ``tests/test_corpus.py`` builds it in a
temporary folder and runs every case through the command that reads it.

Layout written by :func:`build_corpus` (``case.target`` in the table is relative to the
folder of its kind):

    gallery/     one folder holding every image case, indexed once
    galleries/   folders given whole to ``snaplook index`` (empty, all unreadable, ...)
    queries/     a query folder with awkward names
    indexes/     broken copies of a small valid index, given to ``snaplook query``
    videos/      files and folders given to ``snaplook extract``
    partitions/  DeepFashion In-shop roots with broken ``list_eval_partition.txt``
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CASES_CSV = Path(__file__).with_name("corpus_cases.csv")
#: Size of the ordinary generated images (width, height).
SIZE = (64, 48)


@dataclass(frozen=True)
class Case:
    """One row of ``corpus_cases.csv``.

    Attributes:
        case: unique name.
        kind: image, gallery, query, index, video or partition (the corpus sub-folder).
        target: path of the input relative to its kind's folder.
        command: the snaplook command that reads it.
        expect: indexed / skipped / ignored (image cases), ok / refused (the others).
        message: substring of the skip reason or error message; for indexed images an
            optional ``WxH`` the manifest must record.
        exit_code: the command's exit code.
        note: why the case exists.
    """

    case: str
    kind: str
    target: str
    command: str
    expect: str
    message: str
    exit_code: int
    note: str


def read_cases(path: Path = CASES_CSV) -> list[Case]:
    """Read the table of expected outcomes."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["case"] and not r["case"].startswith("#")]
    return [
        Case(**{**r, "exit_code": int(r["exit_code"] or 0)})  # type: ignore[arg-type]
        for r in rows
    ]


# --- small builders -------------------------------------------------------------------


def _pattern(size: tuple[int, int] = SIZE, seed: int = 0) -> np.ndarray:
    """An RGB uint8 test picture: a gradient with a seeded noise texture."""
    w, h = size
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, w)[None, :, None]
    y = np.linspace(0, 255, h)[:, None, None]
    arr = np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2)
    arr = arr + rng.normal(0, 10, arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels but holds one row."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" + b"\x00" * 3 * min(width, 16))
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose SOF marker is patched to claim ``width`` x ``height``."""
    data = bytearray(_encode(Image.fromarray(_pattern((16, 16))), "JPEG"))
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def exif_rotated_jpeg(orientation: int) -> bytes:
    """A 64x48 JPEG whose EXIF says to rotate it (6: a quarter turn, upright 48x64)."""
    image = Image.fromarray(_pattern())
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(image, "JPEG", exif=exif.tobytes())


def animated_gif(n_frames: int = 3) -> bytes:
    frames = [Image.fromarray(_pattern(seed=i)).convert("P") for i in range(n_frames)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _symlink(link: Path, target: str) -> None:
    try:
        link.symlink_to(target)
    except (OSError, NotImplementedError):  # no symlinks here (some Windows setups)
        pass


# --- the corpus -----------------------------------------------------------------------


def build_images(gallery: Path) -> None:
    """Write every image case into ``gallery`` (one folder, indexed once)."""
    rgb = Image.fromarray(_pattern())
    jpeg = _encode(rgb, "JPEG", quality=90)
    png = _encode(rgb, "PNG")
    g = gallery
    _write(g / "ok_plain.jpg", jpeg)
    _write(g / "zero_bytes.jpg", b"")
    _write(g / "truncated.jpg", jpeg[: len(jpeg) // 2])
    _write(g / "truncated.png", png[: len(png) // 2])
    _write(g / "png_bytes.jpg", png)
    _write(g / "text.png", b"this is not an image\n")
    _write(g / "html.jpg", b"<!doctype html><html><body>404 not found</body></html>\n")
    _write(g / "cmyk.jpg", _encode(rgb.convert("CMYK"), "JPEG"))
    _write(g / "grey.jpg", _encode(rgb.convert("L"), "JPEG"))
    grey16 = (_pattern()[..., 0].astype(np.uint16) * 257).astype(np.uint16)
    _write(g / "grey16.png", _encode(Image.fromarray(grey16), "PNG"))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(_pattern()[..., 1]))
    _write(g / "rgba.png", _encode(rgba, "PNG"))
    _write(g / "grey_alpha.png", _encode(rgba.convert("LA"), "PNG"))
    _write(g / "palette.png", _encode(rgb.convert("P"), "PNG"))
    pal_t = rgb.convert("P")
    _write(g / "palette_transparent.png", _encode(pal_t, "PNG", transparency=0))
    _write(g / "float.tif", _encode(Image.fromarray(_pattern()[..., 0].astype(np.float32)), "TIFF"))
    _write(g / "ok.bmp", _encode(rgb, "BMP"))
    _write(g / "ok.webp", _encode(rgb, "WEBP"))
    _write(g / "animated.gif", animated_gif())
    _write(g / "animated_gif_bytes.png", animated_gif())
    _write(g / "one_pixel.png", _encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"))
    _write(g / "long_thin.png", _encode(Image.fromarray(_pattern((2000, 2))), "PNG"))
    _write(g / "bomb_60000.png", png_header_only(60000, 60000))
    _write(g / "bomb_60000.jpg", jpeg_claiming(60000, 60000))
    _write(g / "bomb_12000x10000.png", png_header_only(12000, 10000))
    _write(g / "exif_rotated.jpg", exif_rotated_jpeg(6))
    _write(g / "exif_bad_orientation.jpg", exif_rotated_jpeg(9))
    _write(g / "trailing_garbage.jpg", jpeg + b"\x00garbage" * 100)
    _write(g / "name with spaces.jpg", jpeg)
    _write(g / "ünïcødé_画像.png", png)
    _write(g / "-leading-dash.png", png)
    _write(g / "--double-dash.jpg", jpeg)
    _write(g / "UPPER.JPG", jpeg)
    _write(g / ".hidden.jpg", jpeg)
    _write(g / "folder.jpg" / "inside.png", png)
    _write(g / "sub" / "deeper" / "nested.png", png)
    _symlink(g / "loop", ".")  # a folder symlink pointing at its own parent
    _symlink(g / "link_a.jpg", "link_b.jpg")  # two file symlinks pointing at each other
    _symlink(g / "link_b.jpg", "link_a.jpg")
    _symlink(g / "dangling.jpg", "no_such_file.jpg")
    _symlink(g / "link_to_ok.jpg", "ok_plain.jpg")
    # Special files named like images: discovery leaves them out, nothing opens them.
    if hasattr(os, "mkfifo"):
        os.mkfifo(g / "fifo.jpg")
    _symlink(g / "dev_zero.jpg", "/dev/zero")
    unreadable = _write(g / "unreadable.jpg", jpeg)
    unreadable.chmod(0)


def build_galleries(root: Path) -> None:
    """Folders given whole to ``snaplook index``."""
    (root / "empty").mkdir(parents=True, exist_ok=True)
    (root / "no_images").mkdir(parents=True, exist_ok=True)
    _write(root / "no_images" / "notes.txt", b"no pictures here\n")
    _write(root / "no_images" / "clip.mp4", b"not even a video\n")
    _write(root / "all_unreadable" / "a.jpg", b"")
    _write(root / "all_unreadable" / "b.png", b"text, not pixels\n")
    _write(root / "one_image" / "ok.png", _encode(Image.fromarray(_pattern()), "PNG"))
    _write(root / "out_is_a_file", b"a user's file that must not be replaced\n")
    _write(root / "out_not_an_index" / "holiday.jpg", b"a user's folder that must survive\n")


def build_queries(root: Path) -> None:
    """A query folder: two awkward names that must work and one non-image."""
    png = _encode(Image.fromarray(_pattern(seed=3)), "PNG")
    _write(root / "awkward" / "-dash query.png", png)
    _write(root / "awkward" / "ünïcødé query.png", png)
    _write(root / "awkward" / "not_an_image.jpg", b"plain text\n")
    (root / "empty").mkdir(parents=True, exist_ok=True)


#: The corpus tests read inputs, not features: the light backbone keeps them quick.
BACKBONE = "mobilenet_v2"


def _valid_index(path: Path, n: int = 3, dim: int = 1280) -> None:
    """A small valid index (random unit features) in the current format, without TF."""
    from snaplook import __version__
    from snaplook.features import Embedder
    from snaplook.index import INDEX_FORMAT_VERSION
    from snaplook.io_utils import MANIFEST_HEADER

    path.mkdir(parents=True, exist_ok=True)
    feats = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    np.save(path / "features.npy", feats, allow_pickle=False)
    with open(path / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(MANIFEST_HEADER)
        for i in range(n):
            writer.writerow([i, f"img_{i}.png", 64, 48, 1000, "1700000000.000000", "0" * 40])
    meta = {
        "format_version": INDEX_FORMAT_VERSION,
        "snaplook_version": __version__,
        **Embedder(BACKBONE, weights="random").identity(),
        "count": n,
        "metric": "cosine",
        "l2_normalized": True,
        "created": "2026-01-01T00:00:00+00:00",
        "root": str(path.parent / "gallery_of_" / path.name),
        "skipped": 0,
    }
    (path / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")


def _edit_manifest(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    rows = edit(rows)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)


def _edit_meta(path: Path, **changes: object) -> None:
    meta = json.loads(path.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta), encoding="utf-8")


def build_indexes(root: Path) -> None:
    """A valid index and broken copies of it, one fault each."""
    from snaplook.index import INDEX_FORMAT_VERSION

    def variant(name: str) -> Path:
        path = root / name
        _valid_index(path)
        return path

    variant("valid")
    p = variant("rows_disagree")
    np.save(p / "features.npy", np.load(p / "features.npy")[:2], allow_pickle=False)
    p = variant("meta_missing")
    (p / "meta.json").unlink()
    p = variant("meta_truncated")
    text = (p / "meta.json").read_text(encoding="utf-8")
    (p / "meta.json").write_text(text[: len(text) // 2], encoding="utf-8")
    p = variant("meta_binary")
    (p / "meta.json").write_bytes(b"\xff\xfe\x00garbage\x9c")
    p = variant("meta_newer_version")
    _edit_meta(p / "meta.json", format_version=INDEX_FORMAT_VERSION + 1)
    p = variant("meta_no_version")
    _edit_meta(p / "meta.json", format_version=None)
    p = variant("meta_not_object")
    (p / "meta.json").write_text("[1, 2, 3]\n", encoding="utf-8")
    p = variant("meta_dim_disagrees")
    _edit_meta(p / "meta.json", feature_dim=512)
    p = variant("features_pickle")
    # A pickle that would run code if loaded: it must be refused, never unpickled.
    (p / "features.npy").write_bytes(pickle.dumps(_Boom(root / PWNED)))
    p = variant("features_object_npy")
    np.save(p / "features.npy", np.array([{"a": 1}] * 3, dtype=object), allow_pickle=True)
    p = variant("features_truncated")
    data = (p / "features.npy").read_bytes()
    (p / "features.npy").write_bytes(data[: len(data) // 2])
    p = variant("features_zero_bytes")
    (p / "features.npy").write_bytes(b"")
    p = variant("features_missing")
    (p / "features.npy").unlink()
    p = variant("features_float64")
    np.save(p / "features.npy", np.load(p / "features.npy").astype(np.float64))
    p = variant("features_1d")
    np.save(p / "features.npy", np.zeros(3, dtype=np.float32))
    p = variant("features_nan")
    feats = np.load(p / "features.npy")
    feats[1, 7] = np.nan
    np.save(p / "features.npy", feats)
    p = variant("manifest_missing")
    (p / "manifest.csv").unlink()
    p = variant("manifest_not_numeric")
    _edit_manifest(
        p / "manifest.csv",
        lambda rows: [rows[0], [rows[1][0], rows[1][1], "wide"] + rows[1][3:], *rows[2:]],
    )
    p = variant("manifest_rows_shuffled")
    _edit_manifest(p / "manifest.csv", lambda rows: [rows[0], rows[2], rows[1], *rows[3:]])
    p = variant("manifest_escapes_root")
    _edit_manifest(
        p / "manifest.csv",
        lambda rows: [rows[0], [rows[1][0], "../../etc/passwd", *rows[1][2:]], *rows[2:]],
    )
    (root / "not_a_folder").write_text("an index is a folder\n", encoding="utf-8")


#: Created by the pickled features.npy of the corpus if anything ever unpickles it.
PWNED = "PWNED-by-pickle"


class _Boom:
    """Unpickling this creates the file ``marker``; the corpus only writes the bytes."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def build_videos(root: Path) -> None:
    """Video cases for ``snaplook extract``."""
    import cv2

    def video(path: Path, n_frames: int) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, SIZE)
        for i in range(n_frames):
            writer.write(np.ascontiguousarray(_pattern(seed=i)[..., ::-1]))
        writer.release()
        return path

    _write(root / "text.mp4", b"this is a text file with a video name\n")
    _write(root / "zero_bytes.mp4", b"")
    video(root / "zero_frames.mp4", 0)
    good = video(root / "good.mp4", 20).read_bytes()
    _write(root / "truncated.mp4", good[: len(good) // 3])
    _write(root / "unreadable.mp4", good).chmod(0)
    (root / "no_videos").mkdir(parents=True, exist_ok=True)
    _write(root / "no_videos" / "readme.txt", b"nothing to see\n")
    video(root / "mixed" / "good.mp4", 20)
    _write(root / "mixed" / "broken.mp4", b"not a video\n")
    video(root / "name with spaces" / "-dash ünï.mp4", 20)
    # Special files named like videos: refused by the input gate, never opened.
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "fifo.mp4")
    _symlink(root / "dev_zero.mp4", "/dev/zero")
    # `extract holiday/holiday.mp4 --out .` would write ./holiday/: the video's own folder.
    video(root / "holiday" / "holiday.mp4", 10)
    _write(root / "holiday" / "notes.txt", b"the user's notes\n")


#: A valid DeepFashion In-shop ``list_eval_partition.txt`` for the images below.
_PARTITION_OK = """4
image_name item_id evaluation_status
img/WOMEN/Dresses/id_00000001/01_1_front.jpg id_00000001 query
img/WOMEN/Dresses/id_00000001/01_2_side.jpg id_00000001 gallery
img/WOMEN/Dresses/id_00000002/02_1_front.jpg id_00000002 query
img/WOMEN/Dresses/id_00000002/02_2_side.jpg id_00000002 gallery
"""


def build_partitions(root: Path) -> None:
    """In-shop roots (four small images) with broken partition files, one per folder."""
    lines = _PARTITION_OK.splitlines(keepends=True)
    variants: dict[str, bytes] = {
        "valid": _PARTITION_OK.encode(),
        "short_line": "".join(
            lines[:3] + ["img/WOMEN/Dresses/id_00000001/01_2_side.jpg\n"] + lines[4:]
        ).encode(),
        "empty": b"",
        "count_disagrees": ("9\n" + "".join(lines[1:])).encode(),
        "no_count_line": "".join(lines[1:]).encode(),
        "unicode_digit_count": ("\u00b2\n" + "".join(lines[1:])).encode(),
        "bad_header": ("4\nfile label split\n" + "".join(lines[2:])).encode(),
        "not_utf8": b"4\nimage_name item_id evaluation_status\n\xff\xfe\xfa broken\n",
        "blank_line_inside": "".join(lines[:4] + ["\n"] + lines[4:]).encode(),
        "unknown_status": _PARTITION_OK.replace("gallery", "galery").encode(),
        "binary_garbage": bytes(range(256)) * 4,
    }
    for name, data in variants.items():
        case = root / name
        for line in _PARTITION_OK.splitlines()[2:]:
            rel = line.split()[0]
            seed = int(rel.split("id_")[1][:8])
            _write(case / rel, _encode(Image.fromarray(_pattern(seed=seed)), "JPEG"))
        _write(case / "list_eval_partition.txt", data)
    (root / "missing_partition").mkdir(parents=True, exist_ok=True)


def build_corpus(root: Path) -> Path:
    """Write the whole corpus under ``root`` (see the module docstring); return ``root``."""
    root = Path(root)
    build_images(root / "gallery")
    build_galleries(root / "galleries")
    build_queries(root / "queries")
    build_indexes(root / "indexes")
    build_videos(root / "videos")
    build_partitions(root / "partitions")
    return root


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/corpus.py OUTPUT_DIR")
    out = build_corpus(Path(sys.argv[1]))
    print(f"wrote {sum(1 for _ in out.rglob('*'))} files and folders under {out}")
