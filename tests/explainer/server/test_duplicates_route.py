"""The near-duplicates page and `GET /api/duplicates`: the command's groups, paged and cut to a bound,
named by file and folder (never by absolute path), with every bad parameter refused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from explainer.cli.app import app
from explainer.server import create_app
from retrieval import Collection, IngestConfig
from retrieval.encoders import EncoderConfig, create_encoder
from retrieval.ingest import ingest
from tests.explainer.server.test_pages import check_snapshot, normalise
from tests.helpers import textures
from tests.server_kit import server_settings


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path) -> Path:
    """48 different pictures, one with two copies (one in a subfolder), another with one copy (the copies
    stay under 1% of the pairs, so the collection threshold is set by different pictures, not by them)."""
    root = tmp_path_factory.mktemp("dup-page")
    photos = root / "photos"
    files = textures(photos, 48)
    (photos / "phone").mkdir()
    with Image.open(files[5]) as im:
        im.save(photos / "copy_a.jpg", quality=60)
        im.save(photos / "phone" / "copy_b.jpg", quality=40)
    with Image.open(files[11]) as im:
        im.save(photos / "phone" / "copy_c.jpg", quality=50)
    encoder = create_encoder(EncoderConfig(model=str(tiny_clip_dir), device="cpu", precision="fp32"))
    with Collection(root / "data") as col:
        ingest(photos, col, encoder, IngestConfig(batch_size=8, progress=False))
    encoder.close()
    return root


@pytest.fixture(scope="module")
def client(library: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = server_settings(library / "data", tmp_path_factory.mktemp("dup-state"))
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="module")
def command(library: Path) -> dict[str, Any]:
    r = CliRunner().invoke(app, ["duplicates", "--data-dir", str(library / "data"), "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_the_api_lists_the_commands_groups(
    client: TestClient, command: dict[str, Any], library: Path
) -> None:
    r = client.get("/api/duplicates")
    assert r.status_code == 200, r.text
    body = r.json()
    assert [g["ids"] for g in body["groups"]] == [g["ids"] for g in command["groups"]]
    assert body["threshold"] == body["default_threshold"] == command["threshold"]
    assert body["total_groups"] == 2 and body["total_copies"] == 3 and not body["has_more"]
    first = body["groups"][0]
    names = sorted((m["file_name"], m["folder"]) for m in first["members"])
    assert names == [("copy_a.jpg", ""), ("copy_b.jpg", "phone"), ("img_0005.jpg", "")]
    assert first["size"] == 3 and 0 < first["min_cosine"] <= 1
    assert str(library) not in r.text  # named by relative path, never by where the server keeps them


def test_the_page_shows_each_group_as_a_row(client: TestClient, library: Path) -> None:
    home = client.get("/")
    assert 'href="/duplicates"' in home.text  # linked from the main page's navigation
    r = client.get("/duplicates")
    assert r.status_code == 200
    html = r.text
    assert html.count('class="dup-group"') == 2 and html.count("dup-member") == 5
    assert html.count('class="badge">largest') == 2
    for name in ("copy_a.jpg", "copy_b.jpg", "copy_c.jpg", "img_0005.jpg", "img_0011.jpg"):
        assert name in html
    assert ">phone<" in html and str(library) not in html
    check_snapshot("duplicates", normalise(html, library))


def test_groups_and_members_are_paged_and_capped(client: TestClient, command: dict[str, Any]) -> None:
    one = client.get("/api/duplicates", params={"per_page": 1, "members": 2}).json()
    assert one["has_more"] and len(one["groups"]) == 1
    assert one["groups"][0]["size"] == 3 and one["groups"][0]["ids"] == command["groups"][0]["ids"][:2]
    two = client.get("/api/duplicates", params={"per_page": 1, "page": 2}).json()
    assert not two["has_more"] and two["groups"][0]["ids"] == command["groups"][1]["ids"]
    assert client.get("/api/duplicates", params={"page": 9}).json()["groups"] == []
    page = client.get("/duplicates", params={"per_page": 1, "members": 2}).text
    assert "2 shown, 1 more" in page
    assert 'rel="next" href="/duplicates?per_page=1&amp;members=2&amp;page=2"' in page
    assert "No groups on this page" in client.get("/duplicates", params={"page": 9}).text


def test_a_stricter_threshold_is_grouped_from_the_pairs_found(client: TestClient) -> None:
    default = client.get("/api/duplicates").json()
    weakest = min(g["min_cosine"] for g in default["groups"])
    strongest = max(g["min_cosine"] for g in default["groups"])
    between = (weakest + strongest) / 2
    if between <= default["threshold"] or weakest == strongest:
        pytest.skip("the two planted groups are joined at the same cosine under this model")
    stricter = client.get("/api/duplicates", params={"threshold": between}).json()
    assert stricter["threshold"] == between and stricter["default_threshold"] == default["threshold"]
    assert len(stricter["groups"]) < len(default["groups"]) + 1
    assert all(g["min_cosine"] >= between for g in stricter["groups"])


@pytest.mark.parametrize(
    "params",
    [
        {"page": 0},
        {"page": 10_001},
        {"page": "two"},
        {"per_page": 0},
        {"per_page": 51},
        {"members": 1},
        {"members": 49},
        {"threshold": 0},
        {"threshold": 1.5},
        {"threshold": "nan"},
        {"threshold": "high"},
    ],
)
def test_bad_parameters_are_refused(client: TestClient, params: dict[str, Any]) -> None:
    api = client.get("/api/duplicates", params=params)
    assert api.status_code == 422 and api.json()["error"]["type"] == "ValidationError"
    page = client.get("/duplicates", params=params)
    assert page.status_code == 422 and "text/html" in page.headers["content-type"]
    assert "malformed request" in page.text


def test_a_threshold_below_the_collections_is_refused(client: TestClient) -> None:
    default = client.get("/api/duplicates").json()["threshold"]
    r = client.get("/api/duplicates", params={"threshold": default / 2})
    assert r.status_code == 422 and "or stricter" in r.json()["error"]["message"]
    assert client.get("/duplicates", params={"threshold": default / 2}).status_code == 422
