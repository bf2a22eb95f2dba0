"""Writers for awkward image files: odd modes, broken files, decompression-bomb headers.

Shared by test_io_utils.py (reader behaviour) and test_index.py (a gallery that holds them).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

#: Orientation tag of EXIF (0x0112); value 6 means "rotate 90 degrees clockwise to view".
EXIF_ORIENTATION = 0x0112


def write_exif_rotated_jpeg(path: Path, *, size: tuple[int, int] = (64, 32)) -> Path:
    """A JPEG stored ``size`` (w, h) with orientation 6; its top-left quarter is red, rest blue."""
    w, h = size
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:] = (0, 0, 255)
    arr[: h // 2, : w // 2] = (255, 0, 0)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    Image.fromarray(arr).save(path, format="JPEG", quality=95, exif=exif)
    return path


def write_cmyk_jpeg(path: Path, *, size: tuple[int, int] = (40, 30)) -> Path:
    """A CMYK JPEG of pure red (C=0, M=255, Y=255, K=0)."""
    Image.new("CMYK", size, (0, 255, 255, 0)).save(path, format="JPEG", quality=95)
    return path


def write_16bit_grey_png(path: Path) -> Path:
    """A 16-bit greyscale PNG, 4x3: row 0 = 65535, row 1 = 0, row 2 = 32896 (128.5 * 256)."""
    arr = np.zeros((3, 4), dtype=np.uint16)
    arr[0] = 65535
    arr[2] = 32896
    Image.fromarray(arr).save(path, format="PNG")
    return path


def write_16bit_rgb_png(path: Path) -> Path:
    """A 16-bit RGB PNG (written by OpenCV), 5x4, every pixel RGB (65535, 0, 32896)."""
    bgr = np.zeros((4, 5, 3), dtype=np.uint16)
    bgr[..., 2] = 65535
    bgr[..., 0] = 32896
    if not cv2.imwrite(str(path), bgr):
        raise RuntimeError(f"cv2 could not write {path}")
    return path


def write_rgba_png(path: Path, *, size: tuple[int, int] = (20, 10)) -> Path:
    """An RGBA PNG: left half opaque red, right half fully transparent (black under it)."""
    w, h = size
    arr = np.zeros((h, w, 4), dtype=np.uint8)
    arr[:, : w // 2] = (255, 0, 0, 255)
    arr[:, w // 2 :] = (0, 0, 0, 0)
    Image.fromarray(arr, mode="RGBA").save(path, format="PNG")
    return path


def write_palette_png(path: Path) -> Path:
    """A palette PNG, 6x4: left half palette entry 1 = green, right half entry 2 = blue."""
    img = Image.new("P", (6, 4), 1)
    img.putpalette([0, 0, 0, 0, 200, 0, 0, 0, 200] + [0] * (256 * 3 - 9))
    img.paste(2, (3, 0, 6, 4))
    img.save(path, format="PNG")
    return path


def write_grey_png(path: Path) -> Path:
    """An 8-bit greyscale PNG, 8x6, value 77 everywhere."""
    Image.new("L", (8, 6), 77).save(path, format="PNG")
    return path


def write_zero_byte(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def write_text_as_image(path: Path) -> Path:
    path.write_text("this is not an image, only text with an image's name\n", encoding="utf-8")
    return path


def write_truncated_jpeg(path: Path) -> Path:
    """A valid 128x96 noise JPEG cut to 40% of its bytes (header intact, scan data missing)."""
    rng = np.random.default_rng(7)
    arr = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    full = path.with_name(path.name + ".full")
    Image.fromarray(arr).save(full, format="JPEG", quality=90)
    data = full.read_bytes()
    full.unlink()
    path.write_bytes(data[: int(len(data) * 0.4)])
    return path


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def write_png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG file whose IHDR claims ``width`` x ``height`` RGB (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )
    path.write_bytes(data)
    return path


def write_gallery_with_bad_inputs(root: Path) -> dict[str, list[str]]:
    """Write a gallery of good and bad files under ``root``.

    Returns:
        {"good": [...], "bad": [...]} relative POSIX paths.
    """
    from conftest import make_image

    root.mkdir(parents=True, exist_ok=True)
    good = {
        "a_plain.png": lambda p: make_image(p, (200, 30, 30), seed=1),
        "b_plain.jpg": lambda p: make_image(p, (30, 160, 60), seed=2),
        "c_cmyk.jpg": write_cmyk_jpeg,
        "d_16bit.png": write_16bit_grey_png,
        "e_rgba.png": write_rgba_png,
    }
    bad = {
        "f_zero.jpg": write_zero_byte,
        "g_text.png": write_text_as_image,
        "h_truncated.jpg": write_truncated_jpeg,
    }
    for name, writer in {**good, **bad}.items():
        writer(root / name)
    return {"good": sorted(good), "bad": sorted(bad)}
