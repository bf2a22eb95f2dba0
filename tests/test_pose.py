"""snaplook.pose: the full-shot rule and garment regions on hand-made landmarks, and the real
BlazePose model on the test photos (skipped with the reason when not fetched; CI fetches it
and sets SNAPLOOK_REQUIRE_MODELS)."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from snaplook import models
from snaplook.cli import app
from snaplook.errors import SnaplookError
from snaplook.pose import (
    N_LANDMARKS,
    Pose,
    PoseLandmarker,
    garment_regions,
    is_full_shot_pose,
    person_mask,
)

runner = CliRunner()
REQUIRE_MODELS = os.environ.get("SNAPLOOK_REQUIRE_MODELS") == "1"

# A standing figure 400 px tall centred at x 100: (x, y) per landmark used by the rules.
_FIGURE = {
    **{i: (100 + dx, 40) for i, dx in ((1, 4), (2, 8), (3, 12), (4, -4), (5, -8), (6, -12))},
    0: (100, 50),
    11: (130, 90), 12: (70, 90), 13: (140, 150), 14: (60, 150),
    23: (120, 200), 24: (80, 200), 25: (120, 300), 26: (80, 300),
    27: (120, 380), 28: (80, 380), 29: (118, 392), 30: (82, 392), 31: (135, 395), 32: (65, 395),
}  # fmt: skip


def _pose(points: dict[int, tuple[float, float]] = _FIGURE, *, score: float = 0.99) -> Pose:
    xy = np.zeros((N_LANDMARKS, 2), np.float32)
    for i, p in points.items():
        xy[i] = p
    return Pose(
        points=xy,
        visibility=np.ones(N_LANDMARKS, np.float32),
        score=score,
        mask=np.zeros((4, 4), np.float32),
        mask_box=(0, 0, 4, 4),
    )


def test_is_full_shot_pose_standing_figure():
    assert is_full_shot_pose(_pose(), (420, 200))


def test_is_full_shot_pose_heels_outside_the_frame():
    assert not is_full_shot_pose(_pose(), (380, 200))  # the frame ends above the heels


def test_is_full_shot_pose_short_invented_legs():
    short = {**_FIGURE, 29: (118, 300), 30: (82, 300)}  # heels 100 px under the hips
    assert not is_full_shot_pose(_pose(short), (420, 200))


def test_is_full_shot_pose_low_score_is_never_full():
    assert not is_full_shot_pose(_pose(score=0.2), (420, 200))


def test_garment_regions_of_standing_figure():
    regions = garment_regions(_pose(), (420, 200))
    assert sorted(regions) == ["eyewear", "footwear", "lower", "upper"]
    x, y, w, h = regions["upper"]
    assert y < 90 and y + h > 200 and x < 60 and x + w > 140  # shoulders, elbows, hips
    x, y, w, h = regions["lower"]
    assert 195 <= y <= 200 and y + h >= 380
    x, y, w, h = regions["footwear"]
    assert y < 380 and y + h > 395 and x < 65 and x + w > 135
    x, y, w, h = regions["eyewear"]
    assert y < 40 < y + h and x < 88 and x + w > 112 and h < 20


def test_garment_regions_seen_from_behind_no_eyewear():
    behind = {**_FIGURE, **{i: (200 - x, y) for i, (x, y) in _FIGURE.items() if 1 <= i <= 6}}
    assert "eyewear" not in garment_regions(_pose(behind), (420, 200))


def test_garment_regions_hidden_feet_leave_footwear_out():
    pose = _pose()
    pose.visibility[[29, 30, 31, 32]] = 0.1
    assert "footwear" not in garment_regions(pose, (420, 200))


def test_garment_regions_clipped_to_the_frame():
    regions = garment_regions(_pose(), (420, 130))  # the figure's right side is cut off
    assert all(x + w <= 130 for x, _, w, _ in regions.values())
    assert "upper" not in regions  # a shoulder is outside the frame


def test_person_mask_is_placed_and_clipped_in_frame_pixels():
    pose = _pose()
    pose.mask = np.zeros((4, 4), np.float32)
    pose.mask[:2, :] = 1.0  # the top half of the region the model saw
    pose.mask_box = (-20, 10, 40, 40)  # starts left of the frame
    mask = person_mask(pose, (100, 50))
    assert mask.shape == (100, 50)
    assert mask[10:30, 0:20].all() and not mask[30:, :].any() and not mask[:, 20:].any()


def test_extract_clothes_takes_the_landmark_mask_and_rows():
    from snaplook.artists import extract_clothes

    image = np.full((200, 100, 3), 200, np.uint8)
    image[20:190, 30:70] = (40, 60, 160)  # a blue figure on grey
    mask = np.zeros((200, 100), bool)
    mask[20:190, 30:70] = True
    clothes = extract_clothes(
        image, (25, 15, 50, 180), person_mask=mask, rows=((40.0, 100.0), (100.0, 185.0))
    )
    assert clothes.mask.sum() == mask[15:195, 25:75].sum()  # the given mask, no GrabCut
    _, uy, _, uh = clothes.upper_box
    _, ly, _, lh = clothes.lower_box
    assert 40 <= uy and uy + uh <= 101 and 100 <= ly and ly + lh <= 186


def test_pose_landmarker_missing_model_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    with pytest.raises(SnaplookError, match="run `snaplook models fetch pose`"):
        PoseLandmarker().load()


# --- the real model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pose_xml() -> Path:
    path = models.model_path("pose") or models.model_path(
        "pose", cache_dir=Path.home() / ".cache" / "snaplook" / "models"
    )
    if path is None:
        message = (
            "the pose model is not fetched (run `snaplook models fetch pose`; cache "
            f"{models.default_cache_dir()})"
        )
        if REQUIRE_MODELS:
            pytest.fail(message + "; SNAPLOOK_REQUIRE_MODELS=1 requires it")
        pytest.skip(message)
    return path


def _label(name: str) -> tuple[int, int, int, int]:
    with open(Path(__file__).parent / "data" / "people_all_boxes.csv", newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["image"] == name)
    return tuple(int(row[c]) for c in "xywh")  # type: ignore[return-value]


def test_real_pose_standing_person_is_full_shot_with_regions(pose_xml, people_dir):
    from snaplook.io_utils import read_image

    image = read_image(people_dir / "darknet_person.jpg")
    box = _label("darknet_person.jpg")
    pose = PoseLandmarker(pose_xml).estimate(image, box)
    x, y, w, h = box
    inside = (pose.points[:, 0] >= x - 10) & (pose.points[:, 0] <= x + w + 10)
    inside &= (pose.points[:, 1] >= y - 10) & (pose.points[:, 1] <= y + h + 10)
    assert pose.score > 0.9 and inside.all()  # every landmark on the person's box
    assert is_full_shot_pose(pose, image.shape)
    regions = garment_regions(pose, image.shape)
    assert {"upper", "lower", "footwear"} <= set(regions)
    assert regions["footwear"][1] > y + 0.75 * h  # the boots are at the bottom


def test_real_pose_portrait_is_no_full_shot(pose_xml, people_dir):
    from snaplook.io_utils import read_image

    image = read_image(people_dir / "skimage_astronaut.png")
    pose = PoseLandmarker(pose_xml).estimate(image, _label("skimage_astronaut.png"))
    assert not is_full_shot_pose(pose, image.shape)
    assert "footwear" not in garment_regions(pose, image.shape)


def test_crop_cli_with_pose_writes_region_crops_and_landmarks(
    pose_xml, people_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv(models.CACHE_ENV, str(pose_xml.parents[2]))
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(people_dir / "coco_000000000785.jpg", photos)
    out = tmp_path / "out"
    result = runner.invoke(app, ["crop", str(photos), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    with open(out / "artists.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    kinds = {r["kind"] for r in rows}
    assert {"person", "footwear", "eyewear"} <= kinds  # the skier's boots and goggles
    for r in rows:
        assert (out / r["path"]).is_file()
    landmarks = json.loads((out / "landmarks.json").read_text())
    (view,) = landmarks.values()
    assert len(view["points"]) == 33 and view["full_shot"] is True
    assert set(view["regions"]) >= {"footwear", "eyewear"}
