"""The photo library's pages in a real browser (Debian's chromium, headless, Playwright): the detail
view's "copy the path" on a loopback server, with the Clipboard API, without it, and refused; and the
near-duplicates page, with a screenshot in bench/out/. Skipped where chromium or playwright is missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from explainer.server import create_app
from retrieval import Collection, IngestConfig
from retrieval.encoders import EncoderConfig, create_encoder
from retrieval.ingest import ingest
from tests.e2e.test_browser import CHROMIUM, SHOTS, wait_until
from tests.helpers import textures
from tests.server_kit import server_settings, serving

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)"),
]
#: Characters selected in the path field.
SELECTED = (
    "(() => { const f = document.getElementById('file-path'); return f.selectionEnd - f.selectionStart; })()"
)
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright not installed (pip install playwright)"
)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("browser-library")
    photos = root / "photos"
    files = textures(photos, 48)
    with Image.open(files[3]) as im:
        im.save(photos / "copy.jpg", quality=50)
    encoder = create_encoder(EncoderConfig(model=str(tiny_clip_dir), device="cpu", precision="fp32"))
    with Collection(root / "data") as col:
        ingest(photos, col, encoder, IngestConfig(batch_size=8, progress=False))
    encoder.close()
    with serving(create_app(server_settings(root / "data", root))) as url:
        yield url, files[3]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--no-first-run"]
        )
        yield b
        b.close()


def _detail(site: tuple[str, Path]) -> tuple[str, str]:
    """The detail page URL of the planted original and its absolute path."""
    url, original = site
    with Collection(original.parents[1] / "data", create=False) as col:
        rec = next(r for r in col.catalog.iter_images("indexed") if r.path == str(original))
    return f"{url}/images/{rec.id}", rec.path


def test_the_button_copies_the_path(browser: Any, site: tuple[str, Path]) -> None:
    url, path = _detail(site)
    context = browser.new_context(permissions=["clipboard-read", "clipboard-write"])
    page = context.new_page()
    try:
        page.goto(url)
        assert page.input_value("#file-path") == path
        page.click("#copy-path")
        wait_until(page, "document.getElementById('copy-note').textContent === 'Copied.'")
        assert page.evaluate("navigator.clipboard.readText()") == path
    finally:
        context.close()


def test_without_the_clipboard_api_the_field_is_the_way(browser: Any, site: tuple[str, Path]) -> None:
    url, path = _detail(site)
    context = browser.new_context()
    context.add_init_script("Object.defineProperty(navigator, 'clipboard', { value: undefined })")
    page = context.new_page()
    try:
        page.goto(url)
        assert page.is_visible("#file-path") and not page.is_visible("#copy-path")
        page.click("#file-path")
        assert page.evaluate("window.getSelection().toString() || document.activeElement.value") == path
        assert page.evaluate(SELECTED) == len(path)
    finally:
        context.close()


def test_a_refused_copy_selects_the_field(browser: Any, site: tuple[str, Path]) -> None:
    url, path = _detail(site)
    context = browser.new_context()
    context.add_init_script(
        "navigator.clipboard.writeText = () => Promise.reject(new DOMException('denied', 'NotAllowedError'))"
    )
    page = context.new_page()
    try:
        page.goto(url)
        page.click("#copy-path")
        wait_until(page, "document.getElementById('copy-note').textContent.startsWith('Copy was refused')")
        assert page.evaluate("document.activeElement.id") == "file-path"
        assert page.evaluate(SELECTED) == len(path)
    finally:
        context.close()


def test_the_duplicates_page_shows_the_planted_pair(browser: Any, site: tuple[str, Path]) -> None:
    url, original = site
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    try:
        page.goto(url + "/")
        page.click("nav.sections >> text=Near-duplicates")
        page.wait_for_selector(".dup-group")
        rows = [
            sorted(page.locator(".dup-group").nth(k).locator(".file-name").all_inner_texts())
            for k in range(page.locator(".dup-group").count())
        ]
        assert sorted(["copy.jpg", original.name]) in rows  # (a random tiny CLIP may group others too)
        wait_until(page, "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "browser-duplicates.png"), full_page=True)
        assert errors == []  # no CSP violation, no script error
    finally:
        page.close()
