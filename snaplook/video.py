"""Frame extraction from video: fixed interval, scene changes, near-duplicate suppression.

The video is read once, front to back (``grab()`` for every frame, ``retrieve()`` only for
frames that are kept or analysed), with timestamps from the container; past damaged data
it seeks on and reports the frames lost.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snaplook.errors import SnaplookError
from snaplook.io_utils import (
    VIDEO_EXTENSIONS,
    check_input,
    display_path,
    find_videos,
    make_temp_dir,
    open_input,
    replace_dir,
    write_csv_atomic,
    write_json_atomic,
    write_skipped,
)
from snaplook.options import DEFAULT_EXTRACT_EVERY as DEFAULT_EVERY
from snaplook.options import DEFAULT_FORMAT, DEFAULT_QUALITY, DEFAULT_SCENE_THRESHOLD, IMAGE_FORMATS
from snaplook.options import DEFAULT_FRAMES_ROOT as DEFAULT_OUT_ROOT

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

#: A cut closer than this to the previous one is ignored (flashes, flicker).
DEFAULT_MIN_SCENE_S = 0.5
#: The frame kept for a scene is the sharpest one in its first this-many seconds, so a
#: long scene never holds frames in memory for long.
DEFAULT_SCENE_WINDOW_S = 1.0
FRAMES_CSV = "frames.csv"
FRAMES_CSV_HEADER = ("index", "frame", "time_s", "path", "reason")
#: Written beside ``frames.csv``: what was decoded, kept and lost (damaged stretches).
SUMMARY_JSON = "summary.json"
#: Written in the output root by :func:`extract_videos` on a folder: the videos skipped.
SKIPPED_CSV = "skipped.csv"
#: Leading bytes of still-image formats that FFmpeg would open as a one-frame "video".
_IMAGE_SIGNATURES = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
)

# Scene analysis works on frames this wide: enough for colour histograms, and resizing a
# full HD frame down to it costs less than the decoder's own colour conversion.
_ANALYSIS_WIDTH = 160
# Sharpness (variance of the Laplacian) is measured after halving the frame (pyrDown)
# until it is at most twice this wide: downscaling further smooths away the blur that it
# is meant to see.
_SHARPNESS_WIDTH = 320
_HIST_BINS = (16, 4, 4)  # H, S, V
# Adaptive part of the cut threshold (as PySceneDetect's AdaptiveDetector): a cut must also
# be RATIO times the mean distance of the scene's last N frames, so fast motion raises the
# bar. A mean, not mean + k * std: one spike (a flash, a suppressed cut) would blow up a
# std and hide the next real cut for N frames.
_ADAPTIVE_FRAMES = 50
_ADAPTIVE_RATIO = 3.0
# Two frames whose dHash bits match are still different if their colours are not alike
# (a flat red frame and a flat blue one have the same all-zero hash).
_DEDUP_MAX_HIST_DISTANCE = 0.25
# A 9x8 grey thumbnail with less spread than this has no structure to hash.
_FLAT_STD = 2.0
# A frame counts as due if it is at most this early: container times such as
# 0.30000000000000004 s or 0.9999 s must not push a frame to the next one.
_DUE_TOLERANCE_S = 1e-3
_FALLBACK_FPS = 25.0
# Past damaged data FFmpeg's reader stops as at the end of the file; a seek past the damage
# gets going again. Seeks go 1 s further each for this long (300 KB overwritten at 30% of
# the 139 s test video: 1235 of 1394 frames back, where 0.1 s steps gave 1238 in 4x the
# time), then double, so a file cut short costs a few dozen failed seeks, not one a second.
_RESEEK_FINE_S = 30.0


@dataclass
class Frame:
    """One kept frame.

    Attributes:
        index: 0-based order among the kept frames.
        frame: frame number in the video (0-based, in the order the decoder returns them).
        time_s: container timestamp in seconds (``CAP_PROP_POS_MSEC / 1000``).
        reason: ``"interval"``, ``"scene"`` or ``"interval+scene"``.
        image: ndarray of shape (H, W, 3), dtype uint8, RGB, when kept in memory.
        path: the image file written, when writing.
        scene: 0-based scene number when ``reason`` includes ``"scene"``.
    """

    index: int
    frame: int
    time_s: float
    reason: str
    image: np.ndarray | None = field(default=None, repr=False)
    path: Path | None = None
    scene: int | None = None


@dataclass(frozen=True)
class Scene:
    """A shot between two cuts: frames ``[start_frame, end_frame)``, times in seconds."""

    index: int
    start_frame: int
    start_s: float
    end_frame: int
    end_s: float


@dataclass(frozen=True)
class LostFrames:
    """A stretch of a video that could not be decoded (damaged or missing data).

    Attributes:
        first_frame: number of the first frame lost.
        n_frames: how many frames were lost (estimated from the timestamps and fps).
        start_s: time of the first frame lost, in seconds.
        end_s: time where decoding went on again (the end of the video if it did not).
    """

    first_frame: int
    n_frames: int
    start_s: float
    end_s: float


@dataclass
class VideoFrames:
    """What extraction did for one video.

    Attributes:
        video: the input video.
        out: the folder written (``None`` when nothing was written).
        frames: the kept frames, in video order.
        n_decoded: frames read from the video.
        duration_s: time of the last frame read.
        seconds: wall time of the run.
        error: why the video was skipped (folder input only); ``frames`` is then empty.
        lost: the stretches that could not be decoded, in video order.
    """

    video: Path
    out: Path | None
    frames: list[Frame] = field(default_factory=list)
    n_decoded: int = 0
    duration_s: float = 0.0
    seconds: float = 0.0
    error: str | None = None
    lost: list[LostFrames] = field(default_factory=list)

    @property
    def frames_per_second(self) -> float:
        """Decoded video frames per wall-clock second."""
        return self.n_decoded / self.seconds if self.seconds > 0 else 0.0

    @property
    def n_lost(self) -> int:
        """Frames that could not be decoded (sum over :attr:`lost`)."""
        return sum(span.n_frames for span in self.lost)


@dataclass
class _Stats:
    n_decoded: int = 0  # frames decoded
    end_frame: int = 0  # one past the number of the last frame decoded
    last_time_s: float = 0.0
    cuts: list[tuple[int, float]] = field(default_factory=list)
    lost: list[LostFrames] = field(default_factory=list)


def _import_cv2() -> Any:
    # FFmpeg prints its own complaints ("moov atom not found") on stderr for files we
    # then refuse with a clear message; silence them unless the user asked otherwise.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    import cv2

    return cv2


def _check_options(
    every: float | None,
    scenes: bool,
    max_frames: int | None,
    dedup: int | None,
    scene_threshold: float,
    min_scene_s: float,
    scene_window_s: float,
) -> float | None:
    if every is not None and (isinstance(every, bool) or not math.isfinite(float(every))):
        raise SnaplookError(f"--every must be a number of seconds, got {every!r}.")
    if every is not None and every < 0:
        raise SnaplookError(f"--every must be > 0 seconds, got {every}.")
    if not every:
        if not scenes:
            raise SnaplookError(
                f"--every must be > 0 seconds, got {every}; use --every 0 only with --scenes "
                "(scene changes only)."
            )
        every = None
    if max_frames is not None and max_frames < 1:
        raise SnaplookError(f"--max-frames must be at least 1, got {max_frames}.")
    if dedup is not None and not 0 <= dedup <= 64:
        raise SnaplookError(f"--dedup is a Hamming distance in bits (0-64), got {dedup}.")
    if not 0 < scene_threshold <= 1:
        raise SnaplookError(f"scene_threshold must be in (0, 1], got {scene_threshold}.")
    if min_scene_s < 0 or scene_window_s <= 0:
        raise SnaplookError(
            f"min_scene_s must be >= 0 and scene_window_s > 0, got {min_scene_s} and "
            f"{scene_window_s}."
        )
    return None if every is None else float(every)


def _open_video(video: Path) -> Any:
    cv2 = _import_cv2()
    name = display_path(video)
    if not video.exists():
        raise SnaplookError(f"{name}: no such file; check the path.")
    if video.is_dir():
        raise SnaplookError(f"{name}: is not a file; pass a video file or a folder of videos.")
    check_input(video, kind="video")  # a FIFO, a device, a dangling link, over the cap
    if not os.access(video, os.R_OK):
        raise SnaplookError(f"{name}: permission denied; check the file's permissions.")
    if video.stat().st_size == 0:
        raise SnaplookError(f"{name}: empty file (0 bytes), not a video.")
    kind = _still_image_kind(video)
    if kind:
        raise SnaplookError(
            f"{name}: is {kind}, not a video (judged by its content, whatever its name); "
            "use `snaplook crop` or `snaplook index` on images."
        )
    # OpenCV warns on stderr when a backend cannot open the file; we say it once, better.
    old_level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    try:
        cap = _capture(cv2, video)
    finally:
        cv2.utils.logging.setLogLevel(old_level)
    if not cap.isOpened():
        raise SnaplookError(
            f"{name}: not a video file that FFmpeg can open (unknown or corrupt container)."
        )
    return cap


def _capture(cv2: Any, video: Path) -> Any:
    """``cv2.VideoCapture`` of ``video``, through an ASCII-named link when its name is not
    valid UTF-8 (OpenCV would get a string with surrogate escapes and crash the process)."""
    import tempfile

    try:
        return cv2.VideoCapture(os.fspath(video).encode("utf-8").decode(), cv2.CAP_FFMPEG)
    except UnicodeEncodeError:
        pass
    suffix = video.suffix if video.suffix.isascii() and video.suffix.isprintable() else ""
    with tempfile.TemporaryDirectory(prefix="snaplook-video-") as folder:
        link = os.path.join(folder, "video" + suffix)
        os.symlink(os.path.abspath(video), link)
        # FFmpeg keeps its own descriptor once open: the link can go at once.
        return cv2.VideoCapture(link, cv2.CAP_FFMPEG)


def _still_image_kind(path: Path) -> str | None:
    """What still image ``path`` holds by its first bytes ("a JPEG image"), or None."""
    try:
        with open_input(path, kind="video") as fh:
            head = fh.read(16)
    except (OSError, SnaplookError):
        return None  # OpenCV then says why it cannot open the file
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    for signature, kind in _IMAGE_SIGNATURES:
        if head.startswith(signature):
            return kind
    return None


def _video_fps(cap: Any, video: Path) -> float:
    cv2 = _import_cv2()
    fps = cap.get(cv2.CAP_PROP_FPS)
    if not math.isfinite(fps) or not 0 < fps <= 1000:
        logger.warning(
            "%s: container reports no usable frame rate (%s); assuming %g fps for the "
            "progress estimate and any timestamp fallback.",
            display_path(video),
            fps,
            _FALLBACK_FPS,
        )
        return _FALLBACK_FPS
    return float(fps)


def probe_duration(video: str | Path) -> float | None:
    """Duration of a video in seconds from its container (frame count / fps), if known.

    Raises:
        SnaplookError: missing file or not a video.
    """
    cv2 = _import_cv2()
    cap = _open_video(Path(video))
    try:
        count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        fps = cap.get(cv2.CAP_PROP_FPS)
    finally:
        cap.release()
    if count > 0 and math.isfinite(fps) and 0 < fps <= 1000:
        return float(count / fps)
    return None


class _Clock:
    """Turns ``CAP_PROP_POS_MSEC`` into strictly increasing seconds, with a fallback."""

    def __init__(self, video: Path, fps: float) -> None:
        self.video = display_path(video)
        self.fps = fps
        self.first: float | None = None
        self.prev = -math.inf
        self.fallback = False
        self.warned_glitch = False

    def time_of(self, pos_msec: float, frame: int) -> float:
        t = pos_msec / 1000.0 if math.isfinite(pos_msec) else math.nan
        if frame == 0:
            self.first = t if math.isfinite(t) and t >= 0 else 0.0
            self.prev = self.first
            return self.first
        assert self.first is not None
        if frame == 1 and not t > self.first:
            # Some containers (raw streams, some AVIs) report 0 for every frame.
            self.fallback = True
            logger.warning(
                "%s: the container gives no usable timestamps (CAP_PROP_POS_MSEC = %s for "
                "frames 0 and 1); using frame number / %g fps instead.",
                self.video,
                pos_msec,
                self.fps,
            )
        if self.fallback:
            t = self.first + frame / self.fps
        elif not t > self.prev:
            if not self.warned_glitch:
                self.warned_glitch = True
                logger.info(
                    "%s: timestamp of frame %d (%s ms) does not increase; using the previous "
                    "one + 1/fps where that happens.",
                    self.video,
                    frame,
                    pos_msec,
                )
            t = self.prev + 1.0 / self.fps
        self.prev = t
        return round(t, 6)


class _CutDetector:
    """Content-change detector: HSV histogram distance against an adaptive threshold."""

    def __init__(self, threshold: float, min_scene_s: float) -> None:
        self.threshold = threshold
        self.min_scene_s = min_scene_s
        self.prev_hist: Any = None
        self.recent: deque[float] = deque(maxlen=_ADAPTIVE_FRAMES)
        self.scene_start_s = -math.inf

    def update(self, hist: Any, time_s: float) -> bool:
        """True when this frame starts a new scene (the first frame always does)."""
        cv2 = _import_cv2()
        prev, self.prev_hist = self.prev_hist, hist
        if prev is None:
            self.scene_start_s = time_s
            return True
        distance = cv2.compareHist(prev, hist, cv2.HISTCMP_BHATTACHARYYA)
        bar = self.threshold
        if self.recent:
            bar = max(bar, _ADAPTIVE_RATIO * sum(self.recent) / len(self.recent))
        if distance >= bar and time_s - self.scene_start_s >= self.min_scene_s:
            self.scene_start_s = time_s
            self.recent.clear()
            return True
        self.recent.append(distance)
        return False


def _small(bgr: np.ndarray, width: int) -> np.ndarray:
    from snaplook.transform_utils import resize_to_width

    # INTER_LINEAR samples rather than averages at this scale, which is what a histogram
    # needs; INTER_AREA measured 2-5 ms a frame (768x432 to 1920x1080), more than decoding.
    return resize_to_width(bgr, width, interpolation="linear")


def _hsv_hist(small_bgr: np.ndarray) -> np.ndarray:
    cv2 = _import_cv2()
    hsv = cv2.cvtColor(small_bgr, cv2.COLOR_BGR2HSV)
    hist = cv2.calcHist([hsv], [0, 1, 2], None, list(_HIST_BINS), [0, 180, 0, 256, 0, 256])
    cv2.normalize(hist, hist, 1.0, 0.0, cv2.NORM_L1)
    return hist


def _sharpness(bgr: np.ndarray) -> float:
    cv2 = _import_cv2()
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    while grey.shape[1] > 2 * _SHARPNESS_WIDTH:
        grey = cv2.pyrDown(grey)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def dhash(image: np.ndarray) -> int:
    """64-bit difference hash of an image (0 for a flat image with no structure).

    Args:
        image: ndarray of shape (H, W, 3) or (H, W), dtype uint8.

    Returns:
        int in [0, 2**64): bit i is set where a 9x8 grey thumbnail gets darker to the right.
    """
    import numpy as np

    cv2 = _import_cv2()
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
    thumb = cv2.resize(grey, (9, 8), interpolation=cv2.INTER_AREA).astype(np.float32)
    if float(thumb.std()) < _FLAT_STD:
        return 0
    bits = (thumb[:, :-1] > thumb[:, 1:]).ravel()
    return int(np.packbits(bits).view(">u8")[0])


class _Deduper:
    def __init__(self, max_bits: int) -> None:
        self.max_bits = max_bits
        self.last: tuple[int, Any] | None = None

    def is_duplicate(self, bgr: np.ndarray) -> bool:
        cv2 = _import_cv2()
        small = _small(bgr, _ANALYSIS_WIDTH)
        key = (dhash(small), _hsv_hist(small))
        if self.last is not None:
            bits = (key[0] ^ self.last[0]).bit_count()
            colour = cv2.compareHist(self.last[1], key[1], cv2.HISTCMP_BHATTACHARYYA)
            if bits <= self.max_bits and colour <= _DEDUP_MAX_HIST_DISTANCE:
                return True
        self.last = key
        return False


@dataclass
class _Pick:
    frame: int
    time_s: float
    bgr: Any
    reasons: set[str]
    scene: int | None = None


class _Scanner:
    """One front-to-back pass over a video: picks interval and scene frames, skips damage."""

    def __init__(
        self,
        video: Path,
        cap: Any,
        *,
        every: float | None,
        scenes: bool,
        max_frames: int | None,
        dedup: int | None,
        scene_threshold: float,
        min_scene_s: float,
        scene_window_s: float,
        stats: _Stats,
        on_progress: Callable[[int], None] | None,
        on_skip: Callable[[int, float, str], None] | None,
    ) -> None:
        self.cv2 = _import_cv2()
        self.video, self.name, self.cap, self.stats = video, display_path(video), cap, stats
        self.every, self.max_frames, self.scene_window_s = every, max_frames, scene_window_s
        self.on_progress, self.on_skip = on_progress, on_skip
        self.fps = _video_fps(cap, video)
        self.clock = _Clock(video, self.fps)
        self.detector = _CutDetector(scene_threshold, min_scene_s) if scenes else None
        self.deduper = _Deduper(dedup) if dedup is not None else None
        self.expected = cap.get(self.cv2.CAP_PROP_FRAME_COUNT)
        self.frame_no = -1
        self.time_s = 0.0
        self.next_due = 0.0
        self.n_kept = 0
        self.held: list[_Pick] = []  # picks waiting for the open scene window to close
        self.best: _Pick | None = None  # sharpest frame so far in the open scene window
        self.best_sharpness = -1.0
        self.window_end = -math.inf
        self.n_scenes = 0
        self.last_second = -1

    def frames(self) -> Iterator[Frame]:
        try:
            while self.max_frames is None or self.n_kept < self.max_frames:
                if not self._advance():
                    break
                yield from self._release(self._look())
                if self.on_progress is not None and int(self.time_s) != self.last_second:
                    self.last_second = int(self.time_s)
                    self.on_progress(self.last_second)
            yield from self._release(self._close_window())
            self._finish()
        finally:
            self.cap.release()

    def _advance(self) -> bool:
        """Move to the next decodable frame (past damaged data); False at the end."""
        if self.cap.grab():
            self.frame_no += 1
        elif not self._seek_past_damage():
            return False
        self.time_s = self.clock.time_of(self.cap.get(self.cv2.CAP_PROP_POS_MSEC), self.frame_no)
        self.stats.n_decoded += 1
        self.stats.end_frame, self.stats.last_time_s = self.frame_no + 1, self.time_s
        return True

    def _seek_past_damage(self) -> bool:
        """After a failed read before the container's end, seek on until a frame decodes."""
        cv2, last_s = self.cv2, self.stats.last_time_s
        end_s = self.expected / self.fps if self.expected > 0 else 0.0
        if self.frame_no < 0 or self.clock.fallback or end_s <= last_s + 1.0:
            return False  # the real end, or no timestamps to seek by
        step, target = 1.0, last_s
        while target < end_s:
            if target - last_s >= _RESEEK_FINE_S:
                step *= 2
            target += step
            self.cap.set(cv2.CAP_PROP_POS_MSEC, target * 1000.0)
            if not self.cap.grab():
                continue
            t = self.cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
            if not math.isfinite(t) or t <= last_s + 0.5 / self.fps:
                continue  # landed on a keyframe before the damage
            # By time, not CAP_PROP_POS_FRAMES: that counts packets, and a demuxer drops a
            # damaged one without a trace (MJPG in AVI).
            number = self.frame_no + max(1, round((t - last_s) * self.fps))
            self._lose(number - self.frame_no - 1, t, "decoding went on after them")
            self.frame_no = number
            return True
        return False

    def _lose(self, n_frames: int, end_s: float, then: str) -> None:
        if n_frames < 1:
            return
        start_s = round(self.stats.last_time_s + 1 / self.fps, 3)
        span = LostFrames(self.frame_no + 1, n_frames, start_s, round(end_s, 3))
        self.stats.lost.append(span)
        message = (
            f"{span.n_frames} frame(s) from {span.start_s:.1f} s to {span.end_s:.1f} s could "
            f"not be decoded (damaged or missing data); {then}"
        )
        logger.warning("%s: %s.", self.name, message)
        if self.on_skip is not None:
            self.on_skip(span.first_frame, span.start_s, message)

    def _look(self) -> list[_Pick]:
        """Analyse the current frame; return the picks that are ready to hand out."""
        bgr = None
        ready: list[_Pick] = []
        if self.detector is not None:
            ok, bgr = self.cap.retrieve()
            if not ok:
                self._undecodable()
                return ready
            ready += self._follow_scenes(bgr)
        t = self.time_s
        if self.every is not None and t >= self.next_due - _DUE_TOLERANCE_S:
            self.next_due = (math.floor((t + _DUE_TOLERANCE_S) / self.every) + 1) * self.every
            if bgr is None:
                ok, bgr = self.cap.retrieve()
                bgr = bgr if ok else None
            if bgr is None:
                self._undecodable()
            else:
                pick = _Pick(self.frame_no, t, bgr, {"interval"})
                (self.held if self.window_end > -math.inf else ready).append(pick)
        return ready

    def _follow_scenes(self, bgr: np.ndarray) -> list[_Pick]:
        assert self.detector is not None
        ready: list[_Pick] = []
        t = self.time_s
        if self.detector.update(_hsv_hist(_small(bgr, _ANALYSIS_WIDTH)), t):
            ready += self._close_window()
            self.stats.cuts.append((self.frame_no, t))
            self.window_end = t + self.scene_window_s
            self.n_scenes += 1
            self.best_sharpness = -1.0
        if t < self.window_end:
            sharpness = _sharpness(bgr)
            if sharpness > self.best_sharpness:
                self.best_sharpness = sharpness
                self.best = _Pick(self.frame_no, t, bgr, {"scene"}, scene=self.n_scenes - 1)
        elif self.best is not None:
            ready += self._close_window()
        return ready

    def _undecodable(self) -> None:
        logger.info("%s: frame %d could not be decoded; skipped", self.name, self.frame_no)
        if self.on_skip is not None:
            self.on_skip(self.frame_no, self.time_s, "frame could not be decoded")

    def _close_window(self) -> list[_Pick]:
        picks = self.held + ([self.best] if self.best is not None else [])
        self.best, self.held, self.window_end = None, [], -math.inf
        return picks

    def _release(self, picks: list[_Pick]) -> Iterator[Frame]:
        merged: dict[int, _Pick] = {}
        for pick in picks:
            if pick.frame in merged:
                merged[pick.frame].reasons |= pick.reasons
                if merged[pick.frame].scene is None:
                    merged[pick.frame].scene = pick.scene
            else:
                merged[pick.frame] = pick
        for pick in sorted(merged.values(), key=lambda p: p.frame):
            if self.max_frames is not None and self.n_kept >= self.max_frames:
                return
            if self.deduper is not None and self.deduper.is_duplicate(pick.bgr):
                logger.debug("frame %d dropped as a near-duplicate", pick.frame)
                continue
            reason = "+".join(r for r in ("interval", "scene") if r in pick.reasons)
            yield Frame(
                index=self.n_kept,
                frame=pick.frame,
                time_s=pick.time_s,
                reason=reason,
                image=self.cv2.cvtColor(pick.bgr, self.cv2.COLOR_BGR2RGB),
                scene=pick.scene if "scene" in pick.reasons else None,
            )
            self.n_kept += 1

    def _finish(self) -> None:
        if self.frame_no < 0:
            raise SnaplookError(
                f"{self.name}: no decodable frames (the file opens but holds no video frames "
                "FFmpeg can decode)."
            )
        expected, reached = self.expected, self.frame_no + 1
        if self.max_frames is None and expected > 0 and reached < 0.9 * expected:
            self._lose(
                round(expected) - reached,
                expected / self.fps,
                f"decoding stopped after {reached} of {int(expected)} frames; the rest of "
                "the file may be truncated",
            )


def _scan(video: Path, *, cap: Any = None, **options: Any) -> Iterator[Frame]:
    """The frames :class:`_Scanner` keeps; opens ``video`` at the first frame asked for,
    unless an open ``cap`` is given."""
    options.setdefault("on_skip", None)
    scanner = _Scanner(video, cap if cap is not None else _open_video(video), **options)
    yield from scanner.frames()


def iter_frames(
    video: str | Path,
    *,
    every: float | None = DEFAULT_EVERY,
    scenes: bool = False,
    max_frames: int | None = None,
    dedup: int | None = None,
    scene_threshold: float = DEFAULT_SCENE_THRESHOLD,
    min_scene_s: float = DEFAULT_MIN_SCENE_S,
    scene_window_s: float = DEFAULT_SCENE_WINDOW_S,
    on_progress: Callable[[int], None] | None = None,
    on_skip: Callable[[int, float, str], None] | None = None,
) -> Iterator[Frame]:
    """Stream the frames worth keeping from a video, in video order; writes nothing.

    The video is read once, sequentially. Interval mode decodes only the frames it keeps
    (``grab()`` skips the colour conversion of the rest); scene mode looks at every frame
    on a downscaled copy, so cuts are found to the frame.

    Args:
        video: the video file.
        every: float or None, default=1.0. Keep the first frame at or after each multiple
            of ``every`` seconds. ``None`` or 0 turns interval mode off (only with
            ``scenes=True``).
        scenes: bool, default=False. Also keep one frame per scene: the sharpest
            (variance of the Laplacian) in the scene's first ``scene_window_s`` seconds. A
            cut is an HSV-histogram (Bhattacharyya) distance between consecutive frames of
            at least ``scene_threshold`` and 3 times the mean of the scene's last 50
            distances, at least ``min_scene_s`` after the previous cut.
        max_frames: int or None, default=None. Stop after this many kept frames.
        dedup: int or None, default=None. Drop a frame whose 64-bit dHash is within this
            many bits of the last kept frame's and whose colours are alike.
        scene_threshold: float, default=0.3. Minimum histogram distance for a cut.
        min_scene_s: float, default=0.5. Minimum scene length in seconds.
        scene_window_s: float, default=1.0. Seconds at the start of each scene searched
            for its sharpest frame.
        on_progress: called with the video time reached, in whole seconds.
        on_skip: called with (frame number, time in seconds, reason) for a frame that could
            not be decoded, once per damaged stretch that decoding seeked past (the reason
            gives the number of frames lost and their time range), and once when decoding
            stops early (a truncated file).

    Returns:
        Iterator of :class:`Frame` with ``image`` set: ndarray of shape (H, W, 3), dtype
        uint8, RGB. The video stays open until the iterator is exhausted or closed.

    Raises:
        SnaplookError: at the call, bad options (``every`` <= 0 without ``scenes``), a
            missing file or a file that is not a video; while iterating, a video with no
            decodable frames.
    """
    every = _check_options(
        every, scenes, max_frames, dedup, scene_threshold, min_scene_s, scene_window_s
    )
    # Opened here, not in the generator, so a bad path fails at the call, not at first use.
    cap = _open_video(Path(video))
    return _scan(
        Path(video),
        cap=cap,
        every=every,
        scenes=scenes,
        max_frames=max_frames,
        dedup=dedup,
        scene_threshold=scene_threshold,
        min_scene_s=min_scene_s,
        scene_window_s=scene_window_s,
        stats=_Stats(),
        on_progress=on_progress,
        on_skip=on_skip,
    )


def detect_scenes(
    video: str | Path,
    *,
    scene_threshold: float = DEFAULT_SCENE_THRESHOLD,
    min_scene_s: float = DEFAULT_MIN_SCENE_S,
    on_progress: Callable[[int], None] | None = None,
) -> list[Scene]:
    """Find the cuts of a video (see :func:`iter_frames` for the detector).

    Returns:
        The scenes in order; the first starts at frame 0, the last ends after the last
        decoded frame (``end_s`` is that frame's time).

    Raises:
        SnaplookError: missing file, not a video, no decodable frames, bad options.
    """
    _check_options(None, True, None, None, scene_threshold, min_scene_s, DEFAULT_SCENE_WINDOW_S)
    stats = _Stats()
    for frame in _scan(
        Path(video),
        every=None,
        scenes=True,
        max_frames=None,
        dedup=None,
        scene_threshold=scene_threshold,
        min_scene_s=min_scene_s,
        scene_window_s=1e-9,
        stats=stats,
        on_progress=on_progress,
    ):
        frame.image = None
    bounds = [*stats.cuts, (stats.end_frame, stats.last_time_s)]
    return [
        Scene(i, start[0], start[1], end[0], end[1])
        for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:]))
    ]


def frame_filename(frame: int, time_s: float, image_format: str = DEFAULT_FORMAT) -> str:
    """File name of a kept frame: ``f000123_t0004.100.jpg`` (frame number, seconds)."""
    return f"f{frame:06d}_t{time_s:08.3f}.{image_format}"


def _check_format(image_format: str, quality: int) -> str:
    fmt = image_format.lower().lstrip(".")
    fmt = "jpg" if fmt == "jpeg" else fmt
    if fmt not in IMAGE_FORMATS:
        raise SnaplookError(
            f"--format must be one of {', '.join(IMAGE_FORMATS)}, got {image_format!r}."
        )
    if not 1 <= quality <= 100:
        raise SnaplookError(f"--quality must be between 1 and 100, got {quality}.")
    return fmt


def _extract_one(
    video: Path,
    *,
    out: Path | None,
    image_format: str,
    quality: int,
    keep_images: bool,
    on_progress: Callable[[int], None] | None,
    **scan_options: Any,
) -> VideoFrames:
    stats = _Stats()
    start = time.perf_counter()
    stream = _scan(video, stats=stats, on_progress=on_progress, **scan_options)
    if out is None:
        frames = list(stream)
    else:
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise SnaplookError(f"{out}: exists and is not a folder; choose another --out.")
        if out.is_dir() and not (out / FRAMES_CSV).is_file() and any(out.iterdir()):
            # Checked before decoding; replace_dir checks it again before swapping.
            raise SnaplookError(
                f"{out} exists and is not a snaplook output (no {FRAMES_CSV}); refusing to "
                "replace it. Choose another --out or move it away."
            )
        frames = _write_frames(
            stream,
            video,
            out,
            stats,
            image_format=image_format,
            quality=quality,
            keep_images=keep_images,
        )
    return VideoFrames(
        video=video,
        out=out,
        frames=frames,
        n_decoded=stats.n_decoded,
        duration_s=stats.last_time_s,
        seconds=time.perf_counter() - start,
        lost=list(stats.lost),
    )


def _write_frames(
    stream: Iterator[Frame],
    video: Path,
    out: Path,
    stats: _Stats,
    *,
    image_format: str,
    quality: int,
    keep_images: bool,
) -> list[Frame]:
    """Write the frames, ``frames.csv`` and ``summary.json`` into a temporary folder, then
    swap it onto ``out``."""
    cv2 = _import_cv2()
    params = (
        [cv2.IMWRITE_JPEG_QUALITY, quality]
        if image_format == "jpg"
        else [cv2.IMWRITE_PNG_COMPRESSION, 3]
    )
    frames: list[Frame] = []
    tmp = make_temp_dir(out)
    try:
        for frame in stream:
            name = frame_filename(frame.frame, frame.time_s, image_format)
            assert frame.image is not None
            # imencode + Python's open, not imwrite: any folder name works, UTF-8 or not.
            ok, encoded = cv2.imencode(
                f".{image_format}", cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR), params
            )
            try:
                if not ok:
                    raise OSError("the encoder failed")
                (tmp / name).write_bytes(encoded.tobytes())
            except OSError as exc:
                raise SnaplookError(
                    f"{display_path(tmp / name)}: could not write the frame image ({exc})."
                ) from exc
            frame.path = out / name
            if not keep_images:
                frame.image = None
            frames.append(frame)
        write_csv_atomic(
            tmp / FRAMES_CSV,
            FRAMES_CSV_HEADER,
            (
                (f.index, f.frame, f"{f.time_s:.3f}", f.path.name if f.path else "", f.reason)
                for f in frames
            ),
        )
        write_json_atomic(tmp / SUMMARY_JSON, _summary(video, frames, stats))
        replace_dir(tmp, out, marker=FRAMES_CSV)
        logger.info("wrote %d frame(s) and %s in %s", len(frames), FRAMES_CSV, display_path(out))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return frames


def _summary(video: Path, frames: list[Frame], stats: _Stats) -> dict[str, Any]:
    return {
        "video": display_path(video),
        "frames_decoded": stats.n_decoded,
        "frames_kept": len(frames),
        "duration_s": round(stats.last_time_s, 3),
        "frames_lost": sum(span.n_frames for span in stats.lost),
        "lost": [
            {
                "first_frame": span.first_frame,
                "frames": span.n_frames,
                "start_s": span.start_s,
                "end_s": span.end_s,
            }
            for span in stats.lost
        ],
    }


def extract_frames(
    video: str | Path,
    *,
    every: float | None = DEFAULT_EVERY,
    scenes: bool = False,
    max_frames: int | None = None,
    dedup: int | None = None,
    out: str | Path | None = None,
    image_format: str = DEFAULT_FORMAT,
    quality: int = DEFAULT_QUALITY,
    keep_images: bool = False,
    scene_threshold: float = DEFAULT_SCENE_THRESHOLD,
    min_scene_s: float = DEFAULT_MIN_SCENE_S,
    scene_window_s: float = DEFAULT_SCENE_WINDOW_S,
    on_progress: Callable[[int], None] | None = None,
) -> list[Frame]:
    """Extract frames from one video, in memory or into a folder.

    Args:
        video: the video file.
        every, scenes, max_frames, dedup, scene_threshold, min_scene_s, scene_window_s:
            what to keep (see :func:`iter_frames`).
        out: None or folder, default=None. None keeps the images in memory and writes
            nothing. A folder receives one image per kept frame (``f000123_t0004.100.jpg``)
            ``frames.csv`` (``index, frame, time_s, path, reason``; ``path`` relative to
            the folder) and ``summary.json`` (``video, frames_decoded, frames_kept,
            duration_s, frames_lost, lost``: one ``{first_frame, frames, start_s, end_s}``
            per damaged stretch). The folder is built beside ``out`` and swapped in at the
            end, so a failed run leaves an older ``out`` as it was, and a rerun replaces it
            whole.
        image_format: ``"jpg"`` or ``"png"``, default="jpg".
        quality: int, default=95. JPEG quality 1-100 (ignored for PNG).
        keep_images: bool, default=False. With ``out``, also keep ``Frame.image``.
        on_progress: called with the video time reached, in whole seconds.

    Returns:
        The kept frames in video order; ``image`` is set when ``out`` is None or
        ``keep_images``; ``path`` is set when ``out`` is given.

    Raises:
        SnaplookError: bad options, missing file, not a video, no decodable frames, or an
            ``out`` that cannot be written.
    """
    checked_every = _check_options(
        every, scenes, max_frames, dedup, scene_threshold, min_scene_s, scene_window_s
    )
    result = _extract_one(
        Path(video),
        out=None if out is None else Path(out),
        image_format=_check_format(image_format, quality),
        quality=quality,
        keep_images=keep_images or out is None,
        on_progress=on_progress,
        every=checked_every,
        scenes=scenes,
        max_frames=max_frames,
        dedup=dedup,
        scene_threshold=scene_threshold,
        min_scene_s=min_scene_s,
        scene_window_s=scene_window_s,
    )
    return result.frames


def _output_dirs(videos: list[Path], root: Path, out_root: Path) -> list[Path]:
    # A name that is not UTF-8 gives a folder with its bytes escaped (caf\\xe9), so every
    # later step can print it and write it into CSV and JSON files.
    if root.is_file():
        return [out_root / display_path(videos[0].stem)]
    dirs = [out_root / display_path(v.relative_to(root).with_suffix("")) for v in videos]
    seen: dict[Path, Path] = {}
    for video, d in zip(videos, dirs):
        if d in seen:
            raise SnaplookError(
                f"{display_path(seen[d])} and {display_path(video)} would both write to "
                f"{display_path(d)}; rename one of them."
            )
        seen[d] = video
    return dirs


def extract_videos(
    path_or_folder: str | Path,
    *,
    out_root: str | Path = DEFAULT_OUT_ROOT,
    every: float | None = DEFAULT_EVERY,
    scenes: bool = False,
    max_frames: int | None = None,
    dedup: int | None = None,
    image_format: str = DEFAULT_FORMAT,
    quality: int = DEFAULT_QUALITY,
    scene_threshold: float = DEFAULT_SCENE_THRESHOLD,
    min_scene_s: float = DEFAULT_MIN_SCENE_S,
    scene_window_s: float = DEFAULT_SCENE_WINDOW_S,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> list[VideoFrames]:
    """Extract frames from a video, or from every video in a folder, into ``out_root``.

    Each video writes ``<out_root>/<video-stem>/`` (for a folder, the video's path
    relative to it, without the extension) as :func:`extract_frames` with ``out`` does.

    Args:
        path_or_folder: a video file, or a folder searched recursively for videos.
        out_root: folder, default=``output/frames``.
        on_start: called once with the total video duration in whole seconds (when the
            containers give it).
        on_progress: called with the video seconds done so far, over all videos.
        Other arguments: see :func:`extract_frames`.

    Returns:
        One :class:`VideoFrames` per video, in sorted path order. In a folder, a video that
        fails (or a FIFO or device named like a video) is skipped and logged, with
        ``error`` set; the others go on, and the skipped videos are listed in
        ``<out_root>/skipped.csv`` (``path, reason``).

    Raises:
        SnaplookError: bad options; for a single video, any failure of
            :func:`extract_frames`; for a folder, no videos found or every video failed.
    """
    checked_every = _check_options(
        every, scenes, max_frames, dedup, scene_threshold, min_scene_s, scene_window_s
    )
    fmt = _check_format(image_format, quality)
    root, out_root = Path(path_or_folder), Path(out_root)
    videos, refused = _list_videos(root, out_root)
    single = root.is_file()
    results = _extract_each(
        videos,
        _output_dirs(videos, root, out_root) if videos else [],
        single=single,
        on_start=on_start,
        on_progress=on_progress,
        image_format=fmt,
        quality=quality,
        keep_images=False,
        every=checked_every,
        scenes=scenes,
        max_frames=max_frames,
        dedup=dedup,
        scene_threshold=scene_threshold,
        min_scene_s=min_scene_s,
        scene_window_s=scene_window_s,
    )
    if refused:
        results = sorted([*results, *refused], key=lambda r: r.video.relative_to(root).as_posix())
    if all(r.error for r in results):
        raise SnaplookError(
            f"{display_path(root)}: no video could be read; first error: {results[0].error}"
        )
    if not single:
        write_skipped(out_root / SKIPPED_CSV, ((r.video, r.error) for r in results if r.error))
    return results


def _list_videos(root: Path, out_root: Path) -> tuple[list[Path], list[VideoFrames]]:
    """The videos to extract, and the files named like videos that discovery refused."""
    if not root.exists():
        raise SnaplookError(f"{display_path(root)}: no such file or folder; check the path.")
    refused: list[VideoFrames] = []
    videos = find_videos(
        root, on_skip=lambda path, why: refused.append(VideoFrames(path, None, error=why))
    )
    if not videos and not refused:
        raise SnaplookError(
            f"{display_path(root)}: no videos found (looked for "
            f"{', '.join(sorted(VIDEO_EXTENSIONS))})."
        )
    if out_root.exists() and not out_root.is_dir():
        raise SnaplookError(f"--out {out_root} is a file; pass a folder for the frames.")
    return videos, refused


def _extract_each(
    videos: list[Path],
    out_dirs: list[Path],
    *,
    single: bool,
    on_start: Callable[[int], None] | None,
    on_progress: Callable[[int], None] | None,
    **options: Any,
) -> list[VideoFrames]:
    """Extract each video into its folder; in a folder, a failing video is skipped."""
    durations: list[float | None] = []
    for video in videos:
        try:
            durations.append(probe_duration(video))
        except SnaplookError:
            if single:
                raise
            durations.append(None)
    total_s = None
    if all(d is not None for d in durations):
        total_s = math.ceil(sum(d or 0.0 for d in durations))
        if on_start is not None:
            on_start(total_s)
    results: list[VideoFrames] = []
    done_s = 0.0
    for video, out_dir, duration in zip(videos, out_dirs, durations):

        def progress(seconds: int, offset: float = done_s) -> None:
            if on_progress is not None:
                on_progress(int(offset + seconds))

        try:
            result = _extract_one(video, out=out_dir, on_progress=progress, **options)
        except SnaplookError as exc:
            if single:
                raise
            logger.warning("skipped %s", exc)
            result = VideoFrames(video=video, out=None, error=str(exc))
        results.append(result)
        done_s += duration if duration is not None else result.duration_s
        if on_progress is not None:
            on_progress(int(done_s))
    if on_progress is not None and total_s is not None:
        on_progress(total_s)
    return results
