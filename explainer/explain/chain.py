"""The explanation chain: `prompt | llm | parser`, run for a whole results page at once.

Guarantees the rest of the product relies on:
- every hit gets an explanation: when the LLM fails for a card (timeout, 429 after retries,
  5xx, malformed output, no rate budget within the wait allowed...), that card alone gets the
  offline text, labelled "offline" with `fallback_reason` saying why;
- with a page prompt and a backend that can (Groq), the hits of one query are explained a page per
  call (`page.py`: `page_size` hits, top ranks first), hits the reply left out asked again once;
  otherwise one call per hit, at most `max_concurrency` at a time;
- every claimed match is checked against the hit's own descriptions (`grounding.py`); the ones
  they do not support move to `unsupported_concepts`; a backend that vets its replies (the local
  one) has junk (an echo of the query, repetition, nothing supported: `vetting.py`) replaced by the
  offline text, labelled with the reason, never shown as the model's explanation;
- LLM explanations are cached per hit, whichever call wrote them, so a repeated page makes no call;
- `aexplain_within` answers after a bounded wait, leaving the rest running: a card waiting for the
  provider's rate budget is reported pending (with the wait) and collected later;
- an explanation's confidence is the hit's calibrated confidence whenever the search gave one (the
  number the card's badge shows), whoever wrote the text: a model's own 0..1 guess would put a
  second, different number on the same card, and it knows nothing of how the collection scores;
- the sync API works from plain code, from a thread of a server, and from inside a running event
  loop (a notebook), because sync calls run on the explainer's own event-loop thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, TypeVar

from langchain_core.exceptions import OutputParserException
from langchain_core.output_parsers import PydanticOutputParser
from langchain_core.runnables import Runnable
from pydantic import ValidationError

from explainer.errors import ConfigError, LLMError, LLMMalformedOutput, LLMRejectedReply, redact
from explainer.explain.backends import Backend, LLMConfig, OfflineExplainer, create_backend
from explainer.explain.budget import QUEUE_STATUS, QueueStatus
from explainer.explain.cache import ExplanationCache, ExplanationKey
from explainer.explain.grounding import GroundingStats, check_concepts, concepts_of
from explainer.explain.page import (
    completion_tokens,
    hit_numbers,
    page_inputs,
    page_tool,
    parse_page,
    reply_arguments,
)
from explainer.explain.prompts import PromptFile, load_prompt
from explainer.explain.regions import describe_regions
from explainer.explain.types import ExplainContext, Explanation, ExplanationOutput, Pending
from explainer.explain.vetting import junk_reason

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Variables the explainer can fill from an `ExplainContext`; a prompt may use any subset.
CONTEXT_VARIABLES = frozenset(
    {"query_text", "query_kind", "caption", "dataset_captions", "evidence", "score", "rank"}
)
#: Variables of a page prompt (`prompts/explain_page.v*.toml`), filled by `page.page_inputs`.
PAGE_VARIABLES = frozenset({"query_text", "query_kind", "count", "hits"})
#: Finished results kept for a client that stopped waiting and asks again (fallbacks are not cached).
_RECENT_MAX = 2048


def context_inputs(ctx: ExplainContext) -> dict[str, str]:
    """The prompt variables of one hit, as text; absent facts are said explicitly, not left blank."""
    regions = describe_regions(ctx.evidence, ctx.image_size)
    return {
        "query_text": ctx.query_text.strip() if ctx.query_text else "(none: the query is an image)",
        "query_kind": ctx.query_kind,
        "caption": ctx.caption.strip() if ctx.caption else "(no caption available)",
        "dataset_captions": "\n".join(f"- {c}" for c in ctx.dataset_captions) or "(none)",
        "evidence": "\n".join(f"{i}. {r}" for i, r in enumerate(regions, 1)) or "(no regions)",
        "score": f"{ctx.score:.3f}",
        "rank": str(ctx.rank),
    }


class _LoopThread:
    """A private event loop on a daemon thread, started on first use, for the sync API."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=self._loop.run_forever, name="clearsight-explainer", daemon=True
                )
                self._thread.start()
            loop = self._loop
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("Explainer's sync API called from its own loop; use the async API there")
        future: concurrent.futures.Future[_T] = asyncio.run_coroutine_threadsafe(coro, loop)
        return future.result()

    def close(self, last: Coroutine[Any, Any, None] | None = None) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            if last is not None:
                last.close()
            return
        if last is not None:
            asyncio.run_coroutine_threadsafe(last, loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


class Explainer:
    """Explains search hits with one backend and its prompts, with caching, grounding and offline fallback."""

    def __init__(
        self,
        backend: Backend,
        prompt: PromptFile | None = None,
        cache: ExplanationCache | None = None,
        *,
        max_concurrency: int = 16,
        offline: OfflineExplainer | None = None,
        page_prompt: PromptFile | None = None,
        page_size: int = 12,
    ) -> None:
        if max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if page_size < 1:
            raise ConfigError(f"page_size must be >= 1, got {page_size}")
        self.backend = backend
        self.prompt = prompt
        self.cache = cache
        self.max_concurrency = max_concurrency
        self.page_size = page_size
        self.grounding = GroundingStats()
        self._offline = offline or OfflineExplainer()
        self._loop_thread = _LoopThread()
        self._chain: Runnable[dict[str, str], ExplanationOutput] | None = None
        self.page_prompt: PromptFile | None = None
        self._inflight: dict[str, asyncio.Future[Explanation]] = {}
        self._status: dict[str, QueueStatus] = {}
        self._recent: OrderedDict[str, Explanation] = OrderedDict()
        self._tasks: set[asyncio.Future[None]] = set()
        runnable = backend.runnable
        if runnable is not None:
            if prompt is None:
                raise ConfigError(f"the {backend.label} explainer needs a prompt (see load_prompt)")
            unknown = sorted(set(prompt.input_variables) - CONTEXT_VARIABLES)
            if unknown:
                raise ConfigError(
                    f"prompt {prompt.id} declares {unknown}, which the explainer cannot fill "
                    f"(it fills {sorted(CONTEXT_VARIABLES)})"
                )
            parser = PydanticOutputParser(pydantic_object=ExplanationOutput)
            self._chain = prompt.chat_template | runnable | parser
            if page_prompt is not None:
                unknown = sorted(set(page_prompt.input_variables) - PAGE_VARIABLES)
                if unknown:
                    allowed = sorted(PAGE_VARIABLES)
                    raise ConfigError(
                        f"page prompt {page_prompt.id} declares {unknown}; it may use {allowed}"
                    )
                self.page_prompt = page_prompt

    @classmethod
    def from_config(
        cls,
        config: LLMConfig,
        prompt: str | PromptFile | None = None,
        cache: ExplanationCache | None = None,
        environ: Mapping[str, str] | None = None,
        page_prompt: str | PromptFile = "explain_page",
    ) -> Explainer:
        """The usual wiring for the server and the CLI: backend from config, prompts by name[@vN]
        (`prompt` None: the backend's own default, else the latest explain_hit)."""
        backend = create_backend(config, environ)
        prompt_file: PromptFile | None = None
        page_file: PromptFile | None = None
        if backend.runnable is not None:  # only a language model reads a prompt
            if prompt is None:
                prompt = backend.default_prompt or "explain_hit"
            prompt_file = load_prompt(prompt) if isinstance(prompt, str) else prompt
            if config.page_size > 1:
                page_file = load_prompt(page_prompt) if isinstance(page_prompt, str) else page_prompt
        return cls(
            backend,
            prompt_file,
            cache,
            max_concurrency=config.max_concurrency,
            page_prompt=page_file,
            page_size=config.page_size,
        )

    @property
    def label(self) -> str:
        """Who writes this explainer's texts when nothing fails."""
        return self.backend.label

    @property
    def prompt_id(self) -> str:
        return (
            self.prompt.id if self.prompt is not None and self._chain is not None else self._offline.prompt_id
        )

    @property
    def chain(self) -> Runnable[dict[str, str], ExplanationOutput] | None:
        """The LangChain runnable (`prompt | llm | parser`), for notebooks; None when offline."""
        return self._chain

    def cache_key(self, ctx: ExplainContext, prompt: str | None = None) -> ExplanationKey:
        return ExplanationKey(
            query_text=ctx.query_text,
            query_image_key=ctx.query_image_key,
            image_key=ctx.image_key,
            prompt=prompt or self.prompt_id,
            backend=self.label,
            caption=ctx.caption,
        )

    def _cached(self, ctx: ExplainContext) -> Explanation | None:
        """A stored LLM explanation of this hit, written by a one-hit or a page call."""
        if self.cache is None:
            return None
        prompts = [self.prompt_id] + ([self.page_prompt.id] if self.page_prompt is not None else [])
        for prompt in prompts:
            hit = self.cache.get(self.cache_key(ctx, prompt))
            if hit is not None:
                return hit
        return None

    # -- async API --------------------------------------------------------------------------

    async def aexplain(self, ctx: ExplainContext) -> Explanation:
        return (await self.aexplain_many([ctx]))[0]

    async def aexplain_many(self, ctxs: Sequence[ExplainContext]) -> list[Explanation]:
        """Explain hits (pages of one query per call where possible); the result is in the order of `ctxs`.

        Each explanation carries its hit's calibrated confidence whenever the search gave one (the
        number the card's badge shows), cached texts too: the calibration changes with the index
        version, the text does not.
        """
        texts = await self._explain_texts(ctxs)
        return [
            e.model_copy(update={"confidence": c.match_confidence})
            if c.match_confidence is not None and e.confidence != c.match_confidence
            else e
            for c, e in zip(ctxs, texts, strict=True)
        ]

    async def _explain_texts(self, ctxs: Sequence[ExplainContext]) -> list[Explanation]:
        start = time.perf_counter()
        results: list[Explanation | None] = [None] * len(ctxs)
        todo: list[int] = []
        for i, ctx in enumerate(ctxs):
            if self._chain is None:
                results[i] = self._ground(ctx, self._offline.explain(ctx))
            elif (hit := self._cached(ctx)) is not None:
                results[i] = hit.model_copy(update={"cached": True, "latency_ms": _ms_since(start)})
            else:
                todo.append(i)
        semaphore = asyncio.Semaphore(self.max_concurrency)
        jobs: list[Coroutine[Any, Any, list[tuple[int, Explanation]]]] = []
        for chunk in self._chunks(ctxs, todo):
            if len(chunk) == 1 or self.page_prompt is None:
                jobs.extend(self._one(i, ctxs[i], semaphore) for i in chunk)
            else:
                jobs.append(self._page([(i, ctxs[i]) for i in chunk]))
        for done in await asyncio.gather(*jobs):  # started in order: top ranks ask the budget first
            for i, explanation in done:
                results[i] = explanation
        return [r for r in results if r is not None]

    def _chunks(self, ctxs: Sequence[ExplainContext], todo: list[int]) -> list[list[int]]:
        """Indices grouped by query, best rank first, cut into pages of `page_size`."""
        size = self.page_size if self.page_prompt is not None and self._can_page() else 1
        groups: dict[tuple[str | None, str, str | None], list[int]] = {}
        for i in sorted(todo, key=lambda i: ctxs[i].rank):
            c = ctxs[i]
            groups.setdefault((c.query_text, c.query_kind, c.query_image_key), []).append(i)
        chunks = [g[k : k + size] for g in groups.values() for k in range(0, len(g), size)]
        return sorted(chunks, key=lambda ch: ctxs[ch[0]].rank)

    def _can_page(self) -> bool:
        return self.backend.page_runnable(page_tool([1, 2]), completion_tokens(2)) is not None

    async def _one(
        self, i: int, ctx: ExplainContext, semaphore: asyncio.Semaphore
    ) -> list[tuple[int, Explanation]]:
        start = time.perf_counter()
        assert self.prompt is not None and self._chain is not None  # only called with a chain
        inputs = context_inputs(ctx)
        self.prompt.validate_inputs(inputs)
        status = self._track_status([ctx])
        try:
            async with semaphore:
                output = await self._chain.ainvoke(inputs)
        except Exception as exc:
            return [(i, self._fallback(ctx, exc, start))]
        finally:
            self._untrack_status([ctx], status)
        explanation = self._from_output(ctx, output, self.prompt.id, start)
        rejected = self._rejected(ctx, output, explanation)
        if rejected is not None:
            return [(i, self._fallback(ctx, rejected, start))]
        if self.cache is not None:
            self.cache.put(self.cache_key(ctx, self.prompt.id), explanation)
        return [(i, explanation)]

    async def _page(self, items: list[tuple[int, ExplainContext]]) -> list[tuple[int, Explanation]]:
        """One call for these hits of one query; the hits its reply left out are asked again, once."""
        start = time.perf_counter()
        assert self.page_prompt is not None
        out: list[tuple[int, Explanation]] = []
        left = items
        problem: Exception | None = None
        status = self._track_status([c for _, c in items])
        try:
            for _ in range(2):
                numbers = hit_numbers([c for _, c in left])
                runnable = self.backend.page_runnable(page_tool(numbers), completion_tokens(len(left)))
                assert runnable is not None  # _chunks pages only where the backend can
                messages = self.page_prompt.chat_template.format_prompt(**page_inputs([c for _, c in left]))
                try:
                    message = await runnable.ainvoke(messages)
                except Exception as exc:
                    problem = exc
                    break
                reply = parse_page(reply_arguments(message), numbers)
                for (i, ctx), number in zip(left, numbers, strict=True):
                    if number in reply.answers:
                        output = reply.answers[number]
                        explanation = self._from_output(ctx, output, self.page_prompt.id, start)
                        rejected = self._rejected(ctx, output, explanation)
                        if rejected is not None:  # junk is not asked again: the same model wrote it
                            out.append((i, self._fallback(ctx, rejected, start)))
                            continue
                        if self.cache is not None:
                            self.cache.put(self.cache_key(ctx, self.page_prompt.id), explanation)
                        out.append((i, explanation))
                if reply.problems:
                    log.info("%s page reply: %s", self.label, reply.problems)
                left = [item for item, n in zip(left, numbers, strict=True) if n in reply.missing]
                problem = LLMMalformedOutput(
                    f"{self.label}: the page reply left out this hit ({reply.problems})"
                )
                if not left:
                    break
        finally:
            self._untrack_status([c for _, c in items], status)
        for i, ctx in left:
            out.append((i, self._fallback(ctx, problem or LLMError("no reply"), start)))
        return out

    def _from_output(
        self, ctx: ExplainContext, output: ExplanationOutput, prompt: str, start: float
    ) -> Explanation:
        explanation = Explanation(
            text=output.explanation,
            backend=self.label,
            matched_concepts=concepts_of(output.matched_concepts),
            mismatches=concepts_of(output.mismatches),
            confidence=output.confidence,
            prompt=prompt,
            latency_ms=_ms_since(start),
        )
        return self._ground(ctx, explanation)

    def _rejected(
        self, ctx: ExplainContext, output: ExplanationOutput, explanation: Explanation
    ) -> LLMRejectedReply | None:
        """Why a parsed reply must not be shown (`vetting.py`), for backends that vet their replies."""
        if not self.backend.vets_replies:
            return None
        reason = junk_reason(ctx, output, explanation.matched_concepts)
        if reason is None:
            return None
        log.info("%s reply for %s not shown (%s): %r", self.label, ctx.image_key, reason, output.explanation)
        return LLMRejectedReply(f"{self.label}: reply not shown: {reason}")

    def _ground(self, ctx: ExplainContext, explanation: Explanation) -> Explanation:
        """Move the claimed matches the hit's descriptions do not say into `unsupported_concepts`."""
        result = check_concepts(ctx, explanation.matched_concepts)
        self.grounding.record(explanation.backend, len(explanation.matched_concepts), len(result.unsupported))
        return explanation.model_copy(
            update={"matched_concepts": result.matched, "unsupported_concepts": result.unsupported}
        )

    def _fallback(self, ctx: ExplainContext, exc: Exception, start: float) -> Explanation:
        reason = self._fallback_reason(exc)
        log.warning("explanation of %s fell back to offline: %s", ctx.image_key, reason)
        fallback = self._ground(ctx, self._offline.explain(ctx, fallback_reason=reason))
        return fallback.model_copy(update={"latency_ms": _ms_since(start)})

    def _fallback_reason(self, exc: Exception) -> str:
        if isinstance(exc, OutputParserException | ValidationError):
            err: LLMError = LLMMalformedOutput(f"{self.label}: reply is not the requested JSON object")
        elif isinstance(exc, LLMError):
            err = exc
        else:
            err = LLMError(f"{self.label}: {type(exc).__name__}: {exc}")
        secrets = self.backend.secrets()
        return redact(f"{err.reason_code}: {err}", secrets)

    # -- bounded waits: pending cards ---------------------------------------------------------

    def _track_status(self, ctxs: Sequence[ExplainContext]) -> QueueStatus:
        """A status the backend reports budget waits into, visible to `aexplain_within`'s callers."""
        status = QueueStatus()
        QUEUE_STATUS.set(status)
        for ctx in ctxs:
            self._status[self.cache_key(ctx).digest()] = status
        return status

    def _untrack_status(self, ctxs: Sequence[ExplainContext], status: QueueStatus) -> None:
        for ctx in ctxs:
            key = self.cache_key(ctx).digest()
            if self._status.get(key) is status:
                del self._status[key]

    async def aexplain_within(
        self, ctxs: Sequence[ExplainContext], wait_s: float
    ) -> list[Explanation | Pending]:
        """Explanations that are ready within `wait_s`; the others come back `Pending` and keep going.

        Asking again for a pending hit joins its running call (or collects its result), so a client
        that stopped waiting never makes a second call. Call from one event loop (the server's).
        """
        loop = asyncio.get_running_loop()
        keys = [self.cache_key(c).digest() for c in ctxs]
        futures: dict[str, asyncio.Future[Explanation]] = {}
        new: dict[str, ExplainContext] = {}
        for key, ctx in zip(keys, ctxs, strict=True):
            if key in futures:
                continue
            if key in self._recent:
                fut: asyncio.Future[Explanation] = loop.create_future()
                fut.set_result(self._recent.pop(key))
            elif key in self._inflight:
                fut = self._inflight[key]
            else:
                fut = self._inflight[key] = loop.create_future()
                new[key] = ctx
            futures[key] = fut
        if new:
            task = asyncio.ensure_future(self._run_tracked(new))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if futures:
            await asyncio.wait(list(futures.values()), timeout=wait_s)
        out: list[Explanation | Pending] = []
        for key in keys:
            fut = futures[key]
            if fut.done():
                self._recent.pop(key, None)  # delivered
                out.append(fut.result())
            else:
                status = self._status.get(key)
                out.append(Pending(status.queued_s() if status is not None else None))
        return out

    async def _run_tracked(self, new: dict[str, ExplainContext]) -> None:
        try:
            results = await self.aexplain_many(list(new.values()))
        except Exception as exc:  # aexplain_many falls back per hit; this is a last resort
            start = time.perf_counter()
            results = [self._fallback(c, exc, start) for c in new.values()]
        for key, explanation in zip(new, results, strict=True):
            fut = self._inflight.pop(key, None)
            if fut is not None and not fut.done():
                fut.set_result(explanation)
            self._recent[key] = explanation
            while len(self._recent) > _RECENT_MAX:
                self._recent.popitem(last=False)

    # -- sync API -----------------------------------------------------------------------------

    def explain(self, ctx: ExplainContext) -> Explanation:
        return self.explain_many([ctx])[0]

    def explain_many(self, ctxs: Sequence[ExplainContext]) -> list[Explanation]:
        """Sync twin of `aexplain_many`; safe to call while another event loop runs in this thread."""
        return self._loop_thread.run(self.aexplain_many(ctxs))

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the private loop and release the backend's connections."""
        self._loop_thread.close(self.backend.aclose())
        self.backend.close()

    def __enter__(self) -> Explainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Explainer(backend={self.label!r}, prompt={self.prompt_id!r}, cache={type(self.cache).__name__})"
        )


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 3)
