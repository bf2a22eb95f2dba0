"""Build a labelled retrieval set of real photos for ``snaplook evaluate --protocol folders``.

Real photos available offline: ``../shared/testdata/people`` (see its PROVENANCE.md) and
the sample photos bundled with scikit-image, scikit-learn and matplotlib. Each photo
becomes one label folder of augmented copies (random crop keeping 55-90% of each side,
horizontal flip, rotation up to 12 degrees, brightness/contrast/saturation jitter, grey
with probability 0.15, resize, JPEG quality 55-90), so leave-one-out retrieval asks "find
the other copies of this photo". Two photo-disjoint splits:

- ``OUT/eval/<photo>/``: the people photos and every other library photo, whole;
- ``OUT/train/<photo>-<tile>/``: the remaining library photos cut into 2x2 tiles, each
  tile its own label (more labels for ``snaplook train --protocol folders``).

Deterministic (``--seed``). The photos are not part of the snaplook repository.

    python scripts/make_photo_folders.py --out output/photo_folders [--copies 8] [--strength strong]
"""

from __future__ import annotations

import argparse
import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

REPO = Path(__file__).resolve().parents[1]
PEOPLE = REPO.parent / "shared" / "testdata" / "people"
#: scikit-image's bundled photographs (astronaut and camera are already in PEOPLE).
SKIMAGE_PHOTOS = (
    "brick.png",
    "cell.png",
    "chelsea.png",
    "clock_motion.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "microaneurysms.png",
    "moon.png",
    "motorcycle_left.png",
    "page.png",
    "retina.jpg",
    "rocket.jpg",
)


def library_photos() -> list[Path]:
    """The photos bundled with scikit-image, scikit-learn and matplotlib, sorted by name."""
    import matplotlib
    import skimage
    import sklearn.datasets

    photos = [Path(skimage.__file__).parent / "data" / name for name in SKIMAGE_PHOTOS]
    photos += sorted((Path(sklearn.datasets.__file__).parent / "images").glob("*.jpg"))
    photos.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    return sorted((p for p in photos if p.is_file()), key=lambda p: p.name)


#: Augmentation ranges: (kept share of each side, max rotation in degrees, brightness and
#: contrast jitter, saturation jitter, probability of grey, max blur radius in pixels).
STRENGTHS = {
    "mild": ((0.55, 0.9), 12, 0.25, 0.4, 0.15, 0.0),
    "strong": ((0.3, 0.65), 25, 0.4, 0.8, 0.3, 2.0),
}


def augment(image: Image.Image, rng: np.random.Generator, *, strength: str = "mild") -> Image.Image:
    """One random augmented copy of an RGB image (see the module docstring)."""
    (lo, hi), rotation, jitter, saturation, grey, blur = STRENGTHS[strength]
    w, h = image.size
    cw, ch = (int(s * rng.uniform(lo, hi)) for s in (w, h))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = image.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        out = ImageOps.mirror(out)
    out = out.rotate(float(rng.uniform(-rotation, rotation)), resample=Image.BICUBIC)
    out = ImageEnhance.Brightness(out).enhance(float(rng.uniform(1 - jitter, 1 + jitter)))
    out = ImageEnhance.Contrast(out).enhance(float(rng.uniform(1 - jitter, 1 + jitter)))
    out = ImageEnhance.Color(out).enhance(float(rng.uniform(1 - saturation, 1 + saturation)))
    if rng.random() < grey:
        out = ImageOps.grayscale(out).convert("RGB")
    if blur:
        out = out.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, blur))))
    side = int(rng.integers(256, 401))
    scale = side / max(out.size)
    out = out.resize((max(1, round(out.width * scale)), max(1, round(out.height * scale))))
    buffer = io.BytesIO()
    out.save(buffer, format="JPEG", quality=int(rng.integers(55, 91)))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _write_label(folder: Path, image: Image.Image, copies: int, seed: int, strength: str) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for c in range(copies):
        augment(image, rng, strength=strength).save(
            folder / f"{folder.name}_{c:02d}.jpg", quality=95
        )


def _tiles(image: Image.Image) -> list[Image.Image]:
    w, h = image.size
    return [
        image.crop((x * w // 2, y * h // 2, (x + 1) * w // 2, (y + 1) * h // 2))
        for y in (0, 1)
        for x in (0, 1)
    ]


def build(out: Path, *, copies: int = 8, seed: int = 0, strength: str = "mild") -> dict[str, int]:
    """Write ``out/eval`` and ``out/train`` (replacing them); return label counts."""
    people = sorted(p for p in PEOPLE.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    if not people:
        raise SystemExit(f"no photos in {PEOPLE} (see ../shared/testdata/PROVENANCE.md)")
    library = library_photos()
    eval_photos = people + library[0::2]
    train_photos = library[1::2]
    for split in ("eval", "train"):
        shutil.rmtree(out / split, ignore_errors=True)
    label = 0
    for path in eval_photos:
        image = Image.open(path).convert("RGB")
        _write_label(out / "eval" / path.stem, image, copies, seed * 1000 + label, strength)
        label += 1
    n_train = 0
    for path in train_photos:
        for t, tile in enumerate(_tiles(Image.open(path).convert("RGB"))):
            _write_label(
                out / "train" / f"{path.stem}-{t}", tile, copies, seed * 1000 + label, strength
            )
            label += 1
            n_train += 1
    return {"eval_labels": len(eval_photos), "train_labels": n_train, "copies": copies}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("output/photo_folders"))
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strength", choices=sorted(STRENGTHS), default="mild")
    args = parser.parse_args()
    counts = build(args.out, copies=args.copies, seed=args.seed, strength=args.strength)
    print(
        f"wrote {counts['eval_labels']} eval labels and {counts['train_labels']} train labels "
        f"x {counts['copies']} copies under {args.out}"
    )


if __name__ == "__main__":
    main()
