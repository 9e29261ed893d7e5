"""The HTML pages, checked against snapshots in tests/snapshots/ (scores, ids, keys and paths normalised).

A deterministic searcher and evidence stand in for the tiny model, so a snapshot changes only when
the page does. To accept a change on purpose: CLEARSIGHT_UPDATE_SNAPSHOTS=1 pytest
tests/explainer/server/test_pages.py
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from explainer.server import create_app
from tests.helpers import SNAPSHOTS
from tests.server_kit import FailingSearcher, FixedEvidence, FixedSearcher, build_collection, server_settings

UPDATE = os.environ.get("CLEARSIGHT_UPDATE_SNAPSHOTS") == "1"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path) -> Path:
    return build_collection(tmp_path_factory.mktemp("server-pages"), tiny_clip_dir, n=6)


@pytest.fixture(scope="module")
def client(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    searcher = FixedSearcher.open(data_dir)
    settings = server_settings(data_dir, tmp_path_factory.mktemp("pages-state"), default_top_k=4)
    with TestClient(create_app(settings, searcher=searcher, evidence=FixedEvidence())) as c:
        yield c
    searcher.close()


def normalise(html: str, *paths: Path) -> str:
    for p in paths:
        html = html.replace(str(p), "<TMP>")
    html = re.sub(r"-?\d+\.\d{3,}", "<NUM>", html)  # scores, confidences, box percentages
    html = re.sub(r"\b[0-9a-f]{32}\b", "<KEY>", html)  # uploaded-image keys
    html = re.sub(r"(/api/images/|/images/|like=|data-id=\"|Image #|image |like #)\d+", r"\1<ID>", html)
    html = re.sub(r"\d+ images", "<N> images", html)
    html = re.sub(r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}", "<DATE>", html)  # photos without EXIF: the file's date
    return "\n".join(line.rstrip() for line in html.splitlines() if line.strip()) + "\n"


def check_snapshot(name: str, html: str) -> None:
    path = SNAPSHOTS / f"{name}.html"
    if UPDATE or not path.exists():
        if not UPDATE and os.environ.get("CI"):
            pytest.fail(f"snapshot {path.name} is missing; create it with CLEARSIGHT_UPDATE_SNAPSHOTS=1")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(html)
        return
    expected = path.read_text()
    assert html == expected, f"{path.name} differs; if intended, rerun with CLEARSIGHT_UPDATE_SNAPSHOTS=1"


def test_empty_search_page(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200
    check_snapshot("index_empty", normalise(r.text))


def test_results_page(client: TestClient, data_dir: Path) -> None:
    r = client.get("/", params={"q": "a red square", "k": 4})
    assert r.status_code == 200
    html = r.text
    assert html.count('class="card"') == 4 and html.count('class="box r1"') == 4
    assert 'data-explain="pending"' in html  # explanations are fetched per card, not awaited
    assert 'rel="next"' in html and 'rel="prev"' not in html
    check_snapshot("index_results", normalise(html, data_dir))
    second = client.get("/", params={"q": "a red square", "k": 4, "o": 4})
    assert second.text.count('class="card"') == 2 and 'rel="prev"' in second.text


def test_upload_redirects_to_a_page_naming_the_image(client: TestClient) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), "blue").save(buf, format="PNG")
    files = {"image": ("q.png", buf.getvalue(), "image/png")}
    r = client.post("/", data={"text": "blue", "w": "0.7", "k": "4"}, files=files, follow_redirects=False)
    assert r.status_code == 303 and "qimg=" in r.headers["location"] and "w=0.7" in r.headers["location"]
    page = client.get(r.headers["location"])
    assert page.status_code == 200 and "text+image" in page.text and "/api/query-images/" in page.text


def test_bad_upload_is_explained_on_the_page(client: TestClient) -> None:
    files = {"image": ("q.jpg", b"definitely not an image", "image/jpeg")}
    r = client.post("/", data={"text": "blue"}, files=files)
    assert r.status_code == 422
    check_snapshot("index_bad_upload", normalise(r.text))


def test_more_like_this_page(client: TestClient) -> None:
    r = client.get("/?like=2&k=4")
    assert r.status_code == 200 and "like #2" in r.text and r.text.count('class="card"') == 4


def test_detail_page_with_full_evidence(client: TestClient, data_dir: Path) -> None:
    r = client.get("/images/3", params={"q": "a red square", "r": 2})
    assert r.status_code == 200
    assert '<table class="evidence">' in r.text and "Evidence as PNG" in r.text
    assert f"{data_dir.parent}/images/img_0002.jpg" in r.text  # a loopback server offers the path to copy
    check_snapshot("detail", normalise(r.text, data_dir.parent))
    plain = client.get("/images/3")
    assert plain.status_code == 200 and 'data-explain="none"' in plain.text


def test_error_pages(client: TestClient) -> None:
    missing = client.get("/images/999999")
    assert missing.status_code == 404
    check_snapshot("error_404", normalise(missing.text))
    assert "not ready" not in missing.text and "status ok" in missing.text  # the server's real state
    assert client.get("/?k=0").status_code == 422


def test_model_unavailable_page(data_dir: Path, tmp_path: Path) -> None:
    searcher = FailingSearcher.open(data_dir)
    try:
        with TestClient(create_app(server_settings(data_dir, tmp_path), searcher=searcher)) as c:
            r = c.get("/", params={"q": "a red square"})
    finally:
        searcher.close()
    assert r.status_code == 503
    check_snapshot("index_unavailable", normalise(r.text))


def test_a_demo_model_is_labelled_on_every_page(
    tmp_path: Path, tiny_clip_dir: Path, client: TestClient
) -> None:
    import shutil

    demo_model = shutil.copytree(tiny_clip_dir, tmp_path / "models" / "clearsight-demo-tiny-0123456789")
    data = build_collection(tmp_path / "demo", demo_model, n=3)
    with TestClient(create_app(server_settings(data, tmp_path))) as c:
        for page in (c.get("/"), c.get("/", params={"q": "a red square"})):
            assert page.status_code == 200
            assert "Demo model." in page.text and "synthetic coloured shapes" in page.text
    assert "Demo model." not in client.get("/").text  # a real model's page carries no such label
