"""The pager, file names, labels and tab stops in a real browser (Debian's chromium through Playwright).

Reuses the server and browser of test_browser.py. Paste-an-image is built by another change (the smart
search box) and is not tested here.
"""

from __future__ import annotations

import pytest

from tests.e2e.test_browser import CHROMIUM, base_url, page, wait_until  # noqa: F401  (fixtures)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)"),
]


def test_pager_numbers_file_names_and_labels(page: object, base_url: str) -> None:  # noqa: F811
    pg = page  # type: ignore[assignment]
    pg.goto(base_url + "/?q=a+red+circle&k=4")
    pg.wait_for_selector(".card")
    assert pg.locator(".pager [aria-current=page]").inner_text() == "Page 1"
    assert pg.locator(".card .file-name").count() == 4
    assert all(t.strip() for t in pg.locator(".card .file-name").all_inner_texts())
    pg.click(".pager .pages a[aria-label='page 2']")
    pg.wait_for_selector(".card")
    assert "o=4" in pg.url and pg.locator(".pager [aria-current=page]").inner_text() == "Page 2"
    assert pg.locator(".pager .pages a[aria-label='page 1']").count() == 1
    # explanations say their confidence in words, not only with a bar
    wait_until(pg, "document.querySelectorAll('.card[data-explain=\"pending\"]').length === 0")
    assert pg.locator(".card .conf-label").first.inner_text().startswith("confidence ")


def test_one_tab_stop_per_card_action(page: object, base_url: str) -> None:  # noqa: F811
    pg = page  # type: ignore[assignment]
    pg.goto(base_url + "/?q=a+red+circle&k=4")
    pg.wait_for_selector(".card")
    focusable = pg.eval_on_selector(
        ".card",
        "c => Array.from(c.querySelectorAll('a, button, input')).filter(e => e.tabIndex >= 0)"
        ".map(e => e.textContent.trim())",
    )
    assert focusable == ["More like this", "Details"]
