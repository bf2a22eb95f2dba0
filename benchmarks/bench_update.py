"""`--update` of 1% of a 1 M-row sharded index: bytes written and time.

Builds a gallery of ``--rows`` tiny files (the same 8x8 PNG, in folders of 1,000) and a
sharded index of seeded synthetic unit features over it, written directly (not embedded).
Then, per scenario, 1% of the files change and ``build_index(..., update=True)`` runs with
an embedder stubbed here (seeded features; image decoding, file discovery, stat/SHA-1
checks, checkpointing and shard writing are the real ones):

- ``contiguous``: the files of 1% of the folders are re-shot (a catalogue section);
- ``appended``: 1% new files in new folders that sort last;
- ``scattered``: 1% of the files, drawn at random over the whole gallery.

The FAISS index (``--ann``, default here ``none``) is left out: it is rebuilt over all rows
on every run, whatever changed, and would time FAISS, not the storage.

Reports shards written / kept, shard bytes written (BuildSummary), all bytes the process
wrote (``wchar`` of /proc/self/io: checkpoint, shards, meta), the time, and for reference
the bytes of a full rewrite. Checks that the updated index has the expected rows.

    python benchmarks/bench_update.py [--rows 1000000] [--dim 2048] [--shard-rows 16384]

Writes benchmarks/results/update-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import RESULTS, machine  # noqa: E402

from snaplook.features import Embedder  # noqa: E402
from snaplook.index import load_index  # noqa: E402
from snaplook.indexing import _HashingWriter, build_index  # noqa: E402
from snaplook.io_utils import MANIFEST_HEADER, write_csv_atomic  # noqa: E402

PER_FOLDER = 1000


class StubEmbedder(Embedder):
    """ResNet50's identity and dimension, seeded random unit features instead of a network."""

    def __init__(self, dim: int) -> None:
        super().__init__("resnet50", weights="random")
        self._dim = dim
        self.n_images = 0

    @property
    def feature_dim(self) -> int:
        return self._dim

    def prepare(self, image: np.ndarray) -> np.ndarray:
        return np.zeros((1, 1, 3), dtype=np.uint8)

    def embed(self, images: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(self.n_images)
        self.n_images += len(images)
        return rng.standard_normal((len(images), self._dim), dtype=np.float32)


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _path(root: Path, i: int) -> Path:
    return root / f"f{i // PER_FOLDER:05d}" / f"img{i % PER_FOLDER:04d}.png"


def make_gallery(root: Path, rows: int) -> bytes:
    data = _png(0)
    for f in range(-(-rows // PER_FOLDER)):
        (root / f"f{f:05d}").mkdir(parents=True)
    for i in range(rows):
        _path(root, i).write_bytes(data)
    return data


def make_index(root: Path, out: Path, rows: int, dim: int, shard_rows: int, data: bytes) -> None:
    """A sharded index over ``root`` as build_index writes it, with synthetic features."""
    sha1 = hashlib.sha1(data).hexdigest()
    identity = StubEmbedder(dim).identity()
    (out / "features").mkdir(parents=True)
    shards = []
    rng = np.random.default_rng(0)
    for k, start in enumerate(range(0, rows, shard_rows)):
        stop = min(start + shard_rows, rows)
        block = rng.standard_normal((stop - start, dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        name = f"shard-{k:05d}"
        with open(out / "features" / f"{name}.npy", "wb") as fh:
            hashing = _HashingWriter(fh)  # the shard's SHA-256, as build_index records it
            np.lib.format.write_array(hashing, block, allow_pickle=False)
        csv_rows = []
        for j, i in enumerate(range(start, stop)):
            st = _path(root, i).stat()
            rel = _path(root, i).relative_to(root).as_posix()
            csv_rows.append((j, rel, 8, 8, st.st_size, f"{st.st_mtime:.6f}", sha1))
        write_csv_atomic(out / "features" / f"{name}.csv", MANIFEST_HEADER, csv_rows)
        digest = hashing.digest.hexdigest()
        shards.append({"name": name, "rows": stop - start, "sha256": digest})
    meta = {
        "format_version": 2,
        **identity,
        "count": rows,
        "metric": "cosine",
        "l2_normalized": True,
        "created": "synthetic",
        "root": str(root.resolve()),
        "skipped": 0,
        "shard_rows": shard_rows,
        "shards": shards,
    }
    (out / "meta.json").write_text(json.dumps(meta))


def _wchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


def run_scenario(name: str, root: Path, base: Path, work: Path, args, rows: int) -> dict:
    """Copy the base index (hard links), change 1% of the files, update, measure."""
    out = work / f"index-{name}"
    shutil.copytree(base, out, copy_function=os.link)
    n = rows // 100
    changed = _png(1)
    rng = np.random.default_rng(1)
    if name == "contiguous":
        first = (rows // 2) // PER_FOLDER * PER_FOLDER
        targets = [_path(root, i) for i in range(first, first + n)]
    elif name == "scattered":
        targets = [_path(root, int(i)) for i in np.sort(rng.choice(rows, n, replace=False))]
    else:
        start = -(-rows // PER_FOLDER) * PER_FOLDER
        targets = [_path(root, i) for i in range(start, start + n)]
        for folder in sorted({p.parent for p in targets}):
            folder.mkdir(exist_ok=True)
    saved = {p: p.read_bytes() if p.exists() else None for p in targets}
    for p in targets:
        p.write_bytes(changed)  # other content, other mtime: SHA-1 decides, re-embedded
    embedder = StubEmbedder(args.dim)
    w0, t0 = _wchar(), time.perf_counter()
    summary = build_index(
        root,
        out,
        embedder=embedder,
        update=True,
        shard_rows=args.shard_rows,
        batch_size=64,
        ann=args.ann,
    )
    seconds = time.perf_counter() - t0
    wrote = _wchar() - w0
    index = load_index(out)
    want_rows = rows + (n if name == "appended" else 0)
    assert len(index) == want_rows and summary.n_embedded == n == embedder.n_images, summary
    assert [r.path for r in index.manifest[:3]] == [
        _path(root, i).relative_to(root).as_posix() for i in range(3)
    ]
    for p, old in saved.items():  # put the gallery back for the next scenario
        if old is None:
            p.unlink()
        else:
            p.write_bytes(old)
    for folder in {p.parent for p, old in saved.items() if old is None}:
        if not any(folder.iterdir()):
            folder.rmdir()
    shutil.rmtree(out)
    return {
        "scenario": name,
        "rows_changed": n,
        "shards_written": summary.shards_written,
        "shards_kept": summary.shards_kept,
        "shard_bytes_written": summary.bytes_written,
        "process_bytes_written": wrote,
        "seconds": round(seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--shard-rows", type=int, default=16384)
    parser.add_argument("--scenarios", default="contiguous,appended,scattered")
    parser.add_argument(
        "--ann",
        default="none",
        help="--ann of the update (default none: storage only; FAISS is rebuilt on every run)",
    )
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: /tmp)")
    args = parser.parse_args()
    started = dt.datetime.now(dt.UTC)
    work = Path(tempfile.mkdtemp(prefix="bench-update-", dir=args.work))
    try:
        root, base = work / "gallery", work / "base"
        t = time.perf_counter()
        data = make_gallery(root, args.rows)
        make_index(root, base, args.rows, args.dim, args.shard_rows, data)
        setup_s = time.perf_counter() - t
        full_bytes = sum(p.stat().st_size for p in (base / "features").iterdir())
        gb = full_bytes / 1e9
        print(f"setup: {args.rows:,} files and a {gb:.2f} GB index in {setup_s:.0f} s")
        results = [
            run_scenario(name, root, base, work, args, args.rows)
            for name in args.scenarios.split(",")
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    head = f"{'scenario':<11} {'changed':>8} {'written':>8} {'kept':>5} "
    print(head + f"{'shard GB':>9} {'all GB':>7} {'of full':>8} {'time s':>7}")
    for r in results:
        print(
            f"{r['scenario']:<11} {r['rows_changed']:>8,} {r['shards_written']:>8} "
            f"{r['shards_kept']:>5} {r['shard_bytes_written'] / 1e9:>9.3f} "
            f"{r['process_bytes_written'] / 1e9:>7.3f} "
            f"{r['shard_bytes_written'] / full_bytes:>8.1%} {r['seconds']:>7.1f}"
        )
    doc = {
        "benchmark": "update",
        "command": "python benchmarks/bench_update.py " + " ".join(sys.argv[1:]),
        "started_utc": started.isoformat(timespec="seconds"),
        "machine": machine(),  # its load average is taken at the end
        "rows": args.rows,
        "dim": args.dim,
        "shard_rows": args.shard_rows,
        "ann": args.ann,
        "full_index_bytes": full_bytes,
        "setup_seconds": round(setup_s, 1),
        "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    target = RESULTS / f"update-{started.date().isoformat()}.json"
    target.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
