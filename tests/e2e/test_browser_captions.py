"""Captions filling in on the page in a real browser: the cards arrive without captions, the page's script
asks the server's captioning worker for them, and each card is explained once its caption is there.
Skipped where chromium or playwright is missing (as tests/e2e/test_browser.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from explainer.server import create_app
from retrieval import Collection, EncoderConfig, IngestConfig, create_encoder
from retrieval.demo.blip import make_blip
from retrieval.ingest import ingest
from tests.e2e.test_browser import CHROMIUM, sync_api, wait_until
from tests.helpers import make_folder
from tests.server_kit import server_settings, serving

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path) -> Iterator[str]:
    root = tmp_path_factory.mktemp("browser-captions")
    make_folder(root / "images", 10)  # no captions.jsonl: every card starts uncaptioned
    encoder = create_encoder(EncoderConfig(model=str(tiny_clip_dir), device="cpu", precision="fp32"))
    with Collection(root / "data") as c:
        ingest(root / "images", c, encoder, IngestConfig(progress=False))
    encoder.close()
    blip = make_blip(root / "blip", "tiny", seed=0)
    settings = server_settings(
        root / "data", root, default_top_k=8, caption_model=str(blip), caption_background=False
    )
    with serving(create_app(settings)) as url:
        yield url


def test_captions_fill_in_and_then_the_explanations(base_url: str) -> None:
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        pg: Any = browser.new_page(viewport={"width": 1280, "height": 900})
        pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        pg.on("pageerror", lambda e: errors.append(str(e)))
        served = pg.goto(base_url + "/?q=a+red+circle").text()
        assert served.count('data-caption="pending"') == 8  # the page came without waiting for BLIP
        pg.wait_for_selector(".card")
        wait_until(pg, "document.querySelectorAll('.card[data-caption=\"pending\"]').length === 0", 120)
        wait_until(pg, "document.querySelectorAll('.card[data-explain=\"pending\"]').length === 0", 120)
        sources = pg.locator(".card .caption .src").all_text_contents()  # the CSS shows them upper-case
        progress = pg.locator("#caption-progress").inner_text()
        browser.close()
    assert sources == ["generated"] * 8
    assert progress.startswith("captions ") and progress.split()[1].split("/")[0] != "0"
    assert errors == []
