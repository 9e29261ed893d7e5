"""`clearsight search --explain / --caption`: captions and explanations on CLI hits, offline.

A tiny CLIP indexes synthetic shapes with dataset captions; a tiny BLIP (built from a config and
loaded like a hub model) writes captions; explanations come from the offline explainer, a counting
chat model registered as a backend, and the real Groq client against a fake server on 127.0.0.1.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.runnables import RunnableLambda
from typer.testing import CliRunner

from explainer.captions.captioner import BlipCaptioner
from explainer.cli.app import app
from explainer.explain.backends import ChatModelBackend, LLMConfig, register_backend, unregister_backend
from explainer.settings import get_settings
from retrieval import Collection
from retrieval.demo.blip import make_blip
from tests.fake_openai import FakeOpenAIServer, Reply
from tests.helpers import COLOURS, index_shapes

runner = CliRunner()
KEY = "gsk_cli_test_secret_0123456789"
#: What --explain fills in on a plain search's cards: the explanation, and the evidence it was given.
ADDED = {"explanation", "evidence", "evidence_method", "evidence_total"}


@pytest.fixture(autouse=True)
def fresh_settings() -> Iterator[None]:
    """Settings are cached per process; every test reads its own environment."""
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def tiny_blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    words = ["a", "the", "picture", "of", *COLOURS, "circle", "square", "shape"]
    return make_blip(tmp_path_factory.mktemp("cli-blip"), "tiny", words=words, seed=0)


@pytest.fixture()
def blip_settings(tiny_blip_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CLEARSIGHT_CAPTION_MODEL", str(tiny_blip_dir))
    monkeypatch.setenv("CLEARSIGHT_CAPTION_MAX_NEW_TOKENS", "6")
    monkeypatch.setenv("CLEARSIGHT_CAPTION_MIN_NEW_TOKENS", "2")
    get_settings.cache_clear()  # an earlier fixture's command may have read the settings already
    return tiny_blip_dir


@pytest.fixture()
def indexed(tmp_path: Path, tiny_clip_dir: Path) -> tuple[Path, list[Path]]:
    """Eight shapes, each with a dataset caption naming its colour and shape."""
    _, data, files = index_shapes(tmp_path, tiny_clip_dir, 8)
    return data, files


def search(data: Path, *args: str, ok: bool = True) -> Any:
    r = runner.invoke(app, ["search", *args, "--data-dir", str(data)])
    if ok:
        assert r.exit_code == 0, (r.stdout, r.stderr)
    return r


def search_json(data: Path, *args: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(search(data, *args, "--json").stdout)
    return out


def test_explain_adds_caption_and_structured_explanation(indexed: tuple[Path, list[Path]]) -> None:
    data, _ = indexed
    plain = search_json(data, "a red square", "-k", "8")
    out = search_json(data, "a red square", "-k", "8", "--explain")
    assert out["explainer"] == {"backend": "offline", "prompt": "offline@v3"}
    assert len(out["results"]) == 8
    for row, before in zip(out["results"], plain["results"], strict=True):
        assert {k: v for k, v in row.items() if k not in ADDED} == {
            k: v for k, v in before.items() if k not in ADDED
        }  # the plain search's cards, plus
        assert before["explanation"] is None and before["evidence"] == []
        assert row["caption"] == before["dataset_captions"][0] and row["caption_source"] == "dataset"
        e = row["explanation"]
        assert e["backend"] == "offline" and e["prompt"] == "offline@v3" and e["text"]
        assert set(e) >= {"matched_concepts", "mismatches", "confidence", "fallback_reason", "cached"}
        assert 0.0 <= e["confidence"] <= 1.0
        # the offline explainer only claims what the caption says, and names what it does not
        caption_words = set(row["caption"].split())
        assert set(e["matched_concepts"]) <= caption_words
        assert set(e["matched_concepts"]) | set(e["mismatches"]) == {"red", "square"}
        assert row["caption"] not in e["text"]  # the card shows the caption; the explanation adds to it
        assert "query words confirmed" in e["text"]
        assert "strongest match" in e["text"]  # evidence regions reached the explainer
    red_square = [r for r in out["results"] if r["caption"] == "a red square"]
    assert red_square and red_square[0]["explanation"]["mismatches"] == []


def test_image_query_and_evidence_rows_feed_the_explanation(indexed: tuple[Path, list[Path]]) -> None:
    data, files = indexed
    out = search_json(data, "--image", str(files[3]), "-k", "2", "--explain", "--evidence-method", "grid")
    for row in out["results"]:
        assert row["evidence_method"] == "grid" and row["evidence"]
        text = row["explanation"]["text"]
        assert text.startswith("Found by visual similarity to the query image.")
        assert "strongest match" in text
    assert out["results"][0]["path"] == str(files[3])


def test_table_shows_caption_and_explanation_under_each_row(indexed: tuple[Path, list[Path]]) -> None:
    data, _ = indexed
    r = search(data, "a blue circle", "-k", "3", "--explain")
    lines = r.stdout.rstrip("\n").splitlines()
    lines = [line for line in lines if not line.startswith("no confident match:")]
    assert lines[0].startswith("3 images for a text query") and "rank" in lines[1]
    rows = [i for i, line in enumerate(lines) if line[:4].strip().isdigit()]
    assert len(rows) == 3
    for start, end in zip(rows, [*rows[1:], len(lines)], strict=True):
        block = lines[start + 1 : end]
        # details sit under the file column of the rich table, indented past rank, score and id
        assert block[0].startswith("      ") and block[0].strip().startswith("caption: a ")
        assert block[0].rstrip().endswith("(dataset)")
        why = " ".join(line.strip() for line in block[1:])
        assert why.startswith("why: ") and why.endswith("[offline]")


def test_caption_generates_with_blip_once_then_reads_the_cache(
    indexed: tuple[Path, list[Path]], blip_settings: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, _ = indexed
    calls: list[int] = []
    real = BlipCaptioner.caption

    def counting(self: BlipCaptioner, images: Any, prefix: str | None = None) -> list[str]:
        calls.append(len(images))
        return real(self, images, prefix)

    monkeypatch.setattr(BlipCaptioner, "caption", counting)
    first = search_json(data, "a green square", "-k", "3", "--caption")
    assert sum(calls) == 3
    source = f"generated:{blip_settings.name}"
    for row in first["results"]:
        assert row["caption"] and row["caption_source"] == source
        assert row["explanation"] is None  # --caption alone adds captions only
    again = search_json(data, "a green square", "-k", "3", "--caption")
    assert sum(calls) == 3  # cached by content: no second BLIP pass
    pick = [(r["id"], r["caption"], r["caption_source"]) for r in first["results"]]
    assert [(r["id"], r["caption"], r["caption_source"]) for r in again["results"]] == pick
    # like `clearsight caption`, the generated caption is now one of the image's own captions
    stored = Collection(data).catalog.captions_for([r["id"] for r in again["results"]])
    assert all(r["caption"] in [c.text for c in stored[r["id"]]] for r in again["results"])
    # Without --caption a cached generated caption is still preferred, and the explainer reads it.
    explained = search_json(data, "a green square", "-k", "3", "--explain")
    assert sum(calls) == 3
    for row, cap in zip(explained["results"], first["results"], strict=True):
        assert (row["caption"], row["caption_source"]) == (cap["caption"], source)
        # the explainer read the generated caption: what it confirms is in it, what it misses is not
        words = set(cap["caption"].split())
        assert set(row["explanation"]["matched_concepts"]) >= words & {"green", "square"}


def test_missing_blip_weights_give_one_line_and_dataset_captions(indexed: tuple[Path, list[Path]]) -> None:
    data, _ = indexed  # no CLEARSIGHT_CAPTION_MODEL: the registry's blip-base, not on this machine
    r = search(data, "a red square", "-k", "2", "--caption", "--explain", "--json")
    assert "Traceback" not in r.output and r.stderr.count("\n") == 1
    assert "captioner unavailable" in r.stderr and "blip-image-captioning-base" in r.stderr
    rows = json.loads(r.stdout)["results"]
    assert all(row["caption_source"] == "dataset" and row["explanation"]["text"] for row in rows)


class CountingChat:
    """A chat model that answers with grounded JSON and counts its calls (thread-safe)."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, value: LanguageModelInput) -> BaseMessage:
        with self._lock:
            self.calls += 1
        reply = {"explanation": "Counted.", "matched_concepts": ["red"], "mismatches": [], "confidence": 0.7}
        return AIMessage(content=json.dumps(reply))


def test_chat_backend_explanations_are_cached_between_runs(
    indexed: tuple[Path, list[Path]], request: pytest.FixtureRequest
) -> None:
    data, _ = indexed
    model = CountingChat()
    register_backend("counting", lambda cfg: ChatModelBackend(RunnableLambda(model), "counting"))
    request.addfinalizer(lambda: unregister_backend("counting"))
    first = search_json(data, "a red square", "-k", "3", "--explain-backend", "counting")
    assert model.calls == 3
    assert first["explainer"] == {"backend": "counting", "prompt": "explain_hit@v2"}
    assert all(
        r["explanation"]["backend"] == "counting" and not r["explanation"]["cached"] for r in first["results"]
    )
    second = search_json(data, "a red square", "-k", "3", "--explain-backend", "counting")
    assert model.calls == 3  # the second run made no model call
    assert all(r["explanation"]["cached"] for r in second["results"])
    assert (data / "explanations.sqlite").is_file()  # the cache the server shares


def test_groq_from_settings_never_shows_the_key(
    indexed: tuple[Path, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    data, _ = indexed
    with FakeOpenAIServer() as server:
        monkeypatch.setenv("GROQ_API_KEY", KEY)
        monkeypatch.setenv("GROQ_BASE_URL", server.base_url)
        monkeypatch.setenv("CLEARSIGHT_EXPLAIN_MAX_RETRIES", "0")
        monkeypatch.setenv("CLEARSIGHT_EXPLAIN_PAGE_SIZE", "1")  # a call per card: one card can fail alone
        # One card's request is refused with the key echoed back; the others succeed.
        server.script(Reply.server_error(400, f"invalid api key {KEY} for this model"))
        r = search(data, "a red square", "-k", "3", "--explain", "--json")
        table = search(data, "a red circle", "-k", "3", "--explain")
        seen = [req.headers.get("authorization") for req in server.requests]
    assert seen and all(h == f"Bearer {KEY}" for h in seen)  # the key did reach the provider...
    for text in (r.stdout, r.stderr, table.stdout, table.stderr):
        assert KEY not in text  # ...and nothing the user sees
    out = json.loads(r.stdout)
    model = LLMConfig().model
    assert out["explainer"]["backend"] == f"groq:{model}"  # auto: a key means Groq
    backends = sorted(row["explanation"]["backend"] for row in out["results"])
    assert backends == [f"groq:{model}", f"groq:{model}", "offline"]
    fallback = next(
        row["explanation"] for row in out["results"] if row["explanation"]["backend"] == "offline"
    )
    assert fallback["fallback_reason"] and "***" in fallback["fallback_reason"]
    assert f"[groq:{model}]" in table.stdout


def test_groq_explains_a_page_in_one_call_with_grounding_fields(
    indexed: tuple[Path, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from explainer.explain.budget import forget_budgets
    from tests.fake_groq import ProviderLimits

    data, _ = indexed
    forget_budgets()
    with FakeOpenAIServer(limits=ProviderLimits(planted="zebra")) as server:
        monkeypatch.setenv("GROQ_API_KEY", KEY)
        monkeypatch.setenv("GROQ_BASE_URL", server.base_url)
        out = search_json(data, "a blue circle", "-k", "4", "--explain")
        table = search(data, "a blue circle", "-k", "4", "--explain")  # answered from the cache
    assert server.calls == 1
    schema = server.requests[0].body["tools"][0]["function"]["parameters"]["properties"]["hits"]
    assert schema["minItems"] == schema["maxItems"] == 4
    for row in out["results"]:
        ex = row["explanation"]
        assert ex["backend"].startswith("groq:") and ex["prompt"] == "explain_page@v1"
        assert ex["unsupported_concepts"] == ["zebra"] and "zebra" not in ex["matched_concepts"]
    assert "claimed, but not in the captions or regions: zebra" in table.stdout


def test_backend_errors(indexed: tuple[Path, list[Path]]) -> None:
    data, _ = indexed
    r = search(data, "a red square", "--explain-backend", "groq", "--json")  # no key: offline, with a line
    assert r.stderr.count("\n") == 1 and "groq" in r.stderr and "explaining offline" in r.stderr
    assert all(row["explanation"]["backend"] == "offline" for row in json.loads(r.stdout)["results"])
    r = search(data, "a red square", "--explain-backend", "nope", ok=False)
    assert r.exit_code == 2 and "unknown explainer backend 'nope'" in r.stderr and "Traceback" not in r.output
    r = search(data, "--image", "x.jpg", "--captions", "--explain", ok=False)
    assert r.exit_code == 2 and "cannot be used with --captions" in r.stderr
