"""Tests for snaplook.artists: detection on real photos, lead-artist logic, clothes, `crop`."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from snaplook.artists import (
    ARTISTS_HEADER,
    DETECTIONS_HEADER,
    Detection,
    FrameDetections,
    PersonDetector,
    body_from_face,
    detect_people,
    drop_false_people,
    extract_clothes,
    foreground_fraction,
    iou,
    is_full_shot,
    parse_yolo_output,
    select_lead_artists,
    skin_mask,
    write_lead_artists,
)
from snaplook.cli import app
from snaplook.errors import SnaplookError

LABELS = Path(__file__).parent / "data" / "people_boxes.csv"
SKIN = (224, 172, 130)
BACKGROUND = (170, 190, 215)
runner = CliRunner()


def _labels(easy_only: bool = True) -> list[dict[str, str]]:
    with open(LABELS, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [r for r in rows if r["easy"] == "1" or not easy_only]


def _box(row: dict[str, str]) -> tuple[int, int, int, int]:
    return (int(row["x"]), int(row["y"]), int(row["w"]), int(row["h"]))


@pytest.fixture(scope="module")
def detector() -> PersonDetector:
    return PersonDetector("hog")  # the OpenCV fallback; NanoDet: tests/test_detection.py


# --- detection on real photos -----------------------------------------------------------


@pytest.mark.parametrize(
    "row", [r for r in _labels() if r["path"] == "hog"], ids=lambda r: r["file"][:24]
)
def test_detect_people_finds_full_body_person(people_dir, detector, row):
    from snaplook.io_utils import read_image

    image = read_image(people_dir / row["file"])
    found = detect_people(image, detector=detector)
    best = max((iou(d.box, _box(row)) for d in found), default=0.0)
    assert best >= 0.5, f"{row['file']}: best IoU {best:.2f} with {[d.box for d in found]}"
    match = max(found, key=lambda d: iou(d.box, _box(row)))
    assert match.source == "hog"
    assert match.whole_body and match.full_shot


def test_detect_people_face_path_finds_astronaut(people_dir, detector):
    from snaplook.io_utils import read_image

    row = next(r for r in _labels() if r["file"] == "skimage_astronaut.png")
    found = detect_people(read_image(people_dir / row["file"]), detector=detector)
    match = max(found, key=lambda d: iou(d.box, _box(row)))
    assert iou(match.box, _box(row)) >= 0.5
    assert match.source == "face"
    assert match.face is not None
    fx, fy, fw, fh = match.face
    # the face sits on the face in the photo (hand-checked: about x 175-275, y 65-160)
    assert 160 <= fx + fw / 2 <= 290 and 60 <= fy + fh / 2 <= 170
    assert not match.full_shot  # a half shot: the feet are not in the frame


def test_detect_people_blank_grey_image_finds_nobody(detector):
    assert detect_people(np.full((240, 320), 128, np.uint8), detector=detector) == []


def test_detect_people_missing_onnx_raises(tmp_path):
    with pytest.raises(SnaplookError, match="detector model not found"):
        detect_people(np.zeros((64, 64, 3), np.uint8), detector=tmp_path / "yolo.onnx")


def test_detect_people_invalid_onnx_raises(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(SnaplookError, match="not an ONNX model OpenCV can load"):
        detect_people(np.zeros((64, 64, 3), np.uint8), detector=bad)


def test_detect_people_wrong_suffix_raises(tmp_path):
    with pytest.raises(SnaplookError, match="expected auto, nanodet, ssdlite, hog"):
        PersonDetector(tmp_path / "model.pt").detect(np.zeros((64, 64, 3), np.uint8))


def test_parse_yolo_output_v5_layout():
    out = np.zeros((1, 10, 7), np.float32)  # 10 anchors, 2 classes: person, other
    out[0, 0] = [100, 200, 50, 150, 0.9, 0.8, 0.1]  # person 0.72
    out[0, 1] = [300, 200, 50, 150, 0.9, 0.1, 0.9]  # other class
    out[0, 2] = [10, 20, 5, 5, 0.1, 0.9, 0.0]  # weak objectness
    boxes, scores = parse_yolo_output(out, conf=0.25)
    np.testing.assert_allclose(boxes, [[100, 200, 50, 150]])
    np.testing.assert_allclose(scores, [0.72], rtol=1e-6)


def test_parse_yolo_output_v8_layout():
    out = np.zeros((1, 6, 10), np.float32)  # (4 + 2 classes, 10 anchors)
    out[0, :, 3] = [320, 240, 80, 200, 0.6, 0.1]
    out[0, :, 7] = [100, 100, 30, 30, 0.1, 0.95]
    boxes, scores = parse_yolo_output(out, conf=0.25)
    np.testing.assert_allclose(boxes, [[320, 240, 80, 200]])
    np.testing.assert_allclose(scores, [0.6], rtol=1e-6)


def test_parse_yolo_output_unknown_shape_raises():
    with pytest.raises(SnaplookError, match="unexpected detector output of shape"):
        parse_yolo_output(np.zeros((1, 3, 4, 4), np.float32), model="m.onnx")


def test_body_from_face_human_proportions():
    x, y, w, h = body_from_face((100, 50, 40, 40))
    assert (x + w / 2) == pytest.approx(120)  # centred under the face
    assert y == pytest.approx(38)  # hair above the brow-to-chin box
    assert w == pytest.approx(128) and h == pytest.approx(390)  # 7.5 heads of 1.3 faces


@pytest.mark.parametrize(
    ("box", "whole_body", "expected"),
    [
        ((100, 20, 60, 200), True, True),
        ((100, -40, 60, 200), True, False),  # head cut off
        ((100, 60, 60, 200), True, False),  # feet below the frame (240 high)
        ((100, 20, 150, 200), True, False),  # too wide for a standing person
        ((100, 200, 10, 30), True, False),  # too small
        ((100, 20, 60, 200), False, False),  # extended from a face: feet never seen
        ((100, -4, 60, 200), True, False),  # touches the top edge: the head may be cut
        ((100, 38, 60, 205), True, False),  # reaches past the bottom edge: feet may be cut
    ],
)
def test_is_full_shot_cases(box, whole_body, expected):
    assert is_full_shot(box, (240, 320), whole_body=whole_body) is expected


# --- false artists (issue 15) -----------------------------------------------------------


VIDEO_BOXES = Path(__file__).parent / "data" / "video_boxes.csv"


def _video_frames(video: Path, numbers: list[int]) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(video))
    frames = []
    for number in numbers:
        cap.set(cv2.CAP_PROP_POS_FRAMES, number)
        ok, bgr = cap.read()
        assert ok, f"frame {number} of {video}"
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    return frames


def _video_boxes(label: str) -> dict[int, list[tuple[int, int, int, int]]]:
    boxes: dict[int, list[tuple[int, int, int, int]]] = {}
    for row in _read(VIDEO_BOXES):
        if row["label"] == label:
            boxes.setdefault(int(row["frame"]), []).append(_box(row))
    return boxes


def test_foreground_fraction_speck_on_wall_is_background():
    wall = np.full((240, 320, 3), 245, np.uint8)
    cv2.circle(wall, (160, 120), 4, (40, 40, 40), -1)
    figure = _frame(seed=1)
    box = _draw_figure(figure, 120, 20, 200, (200, 30, 30), (30, 40, 150))
    assert foreground_fraction(wall, (130, 40, 60, 160)) < 0.05
    assert foreground_fraction(figure, box) > 0.6


def test_drop_false_people_keeps_figure_drops_background_and_odd_boxes():
    image = _frame(seed=2)
    person = _given(_draw_figure(image, 120, 20, 200, (200, 30, 30), (30, 40, 150)))
    empty = _given((10, 20, 60, 180))  # plain background beside the figure
    band = _given((0, 200, 320, 40))  # a band as wide as the frame
    sliver = _given((290, 10, 10, 200))  # 20 times taller than wide
    kept = drop_false_people(image, [person, empty, band, sliver])
    assert kept == [person] and person.foreground > 0.5
    assert drop_false_people(image, [empty], min_foreground=0.0) == [empty]


def test_detect_people_real_video_floorboards_are_not_people(real_video, detector):
    # Frames where HOG fires on the floorboards below the table (hand-checked boxes).
    floor = _video_boxes("background")
    numbers = [540, 580, 1000]
    for number, image in zip(numbers, _video_frames(real_video, numbers)):
        found = detect_people(image, detector=detector)
        for box in floor[number]:
            assert all(iou(d.box, box) < 0.5 for d in found), f"frame {number}: {found}"
        if number == 1000:  # the woman at the table is still found
            assert any(d.box[3] > 300 and d.foreground > 0.5 for d in found)


def test_select_lead_artists_real_video_part_of_person_is_no_full_shot(real_video, detector):
    # At 101 s HOG sees only a 73x210 strip of the woman's sweater (whole: 134x377).
    numbers = [1000, 1010, 1020]
    images = _video_frames(real_video, numbers)
    frames = [
        FrameDetections(n, n / 10, image, detect_people(image, detector=detector))
        for n, image in zip(numbers, images)
    ]
    sel = select_lead_artists(frames, max_artists=1, crops_per_artist=3)
    (artist,) = sel.artists
    assert artist.frames == numbers
    strip = next(c for c in artist.crops if c.frame == 1010)
    assert strip.box[3] < 250 and not strip.full_shot
    assert all(c.full_shot for c in artist.crops if c.frame != 1010)
    assert artist.crops[-1] is strip  # a part of the person is the worst view


def test_select_lead_artists_weak_detection_starts_nobody():
    frames = []
    for i in range(4):
        image = _frame(seed=i)
        lead = _draw_figure(image, 120, 20, 200, (200, 30, 30), (30, 40, 150))
        other = _draw_figure(image, 10, 120, 110, (30, 160, 60), (90, 90, 90))
        # the lead is strong at first, weak later; the other is weak throughout
        lead_score = 0.9 if i == 0 else 0.3
        dets = [
            Detection(lead, lead_score, "given", whole_body=True, full_shot=True),
            Detection(other, 0.3, "given", whole_body=True, full_shot=True),
        ]
        frames.append(FrameDetections(i, float(i), image, dets))
    sel = select_lead_artists(frames, max_artists=5)
    assert sel.n_tracks == 1
    (lead,) = sel.artists
    assert lead.frames == [0, 1, 2, 3]  # weak detections continue a person
    assert all(len(f.detections) == 1 for f in sel.frames)
    assert len(select_lead_artists(frames, max_artists=5, min_track_score=0.2).artists) == 2


def test_select_lead_artists_shorter_box_is_no_full_shot():
    frames = []
    for i in range(3):
        image = _frame(seed=i)
        box = _draw_figure(image, 120, 20, 200, (200, 30, 30), (30, 40, 150))
        if i == 1:  # the detector saw only the top half of the same person
            box = (box[0], box[1], box[2], 110)
        frames.append(FrameDetections(i, float(i), image, [_given(box)]))
    (artist,) = select_lead_artists(frames, crops_per_artist=3).artists
    assert {c.frame: c.full_shot for c in artist.crops} == {0: True, 1: False, 2: True}


# --- lead artists on synthetic sequences (detector bypassed) ------------------------------


def _frame(h: int = 240, w: int = 320, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.full((h, w, 3), BACKGROUND, np.float32) + rng.normal(0, 4, (h, w, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _draw_figure(image, x, y, h, torso, legs) -> tuple[int, int, int, int]:
    """Paint a standing figure (skin head and arms, coloured torso and legs); return its box."""
    w = int(0.4 * h)
    cx = x + w // 2
    cv2.ellipse(
        image, (cx, y + int(0.065 * h)), (int(0.1 * h), int(0.065 * h)), 0, 0, 360, SKIN, -1
    )
    top, hip = y + int(0.14 * h), y + int(0.5 * h)
    image[top:hip, x + int(0.15 * w) : x + int(0.85 * w)] = torso
    image[top : y + int(0.45 * h), x : x + int(0.15 * w)] = SKIN  # arms
    image[top : y + int(0.45 * h), x + int(0.85 * w) : x + w] = SKIN
    image[hip : y + h, x + int(0.2 * w) : x + int(0.48 * w)] = legs
    image[hip : y + h, x + int(0.52 * w) : x + int(0.8 * w)] = legs
    return (x, y, w, h)


def _given(box) -> Detection:
    return Detection(box=box, score=1.0, source="given", whole_body=True, full_shot=True)


def test_select_lead_artists_most_present_and_largest_is_artist_1():
    frames = []
    for i in range(10):
        image = _frame(seed=i)
        dets = []
        if i not in (0, 9):  # the lead: 8 of 10 frames, large and central
            dets.append(_given(_draw_figure(image, 120 + i, 20, 200, (200, 30, 30), (30, 40, 150))))
        if i < 4:  # a passer-by: 4 frames, small, at the side
            dets.append(
                _given(_draw_figure(image, 10 + 3 * i, 130, 100, (30, 160, 60), (90, 90, 90)))
            )
        frames.append(FrameDetections(frame=10 * i, time_s=i * 0.5, image=image, detections=dets))
    sel = select_lead_artists(frames, max_artists=2, crops_per_artist=3)
    assert sel.n_tracks == 2
    lead, other = sel.artists
    assert lead.artist == 1 and lead.frames == [10 * i for i in range(1, 9)]
    assert other.artist == 2 and other.frames == [0, 10, 20, 30]
    assert lead.screen_time == pytest.approx(0.8) and other.screen_time == pytest.approx(0.4)
    assert lead.size == pytest.approx(200 / 240)
    assert lead.score > other.score
    assert len(lead.crops) == 3 and len({c.frame for c in lead.crops}) == 3
    assert [f.frame for f in sel.frames] == [10 * i for i in range(10)]


def test_select_lead_artists_two_people_swapping_places_not_merged():
    red, blue = (200, 30, 30), (30, 60, 200)
    frames = []
    for i in range(6):
        image = _frame(seed=i)
        left, right = (red, blue) if i < 3 else (blue, red)  # they swap after frame 2
        a = _draw_figure(image, 30, 20, 200, left, (40, 40, 40))
        b = _draw_figure(image, 200, 20, 200, right, (40, 40, 40))
        frames.append(FrameDetections(i, float(i), image, [_given(a), _given(b)]))
    sel = select_lead_artists(frames, max_artists=2)
    assert sel.n_tracks == 2
    for artist in sel.artists:
        assert len(artist.frames) == 6
        colours = set()
        for frame, box in zip(artist.frames, artist.boxes):
            x, y, w, h = box
            colours.add(tuple(int(v) for v in frames[frame].image[y + h // 3, x + w // 2]))
        torso = {(200, 30, 30) if c[0] > c[2] else (30, 60, 200) for c in colours}
        assert len(torso) == 1, f"artist {artist.artist} mixes torso colours {colours}"
        xs = [box[0] for box in artist.boxes]
        assert xs[:3] != xs[3:]  # each followed across the swap


def test_select_lead_artists_nobody_records_every_frame(tmp_path):
    frames = [FrameDetections(i, i * 1.0, _frame(seed=i), []) for i in range(3)]
    sel = select_lead_artists(frames)
    assert sel.artists == [] and len(sel.frames) == 3 and sel.n_frames_with_people == 0
    rows = write_lead_artists(sel, tmp_path / "out")
    assert rows == []
    with open(tmp_path / "out" / "artists.csv", newline="") as fh:
        assert list(csv.reader(fh)) == [list(ARTISTS_HEADER)]
    with open(tmp_path / "out" / "detections.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == list(DETECTIONS_HEADER)
    assert [(r["frame"], r["n_people"]) for r in table] == [("0", "0"), ("1", "0"), ("2", "0")]


def test_select_lead_artists_bad_max_artists_raises():
    with pytest.raises(SnaplookError, match="--max-artists must be at least 1"):
        select_lead_artists([], max_artists=0)


# --- clothes ----------------------------------------------------------------------------


def _near(pixels: np.ndarray, colour, tol: float = 60.0) -> np.ndarray:
    return np.linalg.norm(pixels.astype(np.float32) - np.array(colour, np.float32), axis=-1) < tol


def _not_white(image: np.ndarray) -> np.ndarray:
    return image.reshape(-1, 3)[~np.all(image.reshape(-1, 3) >= 250, axis=1)]


def test_extract_clothes_synthetic_figure():
    torso, legs = (200, 30, 30), (30, 50, 160)
    image = _frame(300, 240, seed=3)
    box = _draw_figure(image, 70, 30, 250, torso, legs)
    clothes = extract_clothes(image, box)
    assert clothes.person.shape[:2] == (box[3], box[2])
    assert clothes.upper is not None and clothes.lower is not None
    upper, lower = _not_white(clothes.upper), _not_white(clothes.lower)
    assert _near(upper, torso).mean() >= 0.85
    assert _near(lower, legs).mean() >= 0.85
    person = clothes.person.reshape(-1, 3)
    assert _near(person, SKIN, 30).sum() == 0  # head and arms painted white
    assert _near(person, BACKGROUND, 30).mean() < 0.02  # background painted white
    assert np.all(person[~clothes.mask.ravel()] == 255)
    # boxes are in image pixels: the upper garment starts below the head, the lower ends at the feet
    ux, uy, uw, uh = clothes.upper_box
    lx, ly, lw, lh = clothes.lower_box
    assert box[1] + 0.1 * box[3] <= uy < ly and ly + lh <= box[1] + box[3]


def test_skin_mask_keeps_orange_and_red_garments():
    patch = np.array([[SKIN, (230, 100, 40), (200, 30, 30), (30, 50, 160)]], np.uint8)
    assert skin_mask(patch).tolist() == [[True, False, False, False]]


def test_extract_clothes_empty_box_raises():
    with pytest.raises(SnaplookError, match="is empty inside"):
        extract_clothes(np.zeros((50, 50, 3), np.uint8), (60, 60, 10, 10))


# --- the `crop` command -----------------------------------------------------------------


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_crop_cli_frames_folder_uses_frames_csv(people_dir, tmp_path):
    import shutil

    frames = tmp_path / "frames" / "clip"
    frames.mkdir(parents=True)
    shutil.copy(people_dir / "darknet_person.jpg", frames / "f000250.jpg")
    (frames / "frames.csv").write_text(
        "index,frame,time_s,path,reason\n0,250,10.000,f000250.jpg,interval\n"
    )
    out = tmp_path / "artists"
    result = runner.invoke(app, ["crop", str(frames), "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    rows = _read(out / "artists.csv")
    assert list(rows[0]) == list(ARTISTS_HEADER)
    # footwear / eyewear crops come too where the pose model is fetched (tests/test_pose.py)
    assert {r["kind"] for r in rows} - {"footwear", "eyewear"} == {"person", "upper", "lower"}
    assert {(r["artist"], r["frame"], r["time_s"]) for r in rows} == {("1", "250", "10.000")}
    person = next(r for r in rows if r["kind"] == "person")
    label = next(r for r in _labels() if r["file"] == "darknet_person.jpg")
    box = tuple(int(person[c]) for c in "xywh")
    assert iou(box, _box(label)) >= 0.5 and person["full_shot"] == "1"
    for r in rows:
        assert (out / r["path"]).is_file() and r["path"] == f"artist1_f000250_{r['kind']}.png"
        assert r["source"] == str(frames / "f000250.jpg")
    (detection,) = _read(out / "detections.csv")
    detector = PersonDetector().label.split()[0]  # auto: nanodet when fetched, else hog
    assert detection["n_people"] == "1" and detection["detector"] == detector
    assert {r["detector"] for r in rows} == {PersonDetector().label}
    assert detection["artist"] == "1" and detection["source"] == str(frames / "f000250.jpg")


def test_crop_cli_photo_folder_each_photo_on_its_own(people_dir, tmp_path):
    import shutil

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("coco_000000000785.jpg", "darknet_person.jpg", "skimage_astronaut.png"):
        shutil.copy(people_dir / name, photos / name)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "out"
    result = runner.invoke(app, ["crop", str(photos), "--out", str(out), "--max-artists", "1"])
    assert result.exit_code == 0, result.output
    rows = _read(out / "artists.csv")
    people = {r["artist"]: r for r in rows if r["kind"] == "person"}
    # One person per photo, numbered through the folder in sorted order.
    assert {a: Path(r["source"]).name for a, r in people.items()} == {
        "1": "coco_000000000785.jpg",
        "2": "darknet_person.jpg",
        "3": "skimage_astronaut.png",
    }
    for r in rows:
        stem = Path(r["source"]).stem
        assert r["path"] == f"artist{r['artist']}_{stem}_{r['kind']}.png"
        assert (out / r["path"]).is_file()
        label = next(lab for lab in _labels() if lab["file"] == Path(r["source"]).name)
        if r["kind"] == "person":
            assert iou(tuple(int(r[c]) for c in "xywh"), _box(label)) >= 0.5
    detections = _read(out / "detections.csv")
    assert {(d["artist"], Path(d["source"]).name) for d in detections} == {
        (a, Path(r["source"]).name) for a, r in people.items()
    }
    skipped = _read(out / "skipped.csv")
    assert [Path(r["path"]).name for r in skipped] == ["broken.jpg"] and skipped[0]["reason"]
    assert "Skipped 1" in result.output


def test_crop_cli_as_video_follows_people_across_images(people_dir, tmp_path):
    import shutil

    folder = tmp_path / "ffmpeg_frames"  # frames from another tool: no frames.csv
    folder.mkdir()
    for name in ("0001.jpg", "0002.jpg"):
        shutil.copy(people_dir / "darknet_person.jpg", folder / name)
    photos, video = tmp_path / "photos", tmp_path / "video"
    assert runner.invoke(app, ["crop", str(folder), "-o", str(photos), "-q"]).exit_code == 0
    args = ["crop", str(folder), "-o", str(video), "--as-video", "-q", "--no-clothes"]
    assert runner.invoke(app, args).exit_code == 0
    assert sorted({r["artist"] for r in _read(photos / "artists.csv")}) == ["1", "2"]
    rows = _read(video / "artists.csv")
    assert {r["artist"] for r in rows} == {"1"}
    assert sorted(Path(r["source"]).name for r in rows) == ["0001.jpg", "0002.jpg"]


def test_crop_cli_nobody_exits_0_with_empty_csv(tmp_path):
    from PIL import Image

    folder = tmp_path / "empty_scene"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(_frame(seed=i)).save(folder / f"{i}.png")
    out = tmp_path / "out"
    result = runner.invoke(app, ["crop", str(folder), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "No people found in 2 frame(s)" in result.output
    assert (out / "artists.csv").read_text().strip() == ",".join(ARTISTS_HEADER)
    assert len(_read(out / "detections.csv")) == 2


def test_crop_cli_missing_onnx_detector_fails_cleanly(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(_frame()).save(folder / "a.png")
    result = runner.invoke(app, ["crop", str(folder), "--detector", str(tmp_path / "no.onnx")])
    assert result.exit_code == 2  # usage error at parse time (issue 15)
    assert "neither auto, nanodet, ssdlite, hog nor an existing .onnx file" in result.output
    assert "Traceback" not in result.output


def test_crop_cli_folder_without_images_fails(tmp_path):
    (tmp_path / "nothing").mkdir()
    result = runner.invoke(app, ["crop", str(tmp_path / "nothing")])
    assert result.exit_code == 1
    assert "no images found" in result.output
    assert "Traceback" not in result.output


def test_crop_cli_refuses_to_replace_a_foreign_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(_frame()).save(folder / "a.png")
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    result = runner.invoke(app, ["crop", str(folder), "--out", str(precious)])
    assert result.exit_code == 1
    assert "holds files but no artists.csv" in result.output
    assert (precious / "notes.txt").read_text() == "keep me"
