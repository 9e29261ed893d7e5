"""The Groq backend through the real groq / langchain-groq client, against a fake server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest
from pydantic import SecretStr

from explainer.errors import LLMError, LLMRateLimited, LLMTimeout
from explainer.explain.backends import LLMConfig, create_backend
from explainer.explain.backends.groq import GroqBackend
from explainer.explain.cache import MemoryExplanationCache
from explainer.explain.chain import Explainer
from explainer.explain.prompts import load_prompt
from explainer.explain.types import ExplainContext, Explanation
from retrieval.types import Region
from tests.fake_openai import CHAT_PATH, VALID_OUTPUT, FakeOpenAIServer, Reply

MODEL = "llama-3.1-8b-instant"
KEY = "gsk_test_secret_0123456789abcdef"


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as srv:
        yield srv


def config(server: FakeOpenAIServer, **overrides: object) -> LLMConfig:
    values: dict[str, object] = {
        "backend": "groq",
        "model": MODEL,
        "api_key": SecretStr(KEY),
        "base_url": server.base_url,
        "timeout_s": 2.0,
        "max_retries": 2,
        "backoff_initial_s": 0.01,
        "backoff_max_s": 0.05,
        "max_concurrency": 4,
    }
    values.update(overrides)
    return LLMConfig(**values)  # type: ignore[arg-type]


def explainer(
    server: FakeOpenAIServer, cache: MemoryExplanationCache | None = None, **overrides: object
) -> Explainer:
    backend = create_backend(config(server, **overrides), environ={})
    return Explainer(backend, load_prompt("explain_hit", 1), cache, max_concurrency=8)


def ctx(i: int = 0) -> ExplainContext:
    return ExplainContext(
        query_text="red bus",
        caption="a red bus on a street",
        dataset_captions=["a bus in the city"],
        evidence=[Region(box=(0, 0, 50, 50), score=0.3, rank=1)],
        image_size=(100, 100),
        score=0.3,
        rank=i + 1,
        image_key=f"img-{i}",
    )


def test_normal_reply_is_a_structured_explanation(server: FakeOpenAIServer) -> None:
    with explainer(server) as ex:
        result = ex.explain(ctx())
    assert result.backend == f"groq:{MODEL}"
    assert result.text == VALID_OUTPUT["explanation"]
    assert result.matched_concepts == ["red", "bus"] and result.confidence == 0.8
    assert result.fallback_reason is None and result.prompt == "explain_hit@v1"
    (seen,) = server.requests
    assert seen.path == CHAT_PATH
    assert seen.headers["authorization"] == f"Bearer {KEY}"
    assert seen.body["model"] == MODEL
    assert seen.body["response_format"] == {"type": "json_object"}
    assert "a red bus on a street" in seen.body["messages"][1]["content"]


def test_rate_limited_then_success_is_retried(server: FakeOpenAIServer) -> None:
    server.script(Reply.rate_limited(retry_after="0.02"), Reply.ok())
    with explainer(server) as ex:
        result = ex.explain(ctx())
    assert result.backend == f"groq:{MODEL}" and result.fallback_reason is None
    assert server.calls == 2


def test_rate_limited_every_time_falls_back(server: FakeOpenAIServer) -> None:
    server.default = Reply.rate_limited(retry_after="0.01")
    with explainer(server, max_retries=2) as ex:
        result = ex.explain(ctx())
    assert result.backend == "offline"
    assert result.fallback_reason is not None and result.fallback_reason.startswith("rate_limited:")
    # max_retries=2, and a 429 gets 3 more tries, each once the budget has waited out its retry-after
    assert server.calls == 2 + 1 + 3


def test_timeout_falls_back_without_retrying(server: FakeOpenAIServer) -> None:
    server.script(Reply.ok(delay_s=1.5))
    with explainer(server, timeout_s=0.2) as ex:
        result = ex.explain(ctx())
    assert result.backend == "offline"
    assert result.fallback_reason == f"timeout: groq:{MODEL}: no answer within 0.2 s"
    assert server.calls == 1


def test_invalid_json_content_falls_back(server: FakeOpenAIServer) -> None:
    server.script(Reply.text("The image shows a bus. {not json"))
    with explainer(server) as ex:
        result = ex.explain(ctx())
    assert result.backend == "offline"
    assert result.fallback_reason is not None and result.fallback_reason.startswith("malformed_output:")
    assert server.calls == 1  # a malformed answer is not an HTTP failure: no retry


def test_server_error_falls_back_after_retries(server: FakeOpenAIServer) -> None:
    server.default = Reply.server_error(500)
    with explainer(server, max_retries=2) as ex:
        result = ex.explain(ctx())
    assert result.backend == "offline"
    assert result.fallback_reason is not None
    assert result.fallback_reason.startswith("llm_error:") and "HTTP 500" in result.fallback_reason
    assert server.calls == 3


def test_server_error_then_success(server: FakeOpenAIServer) -> None:
    server.script(Reply.server_error(503), Reply.ok())
    with explainer(server) as ex:
        assert ex.explain(ctx()).backend == f"groq:{MODEL}"
    assert server.calls == 2


def test_client_errors_are_not_retried(server: FakeOpenAIServer) -> None:
    server.default = Reply.server_error(400, "bad request")
    with explainer(server) as ex:
        result = ex.explain(ctx())
    assert result.backend == "offline" and server.calls == 1


def test_page_is_explained_concurrently_and_within_the_bound(server: FakeOpenAIServer) -> None:
    server.default = Reply.ok(delay_s=0.2)
    with explainer(server, max_concurrency=4) as ex:
        results = ex.explain_many([ctx(i) for i in range(10)])
    assert all(r.backend == f"groq:{MODEL}" for r in results)
    assert server.calls == 10
    assert 1 < server.max_in_flight <= 4


def test_second_page_makes_no_server_call(server: FakeOpenAIServer) -> None:
    cache = MemoryExplanationCache()
    with explainer(server, cache) as ex:
        first = ex.explain_many([ctx(i) for i in range(5)])
        calls = server.calls
        second = ex.explain_many([ctx(i) for i in range(5)])
    assert calls == 5 and server.calls == calls
    assert all(r.cached for r in second) and not any(r.cached for r in first)


def test_one_failing_card_keeps_the_others(server: FakeOpenAIServer) -> None:
    server.script(Reply.text("garbage"))
    with explainer(server, max_concurrency=1) as ex:
        results = ex.explain_many([ctx(i) for i in range(3)])
    assert sorted(r.backend for r in results) == ["groq:" + MODEL, "groq:" + MODEL, "offline"]


def test_async_api_and_sync_runnable(server: FakeOpenAIServer) -> None:
    backend = create_backend(config(server), environ={})
    assert isinstance(backend, GroqBackend)
    prompt = load_prompt("explain_hit", 2)
    ex = Explainer(backend, prompt)
    for _ in range(2):  # two loops: each gets its own client and semaphore
        results = asyncio.run(ex.aexplain_many([ctx(0), ctx(1)]))
        assert [r.backend for r in results] == [f"groq:{MODEL}"] * 2
    message = backend.runnable.invoke(prompt.chat_template.invoke({v: "x" for v in prompt.input_variables}))
    assert "explanation" in str(message.content)
    ex.close()


def test_backend_errors_are_typed(server: FakeOpenAIServer) -> None:
    backend = GroqBackend(config(server, max_retries=0, timeout_s=0.2))
    server.script(Reply.rate_limited(), Reply.ok(delay_s=1.0), Reply.server_error(502))
    with pytest.raises(LLMRateLimited):
        backend.runnable.invoke("hi")
    with pytest.raises(LLMTimeout):
        backend.runnable.invoke("hi")
    with pytest.raises(LLMError, match="HTTP 502"):
        backend.runnable.invoke("hi")
    backend.close()


def test_unreachable_server_falls_back(server: FakeOpenAIServer) -> None:
    port = server.base_url.rsplit(":", 1)[1]
    server.stop()
    with explainer(server, base_url=f"http://127.0.0.1:{port}", max_retries=1) as ex:
        result = ex.explain(ctx())
    assert result.backend == "offline" and result.fallback_reason is not None
    assert "cannot connect" in result.fallback_reason


def test_key_never_leaks(server: FakeOpenAIServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("httpx", "httpcore", "groq", "langchain", "langchain_core", "langchain_groq", "explainer"):
        caplog.set_level(logging.DEBUG, logger=name)
    # A provider that echoes the credential in its error body, a timeout, a 429 and a success.
    server.script(
        Reply.server_error(500, f"invalid header Authorization: Bearer {KEY}"),
        Reply.server_error(500, f"invalid header Authorization: Bearer {KEY}"),
        Reply.server_error(500, f"invalid header Authorization: Bearer {KEY}"),
        Reply.ok(delay_s=1.0),
        Reply.rate_limited(),
        Reply.ok(),
    )
    cfg = config(server, timeout_s=0.3, max_retries=2, max_concurrency=1)
    backend = create_backend(cfg, environ={})
    texts: list[str] = [repr(cfg), str(cfg), repr(backend)]
    with Explainer(backend, load_prompt("explain_hit"), MemoryExplanationCache()) as ex:
        texts.append(repr(ex))
        for i in range(3):
            result = ex.explain(ctx(i))
            texts.append(result.model_dump_json())
            texts.append(repr(result))
    assert [r.backend for r in json_results(texts)] == ["offline", "offline", f"groq:{MODEL}"]
    direct = GroqBackend(config(server, max_retries=0))
    server.script(Reply.server_error(500, f"your key {KEY} is invalid"))
    with pytest.raises(LLMError) as err:
        direct.runnable.invoke("hi")
    texts += [str(err.value), repr(err.value), str(err.value.__cause__), str(err.value.__context__)]
    assert "***" in str(err.value)  # the echoed key was masked, not dropped silently
    direct.close()

    assert server.requests[0].headers["authorization"] == f"Bearer {KEY}"  # the key was really used
    records = [r.getMessage() for r in caplog.records] + [caplog.text]
    records += [str(r.exc_info[1]) for r in caplog.records if r.exc_info and r.exc_info[1] is not None]
    assert len(caplog.records) > 10  # DEBUG logging of httpx/groq really was captured
    for text in texts + records:
        assert KEY not in text, text


def json_results(texts: list[str]) -> list[Explanation]:
    return [Explanation.model_validate_json(t) for t in texts if t.startswith("{")]
