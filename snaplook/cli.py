"""The `snaplook` command line: one command per step, a thin shell over the library.

Commands parse options, show progress, call one library function and print what was
written where. Heavy libraries load inside the commands, so `snaplook --help` is instant.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from snaplook import __version__
from snaplook import features as _features
from snaplook import index as _index
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
            _err("Interrupted: finished work is kept; run the same command again to resume.")
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
    rich_markup_mode="rich",
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
    handler = RichHandler(
        console=Console(stderr=True), show_time=False, show_path=False, markup=False
    )
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


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


def _report_skipped(skipped: list[Any], where: Path | None, strict: bool) -> None:
    if not skipped:
        return
    target = f"; listed in {where}" if where else ""
    _err(f"Skipped {len(skipped)} unreadable file(s){target}.")
    for s in skipped[:5]:
        _err(f"  {s.reason}")
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
    quiet: QuietOpt = False,
) -> None:
    """Embed a gallery folder into a cosine k-NN index (features.npy, manifest.csv, meta.json)."""
    with _progress("Indexing", quiet=quiet) as (on_start, on_progress):
        summary = _index.build_index(
            gallery,
            out,
            backbone=backbone,
            weights=weights,
            seed=seed,
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

    table = Table(title=f"Top {summary.k} per query", show_lines=False)
    table.add_column("query")
    table.add_column("rank", justify="right")
    table.add_column("gallery image")
    table.add_column("distance", justify="right")
    for result in summary.results[:20]:
        for hit in result.hits[:3]:
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
