"""`POST /api/explain` under the provider's rate limits: page calls, pending cards, grounding fields.

The server's explainer is the real Groq backend pointed (GROQ_BASE_URL) at a fake Groq on 127.0.0.1
whose window is shortened, with the budget's window shortened the same way.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from explainer.explain.budget import forget_budgets
from explainer.server import create_app
from tests.fake_groq import ProviderLimits
from tests.fake_openai import FakeOpenAIServer
from tests.server_kit import build_collection, server_settings

WINDOW_S = 2.0


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path) -> Path:
    return build_collection(tmp_path_factory.mktemp("server-explain"), tiny_clip_dir, n=12)


@pytest.fixture
def groq() -> Iterator[FakeOpenAIServer]:
    forget_budgets()
    # room for one page of 12 a window: the second page must wait for the budget
    with FakeOpenAIServer(limits=ProviderLimits(tpm=3500, window_s=WINDOW_S, planted="zebra")) as server:
        yield server
    forget_budgets()


def _client(data_dir: Path, tmp: Path, groq: FakeOpenAIServer) -> TestClient:
    settings = server_settings(
        data_dir,
        tmp,
        explain_backend="groq",
        groq_api_key=SecretStr("gsk_test_secret_0123456789abcdef"),
        groq_base_url=groq.base_url,
        explain_rate_window_s=WINDOW_S,
        explain_max_retries=2,
    )
    return TestClient(create_app(settings))


def test_a_page_of_ids_is_one_call_then_a_waiting_page_is_pending_and_collected_later(
    data_dir: Path, tmp_path: Path, groq: FakeOpenAIServer
) -> None:
    with _client(data_dir, tmp_path, groq) as c:
        pages = {}
        for q in ("a red circle", "a blue square"):
            r = c.post("/api/search", json={"text": q, "top_k": 12, "explain": False})
            pages[q] = [card["id"] for card in r.json()["results"]]
        first = c.post("/api/explain", json={"text": "a red circle", "ids": pages["a red circle"]}).json()
        assert groq.calls == 1 and len(first["explanations"]) == 12
        for item in first["explanations"]:
            ex = item["explanation"]
            assert item["pending"] is False and ex["backend"].startswith("groq:")
            assert "zebra" in ex["unsupported_concepts"] and "zebra" not in ex["matched_concepts"]
        body = {"text": "a blue square", "ids": pages["a blue square"], "wait_s": 0.1}
        queued = c.post("/api/explain", json=body).json()["explanations"]
        assert all(i["pending"] and i["explanation"] is None and i["queued_s"] > 0 for i in queued)
        assert groq.calls == 1  # the budget holds the second page back instead of firing into a 429
        later: list[dict[str, object]] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not later:
            items = c.post("/api/explain", json={**body, "wait_s": 5}).json()["explanations"]
            later = [i for i in items if not i["pending"]]
        assert len(later) == 12
        assert groq.calls == 2 and groq.limits is not None and groq.limits.refused == 0


def test_one_id_keeps_the_one_hit_path(data_dir: Path, tmp_path: Path, groq: FakeOpenAIServer) -> None:
    with _client(data_dir, tmp_path, groq) as c:
        q = "a green square"  # not explained by the other test (the collection's cache is shared)
        ids = [x["id"] for x in c.post("/api/search", json={"text": q, "explain": False}).json()["results"]]
        item = c.post("/api/explain", json={"text": q, "ids": ids[:1]}).json()["explanations"][0]
        (seen,) = groq.requests
        assert "tools" not in seen.body and seen.body["response_format"] == {"type": "json_object"}
        ex = item["explanation"]
        assert ex["backend"].startswith("groq:") and ex["prompt"] == "explain_hit@v2"
        assert {"backend", "matched_concepts", "unsupported_concepts"} <= set(ex)
