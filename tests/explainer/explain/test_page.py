"""Page calls under Groq's free-tier limits: the real groq client against a fake Groq on 127.0.0.1.

The fake's window is shortened (WINDOW_S instead of 60 s) so that minutes of rate limiting take
seconds; the budget is given the same window, and everything else (limits, headers, 429 with
retry-after, token counting) is as on the free tier.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import SecretStr

from explainer.explain.backends import LLMConfig
from explainer.explain.budget import forget_budgets
from explainer.explain.cache import MemoryExplanationCache
from explainer.explain.chain import Explainer, Pending
from explainer.explain.types import ExplainContext, Explanation
from retrieval.types import Region
from tests.fake_groq import ProviderLimits
from tests.fake_openai import CHAT_PATH, FakeOpenAIServer

KEY = "gsk_test_secret_0123456789abcdef"
WINDOW_S = 3.0
PLANTED = "zebra"


@pytest.fixture(autouse=True)
def _fresh_budgets() -> Iterator[None]:
    forget_budgets()
    yield
    forget_budgets()


def serve(**limits: Any) -> FakeOpenAIServer:
    values: dict[str, Any] = {"rpm": 30, "tpm": 6000, "window_s": WINDOW_S, "planted": PLANTED}
    values.update(limits)
    return FakeOpenAIServer(limits=ProviderLimits(**values)).start()


def explainer(server: FakeOpenAIServer, cache: MemoryExplanationCache | None = None, **cfg: Any) -> Explainer:
    values: dict[str, Any] = {
        "backend": "groq",
        "model": "llama-3.1-8b-instant",
        "api_key": SecretStr(KEY),
        "base_url": server.base_url,
        "timeout_s": 5.0,
        "max_retries": 2,
        "rate_window_s": WINDOW_S,
        "max_budget_wait_s": 60.0,
    }
    values.update(cfg)
    return Explainer.from_config(LLMConfig(**values), cache=cache, environ={})


def page(query: str, n: int = 12) -> list[ExplainContext]:
    word = query.split()[-1]
    return [
        ExplainContext(
            query_text=query,
            caption=f"a {word} drawn in the picture {i}",
            dataset_captions=[f"a {word} on a white background", f"one {word} alone"],
            evidence=[Region(box=(0, 0, 40, 40), score=0.3, rank=1), Region((50, 50, 90, 90), 0.2, 2)],
            image_size=(120, 120),
            score=0.3 - i / 100,
            rank=i + 1,
            image_key=f"{query}-{i}",
        )
        for i in range(n)
    ]


def limits(server: FakeOpenAIServer) -> ProviderLimits:
    assert server.limits is not None
    return server.limits


def llm(outs: list[Explanation]) -> bool:
    return all(o.backend.startswith("groq:") and o.fallback_reason is None for o in outs)


def test_a_page_is_one_call_with_the_hit_list_pinned() -> None:
    server = serve()
    try:
        with explainer(server) as ex:
            outs = ex.explain_many(page("a red circle"))
        assert llm(outs) and len(outs) == 12
        (seen,) = server.requests
        assert seen.path == CHAT_PATH
        schema = seen.body["tools"][0]["function"]["parameters"]
        hits = schema["properties"]["hits"]
        assert hits["minItems"] == hits["maxItems"] == 12
        assert hits["items"]["properties"]["hit"]["enum"] == list(range(1, 13))
        assert set(hits["items"]["required"]) == {
            "hit",
            "explanation",
            "matched_concepts",
            "mismatches",
            "confidence",
        }
        assert seen.body["tool_choice"]["function"]["name"] == "explain_hits"
        assert "response_format" not in seen.body  # JSON mode and tools do not mix on Groq
        _system, user = seen.body["messages"]
        assert user["content"].count("Hit ") == 12 and "a red circle" in user["content"]
        assert outs[3].text.startswith("Hit 4:")  # each answer reaches its own hit
        assert all(o.prompt == "explain_page@v1" for o in outs)
    finally:
        server.stop()


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda a: {"hits": a["hits"][:-2]}, id="dropped"),
        pytest.param(lambda a: {"hits": [*a["hits"][:-2], *a["hits"][:2]]}, id="repeated"),
        pytest.param(lambda a: {"hits": a["hits"][:-2] + [{**a["hits"][0], "hit": 99}] * 2}, id="invented"),
        pytest.param(
            lambda a: {"hits": [*a["hits"][:-2], {"hit": 11}, {"hit": 12, "explanation": ""}]}, id="invalid"
        ),
    ],
)
def test_only_the_hits_a_reply_got_wrong_are_asked_again(mangle: Any) -> None:
    server = serve()
    limits(server).mangle.append(mangle)
    try:
        with explainer(server) as ex:
            outs = ex.explain_many(page("a blue square"))
        assert llm(outs)
        _first, second = server.requests
        again = second.body["tools"][0]["function"]["parameters"]["properties"]["hits"]
        assert again["items"]["properties"]["hit"]["enum"] == [11, 12]
        assert again["minItems"] == again["maxItems"] == 2
        assert second.body["messages"][1]["content"].count("Hit ") == 2
    finally:
        server.stop()


def test_a_reply_wrong_twice_falls_back_for_those_hits_only() -> None:
    server = serve()
    drop = lambda a: {"hits": a["hits"][:-1]}  # noqa: E731
    limits(server).mangle.extend([drop, drop])
    try:
        with explainer(server) as ex:
            outs = ex.explain_many(page("a blue square", 4))
        assert llm(outs[:3])
        assert outs[3].backend == "offline" and outs[3].fallback_reason is not None
        assert outs[3].fallback_reason.startswith("malformed_output")
    finally:
        server.stop()


def test_hits_explained_in_a_page_are_cached_each_under_its_own_key() -> None:
    server = serve()
    cache = MemoryExplanationCache()
    try:
        with explainer(server, cache) as ex:
            ex.explain_many(page("a red circle"))
            one = ex.explain(page("a red circle")[5])
        assert len(cache) == 12 and one.cached and server.calls == 1
        assert one.text.startswith("Hit 6:")
    finally:
        server.stop()


def test_page_size_splits_bigger_pages_top_ranks_first() -> None:
    server = serve()
    try:
        with explainer(server, page_size=5) as ex:
            outs = ex.explain_many(list(reversed(page("a red circle"))))
        assert llm(outs) and outs[0].text.startswith("Hit 12:")
        enums = [
            r.body["tools"][0]["function"]["parameters"]["properties"]["hits"]["items"]["properties"]["hit"][
                "enum"
            ]
            for r in server.requests
        ]
        assert sorted(enums) == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12]]
    finally:
        server.stop()


def test_planted_concepts_move_to_unsupported() -> None:
    server = serve()
    try:
        with explainer(server) as ex:
            outs = ex.explain_many(page("a red circle"))
        assert all(o.unsupported_concepts == [PLANTED] and PLANTED not in o.matched_concepts for o in outs)
        assert all(o.matched_concepts for o in outs)  # the caption's own word stays matched
    finally:
        server.stop()


def test_five_searches_in_half_a_window_all_get_llm_explanations_without_a_429() -> None:
    """Free-tier limits (30 RPM, 6,000 TPM), five searches of 12 cards fired within half a window."""
    server = serve(latency_s=0.05)
    queries = ["a red circle", "a blue square", "a green circle", "a yellow square", "a purple circle"]
    results: dict[str, list[Explanation]] = {}
    try:
        with explainer(server) as ex:

            def search(q: str) -> None:
                results[q] = ex.explain_many(page(q))

            threads = []
            for q in queries:
                threads.append(threading.Thread(target=search, args=(q,)))
                threads[-1].start()
                threading.Event().wait(WINDOW_S / 2 / len(queries))
            for t in threads:
                t.join()
        log = limits(server).log
        assert all(llm(results[q]) for q in queries), {
            q: [o.fallback_reason for o in results[q]] for q in queries
        }
        assert len(limits(server).answered) == len(queries)  # one call a page
        assert limits(server).refused == 0
        assert not any(x.told_refused for x in log)  # nothing sent that the last headers said would fail
        assert sum(x.tokens for x in log) > 6000  # more than a window's tokens: the budget had to wait
    finally:
        server.stop()


def test_a_429_mid_page_is_waited_for_not_retried_at_once() -> None:
    server = serve()
    limits(server).cut_next(0.8)
    try:
        with explainer(server) as ex:
            outs = ex.explain_many(page("a red circle"))
        assert llm(outs)
        first, second = limits(server).log
        assert not first.ok and second.ok
        assert second.t - first.t >= 0.8  # the retry-after was honoured (a lower bound, not a timing)
    finally:
        server.stop()


def test_a_call_waiting_for_budget_is_pending_then_collected() -> None:
    """`aexplain_within` answers pending with the wait, keeps going, and a later ask gets the result."""
    server = serve(tpm=3000)
    try:
        with explainer(server) as ex:

            async def main() -> tuple[list[Explanation | Pending], list[Explanation | Pending], int]:
                await ex.aexplain_within(page("a red circle"), wait_s=30)
                queued = await ex.aexplain_within(page("a blue square"), wait_s=0.05)
                calls_then = server.calls
                later = await ex.aexplain_within(page("a blue square"), wait_s=30)
                return queued, later, calls_then

            queued, later, calls_then = asyncio.run(main())
        assert all(isinstance(q, Pending) and q.queued_s is not None and q.queued_s > 0 for q in queued)
        assert calls_then == 1  # the second page waits for the budget instead of being sent
        assert all(isinstance(x, Explanation) and x.backend.startswith("groq:") for x in later)
        assert server.calls == 2  # asking again joined the waiting call, it did not make another
    finally:
        server.stop()


def test_a_chat_model_can_answer_pages_in_its_content() -> None:
    """ChatModelBackend(pages=True): a scripted model answers the page's JSON as text (fences allowed)."""
    import json

    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    from explainer.explain.backends import ChatModelBackend
    from explainer.explain.prompts import load_prompt

    items = [
        {
            "hit": n,
            "explanation": f"hit {n}",
            "matched_concepts": ["square"],
            "mismatches": [],
            "confidence": 0.5,
        }
        for n in (1, 2, 3)
    ]
    reply = "```json\n" + json.dumps({"hits": items}) + "\n```"
    model = FakeListChatModel(responses=[reply, "a second call would get this"])
    backend = ChatModelBackend(model, "scripted", pages=True)
    with Explainer(backend, load_prompt("explain_hit"), page_prompt=load_prompt("explain_page")) as ex:
        outs = ex.explain_many(page("a blue square", 3))
    assert [o.text for o in outs] == ["hit 1", "hit 2", "hit 3"] and model.i == 1
    assert all(o.matched_concepts == ["square"] and o.unsupported_concepts == [] for o in outs)


@pytest.mark.parametrize(
    ("arguments", "answered", "missing"),
    [
        (None, [], [1, 2]),
        ({"hits": "no"}, [], [1, 2]),
        ({"hits": [{"hit": 1}]}, [], [1, 2]),  # required fields missing
        (
            {
                "hits": [
                    {
                        "hit": "1",
                        "explanation": "x",
                        "matched_concepts": [],
                        "mismatches": [],
                        "confidence": 1,
                    }
                ]
            },
            [],
            [1, 2],
        ),
        (
            {
                "hits": [
                    {
                        "hit": 2,
                        "explanation": "x",
                        "matched_concepts": ["a"] * 7,
                        "mismatches": [],
                        "confidence": 1,
                    }
                ]
            },
            [],
            [1, 2],
        ),  # more concepts than the schema allows
        (
            {
                "hits": [
                    {
                        "hit": 2,
                        "explanation": "x",
                        "matched_concepts": [],
                        "mismatches": [],
                        "confidence": 0.4,
                    }
                ]
            },
            [2],
            [1],
        ),
    ],
)
def test_parse_page_keeps_only_valid_items_of_known_hits(
    arguments: Any, answered: list[int], missing: list[int]
) -> None:
    from explainer.explain.page import parse_page

    reply = parse_page(arguments, [1, 2])
    assert sorted(reply.answers) == answered and reply.missing == missing
    assert bool(reply.problems) == bool(missing)


def test_the_sync_page_call_goes_through_the_budget_too() -> None:
    from explainer.explain.backends.groq import GroqBackend
    from explainer.explain.page import page_tool, reply_arguments

    server = serve()
    try:
        backend = GroqBackend(
            LLMConfig(
                backend="groq", api_key=SecretStr(KEY), base_url=server.base_url, rate_window_s=WINDOW_S
            )
        )
        message = backend.page_runnable(page_tool([1]), 150).invoke("Hit 1 (score 0.3)\ncaption: a red bus")
        backend.close()
        args = reply_arguments(message)
        assert isinstance(args, dict) and args["hits"][0]["hit"] == 1
        assert backend.budget.sent_calls == 1 and server.requests[0].body["max_tokens"] == 150
    finally:
        server.stop()
