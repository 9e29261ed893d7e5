"""The page in a real browser: Debian's chromium, headless, driven by Playwright.

Searches, sees cards fill in with explanations, toggles evidence, uploads an image and follows
"more like this"; leaves a screenshot of the results page in bench/out/ for people to look at.
Skipped (with the reason) where chromium or the playwright package is missing.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from explainer.server import create_app
from tests.helpers import ROOT
from tests.server_kit import build_collection, server_settings, serving

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
SHOTS = ROOT / "bench" / "out"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)"),
]
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright not installed (pip install playwright)"
)


#: Console errors and uncaught exceptions seen on any page of this module.
CONSOLE_ERRORS: list[str] = []


def wait_until(page: Any, expression: str, timeout_s: float = 60.0) -> None:
    """Poll a page expression through the debugging protocol: the page's CSP forbids the eval that
    Playwright's `wait_for_function` uses in the page, and the CSP must stay on in this test."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {expression}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path) -> Iterator[str]:
    root = tmp_path_factory.mktemp("browser")
    data = build_collection(root, tiny_clip_dir, n=12)
    app = create_app(server_settings(data, root, default_top_k=8))
    with serving(app) as url:
        yield url


@pytest.fixture(scope="module")
def page(base_url: str) -> Iterator[object]:
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        pg = browser.new_page(viewport={"width": 1280, "height": 900})
        # CSP violations surface as console errors: every test's pages are checked at the end
        pg.on("console", lambda m: CONSOLE_ERRORS.append(m.text) if m.type == "error" else None)
        pg.on("pageerror", lambda e: CONSOLE_ERRORS.append(str(e)))
        yield pg
        browser.close()


def test_the_page_asks_for_its_cards_explanations_in_one_request(page: object, base_url: str) -> None:
    """A page of cards is one /api/explain request (12 cards a request), not one per card."""
    pg = page  # type: ignore[assignment]
    bodies: list[Any] = []

    def record(request: Any) -> None:
        if request.url.endswith("/api/explain"):
            bodies.append(request.post_data_json)

    pg.on("request", record)
    try:
        pg.goto(base_url + "/?q=a+blue+square")
        wait_until(pg, "document.querySelectorAll('.card[data-explain=\"pending\"]').length === 0")
    finally:
        pg.remove_listener("request", record)
    assert len(bodies) == 1 and len(bodies[0]["ids"]) == 8 == pg.locator(".card .backend").count()
    assert bodies[0]["text"] == "a blue square" and bodies[0]["wait_s"] > 0


def test_search_shows_cards_that_fill_in(page: object, base_url: str) -> None:
    pg = page  # type: ignore[assignment]
    pg.goto(base_url + "/")
    pg.fill("#q", "a red circle")
    pg.click("button[type=submit]")
    pg.wait_for_selector(".card")
    assert pg.locator(".card").count() == 8
    assert "q=a+red+circle" in pg.url
    wait_until(pg, "document.querySelectorAll('.card[data-explain=\"pending\"]').length === 0")
    assert pg.locator(".card .backend").count() == 8
    assert pg.locator(".card .backend").first.inner_text() == "offline"
    # images load, and the evidence boxes sit inside the displayed image
    wait_until(pg, "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    stage = pg.locator(".card .stage").first.bounding_box()
    box = pg.locator(".card .box").first.bounding_box()
    assert stage and box
    assert stage["x"] - 1 <= box["x"] and box["x"] + box["width"] <= stage["x"] + stage["width"] + 1
    assert stage["y"] - 1 <= box["y"] and box["y"] + box["height"] <= stage["y"] + stage["height"] + 1
    SHOTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(SHOTS / "browser-results.png"), full_page=True)


def test_evidence_toggle_hides_and_shows_boxes(page: object, base_url: str) -> None:
    pg = page  # type: ignore[assignment]
    pg.goto(base_url + "/?q=blue+square")
    box = pg.locator(".card .box").first
    assert box.is_visible()
    pg.click("label.switch")
    box.wait_for(state="hidden")
    pg.reload()  # the choice is remembered
    pg.locator(".card .box").first.wait_for(state="hidden")
    pg.click("label.switch")
    pg.locator(".card .box").first.wait_for(state="visible")


def test_upload_an_image_then_more_like_this(page: object, base_url: str, tmp_path: Path) -> None:
    from PIL import Image

    pg = page  # type: ignore[assignment]
    query = tmp_path / "query.png"
    Image.new("RGB", (80, 60), "green").save(query)
    pg.goto(base_url + "/")
    pg.set_input_files("#image", str(query))
    assert pg.locator("#query-image").is_visible()
    pg.click("button[type=submit]")
    pg.wait_for_selector(".card")
    assert "qimg=" in pg.url and pg.locator(".summary .kind").inner_text() == "image"
    first_id = pg.locator(".card").nth(2).get_attribute("data-id")
    pg.locator(".card").nth(2).locator("a.like").click()
    pg.wait_for_selector(".card")
    assert f"like={first_id}" in pg.url
    shown = [pg.locator(".card").nth(i).get_attribute("data-id") for i in range(pg.locator(".card").count())]
    assert shown and first_id not in shown  # more like it: other images, never the query image itself
    wait_until(pg, "document.querySelectorAll('.card[data-explain=\"pending\"]').length === 0")


def test_bad_upload_shows_a_clear_message(page: object, base_url: str, tmp_path: Path) -> None:
    pg = page  # type: ignore[assignment]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not really a jpeg")
    pg.goto(base_url + "/")
    pg.set_input_files("#image", str(bad))
    pg.click("button[type=submit]")
    notice = pg.locator(".notice[role=alert]")
    notice.wait_for()
    assert "could not be used" in notice.inner_text()


def test_api_docs_render_offline_under_the_csp(page: object, base_url: str) -> None:
    pg = page  # type: ignore[assignment]
    pg.goto(f"{base_url}/docs")
    pg.wait_for_selector(".opblock-summary-path", timeout=30_000)  # operations drawn by Swagger UI
    paths = pg.locator(".opblock-summary-path").all_inner_texts()
    assert any("/api/search" in p for p in paths), paths


def test_no_console_errors_under_the_csp(page: object, base_url: str) -> None:
    """Runs last: the pages above (results, detail, upload, docs) logged no script errors and no CSP
    violations. HTTP error statuses the tests provoke on purpose (404/422 pages) are not script errors."""
    errors = [e for e in CONSOLE_ERRORS if not e.startswith("Failed to load resource")]
    assert errors == []
