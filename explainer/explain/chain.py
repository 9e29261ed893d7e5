"""The explanation chain: `prompt | llm | parser`, run for a whole results page at once.

Guarantees the rest of the product relies on:
- every hit gets an explanation: when the LLM fails for a card (timeout, 429 after retries,
  5xx, malformed output...), that card alone gets the offline text, labelled "offline" with
  `fallback_reason` saying why;
- cards of one page are explained concurrently, at most `max_concurrency` at a time;
- LLM explanations are cached, so a repeated page makes no model call;
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
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, TypeVar

from langchain_core.exceptions import OutputParserException
from langchain_core.output_parsers import PydanticOutputParser
from langchain_core.runnables import Runnable
from pydantic import ValidationError

from explainer.errors import ConfigError, LLMError, LLMMalformedOutput, redact
from explainer.explain.backends import Backend, LLMConfig, OfflineExplainer, create_backend
from explainer.explain.cache import ExplanationCache, ExplanationKey
from explainer.explain.prompts import PromptFile, load_prompt
from explainer.explain.regions import describe_regions
from explainer.explain.types import ExplainContext, Explanation, ExplanationOutput

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Variables the explainer can fill from an `ExplainContext`; a prompt may use any subset.
CONTEXT_VARIABLES = frozenset(
    {"query_text", "query_kind", "caption", "dataset_captions", "evidence", "score", "rank"}
)


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
    """Explains search hits with one backend and one prompt, with caching and offline fallback."""

    def __init__(
        self,
        backend: Backend,
        prompt: PromptFile | None = None,
        cache: ExplanationCache | None = None,
        *,
        max_concurrency: int = 16,
        offline: OfflineExplainer | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.backend = backend
        self.prompt = prompt
        self.cache = cache
        self.max_concurrency = max_concurrency
        self._offline = offline or OfflineExplainer()
        self._loop_thread = _LoopThread()
        self._chain: Runnable[dict[str, str], ExplanationOutput] | None = None
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

    @classmethod
    def from_config(
        cls,
        config: LLMConfig,
        prompt: str | PromptFile = "explain_hit",
        cache: ExplanationCache | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Explainer:
        """The usual wiring for the server and the CLI: backend from config, prompt by name[@vN]."""
        backend = create_backend(config, environ)
        prompt_file: PromptFile | None = None
        if backend.runnable is not None:  # only a language model reads a prompt
            prompt_file = load_prompt(prompt) if isinstance(prompt, str) else prompt
        return cls(backend, prompt_file, cache, max_concurrency=config.max_concurrency)

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

    def cache_key(self, ctx: ExplainContext) -> ExplanationKey:
        return ExplanationKey(
            query_text=ctx.query_text,
            query_image_key=ctx.query_image_key,
            image_key=ctx.image_key,
            prompt=self.prompt_id,
            backend=self.label,
            caption=ctx.caption,
        )

    # -- async API --------------------------------------------------------------------------

    async def aexplain(self, ctx: ExplainContext) -> Explanation:
        return (await self.aexplain_many([ctx]))[0]

    async def aexplain_many(self, ctxs: Sequence[ExplainContext]) -> list[Explanation]:
        """Explain a page of hits concurrently; the result is in the order of `ctxs`."""
        semaphore = asyncio.Semaphore(self.max_concurrency)
        return list(await asyncio.gather(*(self._explain_one(c, semaphore) for c in ctxs)))

    async def _explain_one(self, ctx: ExplainContext, semaphore: asyncio.Semaphore) -> Explanation:
        explanation = await self._explain_text(ctx, semaphore)
        if ctx.match_confidence is not None and explanation.confidence != ctx.match_confidence:
            # cached texts too: the calibration changes with the index version, the text does not
            return explanation.model_copy(update={"confidence": ctx.match_confidence})
        return explanation

    async def _explain_text(self, ctx: ExplainContext, semaphore: asyncio.Semaphore) -> Explanation:
        start = time.perf_counter()
        if self._chain is None:
            return self._offline.explain(ctx)
        key = self.cache_key(ctx)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                return hit.model_copy(update={"cached": True, "latency_ms": _ms_since(start)})
        assert self.prompt is not None  # set whenever _chain is
        inputs = context_inputs(ctx)
        self.prompt.validate_inputs(inputs)
        try:
            async with semaphore:
                output = await self._chain.ainvoke(inputs)
        except Exception as exc:
            reason = self._fallback_reason(exc)
            log.warning("explanation of %s fell back to offline: %s", ctx.image_key, reason)
            fallback = self._offline.explain(ctx, fallback_reason=reason)
            return fallback.model_copy(update={"latency_ms": _ms_since(start)})
        explanation = Explanation(
            text=output.explanation,
            backend=self.label,
            matched_concepts=output.matched_concepts,
            mismatches=output.mismatches,
            confidence=output.confidence,
            prompt=self.prompt.id,
            latency_ms=_ms_since(start),
        )
        if self.cache is not None:
            self.cache.put(key, explanation)
        return explanation

    def _fallback_reason(self, exc: Exception) -> str:
        if isinstance(exc, OutputParserException | ValidationError):
            err: LLMError = LLMMalformedOutput(f"{self.label}: reply is not the requested JSON object")
        elif isinstance(exc, LLMError):
            err = exc
        else:
            err = LLMError(f"{self.label}: {type(exc).__name__}: {exc}")
        secrets = self.backend.secrets()
        return redact(f"{err.reason_code}: {err}", secrets)

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
