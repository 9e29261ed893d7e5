"""Near-duplicates on the API and the page: the kept card lists the folded ids (`similar`), the page shows
"+N similar" and a link to show them all, `show_all` shows every copy, and the setting turns folding off."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from explainer.server import create_app
from retrieval import Collection, IngestConfig
from retrieval.encoders import EncoderConfig, create_encoder
from retrieval.ingest import ingest
from tests.helpers import textures
from tests.server_kit import server_settings


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("collapse")
    photos = root / "photos"
    files = textures(photos, 24)
    with Image.open(files[5]) as im:
        im.save(photos / "copy_a.jpg", quality=60)
        im.save(photos / "copy_b.jpg", quality=40)
    encoder = create_encoder(EncoderConfig(model=str(tiny_clip_dir), device="cpu", precision="fp32"))
    with Collection(root / "data") as col:
        ingest(photos, col, encoder, IngestConfig(batch_size=8, progress=False))
    encoder.close()
    return root / "data", files[5]


def _client(library: tuple[Path, Path], tmp: Path, **settings: object) -> TestClient:
    return TestClient(create_app(server_settings(library[0], tmp, **settings)))


@pytest.fixture(scope="module")
def client(library: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with _client(library, tmp_path_factory.mktemp("state")) as c:
        yield c


def _search(client: TestClient, original: Path, **extra: object) -> dict:  # type: ignore[type-arg]
    body = {"image_base64": base64.b64encode(original.read_bytes()).decode(), "top_k": 40, "explain": False}
    r = client.post("/api/search", json={**body, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_the_kept_card_lists_the_folded_copies(client: TestClient, library: tuple[Path, Path]) -> None:
    _, original = library
    every = _search(client, original, show_all=True)
    names = {c["id"]: c["file_name"] for c in every["results"]}
    assert len(every["results"]) == 26 and all(c["similar"] == [] for c in every["results"])
    folded = _search(client, original)
    top = folded["results"][0]
    assert top["file_name"] == original.name
    assert sorted(names[i] for i in top["similar"]) == ["copy_a.jpg", "copy_b.jpg"]
    shown = {c["file_name"] for c in folded["results"]}
    assert not {"copy_a.jpg", "copy_b.jpg"} & shown
    assert len(folded["results"]) + sum(len(c["similar"]) for c in folded["results"]) == 26
    assert folded["query"]["show_all"] is False and every["query"]["show_all"] is True


def test_the_page_says_plus_n_similar_and_links_to_show_all(
    client: TestClient, library: tuple[Path, Path]
) -> None:
    key = _search(client, library[1])["query"]["image_key"]
    page = client.get(f"/?qimg={key}&k=24").text
    assert "+2 similar" in page and "Show all (" in page and "show_all=True" in page
    everything = client.get(f"/?qimg={key}&k=24&show_all=true").text
    assert "+2 similar" not in everything and "Fold near-duplicates" in everything


def test_show_all_must_be_a_boolean(client: TestClient, library: tuple[Path, Path]) -> None:
    r = client.post("/api/search", json={"text": "x", "show_all": "sometimes"})
    assert r.status_code == 422


def test_the_setting_turns_folding_off(library: tuple[Path, Path], tmp_path: Path) -> None:
    with _client(library, tmp_path, collapse_duplicates=False) as c:
        body = _search(c, library[1])
    assert len(body["results"]) == 26 and all(not x["similar"] for x in body["results"])
