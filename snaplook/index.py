"""The on-disk gallery index and exact cosine k-nearest-neighbour search over it.

An index is a folder: ``meta.json`` (what produced the features, and the list of shards)
and ``features/shard-NNNNN.npy`` (float32 (rows, d), rows L2-normalised) each with its
``features/shard-NNNNN.csv`` manifest, so ``--update`` rewrites only the shards it
touches. Indexes of format 1 (one ``features.npy`` + ``manifest.csv``) still load.
Nothing is pickled; search reads the memory-mapped shards block by block.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snaplook import __version__
from snaplook.ann import DEFAULT_ANN, AnnIndex, plan_ann
from snaplook.catalog import (
    CATALOG_FILE,
    DEFAULT_IMAGE_COLUMN,
    Catalog,
    Products,
    join_catalog,
    load_products,
    log_join,
    read_catalog,
    write_catalog,
)
from snaplook.checkpoint import CHECKPOINT_FORMAT, BatchRecord, Checkpoint
from snaplook.errors import SnaplookError
from snaplook.features import (
    DEFAULT_BACKBONE,
    DEFAULT_BATCH_SIZE,
    DEFAULT_POOLING,
    DEFAULT_PRECISION,
    DEFAULT_SEED,
    DEFAULT_WEIGHTS,
    Embedder,
    Skipped,
    embedder_runtime,
)
from snaplook.io_utils import ManifestRow, timestamp

if TYPE_CHECKING:
    import numpy as np

    from snaplook.distributed import RayEngine

logger = logging.getLogger(__name__)

DEFAULT_INDEX_DIR = Path("output/index")
DEFAULT_K = 5
#: Version of the index folder layout; an index from a newer snaplook is refused.
#: 1: one ``features.npy`` + ``manifest.csv``; 2: shards listed in ``meta.json``.
INDEX_FORMAT_VERSION = 2
#: Rows per feature shard: 16,384 x 2048 float32 is 128 MiB, so a 10 M-image index is
#: about 610 files and an ``--update`` that touches a few rows rewrites a few of them.
DEFAULT_SHARD_ROWS = 16384
#: The sub-folder of an index that holds the shards.
SHARDS_DIR = "features"
_SHARD_NAME = re.compile(r"shard-[0-9]{5,}")
SKIPPED_HEADER = ("path", "reason")
RESULTS_HEADER = ("query", "rank", "path", "distance", "backbone", "weights")
#: Gallery rows per GEMM block in search: bounds the similarity matrix to
#: n_queries x 8192 float32 whatever the gallery size.
SEARCH_BLOCK_ROWS = 8192


@dataclass
class BuildSummary:
    """What :func:`build_index` did.

    Attributes:
        out: the index folder.
        n_indexed: rows in the index.
        n_embedded: images embedded in this run (the rest were reused by ``--update``).
        skipped: inputs that could not be read.
        seconds: wall time of the run.
        n_resumed: images embedded by an interrupted earlier run and taken from its
            checkpoint (not counted in ``n_embedded``).
        ann: the ``meta.json["ann"]`` block (approximate search built, or exact).
        shards_written: feature shards written by this run.
        shards_kept: shards of the previous index carried over unchanged (``--update``;
            hard-linked, not rewritten).
        bytes_written: bytes of the shards (.npy + .csv) written by this run.
    """

    out: Path
    n_indexed: int
    n_embedded: int
    skipped: list[Skipped]
    seconds: float
    n_resumed: int = 0
    ann: dict[str, Any] | None = None
    catalog: dict[str, Any] | None = None
    shards_written: int = 0
    shards_kept: int = 0
    bytes_written: int = 0

    @property
    def images_per_second(self) -> float:
        return self.n_embedded / self.seconds if self.seconds > 0 else 0.0


def build_index(
    root: str | Path,
    out: str | Path = DEFAULT_INDEX_DIR,
    *,
    backbone: str = DEFAULT_BACKBONE,
    weights: str | Path = DEFAULT_WEIGHTS,
    pooling: str = DEFAULT_POOLING,
    seed: int = DEFAULT_SEED,
    batch_size: int = DEFAULT_BATCH_SIZE,
    update: bool = False,
    precision: str = DEFAULT_PRECISION,
    strict: bool = False,
    embedder: Embedder | None = None,
    head: Any = None,
    ann: str | None = None,
    catalog: str | Path | None = None,
    catalog_image_column: str = DEFAULT_IMAGE_COLUMN,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    engine: str | RayEngine = "local",
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> BuildSummary:
    """Embed every image under ``root`` and write an index folder at ``out``.

    The folder is assembled under a temporary name and renamed into place when complete,
    so an interrupted run leaves the previous index untouched. Finished batches are
    checkpointed in ``<out>.partial/``: a run that is killed or interrupted and started
    again with the same images and settings embeds only the batches that were not
    finished, and writes the same shard bytes as an uninterrupted run (shards already
    assembled when the run was killed are kept). The checkpoint is removed on success.
    ``<out>.lock`` (holding the pid) keeps a second run
    from writing the same index at the same time. In the main thread, Ctrl-C stops the
    run after the current batch (``KeyboardInterrupt``), keeping the checkpoint.

    Args:
        root: gallery folder (searched recursively) or one image.
        out: index folder to write, default="output/index".
        backbone, weights, pooling, seed: the :class:`~snaplook.features.Embedder` to use
            (ignored when ``embedder`` is given).
        batch_size: images per forward pass, default=32.
        precision: "fp32", "bf16", "int8" or "auto" (ignored when ``embedder`` is given);
            recorded in ``meta.json``: queries and ``update`` must use the same. int8 is
            calibrated on a seeded sample of the gallery (of the old index on ``update``).
        update: reuse rows of the existing index at ``out`` for files whose size and
            mtime (or, on doubt, SHA-1) are unchanged; embed only new or changed files.
            The rows equal a full rebuild's; shards of the old index whose rows all come
            through unchanged are kept (hard-linked), only the stretches between them are
            cut into new shards.
        strict: refuse to write the index when any image could not be read (the
            previous index at ``out``, if any, stays as it was).
        head: a trained ``snaplook.train.Head``: the index stores its output and
            ``meta.json`` records its identity (queries must then use the same head).
        ann: approximate search structure built over the features (see
            :mod:`snaplook.ann`): ``auto`` (exact below 100k rows), ``none``, ``hnsw``,
            ``ivfpq`` or a FAISS index-factory string; default None: ``auto``, or with
            ``update`` what the existing index was built with. Rebuilt on every run.
        catalog: a product catalogue (CSV or Parquet, see :mod:`snaplook.catalog`) joined
            to the gallery on the image path and stored as ``catalog.csv``; with
            ``update`` and no ``catalog``, the index's stored catalogue is joined again.
        catalog_image_column: the catalogue column naming the image, default="image".
        shard_rows: rows per feature shard, default=16384.
        engine: "local" (this process), "ray" (a local Ray cluster) or a
            :class:`~snaplook.distributed.RayEngine` (cluster address, workers, CPUs/GPUs
            per worker). Both give the same rows in the same order and, with the same
            runtime, the same features (to 1e-6); batches are checkpointed alike.
        on_start: called once with the number of images found.
        on_progress: called with the number of images handled so far.

    Returns:
        :class:`BuildSummary`.

    Raises:
        SnaplookError: no images under ``root``; ``--update`` against an index built
            with other settings; weights that cannot be loaded; another run holds the
            lock on ``out``.
        KeyboardInterrupt: Ctrl-C; finished batches are kept for the next run.
    """
    import shutil

    from snaplook.io_utils import (
        deferred_sigint,
        exclusive_lock,
        find_images,
        manifest_row,
        replace_dir,
        write_csv_atomic,
        write_json_atomic,
    )

    started = time.perf_counter()
    root, out = Path(root), Path(out)
    if batch_size < 1:
        raise SnaplookError(f"--batch-size must be at least 1, got {batch_size}.")
    if shard_rows < 1:
        raise SnaplookError(f"--shard-rows must be at least 1, got {shard_rows}.")
    if engine not in ("local", "ray") and not hasattr(engine, "embed_batches"):
        raise SnaplookError(f"unknown engine {engine!r}; choose local or ray.")
    embedder = embedder or Embedder(
        backbone, weights=weights, pooling=pooling, seed=seed, precision=precision
    )
    if head is not None:
        from snaplook.features import with_head

        embedder = with_head(embedder, head)
    paths = find_images(root)
    if not paths:
        raise SnaplookError(
            f"{root}: no images found (looked for .jpg, .jpeg, .png, .bmp, .webp, .tif)."
        )
    root_dir = root if root.is_dir() else root.parent
    _check_out(out)
    if embedder.resolved_precision() == "int8":
        old_calibration = _old_calibration(out) if update else None
        if old_calibration is not None:
            embedder.use_calibration(old_calibration)
        else:
            embedder.calibrate_on(paths)
    products = _read_catalog_for(out, catalog, catalog_image_column, root_dir, update=update)
    identity = embedder.identity()
    if ann is not None:  # a bad --ann fails before any image is embedded
        plan_ann(ann, len(paths), embedder.feature_dim)

    with (
        exclusive_lock(_beside(out, ".lock"), what=f"the index {out}"),
        deferred_sigint() as interrupted,
    ):
        reuse: dict[str, tuple[ManifestRow, int]] = {}
        old = None
        old_stamp = None
        if update and (out / "meta.json").exists():
            old = load_index(out, ann=False)
            _check_same_model(old.meta, identity, out)
            if ann is None:
                ann = (old.meta.get("ann") or {}).get("requested")
            old_stamp = [old.meta.get("created"), len(old.manifest)]
            reuse = {row.path: (row, i) for i, row in enumerate(old.manifest)}

        if on_start is not None:
            on_start(len(paths))
        # Rows are written in gallery order; each is either copied from the old index
        # or embedded now, so --update gives the same file as a full rebuild.
        plan: list[tuple[Path, ManifestRow | None, int | None]] = []
        rel_of: dict[Path, str] = {}  # once per file: a million of them take seconds
        for path in paths:
            rel = rel_of[path] = _rel(path, root_dir)
            hit = reuse.get(rel)
            plan.append((path, *_reusable(path, hit)) if hit else (path, None, None))
        to_embed = [p for p, old_row, _ in plan if old_row is None]

        checkpoint = Checkpoint(
            _beside(out, ".partial"),
            {
                "format": CHECKPOINT_FORMAT,
                "root": str(root_dir.resolve()),
                "identity": identity,
                # Runtimes agree to 1e-4, not to the bit: a resume must not mix them.
                "runtime": embedder_runtime(embedder),
                "batch_size": batch_size,
                "update_from": old_stamp,
                "reused": [[rel_of[p], i] for p, r, i in plan if r is not None],
                "embed": [[rel_of[p], *_stat(p)] for p in to_embed],
            },
            n_images=len(to_embed),
            feature_dim=embedder.feature_dim,
        )
        try:
            records = checkpoint.resume()
            n_resumed = sum(len(r.rows) for r in records.values())
            done_before = len(paths) - len(to_embed) + sum(r.size for r in records.values())
            if on_progress is not None and done_before:
                on_progress(done_before)
            if interrupted():
                raise KeyboardInterrupt
            progress = (lambda done: on_progress(done_before + done)) if on_progress else None
            if engine == "local":
                first = next((b for b in range(checkpoint.n_batches) if b not in records), None)
                if first is not None:
                    records.update(
                        _embed_batches(
                            to_embed,
                            embedder,
                            checkpoint,
                            first=first,
                            batch_size=batch_size,
                            interrupted=interrupted,
                            on_progress=progress,
                        )
                    )
            else:
                records.update(
                    _embed_batches_distributed(
                        to_embed, embedder, checkpoint, records, engine, interrupted, progress
                    )
                )

            embedded_at: dict[Path, tuple[int, int, tuple[int, int]]] = {}
            skipped: list[Skipped] = []
            for b in range(checkpoint.n_batches):
                for j, (pos, w, h) in enumerate(records[b].rows):
                    embedded_at[to_embed[pos]] = (b, j, (w, h))
                skipped.extend(Skipped(to_embed[pos], why) for pos, why in records[b].skipped)

            rows: list[ManifestRow] = []
            sources: list[tuple[str, int, int]] = []  # ("old", i, 0) or ("new", batch, j)
            for path, old_row, old_i in plan:
                if old_row is not None:
                    rows.append(_replace_row(old_row, len(rows)))
                    sources.append(("old", old_i, 0))
                elif path in embedded_at:
                    b, j, size = embedded_at[path]
                    rows.append(manifest_row(path, root_dir, len(rows), size))
                    sources.append(("new", b, j))
            if not rows:
                checkpoint.remove()
                raise SnaplookError(
                    f"{root}: none of the {len(paths)} images could be read; see the warnings "
                    "above for why."
                )
            if strict and skipped:
                checkpoint.remove()
                raise SnaplookError(
                    f"--strict: {len(skipped)} of {len(paths)} images could not be read (first: "
                    f"{skipped[0].reason}); the index was not written. Fix or remove them, or "
                    "drop --strict to index the rest."
                )
            # Kept across a kill: shards finished in it are reused by the rerun.
            tmp = checkpoint.folder / "assembling"
            for stale in (tmp / "manifest.csv", tmp / "features.npy"):
                stale.unlink(missing_ok=True)
            plans = _plan_shards(sources, old.shards_ if old is not None else [], shard_rows)
            shards, written = _write_shards(
                tmp,
                plans,
                sources,
                rows,
                old,
                [checkpoint.chunk_path(b) for b in range(checkpoint.n_batches)],
                embedder.feature_dim,
                checkpoint.folder / "shards",
            )
            ann_meta = _build_ann(tmp, shards, ann or DEFAULT_ANN, seed=seed)
            write_csv_atomic(
                tmp / "skipped.csv", SKIPPED_HEADER, ((str(s.path), s.reason) for s in skipped)
            )
            meta = {
                "format_version": INDEX_FORMAT_VERSION,
                "snaplook_version": __version__,
                **identity,
                "count": len(rows),
                "metric": "cosine",
                "l2_normalized": True,
                "created": timestamp(),
                "root": str(root_dir.resolve()),
                "skipped": len(skipped),
                "shard_rows": shard_rows,
                "shards": shards,
                "ann": ann_meta,
            }
            if products is not None:
                join = join_catalog(products, [row.path for row in rows])
                log_join(join, products)
                meta["catalog"] = write_catalog(products, join, tmp)
            write_json_atomic(tmp / "meta.json", meta)
            if old is not None:
                del old  # release the memory maps before replacing their folder
            replace_dir(tmp, out, marker="meta.json")
            logger.info("wrote %s (meta.json, features/ shards, skipped.csv)", out)
        except KeyboardInterrupt:
            logger.warning(
                "stopped: %d of %d images are checkpointed in %s; run the same command again "
                "to resume.",
                checkpoint.n_checkpointed(),
                len(to_embed),
                checkpoint.folder,
            )
            raise
        except OSError as exc:  # disk full, folder not writable, ...
            shutil.rmtree(checkpoint.folder / "assembling", ignore_errors=True)
            raise SnaplookError(
                f"cannot write {exc.filename or out} ({exc.strerror or exc}); "
                f"{checkpoint.n_checkpointed()} images are checkpointed in "
                f"{checkpoint.folder}: fix the cause and run the same command again to resume."
            ) from exc
        except BaseException:
            shutil.rmtree(checkpoint.folder / "assembling", ignore_errors=True)
            checkpoint.remove_if_empty()
            raise
        checkpoint.remove()
    return BuildSummary(
        out=out,
        n_indexed=len(rows),
        n_embedded=len(embedded_at) - n_resumed,
        skipped=skipped,
        seconds=time.perf_counter() - started,
        n_resumed=n_resumed,
        ann=ann_meta,
        catalog=meta.get("catalog"),
        shards_written=sum(1 for p in plans if p.keep is None),
        shards_kept=sum(1 for p in plans if p.keep is not None),
        bytes_written=written,
    )


def _build_ann(
    folder: Path, shards: Sequence[dict[str, Any]], spec: str, *, seed: int
) -> dict[str, Any]:
    """The ANN hook: build ``spec`` over the feature shards just written to ``folder``."""
    from snaplook.ann import build_ann
    from snaplook.io_utils import load_npy

    features = ShardedFeatures(
        [load_npy(folder / SHARDS_DIR / f"{s['name']}.npy", mmap=True) for s in shards]
    )
    try:
        return build_ann(features, folder, spec=spec, seed=seed)
    finally:
        del features


def _load_ann(path: Path, meta: dict[str, Any], features: Any, ann: bool) -> Any:
    if not ann:
        return None
    from snaplook.ann import load_ann

    return load_ann(path, meta.get("ann"), features)


def _read_catalog_for(
    out: Path, catalog: str | Path | None, image_column: str, root: Path, *, update: bool
) -> Catalog | None:
    # Read before anything is embedded: a bad catalogue line fails the run at once.
    if catalog is not None:
        return read_catalog(catalog, image_column=image_column, root=root)
    stored = out / CATALOG_FILE
    if update and stored.is_file():
        return read_catalog(stored)
    return None


def _beside(out: Path, suffix: str) -> Path:
    # Absolute first: `--out .` has no name to add a suffix to.
    absolute = Path(os.path.abspath(out))
    return absolute.with_name(absolute.name + suffix)


def _check_out(out: Path) -> None:
    # The index replaces ``out`` whole: never let that be a user's file or folder.
    if out.exists() and not out.is_dir():
        raise SnaplookError(f"--out {out} is a file, not an index folder; pass another path.")
    if out.is_dir() and not (out / "meta.json").is_file() and any(out.iterdir()):
        raise SnaplookError(
            f"--out {out} is a folder that is not a snaplook index (no meta.json); refusing "
            "to replace it. Pass a new or empty folder."
        )


def _rel(path: Path, root: Path) -> str:
    from snaplook.io_utils import relative_or_absolute

    return relative_or_absolute(path, root)


def _reusable(path: Path, hit: tuple[ManifestRow, int]) -> tuple[ManifestRow | None, int | None]:
    from snaplook.io_utils import file_sha1

    row, i = hit
    try:
        st = path.stat()
    except OSError:
        return None, None
    if st.st_size != row.bytes:
        return None, None
    if abs(st.st_mtime - row.mtime) < 1e-6:
        return row, i
    # Same size, other mtime (a copy, a touch): the content decides.
    if file_sha1(path) == row.sha1:
        return dataclasses.replace(row, mtime=st.st_mtime), i
    return None, None


def _replace_row(row: ManifestRow, new_row: int) -> ManifestRow:
    return dataclasses.replace(row, row=new_row)


@dataclass
class _ShardPlan:
    """Rows ``start:stop`` of the new index; ``keep`` names the old shard that holds
    exactly them (carried over as it is), None for a shard to write."""

    name: str
    start: int
    stop: int
    keep: dict[str, Any] | None = None


def _plan_shards(
    sources: Sequence[tuple[str, int, int]], old_shards: Sequence[dict[str, Any]], shard_rows: int
) -> list[_ShardPlan]:
    """Cut the new rows into shards, keeping every old shard that comes through whole.

    An old shard is kept when its rows appear unchanged, in order and contiguous in the
    new index; the stretches between kept shards are cut into new shards of at most
    ``shard_rows`` rows. A full build (no old shards) gives fixed-size shards.
    """
    by_start = {int(s["start"]): s for s in old_shards if int(s["rows"]) <= shard_rows}
    cuts: list[tuple[int, int, dict[str, Any] | None]] = []
    n = len(sources)
    pending = i = 0
    while i < n:
        kind, a, _ = sources[i]
        shard = by_start.get(a) if kind == "old" else None
        if shard is not None:
            length = int(shard["rows"])
            whole = i + length <= n and all(
                sources[i + t][0] == "old" and sources[i + t][1] == a + t for t in range(length)
            )
            if whole:
                cuts.extend(
                    (s, min(s + shard_rows, i), None) for s in range(pending, i, shard_rows)
                )
                cuts.append((i, i + length, shard))
                i = pending = i + length
                continue
        i += 1
    cuts.extend((s, min(s + shard_rows, n), None) for s in range(pending, n, shard_rows))
    return [_ShardPlan(f"shard-{k:05d}", a, b, keep) for k, (a, b, keep) in enumerate(cuts)]


class _HashingWriter:
    """A write-only file wrapper that hashes what goes through it (SHA-256)."""

    def __init__(self, fh: Any) -> None:
        import hashlib

        self.fh = fh
        self.digest = hashlib.sha256()

    def write(self, data: Any) -> int:
        self.digest.update(data)
        return self.fh.write(data)


def _write_shards(
    folder: Path,
    plans: Sequence[_ShardPlan],
    sources: Sequence[tuple[str, int, int]],
    rows: Sequence[ManifestRow],
    old: Index | None,
    chunk_files: Sequence[Path],
    dim: int,
    done_dir: Path,
) -> tuple[list[dict[str, Any]], int]:
    """Write (or link, or find already written) every planned shard under ``folder/features``.

    A shard written by an earlier, killed run of the same plan is reused when its record in
    ``done_dir`` names the same rows and its bytes still hash to the recorded SHA-256.

    Returns:
        (the ``shards`` entries of ``meta.json``, bytes written).
    """
    import numpy as np

    from snaplook.io_utils import (
        MANIFEST_HEADER,
        atomic_path,
        write_csv_atomic,
        write_json_atomic,
    )
    from snaplook.transform_utils import l2_normalize

    shard_dir = folder / SHARDS_DIR
    shard_dir.mkdir(parents=True, exist_ok=True)
    done_dir.mkdir(parents=True, exist_ok=True)
    wanted = {f"{p.name}{ext}" for p in plans for ext in (".npy", ".csv")}
    for entry in shard_dir.iterdir():  # other layouts, temporary files of a killed write
        if entry.name not in wanted:
            entry.unlink()
    entries: list[dict[str, Any]] = []
    written = 0
    loaded: dict[int, np.ndarray] = {}
    for plan in plans:
        npy, csv_path = shard_dir / f"{plan.name}.npy", shard_dir / f"{plan.name}.csv"
        if plan.keep is not None:
            for ext, target in ((".npy", npy), (".csv", csv_path)):
                _link_or_copy(old.path / SHARDS_DIR / f"{plan.keep['name']}{ext}", target)
            entries.append(
                {"name": plan.name, "rows": plan.stop - plan.start, "sha256": plan.keep["sha256"]}
            )
            continue
        local = [_replace_row(r, r.row - plan.start) for r in rows[plan.start : plan.stop]]
        key = _digest([list(sources[plan.start : plan.stop]), [r.as_csv() for r in local], dim])
        record_path = done_dir / f"{plan.name}.json"
        digest = _finished_shard(record_path, key, npy, csv_path)
        if digest is None:
            block = np.empty((plan.stop - plan.start, dim), dtype=np.float32)
            for i, j, kind, a, b in _runs(sources, plan.start, plan.stop):
                if kind == "old":
                    block[i - plan.start : j - plan.start] = old.features[a : a + (j - i)]
                else:
                    if a not in loaded:
                        loaded.clear()  # chunks are visited in order: keep one in memory
                        loaded[a] = l2_normalize(np.load(chunk_files[a], allow_pickle=False))
                    block[i - plan.start : j - plan.start] = loaded[a][b : b + (j - i)]
            with atomic_path(npy) as tmp, open(tmp, "wb") as fh:
                hashing = _HashingWriter(fh)
                np.lib.format.write_array(hashing, block, allow_pickle=False)
            digest = hashing.digest.hexdigest()
            write_csv_atomic(csv_path, MANIFEST_HEADER, (r.as_csv() for r in local))
            written += npy.stat().st_size + csv_path.stat().st_size
            write_json_atomic(record_path, {"key": key, "sha256": digest})
        entries.append({"name": plan.name, "rows": plan.stop - plan.start, "sha256": digest})
    return entries, written


def _finished_shard(record_path: Path, key: str, npy: Path, csv_path: Path) -> str | None:
    """The SHA-256 of a shard a killed run already wrote for the same rows, else None."""
    from snaplook.io_utils import file_sha256

    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if record.get("key") != key or not csv_path.is_file():
            return None
        digest = record["sha256"]
        return digest if file_sha256(npy) == digest else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _runs(
    sources: Sequence[tuple[str, int, int]], start: int, stop: int
) -> Iterator[tuple[int, int, str, int, int]]:
    """Maximal runs ``i:j`` of rows that come from consecutive rows of one source."""
    i = start
    while i < stop:
        kind, a, b = sources[i]
        j = i + 1
        while j < stop:
            k2, a2, b2 = sources[j]
            step = j - i
            if k2 != kind or (a2, b2) != ((a + step, 0) if kind == "old" else (a, b + step)):
                break
            j += 1
        yield i, j, kind, a, b
        i = j


def _link_or_copy(source: Path, target: Path) -> None:
    import shutil

    target.unlink(missing_ok=True)
    try:
        os.link(source, target)  # the old shard's bytes stay where they are
    except OSError:
        shutil.copy2(source, target)


def _digest(data: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(data, default=str).encode()).hexdigest()


def _embed_batches_distributed(
    to_embed: Sequence[Path],
    embedder: Embedder,
    checkpoint: Checkpoint,
    records: dict[int, BatchRecord],
    engine: str | RayEngine,
    interrupted: Callable[[], bool],
    on_progress: Callable[[int], None] | None,
) -> dict[int, BatchRecord]:
    """Embed the batches missing from ``records`` on a Ray cluster, checkpointing each.

    Batches come back in any order; each is saved as it arrives, so a killed run keeps
    every finished batch.
    """
    from snaplook.distributed import RayEngine

    if isinstance(engine, str):
        engine = RayEngine()
    missing = {
        b: [str(to_embed[p]) for p in checkpoint.batch_positions(b)]
        for b in range(checkpoint.n_batches)
        if b not in records
    }
    done: dict[int, BatchRecord] = {}
    handled = 0

    def save(b: int, features: np.ndarray, rows: list[Any], skipped: list[Any]) -> None:
        nonlocal handled
        first = b * checkpoint.batch_size
        for _, why in skipped:
            logger.warning("skipped %s", why)
        record = BatchRecord(
            size=len(checkpoint.batch_positions(b)),
            rows=[(first + p, int(w), int(h)) for p, w, h in rows],
            skipped=[(first + p, str(why)) for p, why in skipped],
        )
        checkpoint.save(b, features if len(rows) else None, record)
        done[b] = record
        handled += record.size
        if on_progress is not None:
            on_progress(handled)

    if missing:
        engine.embed_batches(missing, embedder, on_batch=save, interrupted=interrupted)
    return done


def _stat(path: Path) -> list[int | None]:
    try:
        st = path.stat()
    except OSError:
        return [None, None]
    return [st.st_size, st.st_mtime_ns]


def _embed_batches(
    to_embed: Sequence[Path],
    embedder: Embedder,
    checkpoint: Checkpoint,
    *,
    first: int,
    batch_size: int,
    interrupted: Callable[[], bool],
    on_progress: Callable[[int], None] | None,
) -> dict[int, BatchRecord]:
    """Embed batches ``first``.. of ``to_embed``, checkpointing each as it finishes.

    Raises ``KeyboardInterrupt`` after the batch during which Ctrl-C was pressed.
    """
    import numpy as np

    from snaplook.features import iter_embeddings

    start = first * batch_size
    position = {Path(p): start + i for i, p in enumerate(to_embed[start:])}
    skips: list[Skipped] = []  # on_skip may be called from a decoding thread
    rows: dict[int, list[tuple[int, int, int]]] = {}
    feats: dict[int, list[np.ndarray]] = {}
    handled: dict[int, int] = {}
    records: dict[int, BatchRecord] = {}
    next_b = first
    n_skips_seen = 0

    def count(pos: int) -> int:
        b = pos // batch_size
        handled[b] = handled.get(b, 0) + 1
        return b

    def flush() -> None:
        nonlocal next_b, n_skips_seen
        new, n_skips_seen = skips[n_skips_seen:], len(skips)
        for s in new:
            count(position[Path(s.path)])
        while next_b < checkpoint.n_batches and handled.get(next_b, 0) == len(
            checkpoint.batch_positions(next_b)
        ):
            b = next_b
            skipped = sorted(
                (position[Path(s.path)], s.reason)
                for s in skips
                if position[Path(s.path)] // batch_size == b
            )
            record = BatchRecord(len(checkpoint.batch_positions(b)), rows.pop(b, []), skipped)
            batch_feats = feats.pop(b, [])
            checkpoint.save(b, np.stack(batch_feats) if batch_feats else None, record)
            records[b] = record
            next_b += 1

    batches = iter_embeddings(
        list(to_embed[start:]),
        embedder,
        batch_size=batch_size,
        on_skip=skips.append,
        on_progress=on_progress,
    )
    try:
        for batch in batches:
            for path, (w, h), feature in zip(batch.paths, batch.sizes, batch.features):
                pos = position[Path(path)]
                b = count(pos)
                rows.setdefault(b, []).append((pos, int(w), int(h)))
                feats.setdefault(b, []).append(feature)
            flush()
            if interrupted():
                raise KeyboardInterrupt
        flush()
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    if next_b != checkpoint.n_batches:
        raise RuntimeError(
            f"embedding returned {next_b} of {checkpoint.n_batches} batches; this is a bug."
        )
    return records


def _old_calibration(out: Path) -> dict[str, Any] | None:
    """The int8 calibration an existing index at ``out`` recorded, if any."""
    try:
        meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    calibration = meta.get("calibration") if meta.get("precision") == "int8" else None
    return calibration if isinstance(calibration, dict) else None


def _check_same_model(meta: dict[str, Any], identity: dict[str, Any], out: Path) -> None:
    # Indexes from before issue 12 carry no precision: they were computed in fp32.
    if meta.get("precision", "fp32") != identity.get("precision", "fp32"):
        raise SnaplookError(
            f"{out} was built at --precision {meta.get('precision', 'fp32')}, not "
            f"{identity.get('precision')}; --update cannot mix features of two precisions. "
            f"Pass --precision {meta.get('precision', 'fp32')} or rebuild without --update."
        )
    if meta.get("precision") == "int8" and (meta.get("calibration") or {}).get("sha256") != (
        identity.get("calibration") or {}
    ).get("sha256"):
        raise SnaplookError(
            f"{out} was built with an int8 model calibrated on other images; --update "
            "cannot mix the two. Rebuild without --update."
        )
    for key in ("backbone", "weights", "input_size", "preprocessing", "resize", "pooling", "head"):
        if meta.get(key) != identity.get(key):
            raise SnaplookError(
                f"{out} was built with {key}={meta.get(key)!r}, not {identity.get(key)!r}; "
                "--update needs the same settings. Rebuild without --update or pass the "
                "index's settings."
            )


class ShardedFeatures:
    """The (n, d) float32 feature matrix of a sharded index, read-only, shard by shard.

    Behaves like an ndarray for what search and scripts need: ``shape``, ``dtype``,
    ``len()``, a row (``features[i]``), a row range (``features[a:b]``, a view when it
    lies in one shard), rows by number or mask (``features[[3, 9]]``, gathered shard by
    shard) and ``np.asarray(features)``, which concatenates the shards into one array in
    memory (only then). ``shards`` holds the per-shard memory maps.
    """

    def __init__(self, shards: Sequence[np.ndarray]) -> None:
        import numpy as np

        self.shards = list(shards)
        self.offsets = [0]
        for shard in self.shards:
            self.offsets.append(self.offsets[-1] + shard.shape[0])
        self.dim = self.shards[0].shape[1] if self.shards else 0
        self.dtype = np.dtype(np.float32)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.offsets[-1], self.dim)

    @property
    def ndim(self) -> int:
        return 2

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, key: Any) -> np.ndarray:
        import bisect

        import numpy as np

        n = len(self)
        if isinstance(key, slice) and key.step in (None, 1):
            start, stop, _ = key.indices(n)
            pieces = []
            for shard, offset in zip(self.shards, self.offsets):
                lo, hi = max(start, offset), min(stop, offset + shard.shape[0])
                if lo < hi:
                    pieces.append(shard[lo - offset : hi - offset])
            if len(pieces) == 1:
                return pieces[0]
            return np.concatenate(pieces) if pieces else np.zeros((0, self.dim), np.float32)
        if isinstance(key, (int, np.integer)):
            i = int(key) + n if int(key) < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"row {int(key)} is out of range for {n} rows")
            s = bisect.bisect_right(self.offsets, i) - 1
            return self.shards[s][i - self.offsets[s]]
        rows = np.asarray(key)
        if rows.dtype == bool and rows.shape == (n,):
            rows = np.flatnonzero(rows)
        if rows.ndim == 1 and rows.dtype.kind in "iu":
            return self._take(rows.astype(np.int64))
        return np.asarray(self)[key]

    def _take(self, rows: np.ndarray) -> np.ndarray:
        """Rows by number (fancy indexing), gathered shard by shard: nothing concatenated."""
        import numpy as np

        n = len(self)
        rows = np.where(rows < 0, rows + n, rows)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"row numbers out of range for {n} rows")
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        which = np.searchsorted(np.asarray(self.offsets), rows, side="right") - 1
        for s in np.unique(which):
            mask = which == s
            out[mask] = self.shards[s][rows[mask] - self.offsets[s]]
        return out

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        import numpy as np

        whole = self[0 : len(self)]
        return np.asarray(whole, dtype=dtype)

    def __repr__(self) -> str:
        return f"ShardedFeatures(shape={self.shape}, shards={len(self.shards)})"


@dataclass
class Index:
    """A loaded index: L2-normalised gallery features, their manifest and meta.

    Attributes:
        path: the index folder.
        features: (n, d) float32, unit rows, memory-mapped: a :class:`ShardedFeatures`
            (format 2) or an ndarray (format 1). ``np.asarray(index.features)`` gives one
            array (concatenating the shards).
        manifest: one :class:`ManifestRow` per row of ``features``.
        meta: the parsed ``meta.json``.
        shards_: the ``meta.json`` shard entries (name, rows, sha256) with their first
            row (``start``); empty for a format-1 index.
    """

    path: Path
    features: np.ndarray | ShardedFeatures
    manifest: list[ManifestRow]
    meta: dict[str, Any]
    shards_: list[dict[str, Any]] = field(default_factory=list)
    root_: Path = field(init=False)
    #: The checked FAISS index when the folder has one (see :mod:`snaplook.ann`).
    ann_: AnnIndex | None = None
    products_: Products | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.root_ = Path(self.meta.get("root", self.path))

    def __len__(self) -> int:
        return len(self.manifest)

    def gallery_path(self, row: int) -> Path:
        """Absolute path of the gallery image in ``row`` (resolved under the indexed root)."""
        rel = Path(self.manifest[row].path)
        return rel if rel.is_absolute() else self.root_ / rel

    def embedder(self, *, head: Any = None, **overrides: Any) -> Embedder:
        """An :class:`Embedder` identical to the one that built this index.

        ``precision`` (or ``runtime``) may be passed: None means the index's; another
        precision than the index's is refused.

        Raises:
            SnaplookError: ``head`` is not the head the index was built with (or the
                index has a head and none is given); see :func:`check_head`. A
                ``precision`` other than the index's.
        """
        check_head(self.meta, head, self.path)
        embedder = embedder_from_meta(self.meta, **overrides)
        if head is None:
            return embedder
        from snaplook.features import with_head

        return with_head(embedder, head)

    def search(
        self,
        queries: np.ndarray,
        k: int = DEFAULT_K,
        *,
        allowed: np.ndarray | None = None,
        exact: bool = False,
        nprobe: int | None = None,
        ef: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Cosine k-NN of ``queries`` against the gallery.

        Exact (:func:`cosine_knn`) when the index has no FAISS index, with ``exact``, or
        when ``allowed`` leaves fewer than ``snaplook.ann.AUTO_EXACT_BELOW`` rows;
        otherwise FAISS candidates re-ranked exactly (:meth:`snaplook.ann.AnnIndex.search`).
        Distances are 1 - cos either way.

        Args:
            queries: ndarray of shape (m, d).
            k: neighbours per query, clamped to the gallery size n.
            allowed: optional bool ndarray of shape (n,): only these rows may be returned
                (a catalogue filter).
            exact: force exact search.
            nprobe: IVF lists visited per query (IVF indexes only).
            ef: HNSW search breadth (HNSW indexes only).

        Returns:
            (distances, rows) of shape (m, min(k, n)), nearest first, ties by row. Where
            fewer rows were found (``allowed`` keeps fewer than k, or the approximate
            search came back short), the missing results are row -1 at distance inf.

        Raises:
            SnaplookError: ``allowed`` is not a bool array of shape (n,).
        """
        import numpy as np

        from snaplook.ann import AUTO_EXACT_BELOW
        from snaplook.transform_utils import l2_normalize

        n = self.features.shape[0]
        k = min(int(k), n)
        if allowed is not None:
            allowed = np.asarray(allowed)
            if allowed.shape != (n,):
                raise SnaplookError(
                    f"allowed must be a bool array of shape ({n},) (one flag per gallery row), "
                    f"got {allowed.dtype} of shape {allowed.shape}."
                )
            allowed = allowed.astype(bool, copy=False)
            n_allowed = int(allowed.sum())
            if exact or self.ann_ is None or n_allowed < AUTO_EXACT_BELOW:
                return cosine_knn(
                    queries, self.features, k=k, normalized_gallery=True, allowed=allowed
                )
        if exact or self.ann_ is None or k < 1:
            return cosine_knn(queries, self.features, k=k, normalized_gallery=True)
        q = l2_normalize(np.atleast_2d(queries))
        return self.ann_.search(q, k, features=self.features, allowed=allowed, nprobe=nprobe, ef=ef)

    def products(self) -> Products | None:
        """The catalogue joined to the gallery rows, or None (loaded on first use)."""
        if self.products_ is None and (self.path / CATALOG_FILE).is_file():
            self.products_ = load_products(self.path, [row.path for row in self.manifest])
        return self.products_


def check_head(meta: dict[str, Any], head: Any, where: str | Path) -> None:
    """Refuse to embed queries with another head (or none) than an index was built with.

    Args:
        meta: the index's ``meta.json``.
        head: the ``snaplook.train.Head`` queries would go through, or None.
        where: the index folder, for the message.

    Raises:
        SnaplookError: the index has a head and ``head`` is None or another one, or the
            index has none and ``head`` is given.
    """
    want = meta.get("head")
    got = head.identity() if head is not None else None
    if want is None and got is None:
        return
    if want is None:
        raise SnaplookError(
            f"{where} was built without a head; querying it through head {got['name']!r} "
            "would compare unrelated features. Drop --head, or rebuild the index with "
            f"`snaplook index ... --head {got['name']}`."
        )
    described = f"head {want.get('name')!r} ({want.get('dim')}-d, sha256 {want['sha256'][:12]})"
    if got is None:
        raise SnaplookError(
            f"{where} was built with {described}; its features are that head's output, so "
            "queries need it too: pass --head with that head folder."
        )
    if got["sha256"] != want["sha256"]:
        raise SnaplookError(
            f"{where} was built with {described}, not head {got['name']!r} (sha256 "
            f"{got['sha256'][:12]}); pass the index's head or rebuild the index with this one."
        )


def recorded_settings(meta: dict[str, Any]) -> dict[str, Any]:
    """The :class:`Embedder` arguments an index or cache recorded: backbone, weights (name
    or file path), pooling, seed, resize mode and precision."""
    weights_meta = meta.get("weights", {})
    kind = weights_meta.get("name", "imagenet")
    weights: str | Path = kind if kind in ("imagenet", "random") else weights_meta.get("path", "")
    return dict(
        backbone=meta.get("backbone", DEFAULT_BACKBONE),
        weights=weights,
        pooling=meta.get("pooling", DEFAULT_POOLING),
        seed=int(weights_meta.get("seed", DEFAULT_SEED)),
        resize_mode=meta.get("resize", "pad"),
        # Indexes from before issue 12 carry no precision: they were computed in fp32.
        precision=meta.get("precision", "fp32"),
    )


def update_settings(out: str | Path) -> dict[str, Any] | None:
    """What ``--update`` of the index at ``out`` reuses by default (see
    :func:`recorded_settings`), or None when ``out`` holds no index yet.

    Raises:
        SnaplookError: ``out`` holds a ``meta.json`` that cannot be read.
    """
    meta_path = Path(out) / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SnaplookError(f"{meta_path} cannot be read ({exc}); rebuild the index.") from exc
    if not isinstance(meta, dict):
        raise SnaplookError(f"{meta_path} is not a JSON object; rebuild the index.")
    return recorded_settings(meta)


def model_settings(out: str | Path, *, update: bool, **given: Any) -> dict[str, Any]:
    """The model settings (backbone, weights, seed, precision) ``snaplook index`` builds with.

    A setting given (not None) is used as given; with ``update``, build_index then refuses it
    unless it equals the index's. A setting left None is the index's own on ``update`` (and
    pooling and resize mode always are), else the library default.

    Raises:
        SnaplookError: ``out`` holds a ``meta.json`` that cannot be read.
    """
    defaults = dict(
        backbone=DEFAULT_BACKBONE,
        weights=DEFAULT_WEIGHTS,
        seed=DEFAULT_SEED,
        precision=DEFAULT_PRECISION,
    )
    recorded = update_settings(out) if update else None
    base = recorded or defaults
    chosen = {name: base[name] if value is None else value for name, value in given.items()}
    if recorded:
        _refuse_other_model(out, recorded, chosen)
        chosen.update(pooling=recorded["pooling"], resize_mode=recorded["resize_mode"])
        logger.info("--update of %s: %s", out, chosen)
    return chosen


def _refuse_other_model(out: str | Path, recorded: dict[str, Any], chosen: dict[str, Any]) -> None:
    # Before any weights load (ImageNet may be offline): differences visible from the names.
    # Two weights files, or precision auto, are compared by build_index once resolved.
    differ = [
        name
        for name in ("backbone", "weights", "seed")
        if name in chosen
        and str(chosen[name]) != str(recorded[name])
        and (name != "weights" or {"imagenet", "random"} & {chosen[name], recorded[name]})
        and (name != "seed" or recorded["weights"] == "random")
    ]
    if differ:
        name = differ[0]
        raise SnaplookError(
            f"{out} was built with {name}={recorded[name]!r}, not {chosen[name]!r}; --update "
            "needs the same settings. Rebuild without --update or pass the index's settings."
        )


def embedder_from_meta(meta: dict[str, Any], **overrides: Any) -> Embedder:
    """Rebuild the embedder an index or cache recorded (same backbone, weights, pooling)."""
    weights_meta = meta.get("weights", {})
    kwargs = recorded_settings(meta)
    weights = kwargs["weights"]
    want_precision = kwargs.pop("precision")
    asked = overrides.pop("precision", None)
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    if asked is not None and asked != want_precision:
        got = Embedder(**kwargs, precision=asked).resolved_precision()
        if got != want_precision:
            raise SnaplookError(
                f"the index was built at --precision {want_precision}; querying it at {got} "
                f"would compare features of two different models. Pass --precision "
                f"{want_precision} (or leave it out), or rebuild the index at {got}."
            )
    embedder = Embedder(**kwargs, precision=want_precision)
    if want_precision == "int8":
        embedder.use_calibration(meta.get("calibration") or {})
    want = weights_meta.get("sha256")
    if want and weights_meta.get("name") == "file":
        got = embedder.identity()["weights"].get("sha256")
        if got != want:
            raise SnaplookError(
                f"weights file {weights} has changed since the index was built (sha256 "
                f"{got[:12] if got else None} != {want[:12]}); rebuild the index."
            )
    return embedder


def load_index(
    path: str | Path = DEFAULT_INDEX_DIR, *, mmap: bool = True, ann: bool = True
) -> Index:
    """Load and validate an index folder (sharded, or a format-1 ``features.npy``).

    Args:
        path: the index folder.
        mmap: memory-map the feature shards (or ``features.npy``) instead of reading them.
        ann: load and check the folder's FAISS index (``ann.faiss``) if it has one;
            False for exact search only (and to skip reading that file).

    Raises:
        SnaplookError: missing folder or file, unreadable or newer-format ``meta.json``,
            a pickled or non-float32 shard (or ``features.npy``), counts that disagree,
            manifest rows out of order or with paths that climb out of the indexed root
            (``..``), NaN/infinite features, or an ``ann.faiss`` that does not belong to the
            features (see :func:`snaplook.ann.load_ann`).
    """
    from snaplook.io_utils import load_npy, read_manifest

    path = Path(path)
    if not path.is_dir():
        raise SnaplookError(
            f"{path}: no index here; build one with `snaplook index DIR --out {path}`."
        )
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        if not any((path / name).exists() for name in (SHARDS_DIR, "features.npy", "manifest.csv")):
            raise SnaplookError(
                f"{path}: no index here (no meta.json, features/, features.npy or manifest.csv: "
                f"`snaplook index` never wrote this folder); build one with `snaplook index "
                f"DIR --out {path}` or pass --index with an index folder."
            )
        raise SnaplookError(f"{meta_path} is missing: not a complete index; rebuild it.")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SnaplookError(f"{meta_path} is not valid JSON ({exc}); rebuild the index.") from exc
    if not isinstance(meta, dict):
        raise SnaplookError(f"{meta_path} is not a JSON object; rebuild the index.")
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise SnaplookError(f"{meta_path} has no format_version; rebuild the index.")
    if version > INDEX_FORMAT_VERSION:
        raise SnaplookError(
            f"{path} has index format {version}, newer than this snaplook understands "
            f"({INDEX_FORMAT_VERSION}); upgrade snaplook or rebuild the index."
        )
    if "shards" in meta:
        features, manifest, shards = _load_shards(path, meta, mmap=mmap)
        _check_manifest(path, manifest)
        for shard in shards:
            _check_finite(path / SHARDS_DIR / f"{shard['name']}.npy", features.shards[shard["i"]])
        return Index(
            path=path,
            features=features,
            manifest=manifest,
            meta=meta,
            shards_=shards,
            ann_=_load_ann(path, meta, features, ann),
        )
    # Format 1: one features.npy + manifest.csv; `--update` rewrites it as shards.
    logger.info(
        "%s is a single-file index (format 1); `snaplook index ROOT --out %s --update` "
        "rewrites it as shards without embedding again.",
        path,
        path,
    )
    features = load_npy(path / "features.npy", mmap=mmap)
    if features.dtype.name != "float32" or features.ndim != 2:
        raise SnaplookError(
            f"{path / 'features.npy'} holds {features.dtype} of shape {features.shape}, "
            "expected float32 (n, d); rebuild the index."
        )
    manifest = read_manifest(path / "manifest.csv")
    count = meta.get("count")
    if not (len(manifest) == features.shape[0] == count):
        raise SnaplookError(
            f"{path}: features.npy has {features.shape[0]} rows, manifest.csv "
            f"{len(manifest)}, meta.json says {count}; the index is inconsistent, rebuild it."
        )
    dim = meta.get("feature_dim")
    if dim is not None and features.shape[1] != dim:
        raise SnaplookError(
            f"{path}: features.npy has dimension {features.shape[1]}, meta.json says {dim}; "
            "rebuild the index."
        )
    _check_manifest(path, manifest)
    _check_finite(path / "features.npy", features)
    return Index(
        path=path,
        features=features,
        manifest=manifest,
        meta=meta,
        ann_=_load_ann(path, meta, features, ann),
    )


def _load_shards(
    path: Path, meta: dict[str, Any], *, mmap: bool
) -> tuple[ShardedFeatures, list[ManifestRow], list[dict[str, Any]]]:
    from snaplook.io_utils import load_npy, read_manifest

    meta_path = path / "meta.json"
    entries = meta["shards"]
    if not isinstance(entries, list) or not entries:
        raise SnaplookError(f"{meta_path}: 'shards' is not a list of shards; rebuild the index.")
    shards: list[dict[str, Any]] = []
    arrays: list[np.ndarray] = []
    manifest: list[ManifestRow] = []
    dim = meta.get("feature_dim")
    for i, entry in enumerate(entries):
        name = entry.get("name") if isinstance(entry, dict) else None
        rows = entry.get("rows") if isinstance(entry, dict) else None
        # The name becomes a file path: only shard-NNNNN, never "../x".
        if (
            not isinstance(name, str)
            or not _SHARD_NAME.fullmatch(name)
            or not (isinstance(rows, int) and rows >= 1)
        ):
            raise SnaplookError(
                f"{meta_path}: shard entry {i} ({entry!r}) is malformed; rebuild the index."
            )
        npy = path / SHARDS_DIR / f"{name}.npy"
        array = load_npy(npy, mmap=mmap)
        if array.dtype.name != "float32" or array.ndim != 2:
            raise SnaplookError(
                f"{npy} holds {array.dtype} of shape {array.shape}, expected float32 (n, d); "
                "rebuild the index."
            )
        dim = array.shape[1] if dim is None else dim
        if array.shape != (rows, dim):
            raise SnaplookError(
                f"{npy} has shape {array.shape}, meta.json says ({rows}, {dim}); the index "
                "is inconsistent, rebuild it."
            )
        csv_path = npy.with_suffix(".csv")
        local = read_manifest(csv_path)
        if len(local) != rows or any(r.row != j for j, r in enumerate(local)):
            raise SnaplookError(
                f"{csv_path} does not list rows 0..{rows - 1} in order; the index is "
                "inconsistent, rebuild it."
            )
        start = len(manifest)
        manifest.extend(_replace_row(r, start + r.row) for r in local)
        arrays.append(array)
        shards.append({**entry, "start": start, "i": i})
    if len(manifest) != meta.get("count"):
        raise SnaplookError(
            f"{path}: the shards hold {len(manifest)} rows, meta.json says "
            f"{meta.get('count')}; the index is inconsistent, rebuild it."
        )
    return ShardedFeatures(arrays), manifest, shards


def _check_manifest(path: Path, manifest: Sequence[ManifestRow]) -> None:
    from pathlib import PurePosixPath

    outside = 0
    for i, row in enumerate(manifest):
        if row.row != i:
            raise SnaplookError(
                f"{path / 'manifest.csv'}: line {i + 2} is row {row.row}, expected {i} (rows "
                "must be 0..n-1 in order); the index is inconsistent, rebuild it."
            )
        rel = PurePosixPath(row.path)
        if not row.path or (".." in rel.parts and not rel.is_absolute()):
            raise SnaplookError(
                f"{path / 'manifest.csv'}: row {i} has path {row.path!r}, which is empty or "
                "climbs out of the indexed root with '..'; refusing this index, rebuild it."
            )
        outside += rel.is_absolute()
    if outside:
        # snaplook itself records files reached through a symlink out of the root this
        # way; they are only ever read (shown in grids), never written.
        logger.info("%s: %d manifest paths lie outside the indexed root", path, outside)


def _check_finite(npy: Path, features: np.ndarray) -> None:
    import numpy as np

    for start in range(0, features.shape[0], SEARCH_BLOCK_ROWS):
        block = np.asarray(features[start : start + SEARCH_BLOCK_ROWS])
        if not np.isfinite(block).all():
            bad = start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
            raise SnaplookError(
                f"{npy}: row {bad} holds NaN or infinite values; the index is corrupt, rebuild it."
            )


def cosine_knn(
    queries: np.ndarray,
    gallery: np.ndarray,
    *,
    k: int = DEFAULT_K,
    normalized_gallery: bool = False,
    block_rows: int = SEARCH_BLOCK_ROWS,
    allowed: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine k-nearest neighbours by blocked inner products.

    Equivalent to scikit-learn ``NearestNeighbors(metric="cosine", algorithm="brute")``
    but the gallery is normalised once (at index time), not on every call, and is read
    in blocks so a memory-mapped gallery never has to fit in RAM.

    Args:
        queries: ndarray of shape (m, d).
        gallery: ndarray of shape (n, d); unit rows if ``normalized_gallery``.
        k: neighbours per query, clamped to n.
        block_rows: gallery rows per GEMM block.
        allowed: boolean ndarray of shape (n,): search only these rows (a catalogue
            filter); None searches all.

    Returns:
        (distances, indices): ndarrays of shape (m, min(k, n)); distances are cosine
        distances 1 - cos in [0, 2], ascending; equal distances are listed by gallery row.
        When ``allowed`` leaves fewer than k rows, the rest is padded with index -1 and
        distance inf.
    """
    import numpy as np

    from snaplook.transform_utils import l2_normalize

    q = l2_normalize(np.atleast_2d(queries))
    n = gallery.shape[0]
    k = min(int(k), n)
    m = q.shape[0]
    if k < 1 or m == 0:
        return np.zeros((m, 0), dtype=np.float32), np.zeros((m, 0), dtype=np.int64)
    selected = None
    if allowed is not None:
        allowed = np.asarray(allowed, dtype=bool)
        if allowed.shape != (n,):
            raise ValueError(f"allowed has shape {allowed.shape}, expected ({n},)")
        selected = np.flatnonzero(allowed)
    n_searched = n if selected is None else len(selected)
    best_sim = np.full((m, k), -np.inf, dtype=np.float32)
    best_idx = np.full((m, k), -1, dtype=np.int64)
    for start in range(0, n_searched, block_rows):
        if selected is None:
            ids = np.arange(start, min(start + block_rows, n))
            block = np.asarray(gallery[start : start + block_rows], dtype=np.float32)
        else:
            ids = selected[start : start + block_rows]
            block = np.asarray(gallery[ids], dtype=np.float32)
        if not normalized_gallery:
            block = l2_normalize(block)
        sims = q @ block.T
        cand_sim = np.concatenate([best_sim, sims], axis=1)
        cand_idx = np.concatenate([best_idx, np.broadcast_to(ids, sims.shape)], axis=1)
        if cand_sim.shape[1] > k:
            part = np.argpartition(-cand_sim, k - 1, axis=1)[:, :k]
            cand_sim = np.take_along_axis(cand_sim, part, axis=1)
            cand_idx = np.take_along_axis(cand_idx, part, axis=1)
        best_sim, best_idx = cand_sim, cand_idx
    # Unfilled slots (-inf, row -1) sort last: pad them as row -1 at distance inf.
    order = np.lexsort((np.where(best_idx < 0, n, best_idx), -best_sim), axis=1)
    best_sim = np.take_along_axis(best_sim, order, axis=1)
    best_idx = np.take_along_axis(best_idx, order, axis=1)
    distances = np.clip(1.0 - best_sim, 0.0, 2.0).astype(np.float32)
    distances[best_idx < 0] = np.inf
    return distances, best_idx


@dataclass
class Hit:
    """One retrieved gallery image."""

    rank: int
    row: int
    path: Path
    distance: float
    product: dict[str, str] | None = None


@dataclass
class QueryResult:
    """The k nearest gallery images of one query, nearest first.

    ``category`` and ``confidence`` are the predicted category under ``restrict="auto"``.
    """

    query: Path
    hits: list[Hit]
    category: str | None = None
    confidence: float | None = None


@dataclass
class QuerySummary:
    """What :func:`query_index` did.

    ``where`` and ``restrict`` are the filters applied; ``n_allowed`` the gallery rows
    they left (None without ``where``).
    """

    results: list[QueryResult]
    k: int
    skipped: list[Skipped]
    out: Path | None = None
    grids: list[Path] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    restrict: str = "none"
    n_allowed: int | None = None
    page: Path | None = None


def check_k(k: int, index: Index) -> int:
    """Validate ``k`` and clamp it to the gallery size (with a warning)."""
    if k < 1:
        raise SnaplookError(f"-k must be at least 1, got {k}.")
    if k > len(index):
        logger.warning(
            "k=%d is larger than the gallery (%d images); using k=%d", k, len(index), len(index)
        )
        return len(index)
    return k


def query_index(
    queries: str | Path | Sequence[str | Path],
    index: Index | str | Path = DEFAULT_INDEX_DIR,
    *,
    k: int = DEFAULT_K,
    backbone: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    embedder: Embedder | None = None,
    head: Any = None,
    exact: bool = False,
    nprobe: int | None = None,
    ef: int | None = None,
    where: Sequence[str] | None = None,
    restrict: str = "none",
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> QuerySummary:
    """Embed query images the way the index was built and find their k nearest neighbours.

    Args:
        queries: an image, a folder of images, or a list of image paths.
        index: a loaded :class:`Index` or its folder, default="output/index".
        k: neighbours per query, default=5 (clamped to the gallery size with a warning).
        backbone: if given, must equal the index's backbone.
        batch_size: images per forward pass.
        embedder: use this embedder instead of rebuilding the index's (it must match).
        head: the ``snaplook.train.Head`` the index was built with, if any (required
            then; see :func:`check_head`).
        where: catalogue conditions (``"category=Dresses"``, ``"price<=50"``; grammar in
            :func:`snaplook.catalog.parse_where`), all of which must hold; the search is
            exact on the rows left (approximate through the FAISS index, if any, when
            100,000 rows or more match), so k results come back when k rows match.
        exact, nprobe, ef: search settings, see :meth:`Index.search`.
        restrict: "none" (default) or "auto": search within each query's category as
            predicted by its nearest catalogue neighbours (recorded in the results).

    Returns:
        :class:`QuerySummary` with one :class:`QueryResult` per readable query; a query
        has fewer than k hits when fewer rows match ``where`` (a warning says so).

    Raises:
        SnaplookError: no query images or none readable, backbone mismatch, missing/corrupt
            index, a bad or unknown ``where`` column, ``where``/``restrict`` without a
            catalogue.
    """
    from snaplook.catalog import filter_mask, restricted_search, warn_if_few
    from snaplook.features import embed_images
    from snaplook.io_utils import find_images

    if not isinstance(index, Index):
        index = load_index(index, ann=not exact)
    if backbone is not None and backbone != index.meta.get("backbone"):
        raise SnaplookError(
            f"{index.path} was built with backbone {index.meta.get('backbone')!r}; "
            f"querying it with {backbone!r} would compare unrelated features. Drop --backbone "
            "or use an index built with it."
        )
    k = check_k(k, index)
    products = index.products()
    allowed = filter_mask(products, where, index.path)
    n_allowed = None if allowed is None else int(allowed.sum())
    warn_if_few(allowed, k, where)
    if isinstance(queries, (str, Path)):
        paths = find_images(queries)
        if not paths:
            raise SnaplookError(f"{queries}: no query images found.")
    else:
        paths = [Path(p) for p in queries]
    if embedder is not None:
        check_head(index.meta, getattr(embedder, "head", None), index.path)
    embedder = embedder or index.embedder(head=head)
    if on_start is not None:
        on_start(len(paths))
    skipped: list[Skipped] = []
    features, kept = embed_images(
        paths, embedder, batch_size=batch_size, on_skip=skipped.append, on_progress=on_progress
    )
    if paths and not kept:
        # Nothing was queried: an empty results.csv with exit 0 would look like success.
        raise SnaplookError(
            f"none of the {len(paths)} query images could be read ({skipped[0].reason})."
        )
    search = functools.partial(index.search, exact=exact, nprobe=nprobe, ef=ef)
    distances, rows, guesses = restricted_search(
        search, features, k, products=products, allowed=allowed, restrict=restrict
    )
    results = [
        QueryResult(
            query=q,
            hits=hits_of(index, rows[i], distances[i]),
            category=guesses[i].category if guesses else None,
            confidence=guesses[i].confidence if guesses else None,
        )
        for i, q in enumerate(kept)
    ]
    return QuerySummary(
        results=results,
        k=k,
        skipped=skipped,
        where=list(where or ()),
        restrict=restrict,
        n_allowed=n_allowed,
    )


def hits_of(index: Index, rows: np.ndarray, distances: np.ndarray) -> list[Hit]:
    """One query's search result as :class:`Hit` s, padding (row -1) left out."""
    products = index.products()
    return [
        Hit(
            rank=r + 1,
            row=int(row),
            path=index.gallery_path(int(row)),
            distance=float(d),
            product=products.product(int(row)) if products is not None else None,
        )
        for r, (row, d) in enumerate(zip(rows, distances))
        if row >= 0
    ]


def product_label(product: dict[str, str] | None, fallback: str) -> str:
    """A grid label: ``product_id · price`` and the title on a second line, or ``fallback``."""
    if not product:
        return fallback
    price = f"{product.get('price', '')} {product.get('currency', '')}".strip()
    first = " · ".join(x for x in (product.get("product_id", ""), price) if x)
    return "\n".join(x for x in (first, product.get("title", "")) if x)


def write_query_results(
    summary: QuerySummary,
    out: str | Path,
    *,
    index: Index,
    plot: bool = True,
    page: bool = True,
    title_note: str = "",
    on_progress: Callable[[int], None] | None = None,
) -> QuerySummary:
    """Write ``results.csv``, ``results.json``, (if ``plot``) one grid PNG per query and
    (if ``page``) ``index.html``, a static page of the results (see :mod:`snaplook.page`).

    Files are written atomically; grids are named after the query file
    (``<stem>_grid.png``, with its parent folders joined by ``__`` when queries come from
    several folders). With a catalogue, results carry each hit's product_id, title and
    price.

    Returns:
        ``summary`` with ``out`` and ``grids`` filled in.
    """
    from snaplook.io_utils import write_csv_atomic, write_json_atomic

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SnaplookError(f"--out {out} is a file, not a folder; pass a folder for the results.")
    out.mkdir(parents=True, exist_ok=True)
    from snaplook.catalog import RESULT_COLUMNS

    has_products = index.products() is not None
    extra = RESULT_COLUMNS if has_products else ()
    backbone = str(index.meta.get("backbone"))
    weights = describe_weights(index.meta.get("weights"))
    # Query and gallery paths in the same (absolute) form, whatever form the query was given in.
    rows = [
        (str(_absolute(r.query)), h.rank, str(_absolute(h.path)), f"{h.distance:.6f}")
        + tuple((h.product or {}).get(c, "") for c in extra)
        + (backbone, weights)
        for r in summary.results
        for h in r.hits
    ]
    write_csv_atomic(
        out / "results.csv",
        (*RESULTS_HEADER[:4], *extra, *RESULTS_HEADER[4:]),
        rows,
    )
    write_csv_atomic(
        out / "skipped.csv",
        SKIPPED_HEADER,
        ((str(_absolute(s.path)), s.reason) for s in summary.skipped),
    )
    write_json_atomic(
        out / "results.json",
        {
            "index": str(index.path),
            "backbone": index.meta.get("backbone"),
            "weights": index.meta.get("weights"),
            "k": summary.k,
            **({"where": summary.where, "n_allowed": summary.n_allowed} if summary.where else {}),
            **({"restrict": summary.restrict} if summary.restrict != "none" else {}),
            "results": [
                {
                    "query": str(_absolute(r.query)),
                    **(
                        {"category": r.category, "confidence": round(r.confidence, 4)}
                        if r.confidence is not None
                        else {}
                    ),
                    "n_hits": len(r.hits),
                    "hits": [
                        {
                            "rank": h.rank,
                            "path": str(_absolute(h.path)),
                            "distance": round(h.distance, 6),
                            **({"product": h.product} if has_products else {}),
                        }
                        for h in r.hits
                    ],
                }
                for r in summary.results
            ],
            "skipped": [{"path": str(s.path), "reason": s.reason} for s in summary.skipped],
        },
    )
    logger.info("wrote %s, results.json and skipped.csv", out / "results.csv")
    summary.out = out
    summary.grids = []
    if plot:
        from snaplook.plot_utils import plot_retrieval_grid

        names = _grid_names([r.query for r in summary.results])
        for n, (result, name) in enumerate(zip(summary.results, names)):
            title = f"{index.meta.get('backbone')} · k={summary.k}{title_note}"
            grid = out / name
            plot_retrieval_grid(
                result.query,
                [h.path for h in result.hits],
                grid,
                distances=[h.distance for h in result.hits],
                labels=[product_label(h.product, h.path.name) for h in result.hits]
                if has_products
                else None,
                title=title,
            )
            summary.grids.append(grid)
            if on_progress is not None:
                on_progress(n + 1)
        logger.info("wrote %d grid(s) in %s", len(summary.grids), out)
    if page:
        from snaplook.page import write_query_page

        summary.page = write_query_page(summary, out, index=index, title_note=title_note)
    return summary


def _absolute(path: Path) -> Path:
    """``path`` absolute and without symlinks or '..', as the index records its root."""
    return Path(path).resolve()


def describe_weights(weights: dict[str, Any] | None) -> str:
    """One word or two for a weights identity: imagenet, random (seed 0), a file's path."""
    weights = weights or {}
    kind = weights.get("name", "unknown")
    if kind == "random":
        return f"random (seed {weights.get('seed')})"
    if kind == "file":
        return str(weights.get("path", "file"))
    return str(kind)


def _grid_names(queries: Sequence[Path]) -> list[str]:
    stems = [q.stem for q in queries]
    if len(set(stems)) == len(stems):
        return [f"{s}_grid.png" for s in stems]
    # Same stem in several folders (or x.jpg beside x.png): name by the last folders, never
    # by the root or "..", which would make the name an absolute path or climb out of out.
    names: list[str] = []
    for q in queries:
        parts = [p for p in q.with_suffix("").parts if p not in (q.anchor, "..", ".")]
        base = "__".join(parts[-3:])
        name, n = f"{base}_grid.png", 1
        while name in names:
            n += 1
            name = f"{base}-{n}_grid.png"
        names.append(name)
    return names


DEFAULT_MAP_IMAGES = 500
DEFAULT_MAP_DIR = Path("output/maps")


def map_index(
    index: Index | str | Path = DEFAULT_INDEX_DIR,
    out: str | Path | None = None,
    *,
    max_images: int = DEFAULT_MAP_IMAGES,
    seed: int = DEFAULT_SEED,
    thumb_size: int = 48,
) -> Path:
    """Draw the gallery of an index as a t-SNE map of thumbnails (see ``plot_utils.plot_tsne``).

    Args:
        index: a loaded :class:`Index` or its folder, default="output/index".
        out: PNG to write, default ``output/maps/<index folder name>_tsne.png``.
        max_images: draw at most this many images, a seeded sample of larger galleries
            (t-SNE and the thumbnails stay readable), default=500.
        seed: seeds the sample and t-SNE: the same seed draws the same map.
        thumb_size: thumbnail side in pixels.

    Returns:
        the PNG written.

    Raises:
        SnaplookError: no index, or fewer than 2 images in it.
    """
    import numpy as np

    from snaplook.plot_utils import plot_tsne

    if not isinstance(index, Index):
        index = load_index(index)
    n = len(index)
    if n < 2:
        raise SnaplookError(f"{index.path} holds {n} image(s); a map needs at least 2.")
    if max_images < 2:
        raise SnaplookError(f"--max-images must be at least 2, got {max_images}.")
    rows = np.arange(n)
    if n > max_images:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=max_images, replace=False))
    out = Path(out) if out is not None else DEFAULT_MAP_DIR / f"{index.path.name}_tsne.png"
    if out.is_dir():
        raise SnaplookError(f"--out {out} is a folder; pass the PNG file to write.")
    out.parent.mkdir(parents=True, exist_ok=True)
    title = (
        f"t-SNE of {len(rows)} of {n} gallery images · {index.meta.get('backbone')}, "
        f"{describe_weights(index.meta.get('weights'))} weights"
    )
    if (index.meta.get("weights") or {}).get("name") == "random":
        title += ": shows the pipeline, not retrieval quality"
    logger.info("t-SNE of %d gallery images of %s", len(rows), index.path)
    plot_tsne(
        np.asarray(index.features[rows]),
        [index.gallery_path(int(r)) for r in rows],
        out,
        seed=seed,
        thumb_size=thumb_size,
        title=title,
    )
    logger.info("wrote %s", out)
    return out
