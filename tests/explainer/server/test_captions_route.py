"""Captions in the server: pages answer at once with what is cached, the uncaptioned cards get a generated
caption from the worker (through POST /api/captions, as the page's script asks), a repeated search shows
it, and an explanation is grounded in it. A real tiny BLIP loads through the same code as real weights."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from explainer.server import create_app
from retrieval import Collection, EncoderConfig, IngestConfig, create_encoder
from retrieval.demo.blip import make_blip
from retrieval.ingest import ingest
from retrieval.status import caption_progress
from tests.helpers import make_folder
from tests.server_kit import server_settings

N = 14
ROUNDS = 30  # POST /api/captions calls a test makes at most (each waits up to 20 s): a bound on a hang


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_blip(tmp_path_factory.mktemp("blip"), "tiny", seed=0)


@pytest.fixture()
def data_dir(tmp_path: Path, tiny_clip_dir: Path) -> Path:
    """Photos without dataset captions: every card starts uncaptioned, as in the main job."""
    make_folder(tmp_path / "images", N)
    encoder = create_encoder(EncoderConfig(model=str(tiny_clip_dir), device="cpu", precision="fp32"))
    with Collection(tmp_path / "data") as c:
        ingest(tmp_path / "images", c, encoder, IngestConfig(progress=False))
    encoder.close()
    return tmp_path / "data"


def _client(data_dir: Path, tmp_path: Path, blip_dir: Path, **overrides: object) -> TestClient:
    values: dict[str, object] = {"caption_model": str(blip_dir), "caption_background": False}
    values.update(overrides)
    return TestClient(create_app(server_settings(data_dir, tmp_path, **values)))


@pytest.fixture()
def client(data_dir: Path, tmp_path: Path, blip_dir: Path) -> Iterator[TestClient]:
    with _client(data_dir, tmp_path, blip_dir) as c:
        yield c


def _caption_all(client: TestClient, ids: list[int]) -> dict[int, dict[str, object]]:
    got: dict[int, dict[str, object]] = {}
    for _ in range(ROUNDS):
        want = [i for i in ids if i not in got]
        if not want:
            break
        body = client.post("/api/captions", json={"ids": want, "wait_s": 20}).json()
        got.update((c["id"], c) for c in body["captions"] if not c["pending"])
    return got


def test_cards_get_generated_captions_and_explanations_use_them(client: TestClient) -> None:
    first = client.post("/api/search", json={"text": "a red square", "top_k": 12, "explain": False}).json()
    ids = [r["id"] for r in first["results"]]
    assert len(ids) == 12
    assert all(r["caption"] is None for r in first["results"])  # answered at once, not after BLIP

    got = _caption_all(client, ids)
    assert set(got) == set(ids)
    assert all(str(c["caption_source"]).startswith("generated:") and c["caption"] for c in got.values())

    # The same search again (a cached page) shows the captions, and the explanation is grounded in them.
    again = client.post("/api/search", json={"text": "a red square", "top_k": 12, "explain": False}).json()
    assert {r["id"]: r["caption"] for r in again["results"]} == {i: got[i]["caption"] for i in ids}
    ex = client.post("/api/explain", json={"text": "a red square", "ids": ids[:2]}).json()
    assert [e["caption"] for e in ex["explanations"]] == [got[i]["caption"] for i in ids[:2]]

    status = client.get("/api/captions/status").json()
    assert status["enabled"] is True
    assert status["total"] == N and status["done"] >= 12


def test_an_explanation_asked_first_waits_for_its_caption(client: TestClient) -> None:
    first = client.post("/api/search", json={"text": "a blue circle", "top_k": 3, "explain": False}).json()
    ids = [r["id"] for r in first["results"]]
    ex = client.post("/api/explain", json={"text": "a blue circle", "ids": ids}).json()
    assert all(e["caption"] for e in ex["explanations"])  # not written without the caption


def test_the_page_marks_uncaptioned_cards_and_shows_progress(client: TestClient) -> None:
    page = client.get("/", params={"q": "a green square"}).text
    assert 'data-caption="pending"' in page
    assert "captioning…" in page
    assert 'id="caption-progress"' in page


def test_background_captions_the_whole_collection(data_dir: Path, tmp_path: Path, blip_dir: Path) -> None:
    with _client(data_dir, tmp_path, blip_dir, caption_background=True) as c:
        state = c.app.state.clearsight  # type: ignore[attr-defined]
        assert state.pipeline.captions.worker.wait_idle(120.0)
        status = c.get("/api/captions/status").json()
    assert status["done"] == status["total"] == N
    with Collection(data_dir) as collection:
        assert caption_progress(collection.catalog) == (N, N)


def test_captions_off_answers_what_is_stored(data_dir: Path, tmp_path: Path, blip_dir: Path) -> None:
    with _client(data_dir, tmp_path, blip_dir, server_captions="off") as c:
        first = c.post("/api/search", json={"text": "a red square", "top_k": 3, "explain": False}).json()
        ids = [r["id"] for r in first["results"]]
        body = c.post("/api/captions", json={"ids": ids, "wait_s": 0}).json()
        page = c.get("/", params={"q": "a red square"}).text
    assert body["progress"]["enabled"] is False
    assert all(x["caption"] is None and x["pending"] is False for x in body["captions"])
    assert 'data-caption="pending"' not in page


def test_a_captioner_that_cannot_load_leaves_the_server_working(data_dir: Path, tmp_path: Path) -> None:
    with _client(data_dir, tmp_path, tmp_path / "no-such-blip", server_captions="on") as c:
        first = c.post("/api/search", json={"text": "a red square", "top_k": 3, "explain": False})
        ids = [r["id"] for r in first.json()["results"]]
        body = c.post("/api/captions", json={"ids": ids, "wait_s": 20}).json()
    assert first.status_code == 200
    assert all(x["pending"] is False for x in body["captions"])
    assert body["progress"]["enabled"] is False and "captions are off" in body["progress"]["problem"]


@pytest.mark.parametrize("bad", [{"ids": []}, {"ids": [0]}, {"ids": [1], "wait_s": 999}])
def test_bad_caption_requests_are_422(client: TestClient, bad: dict[str, object]) -> None:
    assert client.post("/api/captions", json=bad).status_code == 422
