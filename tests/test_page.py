"""Tests for snaplook.page: the static index.html of `query` and `look`, in a real browser.

The browser is the system's Chromium (Debian package `chromium`, installed by .ci/run)
driven by Playwright; no browser is ever downloaded. Without one the browser tests skip,
except in CI (CI=true) or with SNAPLOOK_REQUIRE_TESTDATA=1, where they fail.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import REQUIRE_TESTDATA, write_gallery
from PIL import Image
from shared_model import build_model_shared
from typer.testing import CliRunner

from snaplook import features
from snaplook.cli import app
from snaplook.io_utils import read_csv

runner = CliRunner()
# avg: a random MobileNetV2's activations fall under GeM's clamp (constant features).
MODEL = ["--backbone", "mobilenet_v2", "--weights", "random", "--pooling", "avg", "-q"]
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: item i of conftest's gallery -> (category, body)
KINDS = {0: ("Tops", "upper"), 2: ("Tops", "upper"), 1: ("Trousers", "lower")}
KINDS |= {3: ("Trousers", "lower"), 4: ("Dresses", "full"), 5: ("Dresses", "full")}


def _chromium() -> str:
    """The system Chromium, or skip (fail in CI) with the reason."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    reason = None
    if path is None:
        reason = "no Chromium on PATH (Debian: apt-get install chromium; .ci/run does it)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "playwright is not installed (pip install -e '.[test]')"
    if reason:
        if os.environ.get("CI") == "true" or REQUIRE_TESTDATA:
            pytest.fail(reason + "; CI needs the browser test")
        pytest.skip(reason)
    return path


def check_in_browser(page_path: Path, screenshot: Path) -> dict:
    """Open ``page_path`` from the file system at 1280x800; return what the browser saw."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    failed: list[str] = []
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile,
            executable_path=_chromium(),
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 800},
        )
        try:
            page = context.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: failed.append(r.url))
            page.goto(page_path.resolve().as_uri(), wait_until="load")
            images = page.evaluate(
                "Array.from(document.images).map(i => "
                "({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0}))"
            )
            links = page.evaluate(
                "Array.from(document.querySelectorAll('a')).map(a => a.getAttribute('href'))"
            )
            text = page.inner_text("body")
            page.screenshot(path=str(screenshot))
        finally:
            context.close()
    return {"errors": errors, "failed": failed, "images": images, "links": links, "text": text}


def assert_page_ok(seen: dict, screenshot: Path, *, min_images: int) -> None:
    assert seen["errors"] == []
    assert seen["failed"] == []
    assert len(seen["images"]) >= min_images
    assert [i["src"] for i in seen["images"] if not i["ok"]] == []
    assert all(not i["src"].startswith(("/", "file:", "http")) for i in seen["images"])
    shot = np.asarray(Image.open(screenshot).convert("RGB"))
    assert shot.shape == (800, 1280, 3)
    # Not blank: many colours and real contrast (a white or single-colour page has neither).
    assert len(np.unique(shot.reshape(-1, 3), axis=0)) > 200
    assert shot.std() > 20


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("page_shop")
    root = write_gallery(base / "gallery")
    lines = ["image,product_id,title,price,currency,category,body,url"]
    for path in sorted(root.rglob("*.png")):
        i = int(path.stem[4:6])
        category, body = KINDS[i]
        rel = path.relative_to(root).as_posix()
        # One title needs escaping; one link is not a web link and must not be shown.
        title = '"Item <b>4</b>, ""quoted"""' if i == 4 else f"Item {i}"
        url = "javascript:alert(1)" if i == 5 else f"https://shop.example/p/{i}"
        lines.append(f"{rel},P{i:02d},{title},{10 * (i + 1)}.00,EUR,{category},{body},{url}")
    (base / "products.csv").write_text("\n".join(lines) + "\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(features, "build_model", build_model_shared)
        args = ["index", str(root), "-o", str(base / "index"), *MODEL]
        result = runner.invoke(app, args + ["--catalog", str(base / "products.csv")])
    assert result.exit_code == 0, result.output
    return {"root": root, "index": base / "index"}


@pytest.fixture(autouse=True)
def _shared(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(features, "build_model", build_model_shared)


def test_query_page_in_browser(shop, tmp_path: Path) -> None:
    _chromium()
    out = tmp_path / "res"
    args = ["query", str(shop["root"] / "tops"), "--index", str(shop["index"]), "-o", str(out)]
    result = runner.invoke(app, args + ["-k", "4", "--where", "price<=50", "--no-plot", "-q"])
    assert result.exit_code == 0, result.output
    html = (out / "index.html").read_text()
    assert "&lt;b&gt;4&lt;/b&gt;" in html and "<b>4</b>" not in html
    assert "javascript:" not in html
    assert "random weights" in html

    seen = check_in_browser(out / "index.html", tmp_path / "query.png")
    # 6 queries, each with its thumbnail and 4 products.
    assert_page_ok(seen, tmp_path / "query.png", min_images=6 * 5)
    assert "P00" in seen["text"] and "10.00 EUR" in seen["text"]
    assert "https://shop.example/p/0" in seen["links"]
    # The page and its thumbnails move as one folder.
    moved = tmp_path / "moved"
    shutil.move(out, moved)
    assert_page_ok(
        check_in_browser(moved / "index.html", tmp_path / "moved.png"),
        tmp_path / "moved.png",
        min_images=30,
    )


def test_look_page_products_fused_and_body_parts_in_browser(shop, real_video, tmp_path) -> None:
    _chromium()
    out, crops_out = tmp_path / "looks", tmp_path / "lead"
    # Frames at 0, 10, 20, 30 s: nobody, a woman at the table, nobody, a man in black.
    args = ["look", str(real_video), "-k", "4", "--index", str(shop["index"]), "--every", "10"]
    args += ["--max-frames", "4", "--out", str(out), "--crops-out", str(crops_out), "-q"]
    args += ["--restrict", "auto", "--where", "price<=50", "--no-plot"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output

    body = {f"P{i:02d}": b for i, (_, b) in KINDS.items()}
    looks = read_csv(out / "looks.csv")
    assert looks and {"product_id", "title", "price"} <= set(looks[0])
    assert "P05" not in {h["product_id"] for h in looks}  # 60.00 EUR
    for hit in looks:
        if hit["kind"] in ("upper", "lower"):
            assert body[hit["product_id"]] in (hit["kind"], "full")
    fused = read_csv(out / "looks_fused.csv")
    assert fused
    for artist in {r["artist"] for r in fused}:
        mine = [r for r in fused if r["artist"] == artist]
        ids = [r["product_id"] for r in mine]
        assert len(ids) == len(set(ids))  # products, each once
        assert [int(r["rank"]) for r in mine] == list(range(1, len(mine) + 1))

    seen = check_in_browser(out / "index.html", tmp_path / "look.png")
    n_crops = len({h["crop"] for h in looks})
    # Timeline (4 frames) + each crop and its products + the fused lists.
    assert_page_ok(seen, tmp_path / "look.png", min_images=4 + n_crops + len(looks))
    assert "Timeline" in seen["text"] and "Artist 1" in seen["text"]
    assert "products over all crops" in seen["text"]
    assert "30.0 s" in seen["text"]


def test_no_browser_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(sys.modules[__name__], "REQUIRE_TESTDATA", False)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no Chromium"):
        _chromium()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI needs the browser test"):
        _chromium()
