"""Explaining a page of hits against explaining one: does the chain overlap its model calls?

    .venv/bin/python bench/explain_bench.py                          # 10 hits, 200 ms per call
    .venv/bin/python bench/explain_bench.py --hits 10 --delay-ms 200 --concurrency 1,4,8,10 --rounds 5

The model is LangChain's `FakeListChatModel` wrapped so that every call first sleeps `--delay-ms`
asynchronously (as a network call to Groq waits), behind the real `Explainer`: prompt formatting,
`prompt | llm | parser`, the concurrency bound (`max_concurrency`), the explanation cache. The
wrapper counts calls and the most calls in flight at once.

Per concurrency setting: the time to explain one hit and a page of `--hits` hits (fresh hits each
round, so nothing is cached; median of `--rounds`, order alternating), their ratio against the floor
(page <= 1.5x one call, which needs max_concurrency >= hits), and a second run of the last page,
which must be answered from the cache with no model call. Figures are printed, never asserted.

    .venv/bin/python bench/explain_bench.py --limits                 # against a rate-limited fake Groq

`--limits`: the real Groq backend against tests/fake_groq.py on 127.0.0.1 at Groq's free tier
(30 requests and 6,000 tokens a minute, `--window-s` 60; tokens counted as the explainer estimates
them), COCO-like hits (a generated caption, 5 dataset captions, 3 regions). It prints the tokens a hit
costs by how many dataset captions and regions it sends, requests and tokens per page of 12 in page
mode against per-hit mode, and five searches of 12 fired within half a minute: the share of
LLM-explained cards, 429s, and the time until the last card is explained.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Sequence

from langchain_core.language_models import LanguageModelInput
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import BaseMessage
from langchain_core.runnables import RunnableLambda
from machine import load_average, span

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # the fake Groq

from explainer.explain.backends import ChatModelBackend
from explainer.explain.cache import MemoryExplanationCache
from explainer.explain.chain import Explainer
from explainer.explain.prompts import load_prompt
from explainer.explain.types import ExplainContext, Explanation
from explainer.settings import Settings
from retrieval.types import Region

FLOOR = 1.5
REPLY = json.dumps(
    {
        "explanation": "The caption mentions a red bus, which the query asks for.",
        "matched_concepts": ["red", "bus"],
        "mismatches": [],
        "confidence": 0.8,
    }
)


class SlowFake:
    """A fake chat model that takes `delay_s` per call, asynchronously, and counts its calls."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.model = FakeListChatModel(responses=[REPLY])
        self.calls = 0
        self.in_flight = 0
        self.max_in_flight = 0

    async def ainvoke(self, value: LanguageModelInput) -> BaseMessage:
        self.calls += 1  # every call runs on the explainer's one event-loop thread: no lock needed
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
            return await self.model.ainvoke(value)
        finally:
            self.in_flight -= 1

    def invoke(self, value: LanguageModelInput) -> BaseMessage:
        self.calls += 1
        time.sleep(self.delay_s)
        return self.model.invoke(value)

    def backend(self) -> ChatModelBackend:
        label = f"fake-{self.delay_s * 1000:.0f}ms"
        return ChatModelBackend(RunnableLambda(self.invoke, afunc=self.ainvoke, name=label), label)


def contexts(prefix: str, n: int) -> list[ExplainContext]:
    """`n` hits that differ in image (so in cache key), as a results page would."""
    return [
        ExplainContext(
            query_text="a red bus in the street",
            caption=f"a red bus parked on a street, photo {i}",
            dataset_captions=["a bus in the city", "a red double-decker"],
            evidence=[
                Region(box=(40, 60, 400, 300), score=0.31, rank=1),
                Region(box=(300, 200, 600, 460), score=0.27, rank=2),
            ],
            image_size=(640, 480),
            score=0.3 - 0.01 * i,
            rank=i + 1,
            image_key=f"{prefix}-{i}",
        )
        for i in range(n)
    ]


def timed(explainer: Explainer, ctxs: Sequence[ExplainContext]) -> float:
    start = time.perf_counter()
    out = explainer.explain_many(ctxs)
    wall = time.perf_counter() - start
    assert len(out) == len(ctxs)
    failed = [e.fallback_reason for e in out if e.fallback_reason]
    if failed:
        raise SystemExit(f"explanations fell back to offline: {failed[0]}")
    return wall * 1000.0


def run(concurrency: int, hits: int, delay_s: float, rounds: int, note: str) -> str:
    fake = SlowFake(delay_s)
    prompt = load_prompt("explain_hit")
    cache = MemoryExplanationCache()
    with Explainer(fake.backend(), prompt, cache, max_concurrency=concurrency) as explainer:
        timed(explainer, contexts("warm-up", 1))  # starts the loop thread, builds the chain's pieces
        one: list[float] = []
        page: list[float] = []
        with span() as s:
            for r in range(rounds):
                first_one = r % 2 == 0
                if first_one:
                    one.append(timed(explainer, contexts(f"one-{r}", 1)))
                page.append(timed(explainer, contexts(f"page-{r}", hits)))
                if not first_one:
                    one.append(timed(explainer, contexts(f"one-{r}", 1)))
        peak = fake.max_in_flight
        last_page = contexts(f"page-{rounds - 1}", hits)
        before = fake.calls
        cached_ms = timed(explainer, last_page)
        cached_calls = fake.calls - before
        cached_flags = all(e.cached for e in explainer.explain_many(last_page))
    one_ms, page_ms = statistics.median(one), statistics.median(page)
    ratio = page_ms / one_ms
    verdict = "PASS" if ratio <= FLOOR else "FAIL"
    waves = math.ceil(hits / concurrency)
    calls = f"{cached_calls}" + ("" if cached_flags else " (not all cached!)")
    return (
        f"| {concurrency}{note} | {one_ms:.0f} | {page_ms:.0f} | **{ratio:.2f}x** {verdict} | {waves} "
        f"| {peak} | {cached_ms:.1f} | {calls} | {s.others_text()} |"
    )


def coco_page(query: str, n: int = 12, captions: int = 5, regions: int = 3) -> list[ExplainContext]:
    """Hits as a real collection gives them: a generated caption, dataset captions, regions."""
    dataset = [
        "A man rides a red bicycle down a busy city street.",
        "A cyclist in a helmet passes parked cars on the road.",
        "Someone on a bike waits at a traffic light near shops.",
        "A person cycling past a row of buildings in the daytime.",
        "A bicycle rider on an urban street with cars behind.",
    ]
    boxes = [(40, 60, 400, 300), (300, 200, 600, 460), (0, 0, 200, 160), (420, 20, 630, 200)]
    return [
        ExplainContext(
            query_text=query,
            caption=f"a man riding a bike down a street next to a car ({i})",
            dataset_captions=dataset[:captions],
            evidence=[Region(box=b, score=0.3 - 0.02 * k, rank=k + 1) for k, b in enumerate(boxes[:regions])],
            image_size=(640, 480),
            score=0.31 - 0.005 * i,
            rank=i + 1,
            image_key=f"{query}-{i}",
        )
        for i in range(n)
    ]


def limits_run(
    page_size: int, window_s: float, latency_s: float, searches: int, wait_s: float
) -> dict[str, float]:
    """`searches` pages of 12 fired within half a window; what the provider saw and what cards got."""
    import threading

    from fake_groq import ProviderLimits
    from fake_openai import FakeOpenAIServer
    from pydantic import SecretStr

    from explainer.explain.backends import LLMConfig
    from explainer.explain.budget import forget_budgets

    forget_budgets()
    limits = ProviderLimits(rpm=30, tpm=6000, window_s=window_s, latency_s=latency_s)
    server = FakeOpenAIServer(limits=limits).start()
    config = LLMConfig(
        backend="groq",
        api_key=SecretStr("gsk_bench_0123456789"),
        base_url=server.base_url,
        page_size=page_size,
        rate_window_s=window_s,
        max_budget_wait_s=wait_s,
        timeout_s=30.0,
    )
    done: list[float] = []
    outs: list[list[Explanation]] = []
    start = time.monotonic()
    try:
        with Explainer.from_config(config, environ={}) as explainer:

            def search(q: str) -> None:
                out = explainer.explain_many(coco_page(q))
                done.append(time.monotonic() - start)
                outs.append(out)

            threads = [
                threading.Thread(target=search, args=(f"a person riding a bike {k}",))
                for k in range(searches)
            ]
            for t in threads:
                t.start()
                time.sleep(window_s / 2 / searches)
            for t in threads:
                t.join()
    finally:
        server.stop()
    cards = [e for out in outs for e in out]
    llm_cards = sum(1 for e in cards if e.backend.startswith("groq:"))
    return {
        "cards": len(cards),
        "llm": llm_cards,
        "requests": len(limits.log),
        "answered": len(limits.answered),
        "refused": limits.refused,
        "told_refused": sum(1 for x in limits.log if x.told_refused),
        "tokens": sum(x.tokens for x in limits.answered),
        "last_s": max(done, default=0.0),
    }


def one_page_cost(page_size: int, captions: int = 5, regions: int = 3) -> tuple[int, int]:
    """(requests, tokens as the provider counts them) to explain one page of 12, no limits in the way."""
    from fake_groq import ProviderLimits
    from fake_openai import FakeOpenAIServer
    from pydantic import SecretStr

    from explainer.explain.backends import LLMConfig
    from explainer.explain.budget import forget_budgets

    forget_budgets()
    limits = ProviderLimits(rpm=10_000, tpm=10_000_000)
    server = FakeOpenAIServer(limits=limits).start()
    config = LLMConfig(
        backend="groq",
        api_key=SecretStr("gsk_bench_0123456789"),
        base_url=server.base_url,
        page_size=page_size,
        requests_per_minute=10_000,
        tokens_per_minute=10_000_000,
    )
    try:
        with Explainer.from_config(config, environ={}) as explainer:
            out = explainer.explain_many(
                coco_page("a person riding a bike", captions=captions, regions=regions)
            )
            assert all(e.backend.startswith("groq:") for e in out), [e.fallback_reason for e in out]
    finally:
        server.stop()
    return len(limits.log), sum(x.tokens for x in limits.log)


def limits_main(window_s: float, latency_s: float, modes: str) -> None:
    from explainer.explain import page

    print(
        "## Tokens per page of 12 by what each hit sends (page mode; provider's count, max_tokens included)\n"
    )
    print("| dataset captions per hit | regions per hit | tokens per page | per hit |")
    print("|---:|---:|---:|---:|")
    saved = page.DATASET_CAPTIONS_PER_HIT, page.REGIONS_PER_HIT
    for caps, regs in ((0, 1), (1, 1), (2, 2), (3, 2), (5, 2), (5, 3)):
        page.DATASET_CAPTIONS_PER_HIT, page.REGIONS_PER_HIT = caps, regs
        _, tokens = one_page_cost(12)
        print(f"| {caps} | {regs} | {tokens} | {tokens / 12:.0f} |", flush=True)
    page.DATASET_CAPTIONS_PER_HIT, page.REGIONS_PER_HIT = saved
    print(f"\n(shipped: {saved[0]} dataset captions, {saved[1]} regions per hit)\n")
    print("## One page of 12: page mode against per-hit mode\n")
    print("| mode | requests | tokens | tokens vs per-hit | pages a minute at 30 RPM / 6,000 TPM |")
    print("|---|---:|---:|---:|---:|")
    per_hit = one_page_cost(1)
    for name, size in (("page (12 per call)", 12), ("per hit", 1)):
        requests, tokens = one_page_cost(size)
        pages = min(30 / requests, 6000 / tokens)
        print(
            f"| {name} | {requests} | {tokens} | {100 * tokens / per_hit[1]:.0f}% | {pages:.2f} |", flush=True
        )
    print(
        f"\n## Five searches of 12 fired within half a window ({window_s:g} s window, "
        f"{latency_s:g} s latency)\n"
    )
    print(
        "| mode | LLM-explained cards | provider requests | answered | 429s "
        "| sent against the last headers | last card at (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    runs = {
        "page": ("page, waiting for the budget", 12, 600.0),
        "hit": ("per hit, waiting for the budget", 1, 1800.0),
        "nowait": ("per hit, no waiting (falls back when the budget is spent)", 1, 0.0),
    }
    for name, size, wait in (runs[m] for m in modes.split(",")):
        r = limits_run(size, window_s, latency_s, 5, wait)
        print(
            f"| {name} | {r['llm']:.0f}/{r['cards']:.0f} | {r['requests']:.0f} | {r['answered']:.0f} "
            f"| {r['refused']:.0f} | {r['told_refused']:.0f} | {r['last_s']:.1f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hits", type=int, default=10)
    parser.add_argument("--delay-ms", type=float, default=200.0)
    parser.add_argument("--concurrency", default=None, help="comma-separated max_concurrency values")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--limits", action="store_true", help="against a rate-limited fake Groq")
    parser.add_argument("--window-s", type=float, default=60.0, help="the fake provider's minute")
    parser.add_argument("--latency-s", type=float, default=0.3, help="the fake provider's latency")
    parser.add_argument("--modes", default="page,hit,nowait", help="which five-search runs: page,hit,nowait")
    args = parser.parse_args()
    if args.limits:
        logging.disable(logging.WARNING)  # one line per fallen-back card would drown the tables
        print(f"# {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")
        print(f"# {platform.machine()}, {os.cpu_count()} cores, load average {load_average()}\n")
        limits_main(args.window_s, args.latency_s, args.modes)
        return

    settings_default = Settings(_env_file=None).explain_concurrency  # type: ignore[call-arg]
    explainer_default = 8  # Explainer(max_concurrency=...)'s own default
    values = (
        [int(v) for v in args.concurrency.split(",")]
        if args.concurrency
        else sorted({1, settings_default, explainer_default, args.hits})
    )
    notes = {settings_default: " (settings default)", explainer_default: " (Explainer default)"}
    print(f"# {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, load average {load_average()}"
    )
    print(
        f"# {args.hits} hits vs 1, fake model {args.delay_ms:.0f} ms per call (async sleep), "
        f"median of {args.rounds} rounds; floor: page <= {FLOOR}x one call\n"
    )
    print(
        "| max_concurrency | one hit (ms) | page (ms) | page / one | waves | peak in flight "
        "| cached page (ms) | model calls, cached page | other processes |"
    )
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for value in values:
        print(run(value, args.hits, args.delay_ms / 1000.0, args.rounds, notes.get(value, "")), flush=True)


if __name__ == "__main__":
    main()
