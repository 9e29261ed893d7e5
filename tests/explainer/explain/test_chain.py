"""The explanation chain with LangChain's fake chat models: parsing, fallback, caching, loops, factory."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sqlite3
import threading
from pathlib import Path

import pytest
from langchain_core.language_models import LanguageModelInput
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.prompt_values import PromptValue
from langchain_core.runnables import RunnableLambda
from pydantic import SecretStr

from explainer.errors import (
    ConfigError,
    LLMError,
    LLMTimeout,
    ModelUnavailable,
    exit_code_for,
    http_status_for,
)
from explainer.explain.backends import (
    ChatModelBackend,
    FakeBackend,
    LLMConfig,
    OfflineExplainer,
    create_backend,
    list_backends,
    register_backend,
    unregister_backend,
)
from explainer.explain.cache import ExplanationKey, MemoryExplanationCache, SQLiteExplanationCache
from explainer.explain.chain import Explainer, context_inputs
from explainer.explain.prompts import PromptFile, load_prompt
from explainer.explain.types import ExplainContext, Explanation
from retrieval.registry import default_llm
from retrieval.types import Region

GOOD = json.dumps(
    {
        "explanation": "The caption mentions a red bus.",
        "matched_concepts": ["red", "bus"],
        "mismatches": [],
        "confidence": 0.9,
    }
)


def ctx(i: int = 0, query: str = "red bus", caption: str | None = "a red bus on a street") -> ExplainContext:
    return ExplainContext(
        query_text=query,
        caption=caption,
        dataset_captions=["a bus in the city"],
        evidence=[Region(box=(0, 0, 50, 50), score=0.3, rank=1)],
        image_size=(100, 100),
        score=0.3,
        rank=i + 1,
        image_key=f"img-{i}",
    )


@pytest.fixture
def prompt() -> PromptFile:
    return load_prompt("explain_hit", 1)


class CountingModel:
    """A chat 'model' that answers per image (found in the prompt) and counts calls."""

    def __init__(self, fail_for: set[str] | None = None, malformed_for: set[str] | None = None) -> None:
        self.calls = 0
        self.fail_for = fail_for or set()
        self.malformed_for = malformed_for or set()
        self._lock = threading.Lock()

    def __call__(self, value: LanguageModelInput) -> BaseMessage:
        assert isinstance(value, PromptValue)
        text = value.to_string()
        with self._lock:
            self.calls += 1
        if any(f"rank: {k}\n" in text for k in self.fail_for):
            raise LLMTimeout("fake: too slow")
        if any(f"rank: {k}\n" in text for k in self.malformed_for):
            return AIMessage(content="Sure! Here is why: it is a bus.")
        return AIMessage(content=GOOD)

    def backend(self) -> ChatModelBackend:
        return ChatModelBackend(RunnableLambda(self), label="counting")


def test_fake_reply_becomes_structured_explanation(prompt: PromptFile) -> None:
    with Explainer(FakeBackend([GOOD]), prompt) as explainer:
        result = explainer.explain(ctx())
    assert result.backend == "fake"
    assert result.prompt == "explain_hit@v1"
    assert result.text == "The caption mentions a red bus."
    assert result.matched_concepts == ["red", "bus"] and result.confidence == 0.9
    assert result.fallback_reason is None and result.cached is False and result.latency_ms >= 0


def test_json_in_a_markdown_fence_is_accepted(prompt: PromptFile) -> None:
    model = GenericFakeChatModel(messages=iter([AIMessage(content=f"```json\n{GOOD}\n```")]))
    with Explainer(ChatModelBackend(model, "generic-fake"), prompt) as explainer:
        assert explainer.explain(ctx()).backend == "generic-fake"


@pytest.mark.parametrize(
    "reply",
    [
        "not json at all",
        json.dumps({"explanation": "x", "confidence": 7}),
        json.dumps({"matched_concepts": []}),
    ],
)
def test_malformed_reply_falls_back_to_offline(prompt: PromptFile, reply: str) -> None:
    with Explainer(FakeBackend([reply]), prompt) as explainer:
        result = explainer.explain(ctx())
    assert result.backend == "offline" and result.prompt == "offline@v3"
    assert result.fallback_reason is not None and result.fallback_reason.startswith("malformed_output:")
    assert '"red" and "bus"' in result.text


def test_one_bad_card_never_sinks_the_others(prompt: PromptFile) -> None:
    model = CountingModel(fail_for={"3"}, malformed_for={"5"})
    with Explainer(model.backend(), prompt, max_concurrency=3) as explainer:
        results = explainer.explain_many([ctx(i) for i in range(6)])
    assert [r.backend for r in results] == [
        "counting",
        "counting",
        "offline",
        "counting",
        "offline",
        "counting",
    ]
    assert results[2].fallback_reason == "timeout: fake: too slow"
    assert results[4].fallback_reason is not None and results[4].fallback_reason.startswith(
        "malformed_output"
    )
    assert model.calls == 6


def test_unexpected_exception_is_a_fallback_too(prompt: PromptFile) -> None:
    def boom(value: LanguageModelInput) -> BaseMessage:
        raise RuntimeError("kaput")

    with Explainer(ChatModelBackend(RunnableLambda(boom), "boom"), prompt) as explainer:
        result = explainer.explain(ctx())
    assert result.backend == "offline" and result.fallback_reason == "llm_error: boom: RuntimeError: kaput"


def test_cache_makes_a_repeated_page_free(prompt: PromptFile) -> None:
    model = CountingModel()
    cache = MemoryExplanationCache()
    with Explainer(model.backend(), prompt, cache) as explainer:
        first = explainer.explain_many([ctx(i) for i in range(4)])
        assert model.calls == 4 and not any(r.cached for r in first)
        second = explainer.explain_many([ctx(i) for i in range(4)])
    assert model.calls == 4
    assert all(r.cached for r in second)
    assert [r.text for r in second] == [r.text for r in first]


def test_cache_key_separates_query_prompt_and_backend(prompt: PromptFile) -> None:
    model = CountingModel()
    cache = MemoryExplanationCache()
    with Explainer(model.backend(), prompt, cache) as explainer:
        explainer.explain(ctx(0))
        explainer.explain(ctx(0, query="red  bus "))  # same query after whitespace normalisation
        assert model.calls == 1
        explainer.explain(ctx(0, query="blue bus"))
        assert model.calls == 2
    with Explainer(model.backend(), load_prompt("explain_hit", 2), cache) as explainer:
        explainer.explain(ctx(0))
    assert model.calls == 3


def test_fallbacks_are_not_cached(prompt: PromptFile) -> None:
    model = CountingModel(fail_for={"1"})
    cache = MemoryExplanationCache()
    with Explainer(model.backend(), prompt, cache) as explainer:
        explainer.explain(ctx(0))
        explainer.explain(ctx(0))
    assert model.calls == 2 and len(cache) == 0


def test_sync_api_inside_a_running_loop(prompt: PromptFile) -> None:
    """A notebook cell (or any code under a running loop) may call the sync API."""
    explainer = Explainer(FakeBackend([GOOD]), prompt)

    async def main() -> list[Explanation]:
        return explainer.explain_many([ctx(0), ctx(1)])

    try:
        results = asyncio.run(main())
    finally:
        explainer.close()
    assert [r.backend for r in results] == ["fake", "fake"]


def test_async_api_in_several_loops(prompt: PromptFile) -> None:
    explainer = Explainer(FakeBackend([GOOD]), prompt)
    for _ in range(2):
        results = asyncio.run(explainer.aexplain_many([ctx(i) for i in range(3)]))
        assert [r.backend for r in results] == ["fake"] * 3
    assert asyncio.run(explainer.aexplain(ctx(9))).backend == "fake"
    explainer.close()


def test_offline_backend_needs_no_prompt() -> None:
    with Explainer(OfflineExplainer()) as explainer:
        result = explainer.explain(ctx())
    assert result.backend == "offline" and result.fallback_reason is None
    assert explainer.chain is None and explainer.prompt_id == "offline@v3"


def test_llm_backend_without_prompt_is_refused() -> None:
    with pytest.raises(ConfigError, match="needs a prompt"):
        Explainer(FakeBackend())


def test_chain_is_prompt_llm_parser(prompt: PromptFile) -> None:
    explainer = Explainer(FakeBackend([GOOD]), prompt)
    assert explainer.chain is not None
    output = explainer.chain.invoke(context_inputs(ctx()))
    assert output.confidence == 0.9
    explainer.close()


# -- caches ---------------------------------------------------------------------------------


def _explanation(text: str = "t") -> Explanation:
    return Explanation(text=text, backend="groq:m", confidence=0.5, prompt="explain_hit@v1", latency_ms=12.0)


def _key(i: int = 0) -> ExplanationKey:
    return ExplanationKey("red bus", None, f"img-{i}", "explain_hit@v1", "groq:m", "a caption")


def test_sqlite_cache_persists_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "explanations.sqlite"
    cache = SQLiteExplanationCache(path)
    assert cache.get(_key()) is None
    cache.put(_key(), _explanation("hello"))
    cache.close()
    reopened = SQLiteExplanationCache(path)
    got = reopened.get(_key())
    assert got is not None and got.text == "hello" and len(reopened) == 1
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    reopened.close()


def test_sqlite_cache_is_thread_safe(tmp_path: Path) -> None:
    cache = SQLiteExplanationCache(tmp_path / "c.sqlite")
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(25):
                cache.put(_key(t * 100 + i), _explanation(f"{t}-{i}"))
                got = cache.get(_key(t * 100 + i))
                assert got is not None and got.text == f"{t}-{i}"
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(cache) == 100
    cache.close()


def test_sqlite_cache_drops_unreadable_rows_and_refuses_non_databases(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    cache = SQLiteExplanationCache(path)
    with sqlite3.connect(path) as conn:
        conn.execute(
            "INSERT INTO explanations VALUES (?, 'p', 'b', 0, '{\"text\": 1}')",
            (_key().digest(),),
        )
    assert cache.get(_key()) is None and len(cache) == 0
    cache.close()
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigError, match="delete the file"):
        SQLiteExplanationCache(bad)


def test_sqlite_cache_behind_the_explainer(tmp_path: Path, prompt: PromptFile) -> None:
    model = CountingModel()
    with Explainer(model.backend(), prompt, SQLiteExplanationCache(tmp_path / "c.sqlite")) as explainer:
        explainer.explain_many([ctx(i) for i in range(3)])
    with Explainer(model.backend(), prompt, SQLiteExplanationCache(tmp_path / "c.sqlite")) as explainer:
        again = explainer.explain_many([ctx(i) for i in range(3)])
    assert model.calls == 3 and all(r.cached for r in again)


# -- registry and factory ---------------------------------------------------------------------


def test_list_backends() -> None:
    assert list_backends() == ["fake", "groq", "local", "offline"]


def test_register_backend(prompt: PromptFile) -> None:
    register_backend("scripted", lambda cfg: FakeBackend([GOOD], label="scripted"))
    try:
        backend = create_backend(LLMConfig(backend="scripted"), environ={})
        with Explainer(backend, prompt) as explainer:
            assert explainer.explain(ctx()).backend == "scripted"
        with pytest.raises(ConfigError):
            register_backend("auto", lambda cfg: OfflineExplainer())
        with pytest.raises(ConfigError):
            unregister_backend("offline")
    finally:
        unregister_backend("scripted")
    assert "scripted" not in list_backends()


def test_empty_page(prompt: PromptFile) -> None:
    with Explainer(FakeBackend([GOOD]), prompt) as explainer:
        assert explainer.explain_many([]) == []


def test_auto_without_key_is_offline() -> None:
    assert isinstance(create_backend(LLMConfig(), environ={}), OfflineExplainer)


def test_auto_with_key_from_environment_is_groq() -> None:
    env = {"GROQ_API_KEY": "gsk_env_only", "GROQ_BASE_URL": "http://127.0.0.1:9"}
    backend = create_backend(LLMConfig(model="llama-3.3-70b-versatile"), environ=env)
    assert backend.label == "groq:llama-3.3-70b-versatile"
    assert "gsk_env_only" not in repr(backend)


def test_groq_without_key_says_how_to_fix() -> None:
    with pytest.raises(ConfigError, match="GROQ_API_KEY"):
        create_backend(LLMConfig(backend="groq"), environ={})


def test_unknown_backend() -> None:
    with pytest.raises(ConfigError, match="unknown explainer backend 'gpt'"):
        create_backend(LLMConfig(backend="gpt"), environ={})


def test_local_backend_not_installed_gives_pip_hint() -> None:
    if importlib.util.find_spec("llama_cpp") is not None:  # pragma: no cover - optional dependency present
        pytest.skip("llama-cpp-python is installed")
    with pytest.raises(ModelUnavailable, match="pip install"):
        create_backend(LLMConfig(backend="local", gguf_path=Path("/nonexistent.gguf")), environ={})


def test_fake_backend_from_config(prompt: PromptFile) -> None:
    backend = create_backend(LLMConfig(backend="fake", fake_responses=(GOOD, "nope")), environ={})
    with Explainer(backend, prompt) as explainer:
        a, b = explainer.explain_many([ctx(0), ctx(1)])
    assert {a.backend, b.backend} == {"fake", "offline"}


@pytest.mark.parametrize(
    ("field", "value"),
    [("timeout_s", 0.0), ("max_retries", -1), ("max_concurrency", 0), ("backoff_max_s", -1.0)],
)
def test_config_validation(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field):
        LLMConfig(**{field: value})  # type: ignore[arg-type]


def test_config_key_must_be_secret() -> None:
    with pytest.raises(ConfigError, match="SecretStr"):
        LLMConfig(api_key="plain")  # type: ignore[arg-type]
    config = LLMConfig(api_key=SecretStr("gsk_hidden"))
    assert "gsk_hidden" not in repr(config) and "gsk_hidden" not in str(config)


def test_llm_errors_map_to_status_and_exit_code_at_the_boundaries() -> None:
    assert http_status_for(LLMError("x")) == 502 and http_status_for(LLMTimeout("x")) == 504
    assert exit_code_for(LLMError("x")) != 0


def test_from_config_wires_backend_and_prompt() -> None:
    with Explainer.from_config(LLMConfig(backend="fake"), "explain_hit@v1", environ={}) as explainer:
        assert explainer.label == "fake" and explainer.prompt_id == "explain_hit@v1"
    with Explainer.from_config(LLMConfig(), environ={}) as explainer:
        assert explainer.label == "offline" and explainer.explain(ctx()).backend == "offline"


def test_the_default_groq_model_is_the_registrys() -> None:
    """The LLM registry is data: the config's default model is whatever models/registry.toml marks."""
    spec = default_llm("groq")
    assert spec.default and LLMConfig().model == spec.model
    with pytest.raises(ConfigError, match="lists no model"):
        default_llm("no-such-backend")


def test_public_fallback_reasons_keep_the_code_and_drop_the_details() -> None:
    from explainer.errors import public_fallback_reason

    assert public_fallback_reason(None) is None
    timeout = public_fallback_reason("timeout: groq:m at https://internal.example/v1: no answer")
    assert timeout is not None and timeout.startswith("timeout: ") and "internal.example" not in timeout
    odd = public_fallback_reason("weird: body {'error': 'x'}")
    assert odd is not None and odd.startswith("llm_error: ") and "body" not in odd
