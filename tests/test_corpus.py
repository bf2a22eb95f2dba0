"""Every bad input of the generated corpus (tests/corpus.py) through the command that reads it.

The expected outcome of each case is a row of tests/corpus_cases.csv. The image cases
share one gallery that is indexed once (random MobileNetV2 weights), then each case is
looked up in the index's manifest.csv / skipped.csv; every other case runs its own
command in-process (most fail before any model is built; the "ok" controls run in full).
No case may print a Python traceback or reach the catch-all "unexpected" error, and no
input file may change.
"""

from __future__ import annotations

import csv
import os
import re
import shlex
import signal
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import BACKBONE, PWNED, Case, build_corpus, read_cases  # noqa: E402

from snaplook.cli import app  # noqa: E402

CASES = read_cases()
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
#: Cases that need file permissions to bite: root reads a chmod 000 file anyway.
PERMISSION_CASES = {"img_unreadable", "vid_unreadable"}


def _commands() -> set[str]:
    import typer.main

    return set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


#: No case may take longer (a FIFO named like a video must never block a command).
CASE_DEADLINE_S = 300


def _hung(signum: int, frame: object) -> None:
    raise TimeoutError(f"the command ran over {CASE_DEADLINE_S} s (blocked on a special file?)")


def _invoke(args: list[str], cwd: Path) -> object:
    old = Path.cwd()
    os.chdir(cwd)
    # SIGALRM interrupts a blocking open() of a FIFO; the raise reaches the command's
    # error handler, so a hang fails the case instead of the suite.
    previous = signal.signal(signal.SIGALRM, _hung)
    signal.alarm(CASE_DEADLINE_S)
    try:
        return CliRunner().invoke(app, args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        os.chdir(old)


def _check_clean(result: object) -> None:
    out = result.output  # type: ignore[attr-defined]
    assert "Traceback" not in out, out
    assert "Error: unexpected" not in out, out  # the catch-all for non-SnaplookError failures


def _snapshot(corpus: Path) -> dict[Path, tuple[int, int]]:
    """(size, mtime) of every input file given whole to a command (not the index copies)."""
    files = {}
    for kind in ("galleries", "queries", "videos", "partitions"):
        for p in (corpus / kind).rglob("*"):
            if p.is_file() and not p.is_symlink():
                files[p] = (p.stat().st_size, p.stat().st_mtime_ns)
    return files


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def gallery_index(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Index the whole image corpus once; return what happened to each file."""
    out = tmp_path_factory.mktemp("gallery_index") / "index"
    result = _invoke(
        [
            "index",
            str(corpus / "gallery"),
            "--out",
            str(out),
            "--backbone",
            BACKBONE,
            "--weights",
            "random",
            "--batch-size",
            "16",
            "-q",
        ],
        corpus,
    )
    from snaplook.index import load_index

    manifest = {r.path: (r.width, r.height) for r in load_index(out).manifest}
    with open(out / "skipped.csv", newline="", encoding="utf-8") as fh:
        skipped = {
            Path(r["path"]).relative_to(corpus / "gallery").as_posix(): r["reason"]
            for r in csv.DictReader(fh)
        }
    return {"result": result, "out": out, "manifest": manifest, "skipped": skipped}


def test_corpus_table_covers_every_kind() -> None:
    kinds = {c.kind for c in CASES}
    assert kinds == {"image", "gallery", "query", "index", "video", "partition"}
    assert len(CASES) >= 30
    assert len({c.case for c in CASES}) == len(CASES)


def test_index_corpus_gallery_exits_0_and_lists_skips(gallery_index: dict) -> None:
    from snaplook.index import load_index

    result = gallery_index["result"]
    _check_clean(result)
    assert result.exit_code == 0, result.output
    n_skipped = len(gallery_index["skipped"])
    assert f"Skipped {n_skipped} unreadable file(s)" in result.output
    index = load_index(gallery_index["out"])
    assert len(index) == len(gallery_index["manifest"])
    assert index.features.shape == (len(index), 1280)


@pytest.mark.parametrize("case", [c for c in CASES if c.kind == "image"], ids=lambda c: c.case)
def test_index_image_case(case: Case, gallery_index: dict, corpus: Path) -> None:
    if case.case in PERMISSION_CASES and AS_ROOT:
        pytest.skip("running as root: chmod 000 does not stop root from reading the file")
    manifest, skipped = gallery_index["manifest"], gallery_index["skipped"]
    if case.expect == "indexed":
        assert case.target in manifest, f"{case.target} not in manifest.csv; skipped: {skipped}"
        if re.fullmatch(r"\d+x\d+", case.message):
            w, h = (int(v) for v in case.message.split("x"))
            assert manifest[case.target] == (w, h)
    elif case.expect == "skipped":
        assert case.target in skipped, f"{case.target} not in skipped.csv"
        assert case.message in skipped[case.target]
        assert case.target not in manifest
    else:
        assert case.expect == "ignored"
        listed = [*manifest, *skipped]
        assert case.target not in listed
        if (corpus / "gallery" / case.target).is_symlink():  # not entered either
            assert not [p for p in listed if p.startswith(case.target + "/")]


def _run_case(case: Case, corpus: Path, tmp_path: Path) -> object:
    """Build the command line of a non-image case and run it in its kind's folder."""
    target, *extra = shlex.split(case.target)
    folder = (
        corpus
        / {
            "gallery": "galleries",
            "query": "queries",
            "index": "indexes",
            "video": "videos",
            "partition": "partitions",
        }[case.kind]
    )
    if case.command == "index":
        if "--out" not in extra:
            extra += ["--out", str(tmp_path / "index")]
        args = ["index", target, *extra, "--backbone", BACKBONE, "--weights", "random", "-q"]
    elif case.command == "query":
        # The case's own options come last: for a repeated option the last one counts.
        results = ["--out", str(tmp_path / "results"), "-q"]
        if case.kind == "query":
            index = str(corpus / "indexes" / "valid")
            args = ["query", target, "--index", index, *results, *extra]
        else:
            args = ["query", str(corpus / "gallery" / "ok_plain.jpg"), "--index", target, *results]
    elif case.command == "features":
        args = ["features", target, "--backbone", BACKBONE, "--weights", "random", "-q", *extra]
    elif case.command == "crop":
        args = ["crop", target, "--out", str(tmp_path / "crop"), "-q", *extra]
    elif case.command == "look":
        args = [
            "look",
            target,
            "--index",
            str(corpus / "indexes" / "valid"),
            "--out",
            str(tmp_path / "look"),
            "--crops-out",
            str(tmp_path / "crops"),
            "-q",
            *extra,
        ]
    elif case.command == "train":
        args = [
            "train",
            target,
            "--backbone",
            BACKBONE,
            "--weights",
            "random",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path / "head"),
            *extra,
        ]
    elif case.command == "extract":
        args = ["extract", target, "--out", str(tmp_path / "frames"), "-q", *extra]
    else:
        args = [
            "evaluate",
            target,
            "--protocol",
            "inshop",
            "--backbone",
            BACKBONE,
            "--weights",
            "random",
            "--crop",
            "none",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path / "eval"),
            "-q",
            *extra,
        ]
    return _invoke(args, folder)


@pytest.mark.parametrize("case", [c for c in CASES if c.kind != "image"], ids=lambda c: c.case)
def test_command_case(case: Case, corpus: Path, tmp_path: Path) -> None:
    if case.command not in _commands():
        pytest.skip(f"command not implemented: snaplook {case.command}")
    if case.case in PERMISSION_CASES and AS_ROOT:
        pytest.skip("running as root: chmod 000 does not stop root from reading the file")
    before = _snapshot(corpus)
    result = _run_case(case, corpus, tmp_path)
    _check_clean(result)
    assert result.exit_code == case.exit_code, result.output
    assert case.message in result.output
    if case.expect == "refused":
        assert "Error: " in result.stderr
    assert not (corpus / "indexes" / PWNED).exists()  # nothing was unpickled
    # Refused or not, no input file was changed or removed.
    assert _snapshot(corpus) == before
