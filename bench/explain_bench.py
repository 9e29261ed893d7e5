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
"""

from __future__ import annotations

import argparse
import asyncio
import json
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

from explainer.explain.backends import ChatModelBackend
from explainer.explain.cache import MemoryExplanationCache
from explainer.explain.chain import Explainer
from explainer.explain.prompts import load_prompt
from explainer.explain.types import ExplainContext
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hits", type=int, default=10)
    parser.add_argument("--delay-ms", type=float, default=200.0)
    parser.add_argument("--concurrency", default=None, help="comma-separated max_concurrency values")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

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
