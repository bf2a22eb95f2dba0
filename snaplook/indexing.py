"""Building an index folder: ``snaplook index`` and ``--update`` as stages.

plan (which rows of the old index are reused, which images are embedded) -> embed (batches
checkpointed in ``<out>.partial/``, see :mod:`snaplook.checkpoint`) -> shards (written, or
kept from the old index) -> commit (``meta.json``, then the folder renamed into place). The
folder format is described in :mod:`snaplook.index`, which loads and searches it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snaplook import __version__
from snaplook.ann import plan_ann
from snaplook.catalog import (
    CATALOG_FILE,
    Catalog,
    join_catalog,
    log_join,
    read_catalog,
    write_catalog,
)
from snaplook.checkpoint import CHECKPOINT_FORMAT, BatchRecord, Checkpoint
from snaplook.errors import SnaplookError
from snaplook.features import Embedder, Skipped, embedder_runtime
from snaplook.index import (
    INDEX_FORMAT_VERSION,
    SHARDS_DIR,
    Index,
    ShardedFeatures,
    check_meta,
    load_index,
    read_json_object,
    recorded_settings,
)
from snaplook.io_utils import ManifestRow, timestamp
from snaplook.options import (
    DEFAULT_ANN,
    DEFAULT_BACKBONE,
    DEFAULT_BATCH_SIZE,
    DEFAULT_DBA,
    DEFAULT_ENGINE,
    DEFAULT_GEM_P,
    DEFAULT_IMAGE_COLUMN,
    DEFAULT_INDEX_DIR,
    DEFAULT_PRECISION,
    DEFAULT_RUNTIME,
    DEFAULT_SEED,
    DEFAULT_SHARD_ROWS,
    DEFAULT_TTA,
    DEFAULT_WEIGHTS,
    RayOptions,
)
from snaplook.postprocess import (
    SEARCH_FILE,
    WHITEN_FILE,
    WHITEN_FIT_MAX_ROWS,
    Postprocessing,
    Whitening,
)

if TYPE_CHECKING:
    import numpy as np

    from snaplook.distributed import RayEngine

logger = logging.getLogger(__name__)


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
    pooling: str | None = None,
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
    shard_rows: int | None = None,
    engine: str | RayEngine = "local",
    whiten: str | None = None,
    dba: int | None = None,
    refit: bool = False,
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
            (ignored when ``embedder`` is given); pooling None is the backbone's own.
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
        shard_rows: rows per feature shard; default None: 16384, or with ``update`` the
            existing index's (``meta.json``'s ``shard_rows``).
        engine: "local" (this process), "ray" (a local Ray cluster) or a
            :class:`~snaplook.distributed.RayEngine` (cluster address, workers, CPUs/GPUs
            per worker). Both give the same rows in the same order and, with the same
            runtime, the same features (to 1e-6); batches are checkpointed alike.
        whiten: "none", "pca" or "pca:DIM": centring + PCA-whitening fitted on the gallery
            (at most one dimension per 3 images; see :mod:`snaplook.postprocess`), stored as
            ``whiten.npz`` and applied to queries. The features stay as embedded; the index
            searches ``search.npy``, the whitened (and augmented) gallery. Default None:
            none, or with ``update`` the index's own (whose fitted transform is kept).
        dba: alpha-database-side augmentation with this many neighbours (0: none),
            recomputed over the whole gallery on every build; default None: 0, or with
            ``update`` the index's own.
        refit: with ``update``, fit the whitening again on this gallery instead of keeping
            the index's.
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
    # Long on purpose: the signature and its documented arguments; the body chains the
    # stages (checks, _plan_build, _run_stages).
    from snaplook.io_utils import deferred_sigint, exclusive_lock

    started = time.perf_counter()
    root, out = Path(root), Path(out)
    if shard_rows is None:
        shard_rows = _recorded_shard_rows(out) if update else DEFAULT_SHARD_ROWS
    _check_arguments(batch_size=batch_size, shard_rows=shard_rows, engine=engine)
    embedder = embedder or Embedder(
        backbone, weights=weights, pooling=pooling, seed=seed, precision=precision
    )
    if head is not None:
        from snaplook.features import with_head

        embedder = with_head(embedder, head)
    paths, listing_skipped = _find_gallery(root)
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
        plan = _plan_build(
            paths,
            root,
            root_dir,
            out,
            embedder,
            identity,
            update=update,
            ann=ann,
            batch_size=batch_size,
            search=_SearchRequest(whiten, dba, refit),
        )
        plan.listing_skipped = listing_skipped
        if on_start is not None:
            on_start(len(paths))
        summary = _run_stages(
            plan,
            embedder,
            products,
            engine=engine,
            strict=strict,
            shard_rows=shard_rows,
            seed=seed,
            interrupted=interrupted,
            on_progress=on_progress,
        )
    summary.seconds = time.perf_counter() - started
    return summary


def _run_stages(
    plan: _BuildPlan,
    embedder: Embedder,
    products: Catalog | None,
    *,
    engine: str | RayEngine,
    strict: bool,
    shard_rows: int,
    seed: int,
    interrupted: Callable[[], bool],
    on_progress: Callable[[int], None] | None,
) -> BuildSummary:
    """Embed, write the shards and commit the folder; keep the checkpoint on failure."""
    checkpoint = plan.checkpoint
    try:
        embedded = _embed_stage(
            plan, embedder, engine=engine, interrupted=interrupted, on_progress=on_progress
        )
        rows, sources, skipped = _collect_rows(plan, embedded.records, strict=strict)
        written = _write_shard_stage(
            plan, rows, sources, embedder.feature_dim, shard_rows=shard_rows, seed=seed
        )
        meta = _commit(plan, written, rows, skipped, products, shard_rows)
    except KeyboardInterrupt:
        logger.warning(
            "stopped: %d of %d images are checkpointed in %s; run the same command again "
            "to resume.",
            checkpoint.n_checkpointed(),
            len(plan.to_embed),
            checkpoint.folder,
        )
        raise
    except OSError as exc:  # disk full, folder not writable, ...
        shutil.rmtree(checkpoint.folder / "assembling", ignore_errors=True)
        raise SnaplookError(
            f"cannot write {exc.filename or plan.out} ({exc.strerror or exc}); "
            f"{checkpoint.n_checkpointed()} images are checkpointed in "
            f"{checkpoint.folder}: fix the cause and run the same command again to resume."
        ) from exc
    except BaseException:
        shutil.rmtree(checkpoint.folder / "assembling", ignore_errors=True)
        checkpoint.remove_if_empty()
        raise
    checkpoint.remove()
    return BuildSummary(
        out=plan.out,
        n_indexed=len(rows),
        n_embedded=embedded.n_embedded - embedded.n_resumed,
        skipped=skipped,
        seconds=0.0,
        n_resumed=embedded.n_resumed,
        ann=meta["ann"],
        catalog=meta.get("catalog"),
        shards_written=sum(1 for p in written.plans if p.keep is None),
        shards_kept=sum(1 for p in written.plans if p.keep is not None),
        bytes_written=written.bytes_written,
    )


def _check_arguments(*, batch_size: int, shard_rows: int, engine: Any) -> None:
    if batch_size < 1:
        raise SnaplookError(f"--batch-size must be at least 1, got {batch_size}.")
    if shard_rows < 1:
        raise SnaplookError(f"--shard-rows must be at least 1, got {shard_rows}.")
    if engine not in ("local", "ray") and not hasattr(engine, "embed_batches"):
        raise SnaplookError(f"unknown engine {engine!r}; choose local or ray.")


def _find_gallery(root: Path) -> tuple[list[Path], list[Skipped]]:
    """The gallery's images, and the files with an image name that listing left out (a
    FIFO, a device, a name that is not UTF-8), for ``skipped.csv``."""
    from snaplook.io_utils import find_images

    skipped: list[Skipped] = []
    paths = find_images(root, on_skip=lambda path, why: skipped.append(Skipped(path, why)))
    if not paths:
        raise SnaplookError(
            f"{root}: no images found (looked for .jpg, .jpeg, .png, .bmp, .webp, .tif)."
        )
    return paths, skipped


# --- stage 1: plan ------------------------------------------------------------------------


@dataclass
class _BuildPlan:
    """What a run does: every gallery image, in order, either reused or to embed.

    ``plan`` holds (path, old manifest row, old row number) per image, the row None for
    an image to embed; ``old`` is the index ``--update`` reads (None on a full build);
    ``ann`` the approximate search structure asked for (with ``--update``, by default the
    old index's).
    """

    root: Path
    root_dir: Path
    out: Path
    paths: list[Path]
    plan: list[tuple[Path, ManifestRow | None, int | None]]
    to_embed: list[Path]
    old: Index | None
    ann: str | None
    checkpoint: Checkpoint
    identity: dict[str, Any]
    #: Files with an image name that the gallery listing left out (FIFOs, devices, ...).
    listing_skipped: list[Skipped] = dataclasses.field(default_factory=list)
    #: Whitening and DBA of the search vectors (inactive: the index searches its features).
    postprocess: Postprocessing = dataclasses.field(default_factory=Postprocessing)
    #: The old index's whitening, kept by ``--update`` without ``--refit``.
    whitening: Whitening | None = None


def _plan_build(
    paths: list[Path],
    root: Path,
    root_dir: Path,
    out: Path,
    embedder: Embedder,
    identity: dict[str, Any],
    *,
    update: bool,
    ann: str | None,
    batch_size: int,
    search: _SearchRequest,
) -> _BuildPlan:
    """Read the old index (``update``), decide per image: reuse its row or embed it."""
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
    postprocess, whitening = _search_settings(
        search, old, n_images=len(paths), dim=embedder.feature_dim
    )

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
    return _BuildPlan(
        root,
        root_dir,
        out,
        paths,
        plan,
        to_embed,
        old,
        ann,
        checkpoint,
        identity,
        postprocess=postprocess,
        whitening=whitening,
    )


@dataclass(frozen=True)
class _SearchRequest:
    """``index --whiten/--dba/--refit`` as given: None is the index's own on ``--update``."""

    whiten: str | None = None
    dba: int | None = None
    refit: bool = False


def _search_settings(
    request: _SearchRequest, old: Index | None, *, n_images: int, dim: int
) -> tuple[Postprocessing, Whitening | None]:
    """The whitening/DBA settings of this build, and the old whitening it keeps, if any.

    On ``--update`` a setting left None is the index's; the fitted whitening is kept when
    the whitening asked for is the index's, unless ``refit``.
    """
    from snaplook.postprocess import check_fit_size, load_whitening, parse_whiten

    recorded = (old.meta.get("postprocess") or {}) if old is not None else {}
    whiten = parse_whiten(request.whiten if request.whiten is not None else recorded.get("whiten"))
    dba = request.dba if request.dba is not None else int(recorded.get("dba", DEFAULT_DBA))
    if dba < 0:
        raise SnaplookError(f"--dba must be 0 or more neighbours, got {dba}.")
    settings = Postprocessing(whiten=whiten, dba=dba)
    stored = recorded.get("whitening")
    if request.refit and (old is None or whiten is False):
        raise SnaplookError(
            "--refit fits an index's whitening again: it needs --update of an index built "
            "with --whiten (or --whiten given now)."
            if old is None
            else f"--refit: {old.path} is not whitened and --whiten is none; nothing to refit."
        )
    if whiten is False:
        return settings, None
    keep = stored and parse_whiten(recorded.get("whiten")) == whiten and not request.refit
    if keep:
        whitening = load_whitening(old.path / WHITEN_FILE, sha256=stored.get("sha256"))
        logger.warning(
            "--update keeps the whitening of %s, fitted on %d images; --refit fits it again "
            "on this gallery.",
            old.path,
            whitening.n_fit,
        )
        return settings, whitening
    check_fit_size(whiten, min(n_images, WHITEN_FIT_MAX_ROWS), dim)
    if stored:
        logger.warning("fitting the whitening of %s again (--refit or a new --whiten).", old.path)
    return settings, None


# --- stage 2: embed -----------------------------------------------------------------------


@dataclass
class _Embedded:
    """Every batch of the run's images to embed, finished now or by an earlier run."""

    records: dict[int, BatchRecord]
    n_resumed: int

    @property
    def n_embedded(self) -> int:
        return sum(len(r.rows) for r in self.records.values())


def _embed_stage(
    plan: _BuildPlan,
    embedder: Embedder,
    *,
    engine: str | RayEngine,
    interrupted: Callable[[], bool],
    on_progress: Callable[[int], None] | None,
) -> _Embedded:
    """Embed the batches the checkpoint does not hold yet, checkpointing each."""
    checkpoint, to_embed = plan.checkpoint, plan.to_embed
    records = checkpoint.resume()
    n_resumed = sum(len(r.rows) for r in records.values())
    done_before = len(plan.paths) - len(to_embed) + sum(r.size for r in records.values())
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
                    batch_size=checkpoint.batch_size,
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
    return _Embedded(records, n_resumed)


def _collect_rows(
    plan: _BuildPlan, records: dict[int, BatchRecord], *, strict: bool
) -> tuple[list[ManifestRow], list[tuple[str, int, int]], list[Skipped]]:
    """The new index's manifest rows, where each row's features come from, and the skips.

    ``sources`` holds ("old", row, 0) for a row of the old index and ("new", batch, j) for
    row j of a checkpointed batch.
    """
    from snaplook.io_utils import manifest_row

    checkpoint, to_embed = plan.checkpoint, plan.to_embed
    embedded_at: dict[Path, tuple[int, int, tuple[int, int]]] = {}
    skipped: list[Skipped] = list(plan.listing_skipped)
    for b in range(checkpoint.n_batches):
        for j, (pos, w, h) in enumerate(records[b].rows):
            embedded_at[to_embed[pos]] = (b, j, (w, h))
        skipped.extend(Skipped(to_embed[pos], why) for pos, why in records[b].skipped)

    rows: list[ManifestRow] = []
    sources: list[tuple[str, int, int]] = []
    for path, old_row, old_i in plan.plan:
        if old_row is not None:
            rows.append(dataclasses.replace(old_row, row=len(rows)))
            sources.append(("old", old_i, 0))
        elif path in embedded_at:
            b, j, size = embedded_at[path]
            rows.append(manifest_row(path, plan.root_dir, len(rows), size))
            sources.append(("new", b, j))
    if not rows:
        checkpoint.remove()
        raise SnaplookError(
            f"{plan.root}: none of the {len(plan.paths)} images could be read; see the "
            "warnings above for why."
        )
    if strict and skipped:
        checkpoint.remove()
        raise SnaplookError(
            f"--strict: {len(skipped)} of {len(plan.paths)} images could not be read (first: "
            f"{skipped[0].reason}); the index was not written. Fix or remove them, or "
            "drop --strict to index the rest."
        )
    return rows, sources, skipped


# --- stage 3: shards ----------------------------------------------------------------------


@dataclass
class _Written:
    """The shards assembled in ``folder`` (the checkpoint's ``assembling/``)."""

    folder: Path
    plans: list[_ShardPlan]
    shards: list[dict[str, Any]]
    bytes_written: int
    ann: dict[str, Any]
    #: ``meta.json["postprocess"]``: the search vectors' record, None without whitening/DBA.
    search: dict[str, Any] | None = None


def _write_shard_stage(
    plan: _BuildPlan,
    rows: Sequence[ManifestRow],
    sources: Sequence[tuple[str, int, int]],
    dim: int,
    *,
    shard_rows: int,
    seed: int,
) -> _Written:
    """Cut the rows into shards, write them and the ANN structure under ``assembling/``."""
    checkpoint = plan.checkpoint
    # Kept across a kill: shards finished in it are reused by the rerun.
    tmp = checkpoint.folder / "assembling"
    for stale in ("manifest.csv", "features.npy", SEARCH_FILE, "search.plain.npy", WHITEN_FILE):
        (tmp / stale).unlink(missing_ok=True)
    old = plan.old
    plans = _plan_shards(sources, old.shards_ if old is not None else [], shard_rows)
    shards, written = _write_shards(
        tmp,
        plans,
        sources,
        rows,
        old,
        [checkpoint.chunk_path(b) for b in range(checkpoint.n_batches)],
        dim,
        checkpoint.folder / "shards",
    )
    search = _search_stage(plan, tmp, shards, seed=seed)
    ann_meta = _build_ann(tmp, shards, plan.ann or DEFAULT_ANN, seed=seed, search=search)
    return _Written(tmp, plans, shards, written, ann_meta, search)


def _search_stage(
    plan: _BuildPlan, folder: Path, shards: Sequence[dict[str, Any]], *, seed: int
) -> dict[str, Any] | None:
    """Whiten and/or augment the shards just written into ``search.npy`` (see
    :func:`snaplook.postprocess.write_search_vectors`); None when the index has neither."""
    from snaplook.io_utils import load_npy
    from snaplook.postprocess import write_search_vectors

    if not (plan.postprocess.whiten is not False or plan.postprocess.dba > 0):
        return None
    features = ShardedFeatures(
        [load_npy(folder / SHARDS_DIR / f"{s['name']}.npy", mmap=True) for s in shards]
    )
    try:
        return write_search_vectors(
            features, folder, plan.postprocess, whitening=plan.whitening, seed=seed
        )
    finally:
        del features


# --- stage 4: commit ----------------------------------------------------------------------


def _commit(
    plan: _BuildPlan,
    written: _Written,
    rows: Sequence[ManifestRow],
    skipped: Sequence[Skipped],
    products: Catalog | None,
    shard_rows: int,
) -> dict[str, Any]:
    """Write ``skipped.csv``, the catalogue and ``meta.json``, then move the folder into place.

    Returns:
        the ``meta.json`` written.
    """
    from snaplook.io_utils import replace_dir, write_json_atomic, write_skipped

    tmp = written.folder
    write_skipped(tmp / "skipped.csv", ((s.path, s.reason) for s in skipped))
    meta = {
        "format_version": INDEX_FORMAT_VERSION,
        "snaplook_version": __version__,
        **plan.identity,
        "count": len(rows),
        "metric": "cosine",
        "l2_normalized": True,
        "created": timestamp(),
        "root": str(plan.root_dir.resolve()),
        "skipped": len(skipped),
        "shard_rows": shard_rows,
        "shards": written.shards,
        "ann": written.ann,
    }
    if written.search is not None:  # absent without whitening/DBA: such metas stay as they were
        meta["postprocess"] = written.search
    if products is not None:
        join = join_catalog(products, [row.path for row in rows])
        log_join(join, products)
        meta["catalog"] = write_catalog(products, join, tmp)
    write_json_atomic(tmp / "meta.json", meta)
    plan.old = None  # release the memory maps before replacing their folder
    replace_dir(tmp, plan.out, marker="meta.json")
    logger.info("wrote %s (meta.json, features/ shards, skipped.csv)", plan.out)
    return meta


# --- helpers ---------------------------------------------------------------------------


def _build_ann(
    folder: Path,
    shards: Sequence[dict[str, Any]],
    spec: str,
    *,
    seed: int,
    search: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ANN hook: build ``spec`` over the vectors the index searches, the feature shards
    just written to ``folder`` or, with ``search``, its ``search.npy``."""
    from snaplook.ann import build_ann
    from snaplook.io_utils import load_npy

    features = (
        load_npy(folder / search["file"], mmap=True)
        if search is not None
        else ShardedFeatures(
            [load_npy(folder / SHARDS_DIR / f"{s['name']}.npy", mmap=True) for s in shards]
        )
    )
    try:
        return build_ann(features, folder, spec=spec, seed=seed)
    finally:
        del features


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
        load_npy,
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
        local = [
            dataclasses.replace(r, row=r.row - plan.start) for r in rows[plan.start : plan.stop]
        ]
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
                        loaded[a] = l2_normalize(load_npy(chunk_files[a]))
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
    from snaplook.io_utils import file_sha256, read_input_bytes

    try:
        if not record_path.is_file():
            return None
        record = json.loads(read_input_bytes(record_path, kind="json"))
        if record.get("key") != key or not csv_path.is_file():
            return None
        digest = record["sha256"]
        return digest if file_sha256(npy, kind="array") == digest else None
    except (SnaplookError, OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # a damaged record: the shard is written again


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
        meta = read_json_object(out / "meta.json", fix="rebuild the index")
    except SnaplookError:
        return None  # build_index's --update reads it again and says why
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
    keys = ("backbone", "weights", "input_size", "preprocessing", "resize", "pooling", "gem_p")
    for key in (*keys, "tta", "head"):
        if meta.get(key) != identity.get(key):
            raise SnaplookError(
                f"{out} was built with {key}={meta.get(key)!r}, not {identity.get(key)!r}; "
                "--update needs the same settings. Rebuild without --update or pass the "
                "index's settings."
            )


# --- the --update rule ---------------------------------------------------------------------


def _update_settings(out: str | Path) -> dict[str, Any] | None:
    """What ``--update`` of the index at ``out`` reuses by default (see
    :func:`recorded_settings`), or None when ``out`` holds no index yet.

    Raises:
        SnaplookError: ``out`` holds a ``meta.json`` that cannot be read.
    """
    meta = _recorded_meta(out)
    return None if meta is None else recorded_settings(meta)


def _recorded_meta(out: str | Path) -> dict[str, Any] | None:
    """The checked ``meta.json`` of the index at ``out``, or None when there is none.

    Raises:
        SnaplookError: it cannot be read, or a field has the wrong type (naming it).
    """
    meta_path = Path(out) / "meta.json"
    if not meta_path.is_file():
        return None
    meta = read_json_object(meta_path, fix="rebuild the index")
    check_meta(meta, meta_path)
    return meta


def _recorded_shard_rows(out: Path) -> int:
    """Rows per shard of the index ``--update`` rewrites (the default for a new one)."""
    meta = _recorded_meta(out)
    if meta is None:
        return DEFAULT_SHARD_ROWS
    return int(meta.get("shard_rows", DEFAULT_SHARD_ROWS))


def model_settings(out: str | Path, *, update: bool, **given: Any) -> dict[str, Any]:
    """The model settings (backbone, weights, seed, precision, pooling, gem_p, tta)
    ``snaplook index`` builds with.

    A setting given (not None) is used as given; with ``update``, it is refused unless it
    equals the index's. A setting left None is the index's own on ``update`` (and the resize
    mode always is), else the library default.

    Raises:
        SnaplookError: ``out`` holds a ``meta.json`` that cannot be read.
    """
    defaults = dict(
        backbone=DEFAULT_BACKBONE,
        weights=DEFAULT_WEIGHTS,
        seed=DEFAULT_SEED,
        precision=DEFAULT_PRECISION,
        pooling=None,  # the backbone's own (see Embedder)
        gem_p=DEFAULT_GEM_P,
        tta=DEFAULT_TTA,
    )
    recorded = _update_settings(out) if update else None
    base = recorded or defaults
    chosen = {name: base[name] if value is None else value for name, value in given.items()}
    if recorded:
        _refuse_other_model(out, recorded, chosen)
        chosen.update(resize_mode=recorded["resize_mode"])
        logger.info("--update of %s: %s", out, chosen)
    return chosen


def _refuse_other_model(out: str | Path, recorded: dict[str, Any], chosen: dict[str, Any]) -> None:
    # Before any weights load (ImageNet may be offline): differences visible from the names.
    # Two weights files, or precision auto, are compared by build_index once resolved.
    differ = [
        name
        for name in ("backbone", "weights", "seed", "pooling", "gem_p", "tta")
        if name in chosen
        and str(chosen[name]) != str(recorded[name])
        and (name != "gem_p" or recorded["pooling"] == "gem")
        and (name != "weights" or {"imagenet", "random"} & {chosen[name], recorded[name]})
        and (name != "seed" or recorded["weights"] == "random")
    ]
    if differ:
        name = differ[0]
        raise SnaplookError(
            f"{out} was built with {name}={recorded[name]!r}, not {chosen[name]!r}; --update "
            "needs the same settings. Rebuild without --update or pass the index's settings."
        )


def index_gallery(
    root: str | Path,
    out: str | Path = DEFAULT_INDEX_DIR,
    *,
    backbone: str | None = None,
    weights: str | Path | None = None,
    seed: int | None = None,
    precision: str | None = None,
    pooling: str | None = None,
    gem_p: float | None = None,
    tta: str | None = None,
    runtime: str = DEFAULT_RUNTIME,
    update: bool = False,
    engine: str = DEFAULT_ENGINE,
    ray: RayOptions | None = None,
    **build_options: Any,
) -> BuildSummary:
    """:func:`build_index` with the model and the engine chosen as ``snaplook index`` does.

    Args:
        root: gallery folder (searched recursively) or one image.
        out: index folder to write, default="output/index".
        backbone, weights, seed, precision, pooling, gem_p, tta: the model; one left None is
            the index's own with ``update`` (see :func:`model_settings`), else the library
            default.
        runtime: "auto", "openvino" or "keras" (see :class:`~snaplook.features.Embedder`).
        update: re-embed only new or changed files (see :func:`build_index`).
        engine: "local" (this process) or "ray" (a Ray Data actor pool placed by ``ray``;
            default: a local cluster, one single-CPU actor per CPU).
        ray: where ``engine="ray"`` runs; only with that engine.
        **build_options: the other keyword arguments of :func:`build_index` (batch_size,
            strict, head, ann, catalog, catalog_image_column, shard_rows, whiten, dba,
            refit, on_start, on_progress).

    Returns:
        :class:`BuildSummary`.

    Raises:
        SnaplookError: Ray options given with ``engine="local"``; and as :func:`build_index`.
    """
    if engine != "ray" and ray is not None and not ray.is_default():
        raise SnaplookError(
            f"{ray} needs engine='ray' (engine={engine!r} runs in this process); pass "
            "engine='ray' or leave the Ray options out."
        )
    model = model_settings(
        out,
        update=update,
        backbone=backbone,
        weights=weights,
        seed=seed,
        precision=precision,
        pooling=pooling,
        gem_p=gem_p,
        tta=tta,
    )
    embedder = Embedder(runtime=runtime, **model)
    if gem_p is not None and embedder.pooling != "gem":
        raise SnaplookError(
            f"--gem-p sets GeM's exponent, but the pooling is {embedder.pooling}; pass "
            "--pooling gem or leave --gem-p out."
        )
    chosen: str | RayEngine = engine
    if engine == "ray":
        from snaplook.distributed import RayEngine

        ray = ray or RayOptions()
        chosen = RayEngine(
            address=ray.address,
            workers=ray.workers,
            cpus_per_worker=ray.cpus_per_worker,
            gpus_per_worker=ray.gpus_per_worker,
        )
    return build_index(root, out, embedder=embedder, update=update, engine=chosen, **build_options)
