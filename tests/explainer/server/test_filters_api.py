"""Filters through the JSON API (`"filters": {...}` on /api/search) and browsing with GET /api/images."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from explainer.server import create_app
from retrieval import Collection, IngestConfig
from retrieval.encoders import EncoderConfig, create_encoder
from retrieval.ingest import ingest
from tests.helpers import draw_shape
from tests.server_kit import server_settings

OLD_NS = 1_500_000_000 * 10**9  # 2017-07-14: the modification time of photos without EXIF


def _dated(path: Path, i: int, when: str, size: tuple[int, int] = (96, 72)) -> None:
    draw_shape(path, i, size)
    exif = Image.Exif()
    exif[0x8769] = {0x9003: when}  # the Exif IFD's DateTimeOriginal
    with Image.open(path) as im:
        im.load()
        im.save(path, exif=exif.tobytes())


@pytest.fixture(scope="module")
def photos_data(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("filters-api")
    photos = root / "photos"
    for i in range(6):
        _dated(photos / "2019-trip" / f"trip_{i}.jpg", i, "2019:07:14 10:00:00")
    for i in range(6, 10):
        _dated(photos / "2023-home" / f"home_{i}.jpg", i, "2023:03:02 18:30:00", (72, 96))
    draw_shape(photos / "2023-home" / "undated.png", 11, (80, 80), fmt="PNG")
    os.utime(photos / "2023-home" / "undated.png", ns=(OLD_NS, OLD_NS))
    data = root / "data"
    encoder = create_encoder(EncoderConfig(model=str(tiny_clip_dir), device="cpu", precision="fp32"))
    with Collection(data) as collection:
        ingest(photos, collection, encoder, IngestConfig(batch_size=8, progress=False))
    encoder.close()
    return photos, data


@pytest.fixture(scope="module")
def client(photos_data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = server_settings(photos_data[1], tmp_path_factory.mktemp("state"))
    with TestClient(create_app(settings)) as c:
        yield c


def _search(client: TestClient, **body: object) -> list[dict[str, object]]:
    r = client.post("/api/search", json={"text": "a photo", "top_k": 50, "explain": False, **body})
    assert r.status_code == 200, r.text
    return r.json()["results"]


def test_search_filters_as_one_object(client: TestClient, photos_data: tuple[Path, Path]) -> None:
    photos = photos_data[0]
    hits = _search(client, filters={"folder": str(photos / "2019-trip")})
    assert len(hits) == 6 and all(h["folder"] == "2019-trip" for h in hits)
    hits = _search(client, filters={"folder": "2023-home", "after": "2023-01-01"})
    assert sorted(h["file_name"] for h in hits) == [f"home_{i}.jpg" for i in range(6, 10)]
    assert all(h["taken_at"] == "2023-03-02T18:30:00" and h["taken_source"] == "exif" for h in hits)
    hits = _search(client, filters={"before": "2018-12-31"})
    assert [h["file_name"] for h in hits] == ["undated.png"] and hits[0]["taken_source"] == "mtime"
    assert len(_search(client, filters={"type": "png"})) == 1
    assert len(_search(client, filters={"orientation": "portrait"})) == 4
    assert len(_search(client, filters={"orientation": "square", "min_size": 80})) == 1
    assert len(_search(client, filters={"min_size": 81})) == 0
    # the top-level fields mean the same
    assert len(_search(client, folder="2019-trip", before="2019-07-14")) == 6


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ({"after": "2019-02-30"}, "after is not a real date"),
        ({"after": "July"}, "after"),
        ({"after": "2020-01-01", "before": "2019-01-01"}, "later than before"),
        ({"type": "exe"}, "type must be one of"),
        ({"orientation": "round"}, "orientation must be one of"),
        ({"min_size": 0}, "min_size"),
        ({"colour": "red"}, "colour"),
        ({"folder": "/etc"}, "outside every indexed folder"),
        ({"folder": "nowhere"}, "no folder nowhere"),
    ],
)
def test_bad_filters_are_a_clear_422(client: TestClient, filters: dict[str, object], message: str) -> None:
    r = client.post("/api/search", json={"text": "a photo", "explain": False, "filters": filters})
    assert r.status_code == 422, r.text
    assert message in r.text


def test_a_filter_given_twice_differently_is_refused(client: TestClient) -> None:
    r = client.post("/api/search", json={"text": "x", "folder": "a", "filters": {"folder": "b"}})
    assert r.status_code == 422 and "given twice" in r.text


def test_browse_by_date_and_by_folder(client: TestClient) -> None:
    r = client.get("/api/images", params={"per_page": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["total"] == 11 and body["has_more"] and len(body["images"]) == 4
    assert [i["taken_at"] for i in body["images"]] == ["2023-03-02T18:30:00"] * 4  # newest first
    assert "/" not in body["images"][0]["relative_path"][:1] and body["images"][0]["thumb_url"]
    last = client.get("/api/images", params={"per_page": 4, "page": 3}).json()
    assert len(last["images"]) == 3 and not last["has_more"]
    assert last["images"][-1]["file_name"] == "undated.png"  # 2017 by its modification time
    by_folder = client.get("/api/images", params={"sort": "folder", "per_page": 100}).json()
    folders = [i["folder"] for i in by_folder["images"]]
    assert folders == sorted(folders) and folders[0] == "2019-trip"
    trip = client.get("/api/images", params={"folder": "2019-trip", "type": "jpg"}).json()
    assert trip["total"] == 6


@pytest.mark.parametrize(
    "params",
    [{"sort": "size"}, {"page": 0}, {"per_page": 1000}, {"after": "2019-13-01"}, {"folder": "/etc"}],
)
def test_browse_bounds(client: TestClient, params: dict[str, object]) -> None:
    assert client.get("/api/images", params=params).status_code == 422


# -- the page --------------------------------------------------------------------------------------


def test_the_empty_page_lists_the_collection_with_filters(client: TestClient) -> None:
    html = client.get("/").text
    assert "Your collection" in html and html.count('class="card photo"') == 11
    assert html.index("home_") < html.index("trip_")  # newest first: 2023 before 2019
    html = client.get("/", params={"folder": "2019-trip", "sort": "folder"}).text
    assert html.count('class="card photo"') == 6 and "home_" not in html
    assert 'value="2019-trip"' in html and '<details class="filters" open>' in html
    assert "No photo matches" in client.get("/", params={"type": "gif"}).text
    r = client.get("/", params={"folder": "/etc"})
    assert r.status_code == 422 and "outside every indexed folder" in r.text


def test_the_page_searches_with_the_filters(client: TestClient) -> None:
    html = client.get("/", params={"q": "a photo", "after": "2023-01-01", "k": 24}).text
    assert html.count('class="card"') == 4  # the EXIF-dated home photos (undated.png is from 2017)
    assert "taken 2023-03-02 18:30" in html and "trip_" not in html


def test_the_form_carries_the_filters_to_the_results(client: TestClient) -> None:
    r = client.post(
        "/",
        data={"text": "a photo", "folder": "2023-home", "orientation": "portrait", "after": ""},
        follow_redirects=False,
    )
    assert r.status_code == 303
    assert r.headers["location"] == "/?q=a+photo&folder=2023-home&orientation=portrait"


def test_explanations_for_a_filtered_page(client: TestClient) -> None:
    r = client.post(
        "/api/search", json={"text": "a photo", "top_k": 3, "explain": False, "folder": "2019-trip"}
    )
    echo = r.json()["query"]
    ids = [c["id"] for c in r.json()["results"]]
    spec = {k: v for k, v in echo.items() if k != "kind"}
    r = client.post("/api/explain", json={**spec, "ids": ids, "wait_s": 5})
    assert r.status_code == 200, r.text
    assert {e["id"] for e in r.json()["explanations"]} == set(ids)
    bad = client.post("/api/explain", json={**spec, "after": "2019-02-30", "ids": ids})
    assert bad.status_code == 422 and "not a real date" in bad.text
