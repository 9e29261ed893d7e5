"""The reference systems' features over HTTP: POST /search compatibility, image→text, URL queries."""

from __future__ import annotations

import base64
import http.server
import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from explainer.server import create_app
from retrieval import Collection
from tests.server_kit import build_collection, server_settings

#: A copy of the response shape the reference system's clients read (written from its README and
#: page, not from its code): every result carries these keys with these types.
REFERENCE_RESULT_SHAPE: dict[str, type | tuple[type, ...]] = {
    "path": str,
    "image_path": str,
    "filename": str,
    "distance": (float, int),
    "caption": str,
    "explanation": str,
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path) -> Path:
    return build_collection(tmp_path_factory.mktemp("server-refsys"), tiny_clip_dir, n=12)


@pytest.fixture(scope="module")
def client(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = server_settings(data_dir, tmp_path_factory.mktemp("refsys-state"))
    with TestClient(create_app(settings)) as c:
        yield c


def _image_bytes(data_dir: Path, image_id: int) -> bytes:
    with Collection(data_dir) as col:
        rec = col.catalog.get_image(image_id)
        assert rec is not None
        return Path(rec.path).read_bytes()


def test_compat_search_has_the_reference_shape(client: TestClient) -> None:
    resp = client.post("/search", json={"query": "a red square", "top_k": 5})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["query"] == "a red square" and body["top_k"] == 5 and len(body["results"]) == 5
    for r in body["results"]:
        for key, kind in REFERENCE_RESULT_SHAPE.items():
            assert isinstance(r[key], kind), (key, r)
        assert r["explanation"] and r["path"] == r["image_path"]
        assert r["score"] == r["distance"]
        img = client.get(r["path"])  # the reference page puts `path` straight into <img src>
        assert img.status_code == 200 and img.content[:4] in (b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xdb")
        assert r["filename"].startswith("img_") and "/" not in r["filename"]
    # the same cards as /api/search: same images in the same order
    api = client.post("/api/search", json={"text": "a red square", "top_k": 5, "explain": False}).json()
    assert [c["image_url"] for c in api["results"]] == [r["path"] for r in body["results"]]


@pytest.mark.parametrize(("top_k", "want"), [(0, 1), (-3, 1), (50, 10), (3, 3), (2.7, 2)])
def test_compat_top_k_is_clamped(client: TestClient, top_k: float, want: int) -> None:
    body = client.post("/search", json={"query": "a blue circle", "top_k": top_k}).json()
    assert body["top_k"] == want and len(body["results"]) == want


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        ({"query": "   ", "top_k": 5}, 400),
        ({"query": "", "top_k": 5}, 400),
        ({"top_k": 5}, 422),
        ({"query": 7}, 422),
        ({"query": "x", "top_k": "many"}, 422),
        ({"query": "x" * 1001}, 422),
        ([1, 2], 422),
    ],
)
def test_compat_errors_use_detail(client: TestClient, payload: object, status: int) -> None:
    resp = client.post("/search", json=payload)
    assert resp.status_code == status
    assert set(resp.json()) == {"detail"} and resp.json()["detail"]


def test_compat_route_is_documented(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/search"]["post"]
    assert "compatibility" in op["tags"] and "Compatibility" in op["summary"]


def test_image_to_captions(client: TestClient, data_dir: Path) -> None:
    b64 = base64.b64encode(_image_bytes(data_dir, 3)).decode()
    resp = client.post("/api/search", json={"image_base64": b64, "target": "captions", "top_k": 3})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["target"] == "captions" and len(body["results"]) == 3
    for r in body["results"]:
        assert set(r) >= {"text", "source", "image_id", "score", "rank", "confidence", "image_url"}
        assert client.get(r["image_url"]).status_code == 200
    assert isinstance(body["no_confident_match"], bool)
    bad = client.post("/api/search", json={"text": "x", "target": "poems"})
    assert bad.status_code == 422


def test_image_search_carries_confidence_and_the_cache(client: TestClient) -> None:
    first = client.post("/api/search", json={"text": "a green circle", "top_k": 4, "explain": False}).json()
    again = client.post("/api/search", json={"text": "a green circle", "top_k": 4, "explain": False}).json()
    assert isinstance(first["no_confident_match"], bool)
    assert all(0.0 <= c["confidence"] <= 1.0 for c in first["results"])
    assert first["cached"] is False and again["cached"] is True
    assert [c["id"] for c in first["results"]] == [c["id"] for c in again["results"]]


class _Images(http.server.BaseHTTPRequestHandler):
    body: ClassVar[bytes] = b""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)


@pytest.fixture(scope="module")
def image_server() -> Iterator[str]:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), "blue").save(buf, format="PNG")
    _Images.body = buf.getvalue()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/q.png"
    srv.shutdown()
    srv.server_close()


def test_url_queries_off_by_default_and_internal_addresses_refused(
    client: TestClient, data_dir: Path, tmp_path: Path, image_server: str
) -> None:
    off = client.post("/api/search", json={"image_url": image_server, "explain": False})
    assert off.status_code == 422 and "does not fetch image URLs" in off.json()["error"]["message"]
    settings = server_settings(data_dir, tmp_path, allow_url_queries=True)
    with TestClient(create_app(settings)) as on:
        # allowed, yet 127.0.0.1 is loopback: the server never fetches internal addresses
        resp = on.post("/api/search", json={"image_url": image_server, "explain": False})
        assert resp.status_code == 422 and "loopback" in resp.json()["error"]["message"]
        meta = on.post("/api/search", json={"image_url": "http://169.254.169.254/latest", "explain": False})
        assert meta.status_code == 422
        two = on.post("/api/search", json={"image_url": image_server, "image_key": "0" * 32})
        assert two.status_code == 422
        long = on.post("/api/search", json={"image_url": "http://example.com/" + "a" * 3000})
        assert long.status_code == 422


def test_captions_target_without_captions_says_why(tmp_path: Path, encoder: object) -> None:
    from retrieval.ingest import IngestConfig, ingest
    from tests.helpers import make_folder

    make_folder(tmp_path / "imgs", 4)
    with Collection(tmp_path / "data") as col:
        ingest(tmp_path / "imgs", col, encoder, IngestConfig(progress=False))  # type: ignore[arg-type]
    with TestClient(create_app(server_settings(tmp_path / "data", tmp_path))) as c:
        resp = c.post("/api/search", json={"text": "a red square", "target": "captions"})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["results"] == [] and body["no_confident_match"] is True and "no captions" in body["note"]


def test_page_shows_confidence_and_the_no_match_state(client: TestClient) -> None:
    for q in ("a red square", "a violin concerto in d minor"):
        api = client.post("/api/search", json={"text": q, "top_k": 4, "explain": False}).json()
        html = client.get("/", params={"q": q, "k": 4}).text
        assert ("No confident match" in html) == api["no_confident_match"], q
        assert html.count('class="match ') == len(api["results"])


def test_page_captions_mode_and_evidence_choice(client: TestClient) -> None:
    html = client.get("/", params={"q": "a red square", "t": "captions", "k": 3}).text
    assert 'class="caption-hit"' in html and "a red square" in html
    assert '<option value="captions" selected>' in html
    grid = client.get("/", params={"q": "a red square", "k": 2, "ev": "grid"})
    assert grid.status_code == 200 and '<option value="grid" selected>' in grid.text
    assert client.get("/", params={"q": "x", "ev": "magic"}).status_code == 422
    assert client.get("/", params={"q": "x", "t": "poems"}).status_code == 422


def test_page_url_in_the_box_is_refused_when_off(client: TestClient) -> None:
    r = client.post("/", data={"text": "https://example.com/cat.jpg"}, follow_redirects=False)
    assert r.status_code == 422 and "does not fetch image URLs" in r.text


def test_a_repeated_page_needs_no_encoder_call(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole page (search, evidence, captions) of a repeated query comes from the cache."""
    pipeline = client.app.state.clearsight.pipeline  # type: ignore[attr-defined]
    encoder = pipeline.searcher.encoder
    calls: list[str] = []
    for name in ("encode_texts", "encode_images", "encode_pixels"):
        real = getattr(encoder, name)

        def counting(*args: object, _name: str = name, _real: object = real, **kw: object) -> object:
            calls.append(_name)
            return _real(*args, **kw)  # type: ignore[operator]

        monkeypatch.setattr(encoder, name, counting)
    body = {"text": "an orange square in a corner", "top_k": 3, "explain": False}
    first = client.post("/api/search", json=body).json()
    assert first["cached"] is False and calls  # the first ask runs the model
    calls.clear()
    again = client.post("/api/search", json=body).json()
    assert again["cached"] is True and calls == []
    assert [c["id"] for c in again["results"]] == [c["id"] for c in first["results"]]
    assert [c["evidence"] for c in again["results"]] == [c["evidence"] for c in first["results"]]
