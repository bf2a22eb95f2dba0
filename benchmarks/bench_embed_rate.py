"""Embedding rate of ``snaplook index`` vs ``snaplook evaluate --protocol folders`` (issue 21).

Both commands run in this process (Typer's ``CliRunner``) on the same generated 600x800
photo-like JPEGs (``benchmarks/run.py``'s generator, sorted into 8 label folders), with
ResNet50 and seeded random weights (speed does not depend on the weight values), at each
``--precisions`` value. A rate is the slope between two gallery sizes,
``(large - small) / (t_large - t_small)`` img/s, so the one-time costs (model load and
compile, report files) cancel; the two runs of a slope go back to back (same load), and a
command's rate is the median of its slopes over ``--rounds`` interleaved rounds (default 3).
Target (issue 21): evaluate's rate >= 0.9 of index's at fp32 and at auto (bf16 where the
CPU has it natively).

    python benchmarks/bench_embed_rate.py [--small 48] [--large 192] [--rounds 3]
        [--precisions fp32,auto] [--label after] [--tree before=DIR --tree after=DIR]

With ``--tree`` the commands run in subprocesses importing snaplook from each code tree
(e.g. ``git archive <commit> snaplook | tar -x -C DIR``), interleaved in the same rounds:
a before/after comparison on a busy machine.

Then, without ``--tree``, the two pipelines alone (``embed_images``, which ``index`` runs,
and ``embed_cached``, which ``evaluate`` runs) in this process with one loaded model.

Prints a table and writes benchmarks/results/embed-rate-<date>[-<label>].json with the CPU
model and flags. Converted models are cached in benchmarks/data/model-cache (set
``SNAPLOOK_CACHE_DIR`` to override), so only the first run converts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "benchmarks" / "data"
RESULTS = REPO / "benchmarks" / "results"
LABELS = 8

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("SNAPLOOK_CACHE_DIR", str(DATA / "model-cache"))
sys.path.insert(0, str(REPO / "benchmarks"))


def labelled_gallery(photos: list[Path], folder: Path) -> Path:
    """``folder/<label>/<photo>`` symlinks: a labelled-folders dataset of exactly ``photos``."""
    for i, photo in enumerate(photos):
        target = folder / f"label{i % LABELS}" / photo.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(photo.resolve())
    return folder


def command(kind: str, gallery: Path, precision: str, work: Path) -> list[str]:
    """The CLI arguments of one timed run (fresh output and cache folders each time)."""
    common = ["--weights", "random", "--precision", precision, "-q"]
    if kind == "index":
        return ["index", str(gallery), "--out", str(work / "index"), "--ann", "none", *common]
    return [
        "evaluate",
        str(gallery),
        "--protocol",
        "folders",
        "--out",
        str(work / "report"),
        "--cache-dir",
        str(work / "cache"),
        "--examples",
        "0",
        "--k",
        "1,5",
        *common,
    ]


def timed(tree: Path | None, args: list[str], work: Path) -> float:
    """Seconds of one CLI run; its outputs are removed afterwards.

    ``tree`` None: in this process (Typer's CliRunner). Otherwise in a subprocess importing
    snaplook from ``tree`` (its start-up is a constant, which the slope cancels).
    """
    work.mkdir(parents=True)
    started = time.perf_counter()
    if tree is None:
        from typer.testing import CliRunner

        from snaplook.cli import app

        result = CliRunner().invoke(app, args)
        code, output = result.exit_code, result.output
    else:
        env = {**os.environ, "PYTHONPATH": str(tree)}
        done = subprocess.run(
            [sys.executable, "-c", "from snaplook.cli import app; app()", *args],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
        )
        code, output = done.returncode, done.stdout + done.stderr
    seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"{' '.join(args)} failed ({code}):\n{output}")
    shutil.rmtree(work)
    return seconds


def measure(
    args: argparse.Namespace, trees: dict[str, Path | None], galleries: dict[int, Path], work: Path
) -> list[dict]:
    """Rates per (code tree, precision): the median over rounds of each round's slope.

    Each slope comes from a small and a large run back to back, so both see the same load;
    rounds interleave the trees, precisions and the two commands (in alternating order).
    """
    rates: dict[tuple[str, str, str], list[float]] = {}
    seconds: dict[tuple[str, str, str], list[list[float]]] = {}
    precisions = args.precisions.split(",")
    for tree in trees.values():  # warm-up: converts the model once per precision
        for precision in precisions:
            warm = work / "warm-up"
            timed(tree, command("index", galleries[args.small], precision, warm), warm)
    for r in range(args.rounds):
        kinds = ("index", "evaluate") if r % 2 == 0 else ("evaluate", "index")
        names = list(trees) if r % 2 == 0 else list(reversed(trees))
        for precision, name, kind in itertools.product(precisions, names, kinds):
            pair = []
            for size in (args.small, args.large):
                run_dir = work / f"{name}-{kind}-{precision}-{size}-{r}"
                pair.append(
                    timed(trees[name], command(kind, galleries[size], precision, run_dir), run_dir)
                )
            key = (name, kind, precision)
            rates.setdefault(key, []).append(
                (args.large - args.small) / max(pair[1] - pair[0], 1e-9)
            )
            seconds.setdefault(key, []).append(pair)
            print(
                f"round {r + 1}: {name:7s} {kind:8s} {precision:5s} {args.small} / {args.large} "
                f"images {pair[0]:6.1f} / {pair[1]:6.1f} s: {rates[key][-1]:6.1f} img/s",
                flush=True,
            )
    return [_row(rates, seconds, name, precision) for name in trees for precision in precisions]


def _row(rates: dict, seconds: dict, name: str, precision: str) -> dict:
    index = statistics.median(rates[(name, "index", precision)])
    evaluate = statistics.median(rates[(name, "evaluate", precision)])
    return {
        "tree": name,
        "precision": precision,
        "resolved_precision": resolved(precision),
        "index_img_s": index,
        "evaluate_img_s": evaluate,
        "ratio": evaluate / index,
        "target": 0.9,
        "ok": evaluate / index >= 0.9,
        "rounds": {
            kind: {
                "img_s": rates[(name, kind, precision)],
                "seconds": seconds[(name, kind, precision)],
            }
            for kind in ("index", "evaluate")
        },
    }


def measure_library(args: argparse.Namespace, photos: list[Path]) -> list[dict]:
    """The two pipelines alone, in this process, with one loaded model per precision.

    ``embed_images`` (``iter_embeddings``, which ``build_index`` runs) against
    ``embed_cached`` (which ``evaluate`` and ``train`` run; a fresh cache folder each time)
    on the ``--large`` photos, alternating, median img/s over ``--rounds``: no command
    start-up, report or index writing, so less noise than the slopes above.
    """
    from snaplook.features import Embedder, embed_cached, embed_images

    paths = photos[: args.large]
    rows = []
    for precision in args.precisions.split(","):
        embedder = Embedder("resnet50", weights="random", precision=precision)
        embed_images(paths[:32], embedder)  # load and compile
        rates: dict[str, list[float]] = {"embed_images": [], "embed_cached": []}
        for _ in range(args.rounds):
            started = time.perf_counter()
            embed_images(paths, embedder)
            rates["embed_images"].append(len(paths) / (time.perf_counter() - started))
            with tempfile.TemporaryDirectory() as cache:
                started = time.perf_counter()
                embed_cached([(p, None) for p in paths], embedder, cache_dir=cache)
                rates["embed_cached"].append(len(paths) / (time.perf_counter() - started))
        index, evaluate = (statistics.median(rates[k]) for k in ("embed_images", "embed_cached"))
        rows.append(
            {
                "precision": precision,
                "resolved_precision": embedder.resolved_precision(),
                "embed_images_img_s": index,
                "embed_cached_img_s": evaluate,
                "ratio": evaluate / index,
                "rounds": rates,
            }
        )
        print(f"library {precision}: {rates}", flush=True)
    return rows


def resolved(precision: str) -> str:
    from snaplook.runtime import resolve_precision

    return resolve_precision(precision, "openvino")


def machine() -> dict[str, object]:
    import snaplook
    from snaplook.runtime import bf16_support, cpu_flags, cpu_model

    return {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "cpu_flags": sorted(cpu_flags()),
        "bf16_native": bf16_support(),
        "python": platform.python_version(),
        "snaplook": str(Path(snaplook.__file__).parent),
        "load_average_start": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=48)
    parser.add_argument("--large", type=int, default=192)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precisions", default="fp32,auto")
    parser.add_argument("--label", default="", help="suffix of the results file (before/after)")
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="compare code trees in one run: import snaplook from DIR (a folder holding "
        "snaplook/, e.g. from `git archive`) in subprocesses; repeat, e.g. --tree "
        "before=/tmp/old --tree after=.",
    )
    args = parser.parse_args()
    trees: dict[str, Path | None] = {"": None}
    if args.tree:
        trees = {n: Path(d).resolve() for n, d in (t.split("=", 1) for t in args.tree)}

    from run import ensure_photos

    photos = ensure_photos(DATA, args.large)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="snaplook-embed-rate-") as tmp:
        work = Path(tmp)
        galleries = {
            n: labelled_gallery(photos[:n], work / f"gallery-{n}") for n in (args.small, args.large)
        }
        result = {
            "benchmark": "embed-rate",
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            "images": {"small": args.small, "large": args.large, "size": "600x800 JPEG"},
            "rounds": args.rounds,
            "trees": {n: str(d) if d else "this process" for n, d in trees.items()},
            "rows": measure(args, trees, galleries, work / "runs"),
        }
        if args.tree:
            result["library"] = []  # one snaplook per process: compare trees by the rows
        else:
            result["library"] = measure_library(args, photos)
    result["machine"]["load_average_end"] = os.getloadavg()
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(
        f"\nCPU: {result['machine']['cpu']} ({result['machine']['cpus']} CPUs), "
        f"bf16: {result['machine']['bf16_native']}"
    )
    print(
        f"{'tree':7s} {'precision':10s} {'index img/s':>12s} {'evaluate img/s':>15s} "
        f"{'ratio':>6s}  target"
    )
    for row in result["rows"]:
        name = f"{row['precision']}({row['resolved_precision']})"
        print(
            f"{row['tree']:7s} {name:10s} {row['index_img_s']:12.1f} "
            f"{row['evaluate_img_s']:15.1f} {row['ratio']:6.2f}  >= 0.9 "
            f"{'PASS' if row['ok'] else 'FAIL'}"
        )
    for row in result["library"]:
        name = f"{row['precision']}({row['resolved_precision']})"
        print(
            f"library {name:10s} embed_images {row['embed_images_img_s']:.1f} img/s, "
            f"embed_cached {row['embed_cached_img_s']:.1f} img/s: ratio {row['ratio']:.2f}"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = f"-{args.label}" if args.label else ""
    out = RESULTS / f"embed-rate-{dt.date.today().isoformat()}{suffix}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
