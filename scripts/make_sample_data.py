"""Generate the bundled sample gallery (data/train) and queries (data/test).

Garment-like silhouettes (t-shirt, trousers, dress, skirt, jacket) in several colours and
patterns on a light shop-style background. Every gallery "item" is a distinct (kind,
pattern, colour): no two items of a kind share a pattern or a colour, so a right answer
is unambiguous to the eye. Each item has two views (shift, scale, a small rotation and a
lighting change), and each query is a third, unseen view of one gallery item, so true
matches exist. With real ImageNet features (ResNet50 or efficientnet_lite0) every query's
nearest gallery image is a view of its item. Deterministic: the same seed writes the
same bytes.

    python scripts/make_sample_data.py [--out data] [--seed 7]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 256
COLOURS = {
    "red": (196, 40, 48),
    "navy": (32, 48, 110),
    "green": (40, 130, 70),
    "yellow": (230, 190, 40),
    "black": (30, 30, 30),
    "pink": (230, 140, 170),
}
PATTERNS = ("solid", "stripes", "dots", "checks", "diagonal", "zigzag", "floral", "colourblock")


def _shape(kind: str) -> list[tuple[float, float]]:
    """Polygon of a garment in unit coordinates (0..1)."""
    if kind == "tshirt":
        return [
            (0.30, 0.15),
            (0.42, 0.12),
            (0.50, 0.18),
            (0.58, 0.12),
            (0.70, 0.15),
            (0.90, 0.32),
            (0.80, 0.42),
            (0.70, 0.35),
            (0.70, 0.88),
            (0.30, 0.88),
            (0.30, 0.35),
            (0.20, 0.42),
            (0.10, 0.32),
        ]
    if kind == "trousers":
        return [
            (0.32, 0.10),
            (0.68, 0.10),
            (0.74, 0.92),
            (0.56, 0.92),
            (0.50, 0.38),
            (0.44, 0.92),
            (0.26, 0.92),
        ]
    if kind == "dress":
        return [(0.40, 0.08), (0.60, 0.08), (0.62, 0.35), (0.82, 0.92), (0.18, 0.92), (0.38, 0.35)]
    if kind == "skirt":
        return [(0.36, 0.25), (0.64, 0.25), (0.80, 0.78), (0.20, 0.78)]
    # jacket: long sleeves, open front line drawn later
    return [
        (0.30, 0.12),
        (0.70, 0.12),
        (0.92, 0.30),
        (0.92, 0.80),
        (0.80, 0.80),
        (0.76, 0.40),
        (0.74, 0.90),
        (0.26, 0.90),
        (0.24, 0.40),
        (0.20, 0.80),
        (0.08, 0.80),
        (0.08, 0.30),
    ]


KINDS = ("tshirt", "trousers", "dress", "skirt", "jacket")
QUERY_ITEMS = (0, 3, 6, 9, 12, 15, 18, 19)


def _pattern(colour: tuple[int, int, int], pattern: str, rng: np.random.Generator) -> Image.Image:
    tex = Image.new("RGB", (SIZE, SIZE), colour)
    draw = ImageDraw.Draw(tex)
    accent = tuple(
        int(255 - 0.6 * (255 - c)) if sum(colour) < 300 else int(c * 0.4) for c in colour
    )
    step = int(rng.integers(14, 22))
    if pattern == "stripes":
        for y in range(0, SIZE, step):
            draw.rectangle([0, y, SIZE, y + step // 3], fill=accent)
    elif pattern == "dots":
        for y in range(step // 2, SIZE, step):
            for x in range(step // 2, SIZE, step):
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=accent)
    elif pattern == "checks":
        for y in range(0, SIZE, step):
            for x in range(0, SIZE, step):
                if (x // step + y // step) % 2:
                    draw.rectangle([x, y, x + step - 1, y + step - 1], fill=accent)
    elif pattern == "diagonal":
        for x in range(-SIZE, SIZE, step):
            draw.line([(x, 0), (x + SIZE, SIZE)], fill=accent, width=max(2, step // 3))
    elif pattern == "zigzag":
        for y in range(0, SIZE + step, step):
            points = [
                (x, y + (step // 2 if (x // step) % 2 else 0)) for x in range(0, SIZE + step, step)
            ]
            draw.line(points, fill=accent, width=3)
    elif pattern == "floral":
        for _ in range(40):
            cx, cy = (int(v) for v in rng.integers(0, SIZE, 2))
            for dx, dy in ((-5, 0), (5, 0), (0, -5), (0, 5)):
                draw.ellipse([cx + dx - 4, cy + dy - 4, cx + dx + 4, cy + dy + 4], fill=accent)
            draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=(250, 220, 60))
    elif pattern == "colourblock":
        draw.rectangle([0, SIZE // 2, SIZE, SIZE], fill=accent)
        draw.rectangle([0, SIZE // 2 - 6, SIZE, SIZE // 2 + 6], fill=(245, 245, 245))
    return tex


def _render(
    kind: str, colour: tuple[int, int, int], pattern: str, view: int, seed: int
) -> Image.Image:
    rng = np.random.default_rng(seed)
    texture = _pattern(colour, pattern, np.random.default_rng(seed // 10))
    view_rng = np.random.default_rng(seed * 31 + view)
    scale = 1.0 + view_rng.uniform(-0.08, 0.08)
    dx, dy = view_rng.uniform(-0.05, 0.05, size=2)
    poly = [((x - 0.5) * scale + 0.5 + dx, (y - 0.5) * scale + 0.5 + dy) for x, y in _shape(kind)]
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).polygon([(x * SIZE, y * SIZE) for x, y in poly], fill=255)
    background = Image.new("RGB", (SIZE, SIZE), tuple(int(v) for v in rng.integers(232, 250, 3)))
    img = Image.composite(texture, background, mask.filter(ImageFilter.GaussianBlur(1)))
    if kind == "jacket":
        ImageDraw.Draw(img).line(
            [(SIZE * (0.5 + dx), SIZE * (0.14 + dy)), (SIZE * (0.5 + dx), SIZE * (0.88 + dy))],
            fill=(20, 20, 20),
            width=3,
        )
    img = img.rotate(
        float(view_rng.uniform(-6, 6)),
        resample=Image.BICUBIC,
        fillcolor=background.getpixel((0, 0)),
    )
    light = view_rng.uniform(0.9, 1.1)
    arr = np.clip(
        np.asarray(img, dtype=np.float32) * light + view_rng.normal(0, 3, (SIZE, SIZE, 3)), 0, 255
    )
    return Image.fromarray(arr.astype(np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data"))
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    names = list(COLOURS)
    items = []
    # 20 items x 2 views = 40 gallery images: each kind four times, each time with another
    # pattern and another colour (drawn without replacement per kind).
    per_kind = {
        kind: (rng.permutation(len(PATTERNS))[:4], rng.permutation(len(names))[:4])
        for kind in KINDS
    }
    for i in range(20):
        kind = KINDS[i % len(KINDS)]
        patterns, colours = per_kind[kind]
        colour = names[int(colours[i // len(KINDS)])]
        pattern = PATTERNS[int(patterns[i // len(KINDS)])]
        items.append((i, kind, colour, pattern))
    train, test = args.out / "train", args.out / "test"
    for folder in (train, test):
        folder.mkdir(parents=True, exist_ok=True)
        for old in [*folder.glob("item*.jpg"), *folder.glob("query_item*.jpg")]:
            old.unlink()  # an earlier generation's files would mix with this one
    for i, kind, colour, pattern in items:
        for view in (0, 1):
            img = _render(kind, COLOURS[colour], pattern, view, seed=args.seed * 1000 + i * 10)
            img.save(train / f"item{i:02d}_{kind}_{colour}_{pattern}_v{view}.jpg", quality=90)
    # Queries: a third view of eight items spread over the kinds.
    for i in QUERY_ITEMS:
        _, kind, colour, pattern = items[i]
        img = _render(kind, COLOURS[colour], pattern, 2, seed=args.seed * 1000 + i * 10)
        img.save(test / f"query_item{i:02d}_{kind}_{colour}_{pattern}.jpg", quality=90)
    print(
        f"wrote {len(items) * 2} gallery images to {train} and {len(QUERY_ITEMS)} queries to {test}"
    )


if __name__ == "__main__":
    main()
