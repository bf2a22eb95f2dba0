"""The `snaplook` command line: one command per step, a thin shell over the library.

Commands parse options, show progress, call one library function and print what was
written where. Heavy libraries load inside the commands, so `snaplook --help` is instant.
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
from snaplook import artists as _artists
from snaplook import evaluate as _evaluate
from snaplook import features as _features
from snaplook import index as _index
from snaplook import look as _look
from snaplook import video as _video
from snaplook.errors import SnaplookError

logger = logging.getLogger("snaplook")


class _Group(TyperGroup):
    """Turns `SnaplookError` into one line on stderr and exit 1, Ctrl-C into exit 130."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
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
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain (click) help: Typer's rich help imports rich.markdown, markdown-it and pygments,
    # which took --help from ~0.15 s to ~0.45 s (issue 6: --help within 0.3 s).
    rich_markup_mode=None,
)

_state: dict[str, bool] = {"quiet": False, "verbose": False}


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
        bool, typer.Option("--quiet", "-q", help="No progress bars; only warnings and errors.")
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

    level = logging.INFO if verbose else logging.ERROR if quiet else logging.WARNING
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


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False)


@contextlib.contextmanager
def _progress(
    description: str, *, quiet: bool = False, unit: str = "img"
) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """Yield (on_start(total), on_progress(done)) callbacks that drive a rich progress bar.

    Off with --quiet or when stdout is not a terminal (the callbacks then do nothing).
    """
    if quiet or _state["quiet"] or not sys.stdout.isatty():
        yield (lambda total: None), (lambda done: None)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    rate = TextColumn("{task.fields[rate]}")
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        rate,
        TimeRemainingColumn(),
        transient=False,
    ) as progress:
        task = progress.add_task(description, total=None, rate="")

        def on_start(total: int) -> None:
            progress.update(task, total=total)

        def on_progress(done: int) -> None:
            progress.update(task, completed=done)
            speed = progress.tasks[task].speed
            if speed:
                progress.update(task, rate=f"{speed:.1f} {unit}/s")

        yield on_start, on_progress


WeightsOpt = Annotated[
    str,
    typer.Option(
        "--weights",
        help="imagenet (Keras cache/download), random (seeded, for tests only) or a weights "
        "file path.",
    ),
]
BackboneOpt = Annotated[
    str, typer.Option("--backbone", help=f"One of: {', '.join(_features.BACKBONES)}.")
]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
RuntimeOpt = Annotated[
    Literal["auto", "openvino", "keras"],  # snaplook.features.RUNTIMES
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
    Literal["fp32", "bf16", "int8", "auto"],  # snaplook.features.PRECISIONS
    typer.Option("--precision", help=_PRECISION_HELP + " Recorded in the index."),
]
QueryPrecisionOpt = Annotated[
    Literal["fp32", "bf16", "int8", "auto"] | None,
    typer.Option(
        "--precision",
        help="Must be the index's precision [default: the index's]. " + _PRECISION_HELP,
        show_default=False,
    ),
]
HeadOpt = Annotated[
    Path | None,
    typer.Option(
        "--head",
        exists=True,
        help="A head folder from `snaplook train`: features go through it.",
    ),
]


def _report_skipped(skipped: list[Any], where: Path | None, strict: bool) -> None:
    if not skipped:
        return
    # Each skip was already logged as a warning line with its reason; this is the tally.
    target = f"; listed in {where}" if where else " (see the warnings above)"
    _err(f"Skipped {len(skipped)} unreadable file(s){target}.")
    if strict:
        _err("Error: --strict: failing because inputs were skipped.")
        raise typer.Exit(1)


@app.command("index")
def index_cmd(
    gallery: Annotated[
        Path, typer.Argument(help="Folder of gallery images (searched recursively).")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Index folder to write.")
    ] = _index.DEFAULT_INDEX_DIR,
    backbone: BackboneOpt = _features.DEFAULT_BACKBONE,
    weights: WeightsOpt = _features.DEFAULT_WEIGHTS,
    batch_size: BatchOpt = _features.DEFAULT_BATCH_SIZE,
    update: Annotated[
        bool, typer.Option("--update", help="Re-embed only new or changed files.")
    ] = False,
    strict: Annotated[
        bool, typer.Option("--strict", help="Exit 1 if any file is skipped.")
    ] = False,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed for --weights random.")
    ] = _features.DEFAULT_SEED,
    runtime: RuntimeOpt = _features.DEFAULT_RUNTIME,
    precision: PrecisionOpt = _features.DEFAULT_PRECISION,
    head: HeadOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Embed a gallery folder into a cosine k-NN index (features.npy, manifest.csv, meta.json)."""
    embedder = _features.Embedder(
        backbone, weights=weights, seed=seed, runtime=runtime, precision=precision
    )
    with _progress("Indexing", quiet=quiet) as (on_start, on_progress):
        summary = _index.build_index(
            gallery,
            out,
            embedder=embedder,
            head=_load_head(head),
            batch_size=batch_size,
            update=update,
            on_start=on_start,
            on_progress=on_progress,
        )
    _console().print(
        f"Indexed {summary.n_indexed} images into {summary.out} "
        f"({summary.n_embedded} embedded, {summary.images_per_second:.1f} img/s"
        f"{f', {summary.n_resumed} resumed from the checkpoint' if summary.n_resumed else ''})."
    )
    _report_skipped(summary.skipped, summary.out / "skipped.csv", strict)


@app.command("features")
def features_cmd(
    images: Annotated[Path, typer.Argument(help="Image or folder of images.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Feature matrix to write (.npy).")
    ] = Path("output/features.npy"),
    backbone: BackboneOpt = _features.DEFAULT_BACKBONE,
    weights: WeightsOpt = _features.DEFAULT_WEIGHTS,
    batch_size: BatchOpt = _features.DEFAULT_BATCH_SIZE,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed for --weights random.")
    ] = _features.DEFAULT_SEED,
    runtime: RuntimeOpt = _features.DEFAULT_RUNTIME,
    precision: PrecisionOpt = _features.DEFAULT_PRECISION,
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
    _console().print(f"Wrote {result.features_path} {result.shape} and {result.manifest_path}.")
    _report_skipped(result.skipped, None, False)


@app.command("query")
def query_cmd(
    queries: Annotated[Path, typer.Argument(help="Query image or folder of query images.")],
    k: Annotated[int, typer.Option("-k", "--k", help="Neighbours per query.")] = _index.DEFAULT_K,
    index: Annotated[
        Path, typer.Option("--index", help="Index folder.")
    ] = _index.DEFAULT_INDEX_DIR,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Results folder [default: output/<backbone>]."),
    ] = None,
    backbone: Annotated[
        str | None, typer.Option("--backbone", help="Must match the index's backbone if given.")
    ] = None,
    no_plot: Annotated[bool, typer.Option("--no-plot", help="Skip the grid PNGs.")] = False,
    batch_size: BatchOpt = _features.DEFAULT_BATCH_SIZE,
    runtime: RuntimeOpt = _features.DEFAULT_RUNTIME,
    precision: QueryPrecisionOpt = None,
    head: HeadOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Find the k nearest gallery images of each query; write grids, results.csv and .json."""
    loaded = _index.load_index(index)
    with _progress("Querying", quiet=quiet) as (on_start, on_progress):
        summary = _index.query_index(
            queries,
            loaded,
            k=k,
            backbone=backbone,
            batch_size=batch_size,
            embedder=loaded.embedder(runtime=runtime, precision=precision, head=_load_head(head)),
            on_start=on_start,
            on_progress=on_progress,
        )
    out = out or Path("output") / str(loaded.meta.get("backbone"))
    note = " · random weights" if loaded.meta.get("weights", {}).get("name") == "random" else ""
    with _progress("Drawing grids", quiet=quiet, unit="grid") as (on_start, on_progress):
        on_start(len(summary.results))
        _index.write_query_results(
            summary, out, index=loaded, plot=not no_plot, title_note=note, on_progress=on_progress
        )
    _print_results(summary)
    _report_skipped(summary.skipped, None, False)


def _print_results(summary: Any) -> None:
    from rich.table import Table

    shown = min(3, summary.k)
    title = f"Top {summary.k} per query"
    if shown < summary.k:
        title = f"Nearest {shown} of the top {summary.k} per query (all in results.csv)"
    table = Table(title=title, show_lines=False)
    table.add_column("query")
    table.add_column("rank", justify="right")
    table.add_column("gallery image")
    table.add_column("distance", justify="right")
    for result in summary.results[:20]:
        for hit in result.hits[:shown]:
            table.add_row(result.query.name, str(hit.rank), hit.path.name, f"{hit.distance:.4f}")
    console = _console()
    console.print(table)
    grids = f", {len(summary.grids)} grids" if summary.grids else ""
    console.print(f"Wrote {summary.out / 'results.csv'}, results.json{grids} in {summary.out}.")


@app.command("demo")
def demo_cmd(
    data: Annotated[Path, typer.Option("--data", help="Folder with train/ and test/.")] = Path(
        "data"
    ),
    out: Annotated[Path, typer.Option("--out", "-o", help="Output root.")] = Path("output"),
    k: Annotated[int, typer.Option("-k", "--k", help="Neighbours per query.")] = _index.DEFAULT_K,
    quiet: QuietOpt = False,
) -> None:
    """Index data/train, query data/test with k=5 and say where the grids are."""
    for sub in ("train", "test"):
        if not (data / sub).is_dir():
            raise SnaplookError(
                f"{data / sub} not found: run `snaplook demo` from the snaplook repository "
                "root, or pass --data DIR holding train/ and test/ image folders."
            )
    try:
        _features.fetch_imagenet_weights()
        weights = "imagenet"
    except SnaplookError:
        weights = "random"
        _err(
            "ImageNet weights are not cached and cannot be downloaded (offline): running on "
            "seeded random weights, which show the pipeline working, not retrieval quality."
        )
    index_dir = out / "index"
    with _progress("Indexing", quiet=quiet) as (on_start, on_progress):
        built = _index.build_index(
            data / "train", index_dir, weights=weights, on_start=on_start, on_progress=on_progress
        )
    loaded = _index.load_index(index_dir)
    with _progress("Querying", quiet=quiet) as (on_start, on_progress):
        summary = _index.query_index(
            data / "test", loaded, k=k, on_start=on_start, on_progress=on_progress
        )
    note = " · random weights" if weights == "random" else " · ImageNet weights"
    _index.write_query_results(
        summary, out / str(loaded.meta["backbone"]), index=loaded, title_note=note
    )
    _print_results(summary)
    _console().print(
        f"Demo done: {built.n_indexed} gallery images indexed in {index_dir}; "
        f"{len(summary.grids)} retrieval grids in {summary.out}."
    )


# --- extract (issue 3) ---


@app.command("extract")
def extract_cmd(
    video: Annotated[Path, typer.Argument(help="Video file, or a folder of videos.")],
    every: Annotated[
        float,
        typer.Option(
            "--every", help="Seconds between interval frames; 0 with --scenes: scenes only."
        ),
    ] = _video.DEFAULT_EVERY,
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
    ] = _video.DEFAULT_SCENE_THRESHOLD,
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
            f"colours alike (try {_video.DEFAULT_DEDUP}).",
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Root folder; frames go in <out>/<video-stem>/.")
    ] = _video.DEFAULT_OUT_ROOT,
    image_format: Annotated[
        str, typer.Option("--format", help=f"One of: {', '.join(_video.IMAGE_FORMATS)}.")
    ] = _video.DEFAULT_FORMAT,
    quality: Annotated[
        int, typer.Option("--quality", min=1, max=100, help="JPEG quality.")
    ] = _video.DEFAULT_QUALITY,
    quiet: QuietOpt = False,
) -> None:
    """Extract frames at an interval and/or on scene changes, with frame numbers and times."""
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
    console = _console()
    for r in results:
        if r.error:
            _err(f"Skipped {r.video}: {r.error}")
        else:
            console.print(
                f"{r.video.name}: kept {len(r.frames)} of {r.n_decoded} frames "
                f"({r.duration_s:.1f} s of video, {r.frames_per_second:.0f} frames/s) "
                f"in {r.out}/ with {_video.FRAMES_CSV}."
            )


# --- crop, look (issue 4) ---

MaxArtistsOpt = Annotated[int, typer.Option("--max-artists", min=1, help="Lead artists to keep.")]
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
        "--detector", help="builtin (OpenCV HOG + Haar, needs nothing) or a YOLO-style .onnx file."
    ),
]


def _print_artists(selection: Any, rows: list[Any], out: Path) -> None:
    console = _console()
    frames = len(selection.frames)
    if not selection.artists:
        console.print(
            f"No people found in {frames} frame(s); wrote empty artists.csv and "
            f"detections.csv in {out}."
        )
        return
    from rich.table import Table

    table = Table(
        title=f"Lead artists ({selection.n_frames_with_people}/{frames} frames with people)"
    )
    for col in ("artist", "score", "screen time", "size", "frames", "crops"):
        table.add_column(col, justify="right")
    for a in selection.artists:
        n_files = sum(1 for r in rows if r.artist == a.artist)
        table.add_row(
            str(a.artist),
            f"{a.score:.3f}",
            f"{a.screen_time:.0%}",
            f"{a.size:.2f}",
            str(len(a.frames)),
            str(n_files),
        )
    console.print(table)
    console.print(f"Wrote {len(rows)} crops and artists.csv in {out}.")


@app.command("crop")
def crop_cmd(
    frames: Annotated[
        Path,
        typer.Argument(
            exists=True, help="Frames folder from `snaplook extract`, or a folder of images."
        ),
    ],
    max_artists: MaxArtistsOpt = _artists.DEFAULT_MAX_ARTISTS,
    min_size: MinSizeOpt = _artists.DEFAULT_MIN_SIZE,
    clothes: ClothesOpt = True,
    detector: DetectorOpt = _artists.DEFAULT_DETECTOR,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Folder to write [default: output/lead_artist/<name>]."),
    ] = None,
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
            on_start=on_start,
            on_progress=on_progress,
        )
    _print_artists(summary.selection, summary.rows, summary.out)
    if summary.skipped:
        _err(f"Skipped {len(summary.skipped)} unreadable image(s).")


@app.command("look")
def look_cmd(
    video: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Video file.")],
    k: Annotated[int, typer.Option("-k", "--k", help="Neighbours per crop.")] = _index.DEFAULT_K,
    index: Annotated[
        Path, typer.Option("--index", help="Index folder.")
    ] = _index.DEFAULT_INDEX_DIR,
    every: Annotated[
        float, typer.Option("--every", min=0.001, help="Seconds between examined frames.")
    ] = _look.DEFAULT_EVERY,
    max_frames: Annotated[
        int | None, typer.Option("--max-frames", min=1, help="Stop after N frames.")
    ] = None,
    max_artists: MaxArtistsOpt = _artists.DEFAULT_MAX_ARTISTS,
    min_size: MinSizeOpt = _artists.DEFAULT_MIN_SIZE,
    clothes: ClothesOpt = True,
    detector: DetectorOpt = _artists.DEFAULT_DETECTOR,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Results folder [default: output/looks/<video-stem>]."),
    ] = None,
    crops_out: Annotated[
        Path | None,
        typer.Option(
            "--crops-out", help="Crops folder [default: output/lead_artist/<video-stem>]."
        ),
    ] = None,
    no_plot: Annotated[bool, typer.Option("--no-plot", help="Skip the grid PNGs.")] = False,
    runtime: RuntimeOpt = _features.DEFAULT_RUNTIME,
    precision: QueryPrecisionOpt = None,
    head: HeadOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Shop the look of a video: frames -> lead artists -> clothes -> k nearest gallery items."""
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
            on_start=on_start,
            on_progress=on_progress,
        )
    _print_artists(summary.selection, summary.crops, summary.crops_out)
    if summary.crops:
        _console().print(
            f"Queried {len(summary.crops)} crops (k={summary.k}) in {summary.seconds:.1f} s: "
            f"looks.csv, looks_fused.csv and {len(summary.grids)} grids in {summary.out}."
        )
    else:
        _console().print(
            f"Nothing to query; wrote empty looks.csv and looks_fused.csv in {summary.out}."
        )


# --- evaluate (issue 5) ---


@app.command("evaluate")
def evaluate_cmd(
    root: Annotated[
        Path,
        typer.Argument(
            exists=True,
            file_okay=False,
            help="Dataset root (In-shop / Consumer-to-shop "
            "benchmark folder, or ROOT/<label>/<images> for folders).",
        ),
    ],
    protocol: Annotated[
        str, typer.Option("--protocol", help="inshop, consumer2shop or folders (leave-one-out).")
    ] = _evaluate.DEFAULT_PROTOCOL,
    partition: Annotated[
        Path | None,
        typer.Option(
            "--partition",
            dir_okay=False,
            help="list_eval_partition.txt (default: found in ROOT or ROOT/Eval).",
        ),
    ] = None,
    bbox: Annotated[
        Path | None,
        typer.Option(
            "--bbox",
            dir_okay=False,
            help="Box file (default with --crop gt: "
            "list_bbox_<protocol>.txt in ROOT or ROOT/Anno).",
        ),
    ] = None,
    crop: Annotated[
        str, typer.Option("--crop", help="gt: crop to the ground-truth box; none: whole image.")
    ] = _evaluate.DEFAULT_CROP,
    backbone: Annotated[
        list[str] | None,
        typer.Option(
            "--backbone",
            help="Backbone(s); repeat or comma-separate to compare "
            f"(default: {_features.DEFAULT_BACKBONE}).",
        ),
    ] = None,
    weights: WeightsOpt = _features.DEFAULT_WEIGHTS,
    pooling: Annotated[
        list[str] | None,
        typer.Option("--pooling", help="avg and/or max; repeat to compare (default: avg)."),
    ] = None,
    norm: Annotated[
        list[str] | None,
        typer.Option(
            "--norm",
            help="l2 (cosine), centered, none (Euclidean); repeat to compare (default: l2).",
        ),
    ] = None,
    k: Annotated[str, typer.Option("--k", help="Recall@K cut-offs, comma-separated.")] = ",".join(
        map(str, _evaluate.DEFAULT_KS)
    ),
    ties: Annotated[
        str, typer.Option("--ties", help="pessimistic (a tie never helps) or gallery-order.")
    ] = _evaluate.DEFAULT_TIES,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Report folder (default: output/eval/<root>-<protocol>)."),
    ] = None,
    subset: Annotated[
        str, typer.Option("--subset", help="Consumer-to-shop split evaluated: test or val.")
    ] = _evaluate.DEFAULT_C2S_SUBSET,
    examples: Annotated[
        int, typer.Option("--examples", min=0, help="Queries in the worst and random grids.")
    ] = _evaluate.DEFAULT_N_EXAMPLES,
    cache_dir: Annotated[
        Path, typer.Option("--cache-dir", help="Feature cache folder.")
    ] = _features.DEFAULT_CACHE_DIR,
    strict: Annotated[
        bool, typer.Option("--strict", help="Exit 1 if a listed image is missing or unreadable.")
    ] = False,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed for --weights random and the random grid.")
    ] = _features.DEFAULT_SEED,
    batch_size: BatchOpt = _features.DEFAULT_BATCH_SIZE,
    runtime: RuntimeOpt = _features.DEFAULT_RUNTIME,
    precision: PrecisionOpt = _features.DEFAULT_PRECISION,
    head: HeadOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Score retrieval on DeepFashion In-shop, Consumer-to-shop or labelled folders.

    Writes report.json, per_query.csv, figures and report.md; several settings: compare.md.
    """
    ks = _evaluate.parse_ks(k)
    with _stage_progress(quiet=quiet) as (on_stage, on_progress):
        result = _evaluate.evaluate_settings(
            root,
            protocol=protocol,
            partition=partition,
            bbox=bbox,
            crop=crop,
            backbones=_evaluate.split_values(backbone),
            weights=weights,
            poolings=_evaluate.split_values(pooling),
            normalizations=_evaluate.split_values(norm),
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
    _print_evaluation(result, ks)


@contextlib.contextmanager
def _stage_progress(
    *, quiet: bool = False
) -> Iterator[tuple[Callable[[str, int], None], Callable[[int], None]]]:
    """Yield (on_stage(description, total), on_progress(done)): one bar, relabelled per stage.

    Off with --quiet or when stdout is not a terminal (the callbacks then do nothing).
    """
    if quiet or _state["quiet"] or not sys.stdout.isatty():
        yield (lambda description, total: None), (lambda done: None)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeRemainingColumn(),
    ) as progress:
        task = progress.add_task("Loading", total=None)

        def on_stage(description: str, total: int) -> None:
            progress.reset(task, description=description, total=total, completed=0)

        def on_progress(done: int) -> None:
            progress.update(task, completed=done)

        yield on_stage, on_progress


def _print_evaluation(result: Any, ks: tuple[int, ...]) -> None:
    from rich.table import Table

    table = Table(title="Retrieval (Recall@K = hit rate, %)")
    table.add_column("setting")
    table.add_column("queries", justify="right")
    for k in ks:
        table.add_column(f"R@{k}", justify="right")
    table.add_column("mAP", justify="right")
    table.add_column("MAP@R", justify="right")
    for report in result.reports:
        m = report.metrics
        cells = [m["recall_at_k"][k] for k in ks] + [m["map"], m["map_at_r"]]
        table.add_row(
            report.config["setting"],
            str(report.counts["queries_evaluated"]),
            *("n/a" if v is None else f"{100 * v:.2f}" for v in cells),
        )
    console = _console()
    console.print(table)
    counts = result.reports[0].counts
    notes = [
        f"{counts['missing_images']} listed image(s) missing",
        f"{counts['unreadable_query_images'] + counts['unreadable_gallery_images']} unreadable",
        f"{counts['queries_without_gallery_match']} queries without a gallery match (excluded)",
    ]
    skipped_csv = result.reports[0].files.get("skipped_csv")
    if skipped_csv:
        notes.append(f"skipped images listed in {skipped_csv}")
    console.print("; ".join(notes) + ".")
    if result.reports[0].config["weights"].get("name") == "random":
        _err("Random weights: these numbers test the pipeline, not retrieval quality.")
    written = (
        "compare.md, compare.json and one report per setting"
        if result.files
        else ("report.md, report.json, per_query.csv and figures")
    )
    console.print(f"Wrote {written} in {result.out}.")


# --- train (issue 8) ---

from snaplook import train as _train  # noqa: E402  (light: stdlib only at import)


def _load_head(path: Path | None) -> Any:
    return None if path is None else _train.load_head(path)


@app.command("train")
def train_cmd(
    root: Annotated[Path, typer.Argument(help="Dataset root (as for `snaplook evaluate`).")],
    protocol: Annotated[
        str, typer.Option("--protocol", help="inshop, consumer2shop or folders.")
    ] = _evaluate.DEFAULT_PROTOCOL,
    partition: Annotated[
        Path | None,
        typer.Option("--partition", exists=True, dir_okay=False, help="Partition file."),
    ] = None,
    bbox: Annotated[
        Path | None,
        typer.Option("--bbox", exists=True, dir_okay=False, help="Box file for --crop gt."),
    ] = None,
    crop: Annotated[
        str, typer.Option("--crop", help="gt: crop to the ground-truth box; none: whole image.")
    ] = _evaluate.DEFAULT_CROP,
    loss: Annotated[
        str, typer.Option("--loss", help="triplet (batch-hard) or proxy-anchor.")
    ] = _train.DEFAULT_LOSS,
    dim: Annotated[int, typer.Option("--dim", min=1, help="Embedding size.")] = _train.DEFAULT_DIM,
    hidden: Annotated[
        int, typer.Option("--hidden", min=0, help="Hidden ReLU layer width (0: none).")
    ] = _train.DEFAULT_HIDDEN,
    epochs: Annotated[
        int, typer.Option("--epochs", min=1, help="Maximum epochs.")
    ] = _train.DEFAULT_EPOCHS,
    batch: Annotated[
        str, typer.Option("--batch", help="P items x K images per batch, e.g. 16x4.")
    ] = "{}x{}".format(*_train.DEFAULT_BATCH),
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = _train.DEFAULT_LR,
    val_fraction: Annotated[
        float, typer.Option("--val-fraction", help="Share of training items held out.")
    ] = _train.DEFAULT_VAL_FRACTION,
    patience: Annotated[
        int, typer.Option("--patience", min=1, help="Stop after N epochs without a better R@1.")
    ] = _train.DEFAULT_PATIENCE,
    seed: Annotated[
        int, typer.Option("--seed", help="Seeds training and --weights random.")
    ] = _train.DEFAULT_SEED,
    backbone: BackboneOpt = _features.DEFAULT_BACKBONE,
    weights: WeightsOpt = _features.DEFAULT_WEIGHTS,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Head folder [default: output/heads/<name>]."),
    ] = None,
    cache_dir: Annotated[
        Path, typer.Option("--cache-dir", help="Feature cache (shared with evaluate).")
    ] = _features.DEFAULT_CACHE_DIR,
    batch_size: BatchOpt = _features.DEFAULT_BATCH_SIZE,
    quiet: QuietOpt = False,
) -> None:
    """Train a small embedding head (triplet / Proxy-Anchor) on cached backbone features."""
    console = _console()

    def on_epoch(r: Any) -> None:
        if not (quiet or _state["quiet"]):
            val = "n/a" if r.val_recall_at_1 is None else f"{100 * r.val_recall_at_1:.2f}%"
            best = "  *best" if r.best else ""
            console.print(
                f"epoch {r.epoch:3d}/{epochs}  loss {r.loss:.4f}  val R@1 {val}  "
                f"({r.seconds:.1f} s){best}"
            )

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
            on_epoch=on_epoch,
        )
    _print_training(summary)
    if summary.interrupted:
        _err(f"Interrupted: kept the best head so far in {summary.out}.")
        raise typer.Exit(130)


def _print_training(summary: Any) -> None:
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
    console = _console()
    console.print(line)
    console.print(
        f"Trained on {counts['train_images']} images of {counts['train_items']} items, validated "
        f"on {counts['val_images']} images of {counts['val_items']} held-out items ("
        + (
            f"{summary.n_embedded} images embedded)."
            if summary.n_embedded
            else "all features from the cache)."
        )
    )
    console.print(
        f"Wrote head.weights.h5, head.json, training.csv and training.png in {summary.out}."
    )
