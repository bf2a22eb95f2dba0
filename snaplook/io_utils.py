"""Files in and out: finding images and videos, reading images robustly, atomic writes.

Every reader here either returns good data or raises `SnaplookError` naming the file;
every writer writes to a temporary name in the same folder and renames it into place.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import secrets
import shutil
import struct
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snaplook.errors import SnaplookError

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"})

#: Images whose header claims more pixels than this are refused before any pixel is
#: decoded (a decompression bomb: 60000x60000 RGB would need 10 GB).
MAX_IMAGE_PIXELS = 100_000_000


def _find_files(root: Path, extensions: frozenset[str]) -> list[Path]:
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise SnaplookError(f"{root}: no such file or folder; check the path.")
    found: list[Path] = []
    # os.walk without followlinks never enters a symlinked folder, so a symlink loop
    # cannot make discovery spin; symlinked files are still listed.
    for dirpath, dirnames, filenames in os.walk(root, onerror=_log_walk_error):
        # Hidden folders (.git, .thumbnails, snaplook's own .<name>.tmp) hold no gallery.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if Path(name).suffix.lower() in extensions and not name.startswith("."):
                found.append(Path(dirpath) / name)
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    logger.info("found %d file(s) under %s", len(found), root)
    return found


def _log_walk_error(exc: OSError) -> None:
    logger.warning("cannot list %s: %s", exc.filename, exc.strerror)


def find_images(root: str | Path) -> list[Path]:
    """List the images under ``root`` (recursive, case-insensitive extensions, sorted).

    Args:
        root: a folder, or a single image file (returned as a one-element list).

    Returns:
        Paths sorted by their path relative to ``root``, so the order is the same on
        every machine.

    Raises:
        SnaplookError: if ``root`` does not exist.
    """
    return _find_files(Path(root), IMAGE_EXTENSIONS)


def find_videos(root: str | Path) -> list[Path]:
    """List the videos under ``root`` (a folder, recursive and sorted) or ``root`` itself."""
    return _find_files(Path(root), VIDEO_EXTENSIONS)


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
        SnaplookError: empty, unreadable, truncated or non-image file, or a decompression
            bomb; the message names the file.
    """
    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError as exc:
        raise SnaplookError(f"{path}: is a folder, not an image.") from exc
    except PermissionError as exc:
        raise SnaplookError(f"{path}: permission denied; check the file's permissions.") from exc
    except OSError as exc:
        raise SnaplookError(f"{path}: cannot read ({exc.strerror or exc}).") from exc
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


def file_sha1(path: str | Path, *, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-1 of a file's bytes (read in chunks)."""
    digest = hashlib.sha1()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | Path, *, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (read in chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
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
    path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]
) -> None:
    """Write a CSV file (header first) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(rows)


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """Read a CSV file with a header row as a list of dicts."""
    with open(path, newline="", encoding="utf-8") as fh:
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
        SnaplookError: missing, truncated, pickled or otherwise unreadable file.
    """
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise SnaplookError(f"{path}: file not found.")
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


def make_temp_dir(final_dir: str | Path) -> Path:
    """Create an empty temporary folder beside ``final_dir`` (same file system)."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    return _make_temp(final_dir, folder=True)


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
    if not path.is_file():
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
    """Hold the lock file ``path`` (holding our pid) for the duration of the block.

    The file is created with ``O_CREAT | O_EXCL``, so only one process can hold it. A
    lock left by a process that no longer runs (killed, crashed) is taken over.

    Args:
        path: the lock file, e.g. ``output/index.lock``.
        what: what the lock protects, for the message, e.g. "index output/index".

    Raises:
        SnaplookError: another live process holds the lock.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _take_lock(path, what)
    except OSError as exc:
        raise SnaplookError(
            f"cannot create {path} for {what} ({exc.strerror or exc}); check that the "
            "output folder is writable."
        ) from exc
    try:
        yield path
    finally:
        if _lock_owner(path) == (os.getpid(), _hostname()):
            with contextlib.suppress(OSError):
                path.unlink()


def _hostname() -> str:
    import socket

    return socket.gethostname()


def _lock_owner(path: Path) -> tuple[int, str] | None:
    try:
        pid, _, host = path.read_text(encoding="utf-8").strip().partition(" ")
        return int(pid), host
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    except OSError:
        return False
    return True


def _take_lock(path: Path, what: str) -> None:
    import time

    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _lock_owner(path)
            if owner is None:
                # Empty or garbled: a process may be between creating and writing it.
                try:
                    young = time.time() - path.stat().st_mtime < 10
                except FileNotFoundError:
                    continue
                if young:
                    time.sleep(0.2)
                    continue
            else:
                pid, host = owner
                if host != _hostname() or _pid_alive(pid):
                    raise SnaplookError(
                        f"{what} is being written by another snaplook process (pid {pid}"
                        f"{'' if host == _hostname() else ' on ' + host}); wait for it to "
                        f"finish. If that process is gone, delete {path}."
                    ) from None
            logger.warning(
                "taking over the stale lock %s (its process %s is not running)",
                path,
                owner[0] if owner else "?",
            )
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(f"{os.getpid()} {_hostname()}\n")
        return
    raise SnaplookError(f"cannot take the lock {path} for {what}; delete it if no run is active.")


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
