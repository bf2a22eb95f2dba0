"""Files in and out: the input gate, finding images and videos, reading images robustly,
atomic writes, the output lock.

Every file snaplook reads passes the input gate (:func:`check_input`, :func:`open_input`):
regular files only, under a size cap per kind, so a FIFO, a device or a runaway file can
neither hang a command nor fill its memory. Every reader here either returns good data or
raises `SnaplookError` naming the file; every writer writes to a temporary name in the same
folder and renames it into place.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import stat
import struct
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from snaplook.errors import SnaplookError

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"})

#: Images whose header claims more pixels than this are refused before any pixel is
#: decoded (a decompression bomb: 60000x60000 RGB would need 10 GB).
MAX_IMAGE_PIXELS = 100_000_000

_MIB = 1 << 20
#: Size caps of the input gate in bytes, by kind of file: a bigger file is refused before a
#: byte of it is read. Images are read whole into memory (an uncompressed 100 Mpx RGB TIFF,
#: the pixel cap, is 300 MB); videos are streamed by FFmpeg, so their cap only stops
#: nonsense; tables are manifests, catalogues and partition lists (a 10 M-row manifest is
#: about 1.2 GB); JSON files are index/head metadata and checkpoints; heads are trained
#: head weights; arrays are feature shards (memory-mapped, never read whole); "file" is any
#: other file hashed or copied.
INPUT_CAPS: dict[str, int] = {
    "image": 512 * _MIB,
    "video": 1 << 40,
    "table": 2048 * _MIB,
    "json": 64 * _MIB,
    "head": 1024 * _MIB,
    "array": 1 << 40,
    "file": 1 << 40,
}
_KIND_NOUNS = {
    "image": "an image",
    "video": "a video",
    "table": "a CSV or text table",
    "json": "a JSON file",
    "head": "a head weights file",
    "array": "an array file",
    "file": "a file",
}
# What a non-regular file is, for the refusal message.
_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def display_path(path: str | Path) -> str:
    """``path`` as text that can always be printed and written into a UTF-8 file.

    A file name that is not valid UTF-8 reaches Python with surrogate escapes, which
    cannot be encoded; its raw bytes are shown as ``\\xff`` escapes instead (the name
    ``caf\\xe9.jpg``). Valid names are returned unchanged.
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _check_utf8_name(path: str | Path) -> None:
    """Refuse a file name that is not valid UTF-8 (it could not be written into the UTF-8
    CSV and JSON files that list it).

    Raises:
        SnaplookError: naming the file with its bad bytes escaped (:func:`display_path`).
    """
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise SnaplookError(
            f"{display_path(path)}: file name is not valid UTF-8; rename the file "
            "(snaplook lists names in UTF-8 CSV and JSON files)."
        ) from None


def _format_bytes(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", _MIB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


def _check_stat(st: os.stat_result, name: str, kind: str) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise SnaplookError(f"{name}: is a folder, not {_KIND_NOUNS[kind]}.")
    if not stat.S_ISREG(st.st_mode):
        what = next((w for test, w in _SPECIAL_KINDS if test(st.st_mode)), "not a regular file")
        raise SnaplookError(
            f"{name}: is {what}, not a regular file; snaplook reads only regular files."
        )
    cap = INPUT_CAPS[kind]
    if st.st_size > cap:
        raise SnaplookError(
            f"{name}: {_format_bytes(st.st_size)} is over snaplook's {_format_bytes(cap)} "
            f"limit for {_KIND_NOUNS[kind]}; refusing to read it."
        )


def check_input(path: str | Path, *, kind: str) -> os.stat_result:
    """The input gate's checks without opening: ``path`` is a regular file (or a symlink
    to one) no bigger than ``INPUT_CAPS[kind]``; its name is valid UTF-8 (except videos,
    which are opened through an ASCII link).

    Use it before handing a path to a library that opens it itself (FFmpeg, Keras, FAISS,
    ``np.load``); read through :func:`open_input` wherever snaplook opens the file.

    Args:
        path: the file.
        kind: one of ``INPUT_CAPS`` ("image", "video", "table", "json", "head", "array",
            "file").

    Returns:
        The file's ``os.stat`` result.

    Raises:
        SnaplookError: missing or unreadable path, a folder, a FIFO, device or socket, a
            file over the cap, or (except videos) a name that is not valid UTF-8.
    """
    if kind not in INPUT_CAPS:
        raise ValueError(f"kind must be one of {sorted(INPUT_CAPS)}, got {kind!r}")
    if kind != "video":
        _check_utf8_name(path)
    name = display_path(path)
    try:
        st = os.stat(path)
    except PermissionError as exc:
        raise SnaplookError(f"{name}: permission denied; check the file's permissions.") from exc
    except OSError as exc:
        raise SnaplookError(f"{name}: cannot read ({exc.strerror or exc}).") from exc
    _check_stat(st, name, kind)
    return st


def open_input(path: str | Path, *, kind: str) -> BinaryIO:
    """Open a file for reading through the input gate (see :func:`check_input`).

    The file is opened with ``O_NONBLOCK``, so a FIFO swapped in after the check cannot
    block the open, and checked again on the open descriptor (``fstat``).

    Returns:
        A binary file object, to use as ``with open_input(path, kind="json") as fh:``.

    Raises:
        SnaplookError: as :func:`check_input`, or the file cannot be opened.
    """
    check_input(path, kind=kind)
    name = display_path(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except PermissionError as exc:
        raise SnaplookError(f"{name}: permission denied; check the file's permissions.") from exc
    except IsADirectoryError as exc:
        raise SnaplookError(f"{name}: is a folder, not {_KIND_NOUNS[kind]}.") from exc
    except OSError as exc:
        raise SnaplookError(f"{name}: cannot read ({exc.strerror or exc}).") from exc
    try:
        _check_stat(os.fstat(fd), name, kind)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def read_input_bytes(path: str | Path, *, kind: str) -> bytes:
    """All the bytes of a file, read through the input gate (see :func:`open_input`).

    Raises:
        SnaplookError: as :func:`open_input`, or the file grew past the cap while read.
    """
    cap = INPUT_CAPS[kind]
    with open_input(path, kind=kind) as fh:
        try:
            data = fh.read(cap + 1)
        except OSError as exc:
            raise SnaplookError(
                f"{display_path(path)}: cannot read ({exc.strerror or exc})."
            ) from exc
    if len(data) > cap:
        raise SnaplookError(
            f"{display_path(path)}: grew past snaplook's {_format_bytes(cap)} limit for "
            f"{_KIND_NOUNS[kind]} while being read; refusing it."
        )
    return data


def _find_files(
    root: Path,
    extensions: frozenset[str],
    on_skip: Callable[[Path, str], None] | None,
    *,
    utf8_names: bool,
) -> list[Path]:
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        if os.path.exists(root):  # a FIFO or device given as the gallery
            check_input(root, kind="file")
        raise SnaplookError(f"{root}: no such file or folder; check the path.")
    found: list[Path] = []
    # Not os.walk: its listing would need one more stat per file to tell FIFOs and devices
    # from regular files, which scandir's entries know for free. Symlinked folders are
    # never entered, so a symlink loop cannot make discovery spin; symlinked files are
    # listed.
    folders = [root]
    while folders:
        try:
            with os.scandir(folders.pop()) as listing:
                entries = list(listing)
        except OSError as exc:
            _log_walk_error(exc)
            continue
        for entry in entries:
            # Hidden entries (.git, .thumbnails, snaplook's own .<name>.tmp) hold no gallery.
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                folders.append(Path(entry.path))
            elif os.path.splitext(entry.name)[1].lower() in extensions:
                refused = _refusal(entry, check_name=utf8_names)
                if refused is None:
                    found.append(Path(entry.path))
                elif refused:
                    logger.warning("skipped %s", refused)
                    if on_skip is not None:
                        on_skip(Path(entry.path), refused)
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    logger.info("found %d file(s) under %s", len(found), display_path(root))
    return found


def _refusal(entry: os.DirEntry[str], *, check_name: bool) -> str | None:
    """Why discovery leaves ``entry`` out: a message, "" to leave it out silently (a
    symlinked folder), or None to list it."""
    if check_name:
        try:
            _check_utf8_name(entry.path)
        except SnaplookError as exc:
            return str(exc)
    try:
        if entry.is_file():  # a regular file, or a symlink to one (d_type: no system call)
            return None
        st = os.stat(entry.path)
    except OSError:
        return None  # dangling or looping symlink: the reader says why, in skipped.csv
    if stat.S_ISDIR(st.st_mode):
        return ""
    try:
        _check_stat(st, display_path(entry.path), "file")
    except SnaplookError as exc:
        return str(exc)
    return None


def _log_walk_error(exc: OSError) -> None:
    logger.warning("cannot list %s: %s", display_path(exc.filename or "?"), exc.strerror)


def find_images(
    root: str | Path, *, on_skip: Callable[[Path, str], None] | None = None
) -> list[Path]:
    """List the images under ``root`` (recursive, case-insensitive extensions, sorted).

    Only regular files (and symlinks to them) with valid UTF-8 names are listed; a FIFO,
    device or socket with an image extension, or a name that is not UTF-8, is left out,
    logged and handed to ``on_skip``.

    Args:
        root: a folder, or a single image file (returned as a one-element list).
        on_skip: called with (path, reason) for each file left out, for ``skipped.csv``;
            the reason names the file with :func:`display_path`, so it can be written.

    Returns:
        Paths sorted by their path relative to ``root``, so the order is the same on
        every machine.

    Raises:
        SnaplookError: if ``root`` does not exist or is not a folder or regular file.
    """
    return _find_files(Path(root), IMAGE_EXTENSIONS, on_skip, utf8_names=True)


def find_videos(
    root: str | Path, *, on_skip: Callable[[Path, str], None] | None = None
) -> list[Path]:
    """List the videos under ``root`` (a folder, recursive and sorted) or ``root`` itself.

    As :func:`find_images`, except that names need not be UTF-8 (videos are opened through
    an ASCII link).
    """
    return _find_files(Path(root), VIDEO_EXTENSIONS, on_skip, utf8_names=False)


def read_image(path: str | Path, *, min_size: int | None = None) -> np.ndarray:
    """Read an image file as RGB uint8 (see :func:`read_image_with_size`)."""
    return read_image_with_size(path, min_size=min_size)[0]


def read_image_with_size(
    path: str | Path, *, min_size: int | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Read an image file as RGB uint8, whatever its mode, with EXIF orientation applied.

    Grey, grey+alpha, RGBA, palette, CMYK, YCbCr and 16-bit images are converted to
    8-bit RGB (alpha is composited on white, the background of product photos).

    Args:
        path: the image file.
        min_size: when given, a large JPEG may be decoded at a reduced scale (JPEG DCT
            scaling) as long as its shorter side stays at least ``min_size`` pixels. The
            result is then smaller than the file's nominal size.

    Returns:
        (image, (width, height)): ndarray of shape (h, w, 3), dtype uint8, and the size the
        file declares (upright, after EXIF orientation), whatever scale it was decoded at.

    Raises:
        SnaplookError: empty, unreadable, truncated or non-image file, a decompression
            bomb, or a file the input gate refuses (not a regular file, over
            ``INPUT_CAPS["image"]``, a name that is not UTF-8); the message names the file.
    """
    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    data = read_input_bytes(path, kind="image")
    if not data:
        raise SnaplookError(f"{path}: empty file (0 bytes).")
    try:
        with warnings.catch_warnings():
            # Pillow warns on stderr from 89 Mpx; MAX_IMAGE_PIXELS below is the real limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))
        with opened as img:
            width, height = img.size
            if width < 1 or height < 1:
                raise SnaplookError(f"{path}: image has no pixels ({width}x{height}).")
            if width * height > MAX_IMAGE_PIXELS:
                raise SnaplookError(
                    f"{path}: {width}x{height} pixels is over the limit of "
                    f"{MAX_IMAGE_PIXELS:,}; refusing a possible decompression bomb. "
                    "Downscale the image first."
                )
            if min_size and img.format == "JPEG":
                scale = min(width, height) / min_size
                if scale >= 2:
                    # draft() picks the smallest DCT scale (1/2, 1/4, 1/8) that keeps the
                    # requested size, so decoding skips most of the work on big photos.
                    img.draft("RGB", (int(width / scale) + 1, int(height / scale) + 1))
            img.load()
            # Orientations 5-8 turn the picture a quarter: the upright size is swapped.
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                width, height = height, width
            img = ImageOps.exif_transpose(img)
            return _to_rgb_uint8(img, np), (width, height)
    except SnaplookError:
        raise
    except UnidentifiedImageError as exc:
        raise SnaplookError(f"{path}: not an image file (unknown format).") from exc
    except Image.DecompressionBombError as exc:
        raise SnaplookError(f"{path}: refused as a possible decompression bomb ({exc}).") from exc
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
        raise SnaplookError(
            f"{path}: cannot decode image ({exc}); the file may be truncated."
        ) from exc
    except MemoryError as exc:
        raise SnaplookError(f"{path}: too large to decode in memory.") from exc


def _to_rgb_uint8(img: Any, np: Any) -> np.ndarray:
    from PIL import Image

    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img)
        if mode == "I":
            peak = 65535 if arr.max(initial=0) > 255 else 255
        else:
            peak = 65535
        arr8 = np.clip(arr.astype(np.float64) * (255.0 / peak), 0, 255).round().astype(np.uint8)
        return np.repeat(arr8[..., None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=0))
        arr8 = ((arr - lo) * (255.0 / (hi - lo or 1.0))).round().astype(np.uint8)
        return np.repeat(arr8[..., None], 3, axis=2)
    if mode == "P":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(rgb)


def file_sha1(path: str | Path, *, kind: str = "file", chunk_size: int = 1 << 20) -> str:
    """Hex SHA-1 of a file's bytes (read in chunks through the input gate, as ``kind``)."""
    return _file_digest(hashlib.sha1(), path, kind, chunk_size)


def file_sha256(path: str | Path, *, kind: str = "file", chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (read in chunks through the input gate, as ``kind``)."""
    return _file_digest(hashlib.sha256(), path, kind, chunk_size)


def _file_digest(digest: Any, path: str | Path, kind: str, chunk_size: int) -> str:
    with open_input(path, kind=kind) as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    An exception (or a kill) inside the block leaves ``path`` as it was: no half file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_temp(path, folder=False)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def timestamp() -> str:
    """Now, as every snaplook JSON file records it: UTC ISO 8601 to the second
    (``2026-12-03T07:50:00+00:00``)."""
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="seconds")


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_csv_atomic(
    path: str | Path,
    header: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    spreadsheet: bool = False,
) -> None:
    """Write a CSV file (header first) to ``path`` atomically.

    Args:
        path: the CSV file.
        header: the column names.
        rows: the rows, one sequence of cells each.
        spreadsheet: bool, default=False. The file is one a person opens in a spreadsheet
            (query results, looks): a text cell that starts with ``=``, ``+``, ``-``,
            ``@``, a tab or a carriage return, and is not a plain number, is written with a
            leading ``'`` so the spreadsheet shows it as text instead of running it as a
            formula (OWASP "CSV injection"). Numbers, including ``-0.5`` as a number or as
            text, are written as they are. Keep the raw values in the JSON twin; never set
            this for files snaplook reads back (manifests), whose paths must stay exact.
    """
    if spreadsheet:
        rows = ([_neutralise_formula(cell) for cell in row] for row in rows)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(rows)


_FORMULA_LEADS = ("=", "+", "-", "@", "\t", "\r")


def _neutralise_formula(cell: Any) -> Any:
    """``cell`` made safe for a spreadsheet: a ``str`` that a spreadsheet would run as a
    formula (it starts with ``= + - @``, a tab or a carriage return and is not a plain
    number) gets a leading ``'``; anything else is returned unchanged."""
    if not isinstance(cell, str) or not cell.startswith(_FORMULA_LEADS):
        return cell
    with contextlib.suppress(ValueError):
        float(cell)
        return cell
    return "'" + cell


def read_csv(path: str | Path, *, kind: str = "table") -> list[dict[str, str]]:
    """Read a CSV file with a header row, through the input gate, as a list of dicts.

    Raises:
        SnaplookError: the input gate refuses the file (see :func:`check_input`).
    """
    with open_input(path, kind=kind) as raw:
        with io.TextIOWrapper(raw, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))


def save_npy_atomic(path: str | Path, array: np.ndarray) -> None:
    """Save an array as ``.npy`` (never pickled) atomically."""
    import numpy as np

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)


def load_npy(path: str | Path, *, mmap: bool = False) -> np.ndarray:
    """Load a ``.npy`` file without ever unpickling (object arrays are refused).

    Raises:
        SnaplookError: missing, truncated, pickled or otherwise unreadable file, or one the
            input gate refuses (a FIFO, a device, over ``INPUT_CAPS["array"]``).
    """
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise SnaplookError(f"{path}: file not found.")
    check_input(path, kind="array")
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except ValueError as exc:
        raise SnaplookError(
            f"{path}: not a plain numeric .npy file ({exc}); refusing to load it "
            "(snaplook never unpickles)."
        ) from exc
    except (OSError, EOFError) as exc:
        raise SnaplookError(f"{path}: cannot read .npy file ({exc}); it may be truncated.") from exc


def replace_dir(tmp_dir: str | Path, final_dir: str | Path, *, marker: str | None = None) -> None:
    """Move a finished ``tmp_dir`` onto ``final_dir``, replacing an older one.

    The old directory is renamed aside first and removed only after the new one is in
    place, so at every moment ``final_dir`` is either the old or the new complete result.

    Args:
        tmp_dir: the finished folder (from :func:`make_temp_dir`).
        final_dir: where it goes.
        marker: a file every result of this kind holds (``frames.csv``, ``meta.json``).
            When given, an existing non-empty ``final_dir`` without it is not replaced:
            it is the user's folder, not an older result.

    Raises:
        SnaplookError: ``final_dir`` is a file, or (with ``marker``) a folder that is not
            an older result.
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    if final_dir.exists() and not final_dir.is_dir():
        raise SnaplookError(f"{final_dir} is a file; refusing to replace it with a folder.")
    if (
        marker is not None
        and final_dir.is_dir()
        and not (final_dir / marker).is_file()
        and any(final_dir.iterdir())
    ):
        raise SnaplookError(
            f"{final_dir} exists and is not a snaplook output (no {marker}); refusing to "
            "replace it. Choose another output folder or move it away."
        )
    _let_go(tmp_dir)
    if final_dir.is_dir() and not final_dir.is_symlink() and _exchange(tmp_dir, final_dir):
        shutil.rmtree(tmp_dir, ignore_errors=True)  # now holds the old result
        return
    old = None
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one step (Linux renameat2 RENAME_EXCHANGE); False if unsupported.

    Two renames leave a moment with no folder at ``b``; a kill then would lose the
    result. The exchange has no such moment.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    c_int, c_path = ctypes.c_int, ctypes.c_char_p
    renameat2.argtypes = [c_int, c_path, c_int, c_path, ctypes.c_uint]
    done = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return done == 0


# Temporary folders this process is building: path -> descriptor holding a flock on the
# folder, which tells a later run that its owner is alive (the kernel drops it on death).
_HELD_TEMP_DIRS: dict[str, int] = {}
# An unlocked temporary folder younger than this may be one another process has just made
# and not yet locked (mkdir, then flock): it is left alone.
_ORPHAN_MIN_AGE_S = 5.0


def make_temp_dir(final_dir: str | Path) -> Path:
    """Create an empty temporary folder beside ``final_dir`` (same file system).

    Leftovers of earlier runs for the same ``final_dir`` (``.<name>.<hex>.tmp`` folders of a
    killed process) are removed first; a folder another live process is still building
    is kept. Hand the folder to :func:`replace_dir` when it is finished.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphan_temp_dirs(final_dir)
    tmp = _make_temp(final_dir, folder=True)
    _hold(tmp)
    return tmp


def _hold(folder: Path) -> None:
    try:
        import fcntl
    except ImportError:  # not POSIX: leftovers are then never removed
        return
    for stale in [p for p in _HELD_TEMP_DIRS if not os.path.lexists(p)]:
        _let_go(stale)  # removed by its caller (a failed run): close its descriptor
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return
    _HELD_TEMP_DIRS[os.fspath(folder)] = fd


def _let_go(folder: str | Path) -> None:
    fd = _HELD_TEMP_DIRS.pop(os.fspath(folder), None)
    if fd is not None:
        os.close(fd)


def _remove_orphan_temp_dirs(final_dir: Path) -> None:
    try:
        import fcntl
    except ImportError:
        return
    pattern = re.compile(rf"\.{re.escape(final_dir.name)}\.[0-9a-f]{{8}}\.tmp")
    with contextlib.suppress(OSError), os.scandir(final_dir.parent) as listing:
        leftovers = [
            Path(e.path)
            for e in listing
            if pattern.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
        ]
    for folder in leftovers:
        if os.fspath(folder) in _HELD_TEMP_DIRS:
            continue
        try:
            if time.time() - folder.stat().st_mtime < _ORPHAN_MIN_AGE_S:
                continue
            fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its owner is alive and still building it
        else:
            shutil.rmtree(folder, ignore_errors=True)
            logger.info("removed %s, left by a run that was stopped", display_path(folder))
        finally:
            os.close(fd)


def _make_temp(final: Path, *, folder: bool) -> Path:
    # Not tempfile.mkstemp/mkdtemp: they create 0600/0700 entries, and the rename would
    # hand the user an index or results only they can read. os.open/os.mkdir honour umask.
    for _ in range(100):
        tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp")
        try:
            if folder:
                tmp.mkdir(mode=0o777)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise SnaplookError(f"{final.parent}: cannot create a temporary file there.")


def relative_or_absolute(path: str | Path, root: str | Path) -> str:
    """``path`` relative to ``root`` in POSIX form when it is under it, else absolute."""
    path, root = Path(path), Path(root)
    # Lexically first: a symlink in a gallery keeps its own name (resolving would name its
    # target, twice for two links to one file), and a symlink loop cannot make it fail.
    absolute = Path(os.path.abspath(path))
    with contextlib.suppress(ValueError):
        return absolute.relative_to(os.path.abspath(root)).as_posix()
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except (ValueError, OSError, RuntimeError):
        return absolute.as_posix()


MANIFEST_HEADER = ("row", "path", "width", "height", "bytes", "mtime", "sha1")


@dataclass(frozen=True)
class ManifestRow:
    """One image in an index or feature file: where it is and enough to tell if it changed."""

    row: int
    path: str
    width: int
    height: int
    bytes: int
    mtime: float
    sha1: str

    def as_csv(self) -> tuple[Any, ...]:
        return (
            self.row,
            self.path,
            self.width,
            self.height,
            self.bytes,
            f"{self.mtime:.6f}",
            self.sha1,
        )


def manifest_row(path: Path, root: Path, row: int, size: tuple[int, int]) -> ManifestRow:
    """Describe ``path`` (stat + SHA-1) as row ``row``, its path relative to ``root``."""
    st = path.stat()
    return ManifestRow(
        row=row,
        path=relative_or_absolute(path, root),
        width=size[0],
        height=size[1],
        bytes=st.st_size,
        mtime=st.st_mtime,
        sha1=file_sha1(path),
    )


def write_manifest(path: str | Path, rows: Iterable[ManifestRow]) -> None:
    """Write ``manifest.csv`` atomically."""
    write_csv_atomic(path, MANIFEST_HEADER, (r.as_csv() for r in rows))


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """Read a ``manifest.csv``.

    Raises:
        SnaplookError: missing file, missing columns or non-numeric values.
    """
    path = Path(path)
    if not path.exists():
        raise SnaplookError(f"{path} is missing; rebuild the index.")
    try:
        return [
            ManifestRow(
                row=int(r["row"]),
                path=r["path"],
                width=int(r["width"]),
                height=int(r["height"]),
                bytes=int(r["bytes"]),
                mtime=float(r["mtime"]),
                sha1=r["sha1"],
            )
            for r in read_csv(path)
        ]
    except (KeyError, ValueError, TypeError, csv.Error, UnicodeDecodeError) as exc:
        raise SnaplookError(f"{path} is malformed ({exc}); rebuild the index.") from exc


@contextlib.contextmanager
def exclusive_lock(path: str | Path, *, what: str) -> Iterator[Path]:
    """Hold the output lock ``path`` for the duration of the block.

    The lock is a kernel lock (``flock``, through the ``filelock`` package) on ``path``:
    the kernel releases it when its holder exits in any way (killed, crashed), so there is
    no stale lock to take over and no race in taking one over. The file holds the holder's
    pid and host, for people and for the refusal message, and is removed when the block
    ends; a killed run leaves it behind, and the next run takes it, saying so.

    Args:
        path: the lock file, e.g. ``output/index.lock``.
        what: what the lock protects, for the message, e.g. "the index output/index".

    Raises:
        SnaplookError: another process holds the lock ("<what> is being written by another
            snaplook process (pid N); wait for it to finish."), or the lock file cannot be
            created.
    """
    path = Path(path)
    previous = _lock_owner(path)  # before locking: filelock may empty the file it takes
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        kernel_lock = _take_kernel_lock(path)
    except OSError as exc:
        raise SnaplookError(
            f"cannot create {path} for {what} ({exc.strerror or exc}); check that the "
            "output folder is writable."
        ) from exc
    if kernel_lock is None:
        owner = _lock_owner(path)
        holder = "pid unknown" if owner is None else f"pid {owner[0]}"
        if owner is not None and owner[1] != _hostname():
            holder += f" on {owner[1]}"
        raise SnaplookError(
            f"{what} is being written by another snaplook process ({holder}); wait for it "
            "to finish."
        )
    try:
        me = (os.getpid(), _hostname())
        # The file read before locking may be a holder's that has just finished (it
        # removes the file; we read it first): warn only about a process that is gone.
        if previous is not None and previous != me and not _pid_alive(previous):
            logger.warning(
                "taking over the stale lock %s (its process %s is not running)", path, previous[0]
            )
        # In place, not by rename: the kernel lock belongs to this inode.
        with open(path, "r+", encoding="utf-8") as fh:
            fh.truncate(0)
            fh.write(f"{me[0]} {me[1]}\n")
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still locked: a waiter that opened it sees it unlinked
        kernel_lock.release()


def _take_kernel_lock(path: Path) -> Any:
    """The acquired ``filelock.FileLock`` on ``path``, or None when another process holds it."""
    from filelock import FileLock, Timeout

    for _ in range(5):
        lock = FileLock(path, timeout=0)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return None
        # The holder before us unlinks the file on release: a lock won on that unlinked
        # inode is worth nothing (filelock 4 checks this itself; older releases do not).
        fd = getattr(getattr(lock, "_context", None), "lock_file_fd", None)
        try:
            current = os.stat(path)
            held = os.fstat(fd) if isinstance(fd, int) else current
        except OSError:
            lock.release()
            continue
        if held.st_nlink > 0 and os.path.samestat(held, current):
            return lock
        lock.release()
    return None


def _hostname() -> str:
    import socket

    return socket.gethostname()


def _pid_alive(owner: tuple[int, str]) -> bool:
    pid, host = owner
    if host != _hostname():
        return False  # its lock is free, so it is not running there either
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


def _lock_owner(path: Path) -> tuple[int, str] | None:
    try:
        pid, _, host = path.read_text(encoding="utf-8").strip().partition(" ")
        return int(pid), host
    except (OSError, ValueError, UnicodeDecodeError):
        return None


@contextlib.contextmanager
def deferred_sigint() -> Iterator[Callable[[], bool]]:
    """Within the block, the first Ctrl-C (SIGINT) only raises a flag; a second one stops at once.

    Yields a function that says whether Ctrl-C was pressed, so a long loop can stop at a
    safe point (between batches) by raising ``KeyboardInterrupt`` itself. Outside the
    main thread (signals cannot be handled there) the flag never rises.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    hits: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        hits.append(signum)
        if len(hits) > 1:
            raise KeyboardInterrupt
        logger.warning("Ctrl-C: stopping after the current batch (press it again to stop now).")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(hits)
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)


#: Columns of every ``skipped.csv`` (index, results, crops, looks, frames, evaluation).
SKIPPED_HEADER = ("path", "reason")


def write_skipped(path: str | Path, skipped: Iterable[tuple[str | Path, str]]) -> Path:
    """Write ``skipped.csv`` atomically: one row per input left out of a run.

    Args:
        path: the CSV file (``<folder>/skipped.csv``).
        skipped: (path, reason) pairs; a path may be a ``Path`` or text. A name that is
            not valid UTF-8 is written escaped (:func:`display_path`), never fatal.

    Returns:
        ``path``.
    """
    path = Path(path)
    rows = ((display_path(p), display_path(reason)) for p, reason in skipped)
    write_csv_atomic(path, SKIPPED_HEADER, rows)
    return path
