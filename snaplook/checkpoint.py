"""One resumable store of embedded batches: ``build_index``'s ``<out>.partial/`` and the
feature cache's ``<key>.parts/`` (``features.embed_cached``) are both this folder layout.

A run that is killed or interrupted keeps every finished batch; started again with the same
plan, it embeds only the batches that are missing and gets the same bytes.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snaplook.errors import SnaplookError

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

#: Layout version of the ``<out>.partial/`` checkpoint folder (see :class:`Checkpoint`).
CHECKPOINT_FORMAT = 1


@dataclass
class BatchRecord:
    """One finished batch: (position, width, height) per embedded input, (position, reason)
    per skipped one; positions index the run's list of images to embed."""

    size: int
    rows: list[tuple[int, int, int]]
    skipped: list[tuple[int, str]]


class Checkpoint:
    """Finished batches of one run, kept in ``folder``: ``<out>.partial/`` for
    ``snaplook.indexing.build_index`` (a batch is one forward pass) and
    ``<key>.parts/`` for ``snaplook.features.embed_cached`` (a batch is a chunk of
    ``CACHE_CHUNK_IMAGES`` images, embedded in several forward passes).

    ``plan.json`` records what the run does (for an index: images to embed with size and
    mtime, reused rows, embedder identity, batch size; for a feature cache: its key, which
    covers all that, and the chunk size). Each finished batch leaves ``batch-NNNNNN.npy``
    (raw float32 features of its readable images) and then ``batch-NNNNNN.json`` (rows,
    sizes, skipped inputs, SHA-256 of the .npy), both written atomically: a batch counts
    as finished only once its .json is in place. Batch ``b`` always holds inputs
    ``b*batch_size`` to ``(b+1)*batch_size - 1``, so a resumed run feeds the network the
    same batches as an uninterrupted one and gets the same bytes.
    """

    def __init__(
        self, folder: Path, plan: dict[str, Any], *, n_images: int, feature_dim: int
    ) -> None:
        self.folder = folder
        self.plan = json.loads(json.dumps(plan, default=str))
        self.batch_size = int(plan["batch_size"])
        self.n_images = n_images
        self.feature_dim = feature_dim
        self.n_batches = -(-n_images // self.batch_size)
        self.n_done = 0

    def batch_positions(self, b: int) -> range:
        return range(b * self.batch_size, min((b + 1) * self.batch_size, self.n_images))

    def chunk_path(self, b: int) -> Path:
        return self.folder / f"batch-{b:06d}.npy"

    def _record_path(self, b: int) -> Path:
        return self.folder / f"batch-{b:06d}.json"

    def resume(self) -> dict[int, BatchRecord]:
        """Batches finished by an earlier run with the same plan; start afresh otherwise."""
        import shutil

        from snaplook.io_utils import read_input_bytes, write_json_atomic

        plan_path = self.folder / "plan.json"
        shutil.rmtree(self._trash(), ignore_errors=True)  # a removal cut short by a kill
        if self.folder.exists() or self.folder.is_symlink():
            try:
                old_plan = json.loads(read_input_bytes(plan_path, kind="json"))
            except (SnaplookError, ValueError, RecursionError):
                old_plan = None  # missing or damaged: start over
            if old_plan != self.plan:
                logger.warning(
                    "%s holds an interrupted run with other images or settings; starting over.",
                    self.folder,
                )
                self.remove()
        if not self.folder.is_dir():
            self.folder.mkdir(parents=True)
            write_json_atomic(plan_path, self.plan)
            return {}
        for stale in self.folder.glob(".*.tmp"):  # a write cut short by a kill
            stale.unlink(missing_ok=True)
        records: dict[int, BatchRecord] = {}
        for b in range(self.n_batches):  # any finished batch: the Ray engine finishes out of order
            record = self._load(b)
            if record is not None:
                records[b] = record
        self.n_done = sum(r.size for r in records.values())
        if records:
            logger.warning(
                "resuming from %s: %d of %d batches (%d images) were already done.",
                self.folder,
                len(records),
                self.n_batches,
                self.n_done,
            )
        return records

    def _load(self, b: int) -> BatchRecord | None:
        from snaplook.io_utils import file_sha256, load_npy, read_input_bytes

        if not self._record_path(b).is_file():
            return None
        try:
            doc = json.loads(read_input_bytes(self._record_path(b), kind="json"))
            record = BatchRecord(
                size=int(doc["size"]),
                rows=[(int(p), int(w), int(h)) for p, w, h in doc["rows"]],
                skipped=[(int(p), str(why)) for p, why in doc["skipped"]],
            )
            positions = sorted([r[0] for r in record.rows] + [s[0] for s in record.skipped])
            if positions != list(self.batch_positions(b)) or record.size != len(positions):
                return None
            if record.rows:
                if file_sha256(self.chunk_path(b), kind="array") != doc["sha256"]:
                    return None
                shape = load_npy(self.chunk_path(b), mmap=True).shape
                if shape != (len(record.rows), self.feature_dim):
                    return None
        except FileNotFoundError:
            return None
        except (
            OSError,
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
            RecursionError,
            SnaplookError,
        ) as exc:
            logger.info("batch %d in %s is damaged (%s); embedding it again", b, self.folder, exc)
            return None
        return record

    def save(self, b: int, features: np.ndarray | None, record: BatchRecord) -> None:
        """Write batch ``b``'s features, then its record (the commit point)."""
        import numpy as np

        from snaplook.io_utils import file_sha256, save_npy_atomic, write_json_atomic

        digest = None
        if record.rows:
            save_npy_atomic(self.chunk_path(b), np.asarray(features, dtype=np.float32))
            digest = file_sha256(self.chunk_path(b))
        write_json_atomic(
            self._record_path(b),
            {
                "batch": b,
                "size": record.size,
                "rows": record.rows,
                "skipped": record.skipped,
                "sha256": digest,
            },
        )
        self.n_done += record.size

    def n_checkpointed(self) -> int:
        return self.n_done

    def remove(self) -> None:
        import shutil

        if self.folder.is_symlink() or self.folder.is_file():
            self.folder.unlink()
        elif self.folder.exists():
            # Renamed away first: a kill during the slow delete must not leave a folder
            # that looks like a checkpoint with batches missing.
            trash = self._trash()
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(self.folder, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def _trash(self) -> Path:
        return self.folder.with_name(self.folder.name + ".removing")

    def remove_if_empty(self) -> None:
        if self.folder.is_dir() and not any(self.folder.glob("batch-*.json")):
            self.remove()
