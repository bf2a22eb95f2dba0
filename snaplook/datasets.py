"""Retrieval datasets: DeepFashion In-shop, Consumer-to-shop and label folders as a Split.

Protocol loaders turn a dataset tree into :class:`Split` (train/query/gallery image lists
with item ids and optional ground-truth boxes), for ``evaluate`` and ``train``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from snaplook.errors import SnaplookError
from snaplook.options import CROPS, DEFAULT_C2S_SUBSET, DEFAULT_PROTOCOL, PROTOCOLS

logger = logging.getLogger(__name__)

PARTITION_FILE = "list_eval_partition.txt"
BBOX_FILES = {"inshop": "list_bbox_inshop.txt", "consumer2shop": "list_bbox_consumer2shop.txt"}
#: Where the DeepFashion archives put their annotation files, relative to the benchmark
#: folder (the partition file lives in ``Eval/``, boxes in ``Anno/``).
_ANNOTATION_DIRS = (".", "Eval", "Anno")

#: Columns of the partition file, line 2 (after the count line), per protocol.
_PARTITION_HEADER = {
    "inshop": ("image_name", "item_id", "evaluation_status"),
    "consumer2shop": ("image_pair_name_1", "image_pair_name_2", "item_id", "evaluation_status"),
}
_STATUSES = {
    "inshop": frozenset({"train", "query", "gallery"}),
    "consumer2shop": frozenset({"train", "val", "test"}),
}


@dataclass(frozen=True)
class Sample:
    """One image of an evaluation set.

    Attributes:
        path: path relative to :attr:`Split.root`, POSIX, as written in the partition file.
        item: item id (the label: same item = relevant).
        category: the folder(s) between ``img/`` and the item folder (e.g.
            ``WOMEN/Dresses``), or the label folder for the folders protocol.
        box: ground-truth garment box (x, y, w, h) in pixels, or None.
    """

    path: str
    item: str
    category: str
    box: tuple[int, int, int, int] | None = None


@dataclass
class Split:
    """One evaluation set: which images are trained on, queried and searched.

    Attributes:
        root: folder the sample paths are relative to.
        train: training images (not used by evaluation).
        query: query images.
        gallery: gallery images. For ``protocol="folders"`` it is the same list as
            ``query`` and each query is searched against all images but itself.
        protocol: "inshop", "consumer2shop" or "folders".
        partition: the partition file read (None for folders).
        bbox: the box file read, or None.
        missing: paths listed in the partition file whose image file does not exist
            (dropped from the lists above).
    """

    root: Path
    train: list[Sample]
    query: list[Sample]
    gallery: list[Sample]
    protocol: str
    partition: Path | None = None
    bbox: Path | None = None
    missing: list[str] = field(default_factory=list)

    @property
    def leave_one_out(self) -> bool:
        """True when queries are searched against the other images of the same list."""
        return self.protocol == "folders"

    def counts(self) -> dict[str, int]:
        """Image and item counts per list, for reports."""
        return {
            "train_images": len(self.train),
            "query_images": len(self.query),
            "gallery_images": len(self.gallery),
            "query_items": len({s.item for s in self.query}),
            "gallery_items": len({s.item for s in self.gallery}),
            "missing_images": len(self.missing),
        }


def find_annotation(root: str | Path, name: str) -> Path | None:
    """Look for a DeepFashion annotation file under ``root``, ``root/Eval`` or ``root/Anno``."""
    root = Path(root)
    for sub in _ANNOTATION_DIRS:
        path = root / sub / name
        if path.is_file():
            return path
    return None


def _image_root(root: Path) -> Path:
    # The archives unpack to <benchmark>/Img/img/...; partition paths start with "img/".
    if not (root / "img").is_dir() and (root / "Img" / "img").is_dir():
        return root / "Img"
    return root


def _category_of(path: str) -> str:
    parts = PurePosixPath(path).parts
    if parts and parts[0].lower() == "img":
        parts = parts[1:]
    return "/".join(parts[:-2]) or "(none)"


def _read_lines(path: Path, what: str) -> list[str]:
    from snaplook.io_utils import read_input_bytes

    if not os.path.lexists(path):
        raise SnaplookError(f"{what} {path} not found; pass its path with --partition.")
    try:
        # utf-8-sig: a file saved by a Windows editor starts with a BOM.
        return read_input_bytes(path, kind="table").decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise SnaplookError(f"{path}: not a UTF-8 text file ({exc.reason}).") from exc


def _parse_listing(
    path: Path, header: tuple[str, ...] | None, n_columns: int, what: str
) -> list[tuple[int, list[str]]]:
    """Parse a DeepFashion listing: a count line, a header line, then whitespace rows.

    Returns (line number, tokens) per data row; raises naming the first bad line.
    """
    lines = _read_lines(path, what)
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise SnaplookError(f"{path}: empty file; expected a DeepFashion {what}.")
    first = lines[0].split()
    # isdigit() alone accepts '²' and other Unicode digits that int() refuses.
    if len(first) != 1 or not (first[0].isascii() and first[0].isdigit()):
        raise SnaplookError(
            f"{path}, line 1: expected the number of entries, found {lines[0].strip()[:80]!r}. "
            f"Is this a DeepFashion {what}?"
        )
    declared = int(first[0])
    if len(lines) < 2:
        raise SnaplookError(f"{path}, line 2: missing the header line.")
    found = tuple(lines[1].split())
    if header is not None and found[: len(header)] != header:
        raise SnaplookError(
            f"{path}, line 2: expected the header {' '.join(header)!r}, found "
            f"{lines[1].strip()[:80]!r}. Check --protocol and the file."
        )
    rows: list[tuple[int, list[str]]] = []
    for number, line in enumerate(lines[2:], start=3):
        tokens = line.split()
        if not tokens:
            raise SnaplookError(f"{path}, line {number}: empty line inside the listing.")
        if len(tokens) != n_columns:
            raise SnaplookError(
                f"{path}, line {number}: expected {n_columns} columns, found {len(tokens)} "
                f"({line.strip()[:100]!r})."
            )
        rows.append((number, tokens))
    if declared != len(rows):
        raise SnaplookError(
            f"{path}, line 1: declares {declared} entries but the file has {len(rows)}; "
            "the file may be truncated."
        )
    return rows


def read_bbox_file(path: str | Path) -> dict[str, tuple[int, int, int, int]]:
    """Read a DeepFashion box file (``list_bbox_inshop.txt`` or ``list_bbox_consumer2shop.txt``).

    Rows are ``image_name ... x_1 y_1 x_2 y_2`` (corner coordinates).

    Returns:
        image name -> box (x, y, w, h).

    Raises:
        SnaplookError: missing file, or a malformed line (the message names it).
    """
    path = Path(path)
    lines = _read_lines(path, "box file")
    n_columns = len(lines[1].split()) if len(lines) > 1 else 7
    boxes: dict[str, tuple[int, int, int, int]] = {}
    for number, tokens in _parse_listing(path, None, n_columns, "box file"):
        try:
            x1, y1, x2, y2 = (int(t) for t in tokens[-4:])
        except ValueError:
            raise SnaplookError(
                f"{path}, line {number}: box corners must be integers, found "
                f"{' '.join(tokens[-4:])!r}."
            ) from None
        if x2 <= x1 or y2 <= y1:
            raise SnaplookError(
                f"{path}, line {number}: empty box ({x1}, {y1}, {x2}, {y2}); expected "
                "x_1 < x_2 and y_1 < y_2."
            )
        boxes[tokens[0]] = (x1, y1, x2 - x1, y2 - y1)
    return boxes


def load_split(
    root: str | Path,
    *,
    protocol: str = DEFAULT_PROTOCOL,
    partition: str | Path | None = None,
    bbox: str | Path | None = None,
    strict: bool = False,
    subset: str = DEFAULT_C2S_SUBSET,
) -> Split:
    """Read a dataset's evaluation protocol into image lists with item ids.

    Protocols:
        - "inshop": DeepFashion In-shop; ``list_eval_partition.txt`` rows are
          ``image_name item_id evaluation_status`` (train / query / gallery).
        - "consumer2shop": DeepFashion Consumer-to-shop; rows are ``image_pair_name_1
          image_pair_name_2 item_id evaluation_status``; the consumer images (first column)
          of ``subset`` are the queries, its shop images (second column) the gallery.
        - "folders": ``root/<label>/<images>``; every image is a query against all others.

    Args:
        root: the benchmark folder (containing ``img/`` or ``Img/img/``), or for
            "folders" the folder of label folders.
        protocol: "inshop", "consumer2shop" or "folders", default="inshop".
        partition: the partition file; default: ``list_eval_partition.txt`` in ``root`` or
            ``root/Eval``.
        bbox: a box file; when given, each sample carries its ground-truth box.
        strict: raise if any listed image is missing, instead of dropping and counting it.
        subset: Consumer-to-shop status that is evaluated, default="test" ("val" for
            model selection).

    Returns:
        :class:`Split`.

    Raises:
        SnaplookError: unknown protocol; partition or box file missing or malformed (the
            message names the line); listed images missing with ``strict``; no queries.
    """
    root = Path(root)
    if protocol not in PROTOCOLS:
        raise SnaplookError(
            f"unknown protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}."
        )
    if not root.is_dir():
        raise SnaplookError(f"{root}: no such folder; pass the dataset root.")
    if protocol == "folders":
        split = _load_folders(root)
    else:
        split = _load_deepfashion(root, protocol, partition, subset)
    if bbox is not None:
        split = _attach_boxes(split, Path(bbox), strict=strict)
    split = _drop_missing(split, strict=strict)
    if not split.query:
        raise SnaplookError(f"{split.partition or root}: no query images to evaluate.")
    if not split.gallery:
        raise SnaplookError(f"{split.partition or root}: no gallery images to search.")
    return split


def _load_deepfashion(
    root: Path, protocol: str, partition: str | Path | None, subset: str
) -> Split:
    if partition is None:
        found = find_annotation(root, PARTITION_FILE)
        if found is None:
            raise SnaplookError(
                f"{PARTITION_FILE} not found in {root}, {root / 'Eval'}; pass its path with "
                "--partition."
            )
        partition = found
    partition = Path(partition)
    header = _PARTITION_HEADER[protocol]
    statuses = _STATUSES[protocol]
    if protocol == "consumer2shop" and subset not in statuses:
        raise SnaplookError(f"unknown subset {subset!r}; choose train, val or test.")
    rows = _parse_listing(partition, header, len(header), "partition file")
    train: list[Sample] = []
    query: list[Sample] = []
    gallery: list[Sample] = []
    seen: dict[str, set[str]] = {"train": set(), "query": set(), "gallery": set()}

    def add(kind: str, target: list[Sample], path: str, item: str) -> None:
        # Consumer-to-shop lists an image once per pair it is in; keep it once.
        if path not in seen[kind]:
            seen[kind].add(path)
            target.append(Sample(path, item, _category_of(path)))

    for number, tokens in rows:
        status = tokens[-1]
        if status not in statuses:
            raise SnaplookError(
                f"{partition}, line {number}: unknown evaluation_status {status!r}; expected "
                f"one of {', '.join(sorted(statuses))}."
            )
        if protocol == "inshop":
            path, item = tokens[0], tokens[1]
            target = {"train": train, "query": query, "gallery": gallery}[status]
            add(status, target, path, item)
        else:
            consumer, shop, item = tokens[0], tokens[1], tokens[2]
            if status == subset:
                add("query", query, consumer, item)
                add("gallery", gallery, shop, item)
            elif status == "train":
                add("train", train, consumer, item)
                add("train", train, shop, item)
    return Split(_image_root(root), train, query, gallery, protocol, partition=partition)


def _load_folders(root: Path) -> Split:
    from snaplook.io_utils import find_images

    samples: list[Sample] = []
    loose = 0
    for path in find_images(root):
        rel = path.relative_to(root).as_posix()
        parts = PurePosixPath(rel).parts
        if len(parts) < 2:
            loose += 1
            continue
        samples.append(Sample(rel, parts[0], parts[0]))
    if loose:
        logger.warning(
            "%d image(s) directly in %s have no label folder and were left out", loose, root
        )
    if not samples:
        raise SnaplookError(
            f"{root}: no images in label folders; the folders protocol expects "
            "ROOT/<label>/<images>."
        )
    return Split(root, [], samples, samples, "folders")


def _attach_boxes(split: Split, bbox: Path, *, strict: bool) -> Split:
    boxes = read_bbox_file(bbox)

    def with_box(samples: list[Sample]) -> list[Sample]:
        return [dataclasses.replace(s, box=boxes.get(s.path)) for s in samples]

    query = with_box(split.query)
    gallery = query if split.leave_one_out else with_box(split.gallery)
    unboxed = len({s.path for s in query + gallery if s.box is None})
    if unboxed:
        message = f"{bbox}: {unboxed} evaluated image(s) have no box"
        if strict:
            raise SnaplookError(message + " (--strict); check that it matches the partition file.")
        logger.warning("%s; they are used uncropped", message)
    return dataclasses.replace(
        split, train=with_box(split.train), query=query, gallery=gallery, bbox=bbox
    )


def _drop_missing(split: Split, *, strict: bool) -> Split:
    checked: dict[str, bool] = {}

    def exists(s: Sample) -> bool:
        if s.path not in checked:
            checked[s.path] = (split.root / s.path).is_file()
        return checked[s.path]

    train = [s for s in split.train if exists(s)]
    query = [s for s in split.query if exists(s)]
    gallery = query if split.leave_one_out else [s for s in split.gallery if exists(s)]
    missing = sorted(p for p, ok in checked.items() if not ok)
    if missing:
        # Label folders have no partition file: their images vanished after the listing
        # (or are dangling symlinks).
        source = f"listed in {split.partition}" if split.partition else "found in the folders"
        message = (
            f"{len(missing)} image(s) {source} are missing under {split.root} (first: {missing[0]})"
        )
        if strict:
            raise SnaplookError(message + "; --strict stops here. Check the dataset root.")
        logger.warning("%s; they are left out and counted in the report", message)
    return dataclasses.replace(split, train=train, query=query, gallery=gallery, missing=missing)


def check_crop(crop: str) -> None:
    """Raise unless ``crop`` is one of :data:`~snaplook.options.CROPS`."""
    if crop not in CROPS:
        raise SnaplookError(f"unknown crop {crop!r}; choose none or gt.")


def resolve_bbox(
    root: Path, protocol: str, bbox: str | Path | None, crop: str
) -> str | Path | None:
    """The box file to read: ``bbox`` if given; for ``crop="gt"`` the protocol's own file.

    Raises:
        SnaplookError: ``crop="gt"`` without a box file (or with the folders protocol).
    """
    if bbox is not None or crop != "gt":
        return bbox
    if protocol == "folders":
        raise SnaplookError("--crop gt needs boxes; the folders protocol has none (use --bbox).")
    found = find_annotation(root, BBOX_FILES[protocol])
    if found is None:
        raise SnaplookError(
            f"--crop gt needs {BBOX_FILES[protocol]}; not found in {root} or {root / 'Anno'}. "
            "Pass it with --bbox, or use --crop none."
        )
    return found
