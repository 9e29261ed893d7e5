"""Groq backend: `langchain_groq.ChatGroq` with our own retry policy and a concurrency bound.

Retries: the groq client's built-in retries are switched off (`max_retries=0`) and tenacity
retries around each call instead, because
- its backoff starts at a fixed 0.5 s and cannot be configured (tests need milliseconds, a busy
  server may need more); ours is `backoff_initial_s`·2ⁿ with jitter, capped at `backoff_max_s`;
- it retries timeouts, multiplying a slow card's latency by the retry count; a timed-out card
  should fall back to the offline text at once (unless `retry_on_timeout`);
- the concurrency slot is held per attempt, not across backoff sleeps, so one rate-limited card
  does not block the others.
429 and 5xx replies and connection errors are retried, honouring `retry-after` / `retry-after-ms`
(capped at `backoff_max_s`).

Event loops: an `httpx.AsyncClient` and an `asyncio.Semaphore` belong to the loop that first uses
them, and this backend may be driven from several loops (FastAPI's, the explainer's private loop,
a notebook's), so each loop gets its own chat model, client and semaphore.

Secrets: the key lives in a `SecretStr`; it is handed to the groq client only, every failure is
re-raised as an `LLMError` whose text passes through `redact`, and the original exception (which
may quote a provider's error body) is neither chained nor left as the implicit context.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import weakref
from dataclasses import dataclass

import groq
import httpx
from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import BaseMessage
from langchain_core.runnables import Runnable, RunnableLambda
from langchain_groq import ChatGroq
from pydantic import SecretStr
from tenacity import AsyncRetrying, RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from explainer.errors import ConfigError, LLMError, LLMRateLimited, LLMTimeout, redact
from explainer.explain.backends.base import ChatBackend
from explainer.explain.backends.config import LLMConfig

log = logging.getLogger(__name__)

_MAX_DETAIL = 300


@dataclass
class _LoopResources:
    model: ChatGroq
    client: httpx.AsyncClient
    semaphore: asyncio.Semaphore


def _retry_after_s(exc: BaseException | None) -> float | None:
    """Seconds the server asked us to wait, from `retry-after-ms` or `retry-after` (seconds)."""
    if not isinstance(exc, groq.APIStatusError):
        return None
    headers = exc.response.headers
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            value = float(raw) * scale
        except ValueError:
            continue  # an HTTP date: fall back to our own backoff
        if value >= 0:
            return value
    return None


class GroqBackend(ChatBackend):
    """Explains with a Groq-hosted model through the official client."""

    def __init__(self, config: LLMConfig) -> None:
        if config.api_key is None or not config.api_key.get_secret_value():
            raise ConfigError(
                "the groq explainer needs an API key: pass api_key in the settings or set GROQ_API_KEY, "
                "or choose the offline explainer"
            )
        self.label = f"groq:{config.model}"
        self._config = config
        self._key: SecretStr = config.api_key
        self._rng = random.Random()
        self._lock = threading.Lock()
        self._per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopResources] = (
            weakref.WeakKeyDictionary()
        )
        self._sync_client: httpx.Client | None = None
        self._sync_model: ChatGroq | None = None
        self._sync_semaphore = threading.BoundedSemaphore(config.max_concurrency)
        self._runnable: Runnable[LanguageModelInput, BaseMessage] = RunnableLambda(
            self._invoke, afunc=self._ainvoke, name=self.label
        )

    def __repr__(self) -> str:
        return f"GroqBackend(label={self.label!r}, base_url={self._config.base_url!r}, api_key=**********)"

    @property
    def runnable(self) -> Runnable[LanguageModelInput, BaseMessage]:
        return self._runnable

    def secrets(self) -> tuple[str, ...]:
        return (self._key.get_secret_value(),)

    # -- building clients -------------------------------------------------------------------

    def _chat_model(
        self, sync_client: httpx.Client | None, async_client: httpx.AsyncClient | None
    ) -> ChatGroq:
        cfg = self._config
        kwargs: dict[str, object] = {}
        if cfg.json_mode:
            kwargs["response_format"] = {"type": "json_object"}
        return ChatGroq(
            model=cfg.model,
            api_key=self._key,
            base_url=cfg.base_url,
            timeout=cfg.timeout_s,
            max_retries=0,
            temperature=cfg.temperature,
            max_tokens=cfg.max_tokens,
            model_kwargs=kwargs,
            http_client=sync_client,
            http_async_client=async_client,
        )

    def _for_running_loop(self) -> _LoopResources:
        loop = asyncio.get_running_loop()
        with self._lock:
            res = self._per_loop.get(loop)
            if res is None:
                # A closed loop's client may still reference it; drop such entries so they can be freed.
                for stale in [old for old in self._per_loop if old.is_closed()]:
                    del self._per_loop[stale]
                client = httpx.AsyncClient(timeout=self._config.timeout_s)
                res = _LoopResources(
                    model=self._chat_model(None, client),
                    client=client,
                    semaphore=asyncio.Semaphore(self._config.max_concurrency),
                )
                self._per_loop[loop] = res
            return res

    def _for_sync(self) -> ChatGroq:
        with self._lock:
            if self._sync_model is None:
                self._sync_client = httpx.Client(timeout=self._config.timeout_s)
                self._sync_model = self._chat_model(self._sync_client, None)
            return self._sync_model

    # -- retry policy -----------------------------------------------------------------------

    def _retryable(self, exc: BaseException) -> bool:
        if isinstance(exc, groq.APITimeoutError):
            return self._config.retry_on_timeout
        if isinstance(exc, groq.APIStatusError):
            return exc.status_code == 429 or exc.status_code >= 500
        return isinstance(exc, groq.APIConnectionError)

    def _wait_s(self, state: RetryCallState) -> float:
        cfg = self._config
        exc = state.outcome.exception() if state.outcome is not None else None
        asked = _retry_after_s(exc)
        if asked is not None:
            return min(asked, cfg.backoff_max_s)
        base = min(cfg.backoff_max_s, cfg.backoff_initial_s * 2.0 ** (state.attempt_number - 1))
        return base * (0.5 + 0.5 * self._rng.random())

    def _before_sleep(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        log.info(
            "%s: attempt %d failed (%s), retrying",
            self.label,
            state.attempt_number,
            self._describe(exc) if exc is not None else "unknown",
        )

    def _retrying(self) -> Retrying:
        return Retrying(
            stop=stop_after_attempt(self._config.max_retries + 1),
            wait=self._wait_s,
            retry=retry_if_exception(self._retryable),
            before_sleep=self._before_sleep,
            reraise=True,
        )

    def _async_retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            stop=stop_after_attempt(self._config.max_retries + 1),
            wait=self._wait_s,
            retry=retry_if_exception(self._retryable),
            before_sleep=self._before_sleep,
            reraise=True,
        )

    # -- calls --------------------------------------------------------------------------------

    def _invoke(self, value: LanguageModelInput) -> BaseMessage:
        model = self._for_sync()
        error: LLMError | None = None
        try:
            for attempt in self._retrying():
                with attempt, self._sync_semaphore:
                    return model.invoke(value)
        except Exception as exc:
            error = self._translate(exc)
        # Raised outside the handler so the provider's exception is not even the implicit __context__.
        raise error or LLMError(f"{self.label}: no attempt was made")

    async def _ainvoke(self, value: LanguageModelInput) -> BaseMessage:
        res = self._for_running_loop()
        error: LLMError | None = None
        try:
            async for attempt in self._async_retrying():
                with attempt:
                    async with res.semaphore:
                        return await res.model.ainvoke(value)
        except Exception as exc:
            error = self._translate(exc)
        raise error or LLMError(f"{self.label}: no attempt was made")

    # -- errors -------------------------------------------------------------------------------

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, groq.APITimeoutError):
            text = f"no answer within {self._config.timeout_s:g} s"
        elif isinstance(exc, groq.APIStatusError):
            text = f"HTTP {exc.status_code}: {exc.message}"
        elif isinstance(exc, groq.APIConnectionError):
            text = f"cannot connect to {self._config.base_url or 'api.groq.com'}: {exc.message}"
        else:
            text = f"{type(exc).__name__}: {exc}"
        text = redact(text, self.secrets())
        return text if len(text) <= _MAX_DETAIL else text[:_MAX_DETAIL] + "…"

    def _translate(self, exc: Exception) -> LLMError:
        if isinstance(exc, LLMError):
            return exc
        detail = f"{self.label}: {self._describe(exc)}"
        if isinstance(exc, groq.APITimeoutError):
            return LLMTimeout(detail)
        if isinstance(exc, groq.APIStatusError) and exc.status_code == 429:
            return LLMRateLimited(f"{detail} (after {self._config.max_retries} retries)")
        if isinstance(exc, groq.APIStatusError) and exc.status_code >= 500:
            return LLMError(f"{detail} (after {self._config.max_retries} retries)")
        return LLMError(detail)

    # -- cleanup ------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._sync_client is not None:
                self._sync_client.close()
            self._sync_client = None
            self._sync_model = None

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            res = self._per_loop.pop(loop, None)
        if res is not None:
            await res.client.aclose()
