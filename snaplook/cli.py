"""The `snaplook` command line: one command per step, a thin shell over the library.

Commands parse options, show progress, call one library function and print what was
written where. Heavy libraries load inside the commands, so `snaplook --help` is instant.
Defaults and choice lists come from :mod:`snaplook.options`.
"""

# No `from __future__ import annotations` here: with string annotations Typer compiles and
# evals every parameter's Annotated[...] twice on each start-up (~0.07 s of `--help`), so
# annotations in this module must be importable at runtime (no TYPE_CHECKING-only names).
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from typer.core import TyperGroup

from snaplook import __version__
from snaplook import ann as _ann
from snaplook import artists as _artists
from snaplook import catalog as _catalog
from snaplook import detection as _detection
from snaplook import evaluate as _evaluate
from snaplook import features as _features
from snaplook import index as _index
from snaplook import indexing as _indexing
from snaplook import look as _look
from snaplook import metrics as _metrics
from snaplook import models as _models
from snaplook import options as _opt
from snaplook import page as _page
from snaplook import postprocess as _postprocess
from snaplook import results as _results
from snaplook import train as _train
from snaplook import video as _video
from snaplook.errors import SnaplookError

logger = logging.getLogger("snaplook")


class _Group(TyperGroup):
    """Turns `SnaplookError` into one line on stderr and exit 1, Ctrl-C into exit 130."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        # Typer's own Click exceptions (usage errors, exit 2) derive from TyperException.
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except SnaplookError as exc:
            if os.environ.get("SNAPLOOK_DEBUG"):
                raise
            _err(f"Error: {exc}")
            sys.exit(1)
        except KeyboardInterrupt:
            if os.environ.get("SNAPLOOK_DEBUG"):
                raise
            _err(
                "Interrupted: outputs already written are intact; run the same command again "
                "(index and evaluate resume where they stopped)."
            )
            sys.exit(130)
        except Exception as exc:  # the promise: never a traceback for the user
            if os.environ.get("SNAPLOOK_DEBUG"):
                raise
            _err(
                f"Error: unexpected {type(exc).__name__}: {exc}. Rerun with SNAPLOOK_DEBUG=1 "
                "for the traceback and report it."
            )
            sys.exit(1)


def _err(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(message, markup=False)


app = typer.Typer(
    cls=_Group,
    name="snaplook",
    help="Shop-the-look retrieval for fashion: frames, lead artists, ResNet50 features, "
    "cosine k-NN, retrieval grids.",
    no_args_is_help=True,
    # --install-completion / --show-completion (bash, zsh, fish, PowerShell).
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    # Plain (click) help: Typer's rich help imports rich.markdown, markdown-it and pygments,
    # which took --help from ~0.15 s to ~0.45 s (issue 6: --help within 0.3 s).
    rich_markup_mode=None,
)

_state: dict[str, bool] = {"quiet": False, "verbose": False}


# --- parse-time checks: a bad value is a usage error (exit 2) before any work ---


def _choice(values: Any) -> Any:
    """A parse-time choice type (Typer makes a Literal a click Choice): a value outside it
    is a usage error (exit 2) with the usage hint. Built from the library's constants."""
    return Literal[tuple(values)]


def _each_in(choices: Any) -> Callable[[list[str] | None], list[str] | None]:
    """Callback for a repeatable, comma-separated option: every value must be a choice."""

    def check(value: list[str] | None) -> list[str] | None:
        for v in _split_values(value):
            if v not in choices:
                raise typer.BadParameter(f"{v!r} is not one of {', '.join(choices)}.")
        return value

    return check


def _split_values(values: list[str] | None) -> list[str]:
    """Flatten repeated and comma-separated option values ("a,b" "c" -> a, b, c)."""
    out: list[str] = []
    for value in values or ():
        out.extend(v.strip() for v in value.split(",") if v.strip())
    return list(dict.fromkeys(out))


def _usage(parse: Callable[[str], Any]) -> Callable[[str], str]:
    """Callback running a library parser at parse time: its SnaplookError is a usage error."""

    def check(value: str) -> str:
        try:
            parse(value)
        except SnaplookError as exc:
            raise typer.BadParameter(str(exc)) from None
        return value

    return check


def _check_batch(value: str) -> str:
    try:
        p, k = _train.parse_batch(value)
    except SnaplookError as exc:
        raise typer.BadParameter(str(exc)) from None
    if p < 2 or k < 2:
        raise typer.BadParameter(
            f"{value}: need at least 2 items (P) and 2 images per item (K), e.g. 16x4."
        )
    return value


def _positive(value: float) -> float:
    if not value > 0:
        raise typer.BadParameter(f"{value} is not > 0.")
    return value


def _fraction(value: float) -> float:
    if not 0 <= value < 1:
        raise typer.BadParameter(f"{value} is not in [0, 1).")
    return value


def _check_weights(value: str | None) -> str | None:
    if value is None or value in _opt.WEIGHTS_NAMES or Path(value).expanduser().is_file():
        return value
    raise typer.BadParameter(
        f"{value!r} is neither imagenet, random nor an existing weights file (.weights.h5, "
        "the Keras ImageNet no-top .h5, or efficientnet_lite0's .pth)."
    )


def _check_detector(value: str) -> str:
    names = (*_detection.DETECTORS, "builtin")
    if value in names or (value.lower().endswith(".onnx") and Path(value).is_file()):
        return value
    raise typer.BadParameter(
        f"{value!r} is neither {', '.join(_detection.DETECTORS)} nor an existing .onnx file."
    )


def _check_ann(value: str | None) -> str | None:
    # Parse time: a bad --ann is a usage error (exit 2) before any image is embedded.
    if value is None:
        return None
    try:
        return _ann.check_ann_spec(value)
    except SnaplookError as exc:
        raise typer.BadParameter(str(exc)) from exc


def _check_where(values: list[str] | None) -> list[str] | None:
    # Syntax is checked at parse time (exit 2); columns are checked against the index.
    for value in values or ():
        try:
            _catalog.parse_where(value)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
    return values


def _check_engine(engine: str, ray: _opt.RayOptions) -> None:
    """Ray options without --engine ray are a usage error; with it, Ray's logs stay quiet."""
    if engine != "ray" and not ray.is_default():
        raise typer.BadParameter(
            "--address/--workers/--cpus-per-worker/--gpus-per-worker need --engine ray.",
            param_hint="--engine",
        )
    if engine == "ray" and not _state["verbose"]:
        _quiet_ray()


def _load_head(path: Path | None) -> Any:
    return None if path is None else _train.load_head(path)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"snaplook {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log what each step does.")
    ] = False,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet",
            "-q",
            help="Only warnings, errors and the final summary line (no tables, no progress).",
        ),
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    """Shop-the-look retrieval for fashion."""
    _state["quiet"] = quiet
    _state["verbose"] = verbose
    _setup_logging(verbose=verbose, quiet=quiet)


def _setup_logging(*, verbose: bool, quiet: bool) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    # --quiet keeps warnings (a skipped file, random weights): it drops tables and progress.
    level = logging.INFO if verbose else logging.WARNING
    root = logging.getLogger("snaplook")
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler: logging.Handler
    if sys.stderr.isatty():
        handler = RichHandler(
            console=Console(stderr=True), show_time=False, show_path=False, markup=False
        )
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        # Piped or captured stderr (CI logs, `2> file`): one unwrapped line per message.
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    # Other libraries log or warn about their own decoder complaints (Pillow on a damaged
    # TIFF) that snaplook already reports as one skipped-file line; without a handler
    # Python's last-resort handler would print them too. --verbose shows them.
    logging.captureWarnings(True)
    top = logging.getLogger()
    top.handlers[:] = [h for h in top.handlers if not isinstance(h, logging.NullHandler)]
    if verbose:
        top.addHandler(handler)
    else:
        top.addHandler(logging.NullHandler())


def _quiet_ray() -> None:
    # Ray logs its own INFO/WARNING lines (token authentication, each dataset started and
    # finished) on stderr; they stay off it unless --verbose. Ray Data sets its loggers up
    # when imported, so import it first.
    with contextlib.suppress(ImportError):
        import ray.data  # noqa: F401

    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)


# --- rendering: results on stdout, diagnostics on stderr ---


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False)


def _is_quiet(quiet: bool = False) -> bool:
    return quiet or _state["quiet"]


def _say(message: str, *, quiet: bool = False) -> None:
    """A result line on stdout, left out with --quiet (the final summary is not)."""
    if not _is_quiet(quiet):
        typer.echo(message)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _print_table(
    title: str,
    headers: list[str],
    rows: list[list[str]],
    *,
    right: list[bool],
    quiet: bool = False,
) -> None:
    """A table on stdout that never cuts a cell: a rich table on a terminal wide enough for
    every cell, otherwise (piped, captured, narrow) plain aligned text. Off with --quiet."""
    if _is_quiet(quiet):
        return
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    console = _console()
    if sys.stdout.isatty() and sum(widths) + 3 * len(widths) + 1 <= console.width:
        from rich.table import Table
        from rich.text import Text

        table = Table(title=title)
        for header, r in zip(headers, right):
            table.add_column(header, justify="right" if r else "left", no_wrap=True)
        for row in rows:
            table.add_row(*(Text(cell) for cell in row))
        console.print(table)
        return

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)
        ).rstrip()

    typer.echo("\n".join([title, line(headers), *(line(r) for r in rows)]))


def _no_bars(quiet: bool) -> bool:
    return quiet or _state["quiet"] or not (sys.stdout.isatty() and sys.stderr.isatty())


@contextlib.contextmanager
def _progress(
    description: str, *, quiet: bool = False, unit: str = "img"
) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """Yield (on_start(total), on_progress(done)) callbacks that drive a rich progress bar.

    Drawn on stderr; off with --quiet or when stdout or stderr is not a terminal (the
    callbacks then do nothing).
    """
    if _no_bars(quiet):
        yield (lambda total: None), (lambda done: None)
        return
    from rich.progress import TextColumn

    rate = TextColumn("{task.fields[rate]}")
    with _rich_progress(rate) as progress:
        task = progress.add_task(description, total=None, rate="")

        def on_start(total: int) -> None:
            progress.update(task, total=total)

        def on_progress(done: int) -> None:
            progress.update(task, completed=done)
            speed = progress.tasks[task].speed
            if speed:
                progress.update(task, rate=f"{speed:.1f} {unit}/s")

        yield on_start, on_progress


@contextlib.contextmanager
def _stage_progress(
    *, quiet: bool = False
) -> Iterator[tuple[Callable[[str, int], None], Callable[[int], None]]]:
    """Yield (on_stage(description, total), on_progress(done)): one bar, relabelled per stage.

    Drawn on stderr; off with --quiet or when stdout or stderr is not a terminal (the
    callbacks then do nothing).
    """
    if _no_bars(quiet):
        yield (lambda description, total: None), (lambda done: None)
        return
    with _rich_progress() as progress:
        task = progress.add_task("Loading", total=None)

        def on_stage(description: str, total: int) -> None:
            progress.reset(task, description=description, total=total, completed=0)

        def on_progress(done: int) -> None:
            progress.update(task, completed=done)

        yield on_stage, on_progress


def _rich_progress(*extra: Any) -> Any:
    """A rich Progress on stderr (a diagnostic: stdout holds results only); ``extra``
    columns go before the time remaining."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        *extra,
        TimeRemainingColumn(),
        transient=False,
        console=Console(stderr=True),
    )


def _report_skipped(skipped: list[Any], where: Path | None, strict: bool) -> None:
    if not skipped:
        return
    # Each skip was already logged as a warning line with its reason; this is the tally.
    target = f"; listed in {where}" if where else " (see the warnings above)"
    _err(f"Skipped {len(skipped)} unreadable file(s){target}.")
    if strict:
        _err("Error: --strict: failing because inputs were skipped.")
        raise typer.Exit(1)


def _random_weights_notice(meta: dict[str, Any], what: str) -> None:
    if _features.is_random_weights(meta):
        _err(f"Random weights: {what} test the pipeline, not retrieval quality.")


# --- options shared by several commands ---

_WEIGHTS_HELP = (
    "imagenet (Keras cache/download; efficientnet_lite0: the snaplook[lite0] "
    "package), random (seeded, for tests only) or a weights file path."
)
WeightsOpt = Annotated[str, typer.Option("--weights", callback=_check_weights, help=_WEIGHTS_HELP)]
BackboneOpt = Annotated[
    _choice(_opt.BACKBONE_NAMES),
    typer.Option("--backbone", help="The CNN that embeds images."),
]
# `index` takes None for "not given": --update then keeps the index's own setting.
_AS_INDEXED = " [default: {}; with --update: the index's]"
IndexBackboneOpt = Annotated[
    _choice(_opt.BACKBONE_NAMES) | None,
    typer.Option(
        "--backbone",
        help="The CNN that embeds images." + _AS_INDEXED.format(_opt.DEFAULT_BACKBONE),
        show_default=False,
    ),
]
IndexWeightsOpt = Annotated[
    str | None,
    typer.Option(
        "--weights",
        callback=_check_weights,
        help=_WEIGHTS_HELP + _AS_INDEXED.format(_opt.DEFAULT_WEIGHTS),
        show_default=False,
    ),
]
IndexSeedOpt = Annotated[
    int | None,
    typer.Option(
        "--seed",
        min=0,
        help="Seed for --weights random." + _AS_INDEXED.format(_opt.DEFAULT_SEED),
        show_default=False,
    ),
]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")]
QuietOpt = Annotated[
    bool,
    typer.Option(
        "--quiet", "-q", help="Only warnings, errors and the final summary line (as snaplook -q)."
    ),
]
RuntimeOpt = Annotated[
    _choice(_opt.RUNTIMES),
    typer.Option(
        "--runtime",
        help="auto (OpenVINO on a CPU, Keras on a GPU), openvino or keras; the same fp32 "
        "features either way. --verbose says which ran and why.",
    ),
]
_PRECISION_HELP = (
    "fp32 (exact); bf16 (CPUs with AMX or AVX512-BF16; top-10 neighbour agreement with "
    "fp32 0.98 measured); int8 (NNCF, calibrated on a seeded sample of the gallery; "
    "top-10 agreement with fp32 only 0.90, below 0.95: see README Performance); auto "
    "(bf16 where the CPU has it natively, else fp32)."
)
PrecisionOpt = Annotated[
    _choice(_opt.PRECISIONS),
    typer.Option("--precision", help=_PRECISION_HELP + " Recorded in the index."),
]
QueryPrecisionOpt = Annotated[
    _choice(_opt.PRECISIONS) | None,
    typer.Option(
        "--precision",
        help="Must be the index's precision [default: the index's]. " + _PRECISION_HELP,
        show_default=False,
    ),
]
IndexPrecisionOpt = Annotated[
    _choice(_opt.PRECISIONS) | None,
    typer.Option(
        "--precision",
        help=_PRECISION_HELP
        + " Recorded in the index."
        + _AS_INDEXED.format(_opt.DEFAULT_PRECISION),
        show_default=False,
    ),
]
IndexPoolingOpt = Annotated[
    _choice(_opt.POOLINGS) | None,
    typer.Option(
        "--pooling",
        help="Global pooling of the backbone's feature maps: avg, max or gem (generalised "
        "mean, Radenovic et al.)."
        + _AS_INDEXED.format("the backbone's: gem for efficientnet_lite0, else avg"),
        show_default=False,
    ),
]
IndexGemPOpt = Annotated[
    float | None,
    typer.Option(
        "--gem-p",
        help="GeM's exponent (1: average, large: max), with --pooling gem."
        + _AS_INDEXED.format(_opt.DEFAULT_GEM_P),
        show_default=False,
    ),
]
IndexTtaOpt = Annotated[
    _choice(_opt.TTAS) | None,
    typer.Option(
        "--tta",
        help="Test-time augmentation: flip averages each image's descriptor with its mirror "
        "image's (queries too; half the speed)." + _AS_INDEXED.format(_opt.DEFAULT_TTA),
        show_default=False,
    ),
]
IndexWhitenOpt = Annotated[
    str | None,
    typer.Option(
        "--whiten",
        metavar="none|pca|pca:DIM",
        help="PCA-whitening fitted on the gallery (at most one dimension per 3 images), "
        "stored in the index and applied to queries; the index then searches whitened "
        "vectors. --update keeps the fitted whitening unless --refit."
        + _AS_INDEXED.format(_opt.DEFAULT_WHITEN),
        show_default=False,
    ),
]
IndexDbaOpt = Annotated[
    int | None,
    typer.Option(
        "--dba",
        min=0,
        help="alpha-database-side augmentation: each gallery vector plus its K nearest "
        "(0: none); recomputed on every build." + _AS_INDEXED.format(_opt.DEFAULT_DBA),
        show_default=False,
    ),
]
RefitOpt = Annotated[
    bool,
    typer.Option("--refit", help="With --update: fit the whitening again on this gallery."),
]
HeadOpt = Annotated[
    Path | None,
    typer.Option(
        "--head",
        exists=True,
        help="A head folder from `snaplook train`: features go through it.",
    ),
]
AnnOpt = Annotated[
    str | None,
    typer.Option(
        "--ann",
        callback=_check_ann,
        metavar="auto|none|hnsw|ivfpq|FACTORY",
        help="Approximate search built over the features: auto (exact below "
        f"{_opt.AUTO_EXACT_BELOW:,} images, HNSW below {_opt.AUTO_HNSW_BELOW:,}, IVF-PQ "
        "beyond), none (exact only), hnsw, ivfpq, or a FAISS index-factory string "
        "[default: auto; with --update: as the index was built].",
    ),
]
ExactOpt = Annotated[
    bool, typer.Option("--exact", help="Exact search even if the index has a FAISS index.")
]
NprobeOpt = Annotated[
    int | None,
    typer.Option(
        "--nprobe",
        min=1,
        help=f"IVF lists visited per query (IVF indexes; default {_opt.DEFAULT_NPROBE}).",
    ),
]
EfOpt = Annotated[
    int | None,
    typer.Option(
        "--ef", min=1, help=f"HNSW search breadth (HNSW indexes; default {_opt.DEFAULT_EF})."
    ),
]
WhereOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--where",
        callback=_check_where,
        help="Catalogue filter, repeatable (all must hold): COLUMN=VALUE, COLUMN!=VALUE, "
        "COLUMN<N (<=, >, >=) or 'COLUMN in A,B'; e.g. --where category=Dresses "
        "--where 'price<=50'.",
    ),
]
RestrictOpt = Annotated[
    _choice(_opt.RESTRICT_MODES),
    typer.Option(
        "--restrict",
        help="auto: search within each query's category, predicted from its nearest "
        "catalogue neighbours (needs a catalogue 'category' column).",
    ),
]
NoPageOpt = Annotated[bool, typer.Option("--no-page", help="Skip index.html.")]
NoPlotOpt = Annotated[bool, typer.Option("--no-plot", help="Skip the grid PNGs.")]
IndexDirOpt = Annotated[Path, typer.Option("--index", help="Index folder.")]
QueryKOpt = Annotated[int, typer.Option("-k", "--k", min=1, help="Neighbours per query.")]
CropOpt = Annotated[
    _choice(_opt.CROPS),
    typer.Option("--crop", help="gt: crop to the ground-truth box; none: whole image."),
]


# --- index, features, map, query, demo ---

IndexOutOpt = Annotated[Path, typer.Option("--out", "-o", help="Index folder to write.")]
UpdateOpt = Annotated[bool, typer.Option("--update", help="Re-embed only new or changed files.")]
IndexStrictOpt = Annotated[
    bool, typer.Option("--strict", help="Exit 1, writing nothing, if any file cannot be read.")
]
CatalogOpt = Annotated[
    Path | None,
    typer.Option(
        "--catalog",
        exists=True,
        dir_okay=False,
        help="Product catalogue (.csv or .parquet): image, product_id, title, price, "
        "url, category, ... joined on the image path relative to GALLERY.",
    ),
]
CatalogImageColumnOpt = Annotated[
    str, typer.Option("--catalog-image-column", help="The catalogue's image column.")
]
ShardRowsOpt = Annotated[
    int | None,
    typer.Option(
        "--shard-rows",
        min=1,
        help=f"Rows per feature shard [default: {_opt.DEFAULT_SHARD_ROWS:,}; with --update the "
        "index's].",
    ),
]
EngineOpt = Annotated[
    _choice(_opt.ENGINES),
    typer.Option("--engine", help="local (this process) or ray (Ray Data actor pool)."),
]
AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="Ray cluster to join (from `ray start --head`, or auto); default: start a "
        "local one. With --engine ray.",
    ),
]
WorkersOpt = Annotated[
    int | None,
    typer.Option("--workers", min=1, help="Ray actors (one model each); default: all CPUs."),
]
CpusPerWorkerOpt = Annotated[
    float, typer.Option("--cpus-per-worker", min=0.01, help="CPUs per Ray actor.")
]
GpusPerWorkerOpt = Annotated[
    float, typer.Option("--gpus-per-worker", min=0.0, help="GPUs per Ray actor.")
]


@app.command("index")
def index_cmd(
    gallery: Annotated[
        Path, typer.Argument(help="Folder of gallery images (searched recursively).")
    ],
    out: IndexOutOpt = _opt.DEFAULT_INDEX_DIR,
    backbone: IndexBackboneOpt = None,
    weights: IndexWeightsOpt = None,
    batch_size: BatchOpt = _opt.DEFAULT_BATCH_SIZE,
    update: UpdateOpt = False,
    strict: IndexStrictOpt = False,
    seed: IndexSeedOpt = None,
    runtime: RuntimeOpt = _opt.DEFAULT_RUNTIME,
    precision: IndexPrecisionOpt = None,
    pooling: IndexPoolingOpt = None,
    gem_p: IndexGemPOpt = None,
    tta: IndexTtaOpt = None,
    whiten: IndexWhitenOpt = None,
    dba: IndexDbaOpt = None,
    refit: RefitOpt = False,
    head: HeadOpt = None,
    ann: AnnOpt = None,
    catalog: CatalogOpt = None,
    catalog_image_column: CatalogImageColumnOpt = _opt.DEFAULT_IMAGE_COLUMN,
    shard_rows: ShardRowsOpt = None,
    engine: EngineOpt = _opt.DEFAULT_ENGINE,
    address: AddressOpt = None,
    workers: WorkersOpt = None,
    cpus_per_worker: CpusPerWorkerOpt = _opt.DEFAULT_CPUS_PER_WORKER,
    gpus_per_worker: GpusPerWorkerOpt = _opt.DEFAULT_GPUS_PER_WORKER,
    quiet: QuietOpt = False,
) -> None:
    """Embed a gallery folder into a cosine k-NN index (meta.json + features/ shards)."""
    ray = _opt.RayOptions(address, workers, cpus_per_worker, gpus_per_worker)
    _check_engine(engine, ray)
    with _progress("Indexing", quiet=quiet) as (on_start, on_progress):
        summary = _indexing.index_gallery(
            gallery,
            out,
            backbone=backbone,
            weights=weights,
            seed=seed,
            precision=precision,
            pooling=pooling,
            gem_p=gem_p,
            tta=tta,
            runtime=runtime,
            batch_size=batch_size,
            update=update,
            strict=strict,
            whiten=whiten,
            dba=dba,
            refit=refit,
            head=_load_head(head),
            ann=ann,
            catalog=catalog,
            catalog_image_column=catalog_image_column,
            shard_rows=shard_rows,
            engine=engine,
            ray=ray,
            on_start=on_start,
            on_progress=on_progress,
        )
    _print_index(summary, strict=strict)


def _print_index(summary: Any, *, strict: bool) -> None:
    kept = f", {summary.shards_kept} kept" if summary.shards_kept else ""
    typer.echo(
        f"Indexed {_plural(summary.n_indexed, 'image')} into {summary.out} "
        f"({summary.n_embedded} embedded, {summary.images_per_second:.1f} img/s"
        f"{f', {summary.n_resumed} resumed from the checkpoint' if summary.n_resumed else ''}); "
        f"{_plural(summary.shards_written, 'shard')} written{kept}."
    )
    if summary.ann and summary.ann.get("kind") != "exact":
        _console().print(
            f"Approximate search: {summary.ann['factory']} ({summary.ann['bytes']:,} bytes, "
            f"built in {summary.ann['build_seconds']:.1f} s)."
        )
    if summary.catalog:
        c = summary.catalog
        _console().print(
            f"Catalogue: {c['products']} products in {c['rows']} rows; "
            f"{c['gallery_matched']} gallery images matched, {c['gallery_without_product']} "
            f"without a product, {c['catalog_without_image']} catalogue rows without an image."
        )
    _report_skipped(summary.skipped, summary.out / "skipped.csv", strict)


@app.command("features")
def features_cmd(
    images: Annotated[Path, typer.Argument(help="Image or folder of images.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Feature matrix to write (.npy).")
    ] = _opt.DEFAULT_FEATURES_FILE,
    backbone: BackboneOpt = _opt.DEFAULT_BACKBONE,
    weights: WeightsOpt = _opt.DEFAULT_WEIGHTS,
    batch_size: BatchOpt = _opt.DEFAULT_BATCH_SIZE,
    seed: Annotated[
        int, typer.Option("--seed", min=0, help="Seed for --weights random.")
    ] = _opt.DEFAULT_SEED,
    runtime: RuntimeOpt = _opt.DEFAULT_RUNTIME,
    precision: PrecisionOpt = _opt.DEFAULT_PRECISION,
    quiet: QuietOpt = False,
) -> None:
    """Write raw (not normalised) features and a manifest for scripting."""
    with _progress("Embedding", quiet=quiet) as (on_start, on_progress):
        result = _features.write_features(
            images,
            output,
            backbone=backbone,
            weights=weights,
            seed=seed,
            batch_size=batch_size,
            runtime=runtime,
            precision=precision,
            on_start=on_start,
            on_progress=on_progress,
        )
    typer.echo(f"Wrote {result.features_path} {result.shape} and {result.manifest_path}.")
    _report_skipped(result.skipped, None, False)


@app.command("map")
def map_cmd(
    index: Annotated[
        Path, typer.Argument(help="Index folder (from `snaplook index`).")
    ] = _opt.DEFAULT_INDEX_DIR,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="PNG to write [default: output/maps/<index>_tsne.png]."),
    ] = None,
    max_images: Annotated[
        int, typer.Option("--max-images", min=2, help="Draw a seeded sample of at most N images.")
    ] = _opt.DEFAULT_MAP_IMAGES,
    seed: Annotated[
        int, typer.Option("--seed", min=0, help="Seeds the sample and t-SNE.")
    ] = _opt.DEFAULT_SEED,
    thumb_size: Annotated[
        int, typer.Option("--thumb-size", min=8, max=256, help="Thumbnail side in pixels.")
    ] = _opt.DEFAULT_MAP_THUMB_SIZE,
) -> None:
    """Draw the gallery of an index as a t-SNE map of thumbnails (similar images close)."""
    written = _results.map_index(
        index, out, max_images=max_images, seed=seed, thumb_size=thumb_size
    )
    typer.echo(f"Wrote the t-SNE map of {index} to {written}.")


@app.command("query")
def query_cmd(
    queries: Annotated[Path, typer.Argument(help="Query image or folder of query images.")],
    k: QueryKOpt = _opt.DEFAULT_K,
    index: IndexDirOpt = _opt.DEFAULT_INDEX_DIR,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Results folder, replaced whole: new, empty or an earlier one "
            "[default: output/<backbone>].",
        ),
    ] = None,
    backbone: Annotated[
        _choice(_opt.BACKBONE_NAMES) | None,
        typer.Option("--backbone", help="Must match the index's backbone if given."),
    ] = None,
    no_plot: NoPlotOpt = False,
    batch_size: BatchOpt = _opt.DEFAULT_BATCH_SIZE,
    runtime: RuntimeOpt = _opt.DEFAULT_RUNTIME,
    precision: QueryPrecisionOpt = None,
    head: HeadOpt = None,
    where: WhereOpt = None,
    restrict: RestrictOpt = _opt.DEFAULT_RESTRICT,
    no_page: NoPageOpt = False,
    exact: ExactOpt = False,
    nprobe: NprobeOpt = None,
    ef: EfOpt = None,
    qe: Annotated[
        int,
        typer.Option(
            "--qe", min=0, help="alpha-query expansion: add the K nearest gallery images first."
        ),
    ] = _opt.DEFAULT_QE,
    quiet: QuietOpt = False,
) -> None:
    """Find the k nearest gallery images of each query; grids, results.csv/.json, index.html.

    The results folder is replaced whole when the run succeeds; it must be new, empty or
    an earlier results folder (with results.csv).
    """
    loaded = _index.load_index(index, ann=not exact)
    out = out or _opt.DEFAULT_OUTPUT_ROOT / str(loaded.meta.get("backbone"))
    _results.check_results_dir(out)  # before any query is embedded
    with _progress("Querying", quiet=quiet) as (on_start, on_progress):
        summary = _index.query_index(
            queries,
            loaded,
            k=k,
            backbone=backbone,
            batch_size=batch_size,
            embedder=loaded.embedder(runtime=runtime, precision=precision, head=_load_head(head)),
            exact=exact,
            nprobe=nprobe,
            ef=ef,
            where=where,
            restrict=restrict,
            qe=qe,
            on_start=on_start,
            on_progress=on_progress,
        )
    _write_results(summary, loaded, out, plot=not no_plot, page=not no_page, quiet=quiet)
    _print_results(summary, quiet=quiet)
    _report_skipped(summary.skipped, summary.out / "skipped.csv", False)
    _random_weights_notice(loaded.meta, "these neighbours")


def _write_results(
    summary: Any, loaded: Any, out: Path | None, *, plot: bool, page: bool, quiet: bool
) -> None:
    out = out or _opt.DEFAULT_OUTPUT_ROOT / str(loaded.meta.get("backbone"))
    note = " · random weights" if _features.is_random_weights(loaded.meta) else ""
    view = _results.query_page(summary, index=loaded)
    # Into the same temporary folder as the results: the page is swapped in with them.
    write_page = (lambda folder: _page.write_query_page(view, folder)) if page else None
    with _progress("Drawing grids", quiet=quiet, unit="grid") as (on_start, on_progress):
        on_start(len(summary.results))
        _results.write_query_results(
            summary,
            out,
            index=loaded,
            plot=plot,
            title_note=note,
            write_page=write_page,
            on_progress=on_progress,
        )


def _print_results(summary: Any, *, quiet: bool = False, final: bool = True) -> None:
    from snaplook.plot_utils import format_distances

    shown = min(3, summary.k)
    title = f"Top {summary.k} per query"
    if shown < summary.k:
        title = f"Nearest {shown} of the top {summary.k} per query (all in results.csv)"
    rows = []
    for result in summary.results[:20]:
        labels = format_distances([h.distance for h in result.hits])
        for hit, label in zip(result.hits[:shown], labels):
            rows.append([result.query.name, str(hit.rank), hit.path.name, label])
    _print_table(title, ["query", "rank", "gallery image", "distance"], rows,
                 right=[False, True, False, True], quiet=quiet)  # fmt: skip
    if len(summary.results) > 20:
        _say(f"... and {len(summary.results) - 20} more queries.", quiet=quiet)
    short = sum(1 for r in summary.results if len(r.hits) < summary.k)
    if short:
        if summary.n_allowed is not None:
            why = f"only {summary.n_allowed} gallery images match the --where filters"
        elif summary.restrict != "none":
            why = f"--restrict {summary.restrict} searched only their predicted category"
        else:
            why = "the approximate search found fewer candidates (pass --exact for all)"
        _err(
            f"{short} of {len(summary.results)} queries have fewer than {summary.k} results: {why}."
        )
    if not final:
        return
    grids = f", {_plural(len(summary.grids), 'grid')}" if summary.grids else ""
    page = ", index.html" if summary.page else ""
    typer.echo(
        f"Wrote {summary.out / 'results.csv'} (all results), results.json{grids}{page} in "
        f"{summary.out}."
    )


@app.command("demo")
def demo_cmd(
    data: Annotated[
        Path, typer.Option("--data", help="Folder with train/ and test/.")
    ] = _opt.DEFAULT_DEMO_DATA,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output root.")
    ] = _opt.DEFAULT_OUTPUT_ROOT,
    k: QueryKOpt = _opt.DEFAULT_K,
    quiet: QuietOpt = False,
) -> None:
    """Index data/train, query data/test with k=5 and say where the grids are."""
    with _stage_progress(quiet=quiet) as (on_stage, on_progress):
        demo = _look.run_demo(
            data, out, k=k, on_notice=_err, on_stage=on_stage, on_progress=on_progress
        )
    _print_results(demo.queries, quiet=quiet, final=False)
    typer.echo(
        f"Demo done: {_plural(demo.built.n_indexed, 'gallery image')} indexed in "
        f"{demo.built.out}; {_plural(len(demo.queries.grids), 'retrieval grid')} and "
        f"results.csv in {demo.queries.out}."
    )


# --- extract (issue 3) ---


@app.command("extract")
def extract_cmd(
    video: Annotated[Path, typer.Argument(help="Video file, or a folder of videos.")],
    every: Annotated[
        float,
        typer.Option(
            "--every",
            min=0.0,
            help="Seconds between interval frames; 0 with --scenes: scenes only.",
        ),
    ] = _opt.DEFAULT_EXTRACT_EVERY,
    scenes: Annotated[
        bool, typer.Option("--scenes", help="Also keep the sharpest frame of each scene.")
    ] = False,
    scene_threshold: Annotated[
        float,
        typer.Option(
            "--scene-threshold",
            min=0.01,
            max=1.0,
            help="Smallest colour-histogram distance (0-1) between frames that is a cut.",
        ),
    ] = _opt.DEFAULT_SCENE_THRESHOLD,
    max_frames: Annotated[
        int | None, typer.Option("--max-frames", min=1, help="Stop after N kept frames per video.")
    ] = None,
    dedup: Annotated[
        int | None,
        typer.Option(
            "--dedup",
            min=0,
            max=64,
            help="Drop a frame within THRESHOLD dHash bits (of 64) of the last kept one, "
            f"colours alike (try {_opt.DEFAULT_DEDUP}).",
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Root folder; frames go in <out>/<video-stem>/.")
    ] = _opt.DEFAULT_FRAMES_ROOT,
    image_format: Annotated[
        _choice(_opt.IMAGE_FORMATS), typer.Option("--format", help="Frame image format.")
    ] = _opt.DEFAULT_FORMAT,
    quality: Annotated[
        int, typer.Option("--quality", min=1, max=100, help="JPEG quality.")
    ] = _opt.DEFAULT_QUALITY,
    quiet: QuietOpt = False,
) -> None:
    """Extract frames at an interval and/or on scene changes, with frame numbers and times."""
    if every == 0 and not scenes:
        raise typer.BadParameter(
            "0 needs --scenes (scene frames only); otherwise give seconds > 0.",
            param_hint="'--every'",
        )
    with _progress("Extracting", quiet=quiet, unit="s") as (on_start, on_progress):
        results = _video.extract_videos(
            video,
            out_root=out,
            every=every,
            scenes=scenes,
            scene_threshold=scene_threshold,
            max_frames=max_frames,
            dedup=dedup,
            image_format=image_format,
            quality=quality,
            on_start=on_start,
            on_progress=on_progress,
        )
    _print_extraction(results, out, quiet=quiet)


def _print_extraction(results: list[Any], out: Path, *, quiet: bool) -> None:
    done = [r for r in results if not r.error]
    for r in done:
        line = (
            f"{r.video.name}: kept {len(r.frames)} of {r.n_decoded} frames "
            f"({r.duration_s:.1f} s of video, {r.frames_per_second:.0f} frames/s) "
            f"in {r.out}/ with {_video.FRAMES_CSV}."
        )
        if len(results) == 1:
            typer.echo(line)
        else:
            _say(line, quiet=quiet)
    if len(results) > 1:
        typer.echo(
            f"Extracted {_plural(sum(len(r.frames) for r in done), 'frame')} from "
            f"{len(done)} of {_plural(len(results), 'video')} into {out}/."
        )
    # Each failed video was logged once as a warning with its reason; this is the tally.
    skipped = [r for r in results if r.error]
    _report_skipped(skipped, out / _video.SKIPPED_CSV, False)


# --- crop, look (issue 4) ---

MaxArtistsOpt = Annotated[
    int,
    typer.Option(
        "--max-artists", min=1, help="Lead artists to keep (per photo for unrelated photos)."
    ),
]
MinSizeOpt = Annotated[
    float,
    typer.Option(
        "--min-size",
        min=0.0,
        max=0.99,
        help="Ignore people shorter than this fraction of the frame.",
    ),
]
ClothesOpt = Annotated[
    bool,
    typer.Option(
        "--clothes/--no-clothes", help="Also cut out the clothes and upper/lower garment crops."
    ),
]
DetectorOpt = Annotated[
    str,
    typer.Option(
        "--detector",
        callback=_check_detector,
        help="auto (nanodet when fetched, else ssdlite when fetched, else hog), nanodet "
        "(`snaplook models fetch nanodet`), ssdlite (`snaplook models fetch ssdlite`), hog "
        "(OpenCV HOG + Haar, needs nothing) or a YOLO-style .onnx file.",
    ),
]


@app.command("crop")
def crop_cmd(
    frames: Annotated[
        Path,
        typer.Argument(
            exists=True, help="Frames folder from `snaplook extract`, or a folder of images."
        ),
    ],
    max_artists: MaxArtistsOpt = _opt.DEFAULT_MAX_ARTISTS,
    min_size: MinSizeOpt = _opt.DEFAULT_MIN_SIZE,
    clothes: ClothesOpt = True,
    detector: DetectorOpt = _opt.DEFAULT_DETECTOR,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Folder to write [default: output/lead_artist/<name>]."),
    ] = None,
    as_video: Annotated[
        bool,
        typer.Option(
            "--as-video",
            help="Take a folder without frames.csv as the frames of one video (people followed "
            "across them) instead of unrelated photos.",
        ),
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Find the lead artists in frames; save their best crops, clothes and artists.csv."""
    with _progress("Detecting", quiet=quiet, unit="frame") as (on_start, on_progress):
        summary = _artists.crop_artists(
            frames,
            out=out,
            max_artists=max_artists,
            min_size=min_size,
            clothes=clothes,
            detector=detector,
            photos=False if as_video else None,
            on_start=on_start,
            on_progress=on_progress,
        )
    _print_artists(summary.selection, summary.rows, summary.out, quiet=quiet)
    _report_skipped(summary.skipped, summary.out / "skipped.csv", False)


def _print_artists(
    selection: Any, rows: list[Any], out: Path, *, quiet: bool = False, final: bool = True
) -> None:
    frames = len(selection.frames)
    if not selection.artists:
        (typer.echo if final else _say)(
            f"No people found in {frames} frame(s); wrote empty artists.csv and "
            f"detections.csv in {out}."
        )
        return
    table = [
        [
            str(a.artist),
            f"{a.score:.3f}",
            f"{a.screen_time:.0%}",
            f"{a.size:.2f}",
            str(len(a.frames)),
            str(sum(1 for r in rows if r.artist == a.artist)),
        ]
        for a in selection.artists
    ]
    _print_table(
        f"Lead artists ({selection.n_frames_with_people}/{frames} frames with people)",
        ["artist", "score", "screen time", "size", "frames", "crops"],
        table,
        right=[True] * 6,
        quiet=quiet,
    )
    _say(
        "score: lead score = screen time x size x centrality (higher is more of a lead); "
        "screen time: share of the frames the artist is in; size: mean person height as a "
        "fraction of the frame height.",
        quiet=quiet,
    )
    if final:
        typer.echo(f"Wrote {_plural(len(rows), 'crop')} in {out}; listed in {out / 'artists.csv'}.")


@app.command("look")
def look_cmd(
    video: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Video file.")],
    k: Annotated[
        int, typer.Option("-k", "--k", min=1, help="Neighbours per crop.")
    ] = _opt.DEFAULT_K,
    index: IndexDirOpt = _opt.DEFAULT_INDEX_DIR,
    every: Annotated[
        float, typer.Option("--every", min=0.001, help="Seconds between examined frames.")
    ] = _opt.DEFAULT_LOOK_EVERY,
    max_frames: Annotated[
        int | None, typer.Option("--max-frames", min=1, help="Stop after N frames.")
    ] = None,
    max_artists: MaxArtistsOpt = _opt.DEFAULT_MAX_ARTISTS,
    min_size: MinSizeOpt = _opt.DEFAULT_MIN_SIZE,
    clothes: ClothesOpt = True,
    detector: DetectorOpt = _opt.DEFAULT_DETECTOR,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Results folder [default: output/looks/<video-stem>]."),
    ] = None,
    crops_out: Annotated[
        Path | None, typer.Option("--crops-out", help="Crops folder [default: <out>/crops].")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the crops already in --crops-out.")
    ] = False,
    no_plot: NoPlotOpt = False,
    runtime: RuntimeOpt = _opt.DEFAULT_RUNTIME,
    precision: QueryPrecisionOpt = None,
    head: HeadOpt = None,
    exact: ExactOpt = False,
    nprobe: NprobeOpt = None,
    ef: EfOpt = None,
    where: WhereOpt = None,
    restrict: RestrictOpt = _opt.DEFAULT_RESTRICT,
    no_page: NoPageOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Shop the look of a video: frames -> lead artists -> clothes -> k nearest products."""
    with _progress("Looking", quiet=quiet, unit="s") as (on_start, on_progress):
        summary = _look.look(
            video,
            index=index,
            k=k,
            out=out,
            crops_out=crops_out,
            every=every,
            max_frames=max_frames,
            max_artists=max_artists,
            min_size=min_size,
            clothes=clothes,
            detector=detector,
            plot=not no_plot,
            head=_load_head(head),
            runtime=runtime,
            precision=precision,
            exact=exact,
            nprobe=nprobe,
            ef=ef,
            overwrite=overwrite,
            where=where,
            restrict=restrict,
            page=not no_page,
            on_start=on_start,
            on_progress=on_progress,
        )
    _print_look(summary, quiet=quiet)


def _print_look(summary: Any, *, quiet: bool) -> None:
    _print_artists(summary.selection, summary.crops, summary.crops_out, quiet=quiet, final=False)
    if summary.crops:
        typer.echo(
            f"Queried {_plural(len(summary.crops), 'crop')} (k={summary.k}) in "
            f"{summary.seconds:.1f} s: looks.csv, looks_fused.csv, "
            f"{_plural(len(summary.grids), 'grid')}"
            f"{' and index.html' if summary.page else ''} in {summary.out}."
        )
    else:
        typer.echo(f"Nothing to query; wrote empty looks.csv and looks_fused.csv in {summary.out}.")
    _report_skipped(summary.skipped, summary.out / "skipped.csv", False)


# --- evaluate (issue 5) ---

EvalRootOpt = Annotated[
    Path,
    typer.Argument(
        exists=True,
        file_okay=False,
        help="Dataset root (In-shop / Consumer-to-shop "
        "benchmark folder, or ROOT/<label>/<images> for folders).",
    ),
]
EvalProtocolOpt = Annotated[
    _choice(_opt.PROTOCOLS),
    typer.Option("--protocol", help="inshop, consumer2shop or folders (leave-one-out)."),
]
EvalPartitionOpt = Annotated[
    Path | None,
    typer.Option(
        "--partition",
        dir_okay=False,
        help="list_eval_partition.txt (default: found in ROOT or ROOT/Eval).",
    ),
]
EvalBboxOpt = Annotated[
    Path | None,
    typer.Option(
        "--bbox",
        dir_okay=False,
        help="Box file (default with --crop gt: list_bbox_<protocol>.txt in ROOT or ROOT/Anno).",
    ),
]
EvalBackbonesOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--backbone",
        callback=_each_in(_opt.BACKBONE_NAMES),
        metavar="NAME[,NAME...]",
        help="Backbone(s); repeat or comma-separate to compare "
        f"(default: {_opt.DEFAULT_BACKBONE}).",
    ),
]
PoolingsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--pooling",
        callback=_each_in(_opt.POOLINGS),
        metavar="avg|max|gem[,...]",
        help="avg, max and/or gem (GeM, p=3); repeat to compare (default: the backbone's: "
        "gem for efficientnet_lite0, else avg).",
    ),
]
TtasOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--tta",
        callback=_each_in(_opt.TTAS),
        metavar="none|flip[,...]",
        help="Test-time augmentation: none, flip (image and mirror image averaged); repeat "
        "to compare (default: none).",
    ),
]
NormsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--norm",
        callback=_each_in(_opt.NORMALIZATIONS),
        metavar="l2|centered|none[,...]",
        help="l2 (cosine), centered, none (Euclidean); repeat to compare (default: l2).",
    ),
]
WhitenOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--whiten",
        metavar="none|pca|pca:DIM[,...]",
        help="PCA-whitening fitted on the gallery: pca (at most one dimension per 3 "
        "gallery images), pca:DIM, none; repeat to compare (default: none).",
    ),
]
QeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--qe",
        metavar="K[,...]",
        help="alpha-query expansion with K gallery neighbours (0: none); repeat to compare.",
    ),
]
DbaOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--dba",
        metavar="K[,...]",
        help="alpha-database-side augmentation with K neighbours (0: none); repeat to compare.",
    ),
]
KsOpt = Annotated[
    str,
    typer.Option(
        "--k", callback=_usage(_metrics.parse_ks), help="Recall@K cut-offs, comma-separated."
    ),
]
TiesOpt = Annotated[
    _choice(_opt.TIE_RULES),
    typer.Option("--ties", help="pessimistic (a tie never helps) or gallery-order."),
]
EvalOutOpt = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="Report folder (default: output/eval/<root>-<protocol>)."),
]
SubsetOpt = Annotated[
    _choice(_opt.C2S_SUBSETS),
    typer.Option("--subset", help="Consumer-to-shop split evaluated: test or val."),
]
ExamplesOpt = Annotated[
    int, typer.Option("--examples", min=0, help="Queries in the worst and random grids.")
]
EvalCacheOpt = Annotated[Path, typer.Option("--cache-dir", help="Feature cache folder.")]
EvalStrictOpt = Annotated[
    bool, typer.Option("--strict", help="Exit 1 if a listed image is missing or unreadable.")
]
EvalSeedOpt = Annotated[
    int, typer.Option("--seed", min=0, help="Seed for --weights random and the random grid.")
]


@app.command("evaluate")
def evaluate_cmd(
    root: EvalRootOpt,
    protocol: EvalProtocolOpt = _opt.DEFAULT_PROTOCOL,
    partition: EvalPartitionOpt = None,
    bbox: EvalBboxOpt = None,
    crop: CropOpt = _opt.DEFAULT_CROP,
    backbone: EvalBackbonesOpt = None,
    weights: WeightsOpt = _opt.DEFAULT_WEIGHTS,
    pooling: PoolingsOpt = None,
    tta: TtasOpt = None,
    norm: NormsOpt = None,
    whiten: WhitenOpt = None,
    qe: QeOpt = None,
    dba: DbaOpt = None,
    k: KsOpt = ",".join(map(str, _opt.DEFAULT_KS)),
    ties: TiesOpt = _opt.DEFAULT_TIES,
    out: EvalOutOpt = None,
    subset: SubsetOpt = _opt.DEFAULT_C2S_SUBSET,
    examples: ExamplesOpt = _opt.DEFAULT_N_EXAMPLES,
    cache_dir: EvalCacheOpt = _opt.DEFAULT_CACHE_DIR,
    strict: EvalStrictOpt = False,
    seed: EvalSeedOpt = _opt.DEFAULT_SEED,
    batch_size: BatchOpt = _opt.DEFAULT_BATCH_SIZE,
    runtime: RuntimeOpt = _opt.DEFAULT_RUNTIME,
    precision: PrecisionOpt = _opt.DEFAULT_PRECISION,
    head: HeadOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Score retrieval on DeepFashion In-shop, Consumer-to-shop or labelled folders.

    Writes report.json, per_query.csv, figures and report.md; several settings: compare.md.
    """
    ks = _metrics.parse_ks(k)
    posts = _postprocess.postprocessing_grid(
        _split_values(whiten), _split_values(qe), _split_values(dba)
    )
    with _stage_progress(quiet=quiet) as (on_stage, on_progress):
        result = _evaluate.evaluate_settings(
            root,
            protocol=protocol,
            partition=partition,
            bbox=bbox,
            crop=crop,
            backbones=_split_values(backbone),
            weights=weights,
            poolings=_split_values(pooling),
            ttas=_split_values(tta),
            normalizations=_split_values(norm),
            postprocessings=posts,
            ks=ks,
            ties=ties,
            out=out,
            strict=strict,
            subset=subset,
            seed=seed,
            batch_size=batch_size,
            cache_dir=cache_dir,
            n_examples=examples,
            head=_load_head(head),
            runtime=runtime,
            precision=precision,
            on_stage=on_stage,
            on_progress=on_progress,
        )
    _print_evaluation(result, ks, quiet=quiet)


def _print_evaluation(result: Any, ks: tuple[int, ...], *, quiet: bool = False) -> None:
    rows = []
    for report in result.reports:
        m = report.metrics
        cells = [m["recall_at_k"][k] for k in ks] + [m["map"], m["map_at_r"]]
        rows.append(
            [
                report.config["setting"],
                str(report.counts["queries_evaluated"]),
                *("n/a" if v is None else f"{100 * v:.2f}" for v in cells),
            ]
        )
    headers = ["setting", "queries", *(f"R@{k}" for k in ks), "mAP", "MAP@R"]
    _print_table("Retrieval (Recall@K = hit rate, %)", headers, rows,
                 right=[False] + [True] * (len(headers) - 1), quiet=quiet)  # fmt: skip
    _say(_evaluation_notes(result.reports[0]), quiet=quiet)
    if _features.is_random_weights(result.reports[0].config):
        _err("Random weights: these numbers test the pipeline, not retrieval quality.")
    if result.files:
        typer.echo(
            f"Wrote compare.md, compare.json and one report per setting (per_query.csv per "
            f"query) in {result.out}."
        )
    else:
        typer.echo(
            f"Wrote report.md, report.json, figures and {result.reports[0].files['per_query_csv']}"
            " (per query)."
        )


def _evaluation_notes(report: Any) -> str:
    counts = report.counts
    notes = [
        f"{counts['missing_images']} listed image(s) missing",
        f"{counts['unreadable_query_images'] + counts['unreadable_gallery_images']} unreadable",
        f"{counts['queries_without_gallery_match']} queries without a gallery match (excluded)",
    ]
    skipped_csv = report.files.get("skipped_csv")
    if skipped_csv:
        notes.append(f"skipped images listed in {skipped_csv}")
    return "; ".join(notes) + "."


# --- evaluate-detector (issue 23) ---


def _check_detectors(values: list[str] | None) -> list[str] | None:
    """Callback of ``--detector a,b``: each value a detector name or an existing .onnx."""
    for value in _split_values(values):
        _check_detector(value)
    return values


DetectorsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--detector",
        callback=_check_detectors,
        metavar="NAME[,NAME...]",
        help="Detector(s) to score, as `crop --detector` runs them: auto, nanodet, ssdlite, "
        "hog or a YOLO-style .onnx file; repeat or comma-separate to compare (default: auto).",
    ),
]


@app.command("evaluate-detector")
def evaluate_detector_cmd(
    root: Annotated[
        Path,
        typer.Argument(
            exists=True,
            file_okay=False,
            help="Folder of the labelled photos (unlabelled ones are left out).",
        ),
    ],
    boxes: Annotated[
        Path,
        typer.Option(
            "--boxes",
            exists=True,
            dir_okay=False,
            help="Labelled people: COCO JSON (category person; iscrowd: ignored region) or a "
            "CSV image,x,y,w,h[,ignore,note] (image relative to ROOT, box in pixels).",
        ),
    ],
    detector: DetectorsOpt = None,
    tall_px: Annotated[
        int, typer.Option("--tall-px", min=1, help="Recall of people taller than this (px).")
    ] = _opt.DEFAULT_TALL_PX,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Report folder (default: output/eval/<root>-detection)."),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Score person detectors on your labelled photos: AP@0.5, recall, false boxes per image.

    Writes report.json and report.md (found / labelled people per photo).
    """
    # Imported here: only this command needs it (its dataclasses cost --help ~10 ms).
    from snaplook.detect_eval import evaluate_detectors

    with _progress("Detecting", quiet=quiet) as (on_start, on_progress):
        result = evaluate_detectors(
            root,
            boxes=boxes,
            detectors=_split_values(detector) or [_opt.DEFAULT_DETECTOR],
            tall_px=tall_px,
            out=out,
            on_start=on_start,
            on_progress=on_progress,
        )
    _print_detector_scores(result, quiet=quiet)


def _print_detector_scores(result: Any, *, quiet: bool = False) -> None:
    from snaplook.detect_eval import format_score as fmt

    first = result.results[0].score
    rows = [
        [r.title, fmt(r.score.ap50), fmt(r.score.recall), fmt(r.score.recall_tall),
         fmt(r.score.false_per_image, 2), fmt(r.ms_per_image, 0)]
        for r in result.results
    ]  # fmt: skip
    tall = f"recall >{first.tall_px:g}px"
    headers = ["detector", "AP@0.5", "recall", tall, "false/img", "ms/img"]
    title = (
        f"Person detection ({first.images} images, {first.people} people, "
        f"{first.tall_people} taller than {first.tall_px:g} px; IoU >= 0.5)"
    )
    _print_table(title, headers, rows, right=[False] + [True] * 5, quiet=quiet)
    typer.echo(f"Wrote report.md and report.json (found / labelled per image) in {result.out}.")


# --- train (issue 8) ---

TrainProtocolOpt = Annotated[
    _choice(_opt.PROTOCOLS),
    typer.Option("--protocol", help="inshop, consumer2shop or folders."),
]
TrainPartitionOpt = Annotated[
    Path | None,
    typer.Option("--partition", exists=True, dir_okay=False, help="Partition file."),
]
TrainBboxOpt = Annotated[
    Path | None,
    typer.Option("--bbox", exists=True, dir_okay=False, help="Box file for --crop gt."),
]
LossOpt = Annotated[
    _choice(_opt.LOSSES), typer.Option("--loss", help="triplet (batch-hard) or proxy-anchor.")
]
DimOpt = Annotated[int, typer.Option("--dim", min=1, help="Embedding size.")]
HiddenOpt = Annotated[
    int, typer.Option("--hidden", min=0, help="Hidden ReLU layer width (0: none).")
]
EpochsOpt = Annotated[int, typer.Option("--epochs", min=1, help="Maximum epochs.")]
PKBatchOpt = Annotated[
    str,
    typer.Option("--batch", callback=_check_batch, help="P items x K images per batch, e.g. 16x4."),
]
LrOpt = Annotated[float, typer.Option("--lr", callback=_positive, help="Adam learning rate (> 0).")]
ValFractionOpt = Annotated[
    float,
    typer.Option(
        "--val-fraction", callback=_fraction, help="Share of training items held out, in [0, 1)."
    ),
]
PatienceOpt = Annotated[
    int, typer.Option("--patience", min=1, help="Stop after N epochs without a better R@1.")
]
TrainSeedOpt = Annotated[
    int, typer.Option("--seed", min=0, help="Seeds training and --weights random.")
]
HeadOutOpt = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="Head folder [default: output/heads/<name>]."),
]
TrainCacheOpt = Annotated[
    Path, typer.Option("--cache-dir", help="Feature cache (shared with evaluate).")
]


@app.command("train")
def train_cmd(
    root: Annotated[Path, typer.Argument(help="Dataset root (as for `snaplook evaluate`).")],
    protocol: TrainProtocolOpt = _opt.DEFAULT_PROTOCOL,
    partition: TrainPartitionOpt = None,
    bbox: TrainBboxOpt = None,
    crop: CropOpt = _opt.DEFAULT_CROP,
    loss: LossOpt = _opt.DEFAULT_LOSS,
    dim: DimOpt = _opt.DEFAULT_DIM,
    hidden: HiddenOpt = _opt.DEFAULT_HIDDEN,
    epochs: EpochsOpt = _opt.DEFAULT_EPOCHS,
    batch: PKBatchOpt = "{}x{}".format(*_opt.DEFAULT_BATCH),
    lr: LrOpt = _opt.DEFAULT_LR,
    val_fraction: ValFractionOpt = _opt.DEFAULT_VAL_FRACTION,
    patience: PatienceOpt = _opt.DEFAULT_PATIENCE,
    seed: TrainSeedOpt = _opt.DEFAULT_SEED,
    backbone: BackboneOpt = _opt.DEFAULT_BACKBONE,
    weights: WeightsOpt = _opt.DEFAULT_WEIGHTS,
    out: HeadOutOpt = None,
    cache_dir: TrainCacheOpt = _opt.DEFAULT_CACHE_DIR,
    batch_size: BatchOpt = _opt.DEFAULT_BATCH_SIZE,
    quiet: QuietOpt = False,
) -> None:
    """Train a small embedding head (triplet / Proxy-Anchor) on cached backbone features."""
    with _progress("Embedding train split", quiet=quiet) as (on_start, on_progress):
        summary = _train.train_head(
            root,
            protocol=protocol,
            partition=partition,
            bbox=bbox,
            crop=crop,
            backbone=backbone,
            weights=weights,
            loss=loss,
            dim=dim,
            hidden=hidden,
            epochs=epochs,
            batch=_train.parse_batch(batch),
            lr=lr,
            val_fraction=val_fraction,
            patience=patience,
            seed=seed,
            out=out,
            cache_dir=cache_dir,
            batch_size=batch_size,
            on_start=on_start,
            on_progress=on_progress,
            on_epoch=_epoch_printer(epochs, quiet=quiet),
        )
    _print_training(summary, quiet=quiet)


def _epoch_printer(epochs: int, *, quiet: bool) -> Callable[[Any], None]:
    def on_epoch(r: Any) -> None:
        if not _is_quiet(quiet):
            val = "n/a" if r.val_recall_at_1 is None else f"{100 * r.val_recall_at_1:.2f}%"
            best = "  *best" if r.best else ""
            typer.echo(
                f"epoch {r.epoch:3d}/{epochs}  loss {r.loss:.4f}  val R@1 {val}  "
                f"({r.seconds:.1f} s){best}"
            )

    return on_epoch


def _print_training(summary: Any, *, quiet: bool = False) -> None:
    """What was trained and written; an interrupted run then exits 130."""
    info = summary.head.info
    counts, val = info["counts"], info["val_metrics"]
    r1 = val["recall_at_1"]
    raw = val["raw_recall_at_1"]
    line = (
        f"Best epoch {info['best_epoch']} of {info['epochs_run']}"
        + (" (stopped early)" if info["stopped_early"] else "")
        + (
            f": val R@1 {100 * r1:.2f}% (raw features {100 * raw:.2f}%)"
            if r1 is not None and raw is not None
            else ""
        )
    )
    _say(line, quiet=quiet)
    _say(
        f"Trained on {counts['train_images']} images of {counts['train_items']} items, validated "
        f"on {counts['val_images']} images of {counts['val_items']} held-out items ("
        + (
            f"{summary.n_embedded} images embedded)."
            if summary.n_embedded
            else "all features from the cache)."
        ),
        quiet=quiet,
    )
    if _features.is_random_weights(summary.head.config.get("source") or {}):
        _err("Random weights: this head and its validation Recall@1 test the pipeline only.")
    typer.echo(
        f"Wrote head.weights.h5, head.json, training.csv and training.png in {summary.out} "
        f"(best epoch {info['best_epoch']})."
    )
    if summary.interrupted:
        _err(f"Interrupted: kept the best head so far in {summary.out}.")
        raise typer.Exit(130)


# --- snaplook models: downloaded detector weights (issue 23) ---------------------------------

models_app = typer.Typer(
    cls=_Group,
    help="Fetch, verify and list the downloaded models (NanoDet and SSDLite person detectors, "
    "BlazePose).",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(models_app, name="models")
ModelsDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        file_okay=False,
        help=f"Models folder [default: ${_models.CACHE_ENV}/models or ~/.cache/snaplook/models].",
    ),
]


def _check_model_names(value: list[str] | None) -> list[str] | None:
    for name in value or []:
        if name != "all" and name not in _models.MODELS:
            raise typer.BadParameter(f"{name!r} is not one of {', '.join(_models.MODELS)}, all.")
    return value


@models_app.command("fetch")
def models_fetch_cmd(
    names: Annotated[
        list[str] | None,
        typer.Argument(
            callback=_check_model_names,
            help=f"Models to fetch: {', '.join(_models.MODELS)} or all [default: all].",
        ),
    ] = None,
    source: Annotated[
        Path | None,
        typer.Option(
            "--from",
            exists=True,
            file_okay=False,
            help="Air-gapped: a folder with the npm tarball or pip wheel (or the files from "
            "it) to use instead of running npm / pip.",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Fetch and convert again.")] = False,
    cache_dir: ModelsDirOpt = None,
) -> None:
    """Get models with npm / pip, check their pinned SHA-256s, convert them to OpenVINO once."""
    wanted = list(_models.MODELS) if not names or "all" in names else list(dict.fromkeys(names))
    for name in wanted:
        status = _models.fetch_model(name, cache_dir=cache_dir, source_dir=source, force=force)
        typer.echo(f"{name}: {status.path} (from {status.source}, {status.fetched_at}).")


@models_app.command("list")
def models_list_cmd(cache_dir: ModelsDirOpt = None) -> None:
    """Show the known models and which are fetched."""
    rows = [
        [s.name, "yes" if s.fetched else "no", str(s.path), s.description, s.licence]
        for s in _models.list_models(cache_dir=cache_dir)
    ]
    _print_table(
        "Models",
        ["model", "fetched", "path", "what", "licence"],
        rows,
        right=[False] * 5,
    )
