"""The JSON API through FastAPI's TestClient: searches, uploads, bounds, limits, safety and failures."""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from explainer.server import create_app
from retrieval import Collection
from tests.server_kit import GENERATED_SOURCE, FailingSearcher, build_collection, server_settings

SMALL_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path) -> Path:
    return build_collection(tmp_path_factory.mktemp("server-api"), tiny_clip_dir, n=12)


@pytest.fixture(scope="module")
def client(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = server_settings(data_dir, tmp_path_factory.mktemp("api-state"), max_upload_bytes=SMALL_LIMIT)
    with TestClient(create_app(settings)) as c:
        yield c


def _png(colour: str = "red", size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _image_bytes(data_dir: Path, image_id: int) -> bytes:
    with Collection(data_dir) as col:
        rec = col.catalog.get_image(image_id)
        assert rec is not None
        return Path(rec.path).read_bytes()


def _file_name(data_dir: Path, image_id: int) -> str:
    with Collection(data_dir) as col:
        rec = col.catalog.get_image(image_id)
        assert rec is not None
        return Path(rec.path).name


def _error(resp: object, status: int) -> dict[str, str]:
    assert getattr(resp, "status_code") == status, getattr(resp, "text")  # noqa: B009
    body = getattr(resp, "json")()  # noqa: B009
    assert set(body) == {"error"} and body["error"]["message"], body
    return body["error"]


def test_health_reports_the_loaded_index(client: TestClient) -> None:
    r = client.get("/api/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["index"]["images"] == 12
    assert body["explainer"] == "offline"
    assert "/" not in body["index"]["model"]  # a local model directory is named, not shown


def test_text_search_returns_cards(client: TestClient) -> None:
    r = client.post("/api/search", json={"text": "a red circle", "top_k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    cards = body["results"]
    assert len(cards) == 3 and body["top_k"] == 3 and body["has_more"] is True
    assert [c["rank"] for c in cards] == [1, 2, 3]
    assert [c["score"] for c in cards] == sorted((c["score"] for c in cards), reverse=True)
    for c in cards:
        assert c["explanation"]["backend"] == "offline" and c["explanation"]["text"]
        assert c["image_url"] == f"/api/images/{c['id']}"
        assert c["caption"] and c["caption_source"] in ("dataset", GENERATED_SOURCE)
        for e in c["evidence"]:
            x0, y0, x1, y1 = e["box"]
            assert 0 <= x0 < x1 <= c["width"] and 0 <= y0 < y1 <= c["height"]
    # files are named by name and by path relative to the indexed folder, never by absolute path
    assert '"path":' not in r.text and str(Path.cwd()) not in r.text
    assert all(c["file_name"] and not c["relative_path"].startswith("/") for c in cards)
    assert body["query"] == {
        "text": "a red circle",
        "kind": "text",
        "image_key": None,
        "like_id": None,
        "weight": 0.5,
        "negative": None,
        "min_score": None,
        **dict.fromkeys(("folder", "after", "before", "type", "min_size", "orientation")),
        "show_all": False,
    }


def test_paging_continues_where_the_first_page_ends(client: TestClient) -> None:
    first = client.post("/api/search", json={"text": "blue", "top_k": 5, "explain": False}).json()
    second = client.post(
        "/api/search", json={"text": "blue", "top_k": 5, "offset": 5, "explain": False}
    ).json()
    last = client.post(
        "/api/search", json={"text": "blue", "top_k": 5, "offset": 10, "explain": False}
    ).json()
    assert [c["rank"] for c in second["results"]] == [6, 7, 8, 9, 10]
    ids = [c["id"] for page in (first, second, last) for c in page["results"]]
    assert len(ids) == 12 == len(set(ids))
    assert last["has_more"] is False


def test_deferred_explanations_then_explain(client: TestClient) -> None:
    page = client.post("/api/search", json={"text": "a green square", "top_k": 4, "explain": False}).json()
    assert all(c["explanation"] is None for c in page["results"])
    ids = [c["id"] for c in page["results"]]
    r = client.post("/api/explain", json={"text": "a green square", "ids": [*ids[:2], 999999]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [e["id"] for e in body["explanations"]] == ids[:2] and body["missing"] == [999999]
    assert all(e["explanation"]["backend"] == "offline" for e in body["explanations"])
    # ids never on a page for this query are rebuilt from the catalog
    other = client.post("/api/explain", json={"text": "something else", "ids": ids[:1], "ranks": [3]})
    assert other.status_code == 200 and other.json()["explanations"][0]["id"] == ids[0]


def test_multipart_upload_finds_the_same_image_and_can_be_reused(client: TestClient, data_dir: Path) -> None:
    data = _image_bytes(data_dir, 5)
    r = client.post("/api/search", files={"image": ("q.jpg", data, "image/jpeg")}, data={"top_k": "3"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"]["kind"] == "image" and body["results"][0]["id"] == 5
    key = body["query"]["image_key"]
    again = client.post("/api/search", json={"image_key": key, "top_k": 3, "explain": False}).json()
    assert [c["id"] for c in again["results"]] == [c["id"] for c in body["results"]]
    assert client.get(f"/api/query-images/{key}").headers["content-type"] == "image/png"
    # a well-formed key the server does not hold names a missing resource: 404, on every route
    gone = "0" * 32
    assert client.post("/api/search", json={"image_key": gone}).status_code == 404
    assert client.get(f"/api/images/5/evidence.png?qimg={gone}").status_code == 404
    assert client.get(f"/?qimg={gone}").status_code == 404


def test_base64_and_hybrid_and_like(client: TestClient, data_dir: Path) -> None:
    b64 = "data:image/jpeg;base64," + base64.b64encode(_image_bytes(data_dir, 7)).decode()
    r = client.post("/api/search", json={"image_base64": b64, "top_k": 2, "explain": False})
    assert r.status_code == 200 and r.json()["results"][0]["id"] == 7
    hybrid = client.post("/api/search", json={"image_base64": b64, "text": "red", "weight": 0.3, "top_k": 2})
    assert hybrid.status_code == 200 and hybrid.json()["query"]["kind"] == "text+image"
    like = client.post("/api/search", json={"like_id": 3, "top_k": 2, "explain": False}).json()
    # "more like this" answers with other images: the query image itself is no answer to its own query
    assert like["query"]["like_id"] == 3 and len(like["results"]) == 2
    assert 3 not in [h["id"] for h in like["results"]]
    assert all(h["file_name"].startswith("img_") for h in like["results"])  # like hits name their files
    # the same image uploaded (not "more like this") still finds itself first
    assert r.json()["results"][0]["file_name"] == _file_name(data_dir, 7)
    assert client.post("/api/search", json={"like_id": 999999}).status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        {"text": "x", "top_k": 0},
        {"text": "x", "top_k": 101},
        {"text": "x", "offset": -1},
        {"text": "x", "offset": 10_001},
        {"text": "x", "weight": 1.5},
        {"text": "x", "surprise": 1},
        {"text": "   "},
        {},
        {"text": "x", "image_base64": "!!!not base64!!!"},
        {"text": "x", "like_id": 1, "image_key": "0" * 32},
    ],
)
def test_malformed_searches_are_422_with_a_clear_body(client: TestClient, body: dict[str, object]) -> None:
    err = _error(client.post("/api/search", json=body), 422)
    assert err["type"] in ("ValidationError", "BadQuery")


def test_broken_json_and_bad_uploads_are_422(client: TestClient) -> None:
    r = client.post("/api/search", content=b"{not json", headers={"Content-Type": "application/json"})
    _error(r, 422)
    files = {"image": ("q.jpg", b"this is not an image", "image/jpeg")}
    err = _error(client.post("/api/search", files=files), 422)
    assert "not an image" in err["message"]


def test_raw_bodies_are_415(client: TestClient) -> None:
    r = client.post(
        "/api/search", content=b"\xff\xd8\xff" + b"0" * 100, headers={"Content-Type": "image/jpeg"}
    )
    assert _error(r, 415)["type"] == "UnsupportedMediaType"


def test_uploads_over_the_limit_are_413(client: TestClient) -> None:
    big = b"\xff\xd8" + b"\0" * (2 * SMALL_LIMIT)
    raw = b"\xff\xd8" + b"\0" * (4 * SMALL_LIMIT)  # past the body limit, which allows for base64
    _error(client.post("/api/search", content=raw, headers={"Content-Type": "image/jpeg"}), 413)
    _error(client.post("/api/search", files={"image": ("big.jpg", big, "image/jpeg")}), 413)
    b64 = base64.b64encode(big).decode()
    _error(client.post("/api/search", json={"image_base64": b64}), 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming
        for _ in range(8):
            yield b"\0" * SMALL_LIMIT

    _error(client.post("/api/search", content=chunks(), headers={"Content-Type": "application/json"}), 413)


def test_pixel_bound_refuses_decompression_bombs(data_dir: Path, tmp_path: Path) -> None:
    settings = server_settings(data_dir, tmp_path, max_upload_pixels=10_000)
    with TestClient(create_app(settings)) as c:
        err = _error(
            c.post("/api/search", files={"image": ("b.png", _png(size=(200, 200)), "image/png")}), 422
        )
    assert "decompression bomb" in err["message"]


@pytest.mark.parametrize(
    "path",
    [
        "/api/images/..%2f..%2f..%2fetc%2fpasswd",
        "/api/images/..%2F..%2Fpyproject.toml",
        "/static/..%2f..%2fpyproject.toml",
        "/static/../../pyproject.toml",
        "/static/%2e%2e/%2e%2e/pyproject.toml",
        "/api/images/-1",
        "/api/images/abc/thumb",
        "/api/query-images/..%2f..%2fpyproject.toml",
    ],
)
def test_traversal_attempts_never_serve_a_file(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code in (404, 422)
    assert b"[project]" not in r.content and b"root:" not in r.content


def test_images_by_id(client: TestClient) -> None:
    assert client.get("/api/images/1").headers["content-type"] == "image/jpeg"
    thumb = client.get("/api/images/1/thumb?size=100")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 128
    png = client.get("/api/images/2/evidence.png", params={"q": "a red square"})
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    for path in ("/api/images/999999", "/api/images/999999/thumb", "/api/images/999999/evidence.png?q=x"):
        assert _error(client.get(path), 404)["type"] == "NotFound"
    _error(client.get("/api/images/1/thumb?size=5000"), 422)


def test_uploads_are_not_kept_unless_configured(client: TestClient, data_dir: Path, tmp_path: Path) -> None:
    files = {"image": ("q.png", _png("blue"), "image/png")}
    assert client.post("/api/search", files=files, data={"explain": "false"}).status_code == 200
    assert not (data_dir / "uploads").exists()
    settings = server_settings(data_dir, tmp_path, keep_uploads=True, upload_dir=tmp_path / "kept")
    with TestClient(create_app(settings)) as c:
        key = c.post("/api/search", files=files, data={"explain": "false"}).json()["query"]["image_key"]
    assert (tmp_path / "kept" / f"{key}.png").is_file()


def test_a_failing_model_answers_503_json(data_dir: Path, tmp_path: Path) -> None:
    searcher = FailingSearcher.open(data_dir)
    try:
        with TestClient(create_app(server_settings(data_dir, tmp_path), searcher=searcher)) as c:
            err = _error(c.post("/api/search", json={"text": "red"}), 503)
            assert err["type"] == "ModelUnavailable" and "model failed" in err["message"]
            page = c.get("/?q=red")
            assert page.status_code == 503 and "Search is unavailable" in page.text
    finally:
        searcher.close()


def test_without_an_index_the_server_starts_degraded(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    with TestClient(create_app(server_settings(empty, tmp_path))) as c:
        health = c.get("/api/health")
        assert health.status_code == 503 and health.json()["status"] == "degraded"
        assert "clearsight index" in health.json()["reason"] and str(empty) not in health.text
        err = _error(c.post("/api/search", json={"text": "red"}), 503)
        assert err["type"] == "IndexMissing"
        assert c.get("/").status_code == 200


def test_the_groq_key_never_leaks(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "gsk_test_secret_never_shown_4d2c"
    monkeypatch.setenv("GROQ_API_KEY", secret)
    monkeypatch.setenv("GROQ_BASE_URL", "http://127.0.0.1:9")  # nothing listens: explanations fall back
    caplog.set_level(logging.DEBUG)
    settings = server_settings(data_dir, tmp_path, explain_backend="auto")
    seen = []
    with TestClient(create_app(settings)) as c:
        r = c.post("/api/search", json={"text": "a red circle", "top_k": 2})
        assert r.status_code == 200
        cards = r.json()["results"]
        assert {c["explanation"]["backend"] for c in cards} == {"offline"}
        assert all(c["explanation"]["fallback_reason"] for c in cards)
        # clients get the reason's code and a fixed sentence; the base URL and error stay in the log
        for card in cards:
            reason = card["explanation"]["fallback_reason"]
            assert reason.startswith("llm_error: the language model call failed")
            assert "127.0.0.1" not in reason
        assert "127.0.0.1:9" not in r.text and "127.0.0.1:9" in caplog.text
        seen += [r.text, c.get("/api/health").text, c.get("/?q=red").text, c.get("/openapi.json").text]
        seen.append(c.post("/api/explain", json={"text": "blue", "ids": [1]}).text)
        seen.append(c.get(f"/images/{cards[0]['id']}?q=red").text)
    assert "groq:" in seen[1]  # the configured explainer is named...
    for text in [*seen, caplog.text]:
        assert secret not in text  # ...but its key is never shown


def test_openapi_documents_every_route(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path in (
        "/api/search",
        "/api/explain",
        "/api/images/{image_id}",
        "/api/images/{image_id}/thumb",
        "/api/images/{image_id}/evidence.png",
        "/api/health",
    ):
        assert path in spec["paths"], path
    content = spec["paths"]["/api/search"]["post"]["requestBody"]["content"]
    assert set(content) == {"application/json", "multipart/form-data"}
    assert "SearchRequest" in spec["components"]["schemas"] and "Card" in spec["components"]["schemas"]


def test_the_search_form_schema_is_what_a_form_can_send(client: TestClient) -> None:
    form = client.get("/openapi.json").json()["components"]["schemas"]["SearchForm"]["properties"]
    for name, prop in form.items():
        assert "anyOf" not in prop and prop.get("type") != "null", name  # a form cannot send null
    assert form["image_key"]["pattern"] and form["like_id"]["minimum"] == 1
    assert form["min_score"]["minimum"] == -1.0 and form["text"]["maxLength"] > 0


def _detail(client: TestClient, image_id: int, **params: object) -> str:
    page = client.get(f"/images/{image_id}", params=params)
    assert page.status_code == 200, page.text
    return page.text


def test_the_detail_page_names_its_file_and_takes_rank_score_confidence_from_the_search(
    client: TestClient,
) -> None:
    query = "a yellow circle"  # searched nowhere else in this module: the detail page is asked first
    truth_page = client.post("/api/search", json={"text": query, "top_k": 12, "explain": False})
    truth = {h["id"]: h for h in truth_page.json()["results"]}
    low = max(truth.values(), key=lambda h: h["rank"])  # the last hit: a link claiming rank 1 is a lie
    assert low["rank"] > 1 and low["confidence"] is not None
    for claimed in (1, 500):
        html = _detail(client, low["id"], q=query, r=claimed)
        assert f"File: {low['relative_path']}" in html and low["file_name"] in html
        assert f'data-rank="{low["rank"]}"' in html and f'<dd class="num">#{low["rank"]}</dd>' in html
        assert f"#{claimed}</dd>" not in html
        assert f"{round(low['confidence'] * 100)}%</dd>" in html  # the card's calibrated confidence
    # the page's explanation request (its rank from the page, here a false one) gets the search's facts
    ex = client.post("/api/explain", json={"text": query, "ids": [low["id"]], "ranks": [1]}).json()
    text = ex["explanations"][0]["explanation"]["text"]
    assert f"rank {low['rank']}" in text and "rank 1," not in text
    card = client.post("/api/search", json={"text": query, "top_k": 12}).json()["results"]
    same = next(c for c in card if c["id"] == low["id"])
    assert ex["explanations"][0]["explanation"]["confidence"] == same["explanation"]["confidence"]


def test_the_detail_page_shows_no_rank_for_an_image_its_query_does_not_return(client: TestClient) -> None:
    # "more like this" never returns the image it asks about: its own detail page has no rank to show
    html = _detail(client, 4, like=4, r=1)
    assert "not among this query's results" in html and "data-rank=" not in html
    assert 'data-explain="none"' in html and "#1</dd>" not in html


def test_page_urls_carry_the_whole_spec_and_refuse_it_out_of_bounds(client: TestClient) -> None:
    """The pages and the evidence picture read the query spec from the URL with the spec's own bounds,
    a filter (min_score) included, and the links they make carry it on."""
    hits = client.post("/api/search", json={"text": "a red square", "top_k": 12, "explain": False}).json()
    scores = sorted((h["score"] for h in hits["results"]), reverse=True)
    cut = round((scores[2] + scores[3]) / 2, 4)  # between the third and fourth best: three hits reach it
    assert scores[2] > cut > scores[3]
    page = client.get("/", params={"q": "a red square", "k": 12, "min_score": cut})
    assert page.status_code == 200 and page.text.count('class="card"') == 3
    assert f"min_score={cut:g}" in page.text  # the detail links keep the filter
    for bad in ({"w": "2"}, {"like": "0"}, {"qimg": "nothex"}, {"min_score": "-3"}, {"q": "x" * 1001}):
        assert client.get("/", params={"q": "red", **bad}).status_code == 422, bad
        assert client.get("/api/images/1/evidence.png", params={"q": "red", **bad}).status_code == 422, bad
    params = client.get("/openapi.json").json()["paths"]["/api/images/{image_id}/evidence.png"]["get"]
    assert {"q", "qimg", "like", "neg", "w", "min_score"} <= {p["name"] for p in params["parameters"]}
