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
(capped at `backoff_max_s` for 5xx).

Rate budget: every attempt first waits for the process's budget of this model (`budget.py`), with
its estimated tokens, so calls are not fired into a 429. Every reply's `x-ratelimit-*` headers and a
429's `retry-after` reach the budget through the HTTP client's response hook; a 429 is retried once
the budget (which then holds its `retry-after`) allows, never at once.

Page calls (`page_runnable`) bind the page's function as the only tool, and require it to be called.

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
import time
import weakref
from dataclasses import dataclass
from typing import Any

import groq
import httpx
from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import BaseMessage, convert_to_messages
from langchain_core.prompt_values import PromptValue
from langchain_core.runnables import Runnable, RunnableLambda
from langchain_groq import ChatGroq
from pydantic import SecretStr
from tenacity import AsyncRetrying, RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from explainer.errors import ConfigError, LLMError, LLMRateLimited, LLMTimeout, redact
from explainer.explain.backends.base import ChatBackend
from explainer.explain.backends.config import LLMConfig
from explainer.explain.budget import QUEUE_STATUS, RateBudget, budget_for, estimate_tokens

log = logging.getLogger(__name__)

_MAX_DETAIL = 300
#: 429s retried beyond `max_retries`: each waits for the provider's retry-after, so they cost no load.
_RATE_LIMIT_RETRIES = 3


@dataclass
class _LoopResources:
    model: ChatGroq
    #: The same client without JSON mode, for page calls (Groq refuses JSON mode beside tools).
    tool_model: ChatGroq
    client: httpx.AsyncClient
    semaphore: asyncio.Semaphore


_ROLES = {"system": "system", "human": "user", "ai": "assistant", "tool": "tool"}


def _messages(value: LanguageModelInput) -> list[dict[str, str]]:
    """The chat messages as the provider receives them (roles and text), for the token estimate."""
    msgs = value.to_messages() if isinstance(value, PromptValue) else convert_to_messages(value)
    return [{"role": _ROLES.get(m.type, m.type), "content": str(m.content)} for m in msgs]


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
        self._sync_tool_model: ChatGroq | None = None
        self.budget: RateBudget = budget_for(
            config.base_url or "https://api.groq.com",
            config.model,
            config.requests_per_minute,
            config.tokens_per_minute,
            config.rate_window_s,
        )
        #: Send times of requests in flight (id of the httpx request → monotonic time).
        self._sent_at: dict[int, float] = {}
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
        self,
        sync_client: httpx.Client | None,
        async_client: httpx.AsyncClient | None,
        json_mode: bool = True,
    ) -> ChatGroq:
        cfg = self._config
        kwargs: dict[str, object] = {}
        if cfg.json_mode and json_mode:
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
                client = httpx.AsyncClient(
                    timeout=self._config.timeout_s,
                    event_hooks={"request": [self._on_request_async], "response": [self._on_response_async]},
                )
                res = _LoopResources(
                    model=self._chat_model(None, client),
                    tool_model=self._chat_model(None, client, json_mode=False),
                    client=client,
                    semaphore=asyncio.Semaphore(self._config.max_concurrency),
                )
                self._per_loop[loop] = res
            return res

    def _for_sync(self, tools: bool = False) -> ChatGroq:
        with self._lock:
            if self._sync_model is None or self._sync_tool_model is None:
                self._sync_client = httpx.Client(
                    timeout=self._config.timeout_s,
                    event_hooks={"request": [self._on_request], "response": [self._on_response]},
                )
                self._sync_model = self._chat_model(self._sync_client, None)
                self._sync_tool_model = self._chat_model(self._sync_client, None, json_mode=False)
            return self._sync_tool_model if tools else self._sync_model

    # -- the budget hears every reply ---------------------------------------------------------

    def _on_request(self, request: httpx.Request) -> None:
        self._sent_at[id(request)] = time.monotonic()

    def _on_response(self, response: httpx.Response) -> None:
        sent = self._sent_at.pop(id(response.request), time.monotonic())
        self.budget.observe(response.headers, sent)

    async def _on_request_async(self, request: httpx.Request) -> None:
        self._on_request(request)

    async def _on_response_async(self, response: httpx.Response) -> None:
        self._on_response(response)

    def page_runnable(
        self, tool: dict[str, Any], max_tokens: int
    ) -> Runnable[LanguageModelInput, BaseMessage]:
        name = tool["function"]["name"]
        extra = {
            "tools": [tool],
            "tool_choice": {"type": "function", "function": {"name": name}},
            "max_tokens": max_tokens,
        }

        def call(value: LanguageModelInput) -> BaseMessage:
            return self._invoke(value, extra)

        async def acall(value: LanguageModelInput) -> BaseMessage:
            return await self._ainvoke(value, extra)

        return RunnableLambda(call, afunc=acall, name=f"{self.label}:page")

    def _estimate(self, value: LanguageModelInput, extra: dict[str, Any] | None) -> tuple[int, int]:
        """(prompt tokens as we count them, tokens to ask the budget for)."""
        payload: dict[str, object] = {"m": _messages(value), "t": None, "r": None}
        max_tokens = self._config.max_tokens
        if extra:
            payload["t"] = extra["tools"]
            max_tokens = int(extra["max_tokens"])
        elif self._config.json_mode:
            payload["r"] = {"type": "json_object"}
        prompt = estimate_tokens(payload, 0)
        return prompt, self.budget.scaled(prompt, max_tokens)

    def _learn(self, message: BaseMessage, prompt_estimate: int) -> None:
        usage = getattr(message, "usage_metadata", None)
        if usage:
            self.budget.learn_usage(prompt_estimate, int(usage.get("input_tokens", 0)))

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
        if isinstance(exc, groq.APIStatusError) and exc.status_code == 429:
            return 0.0  # the budget now holds the retry-after and makes the next attempt wait for it
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

    def _stop(self, state: RetryCallState) -> bool:
        """Stop after `max_retries`; a 429 gets a few more, each one waited for by the budget."""
        exc = state.outcome.exception() if state.outcome is not None else None
        limited = isinstance(exc, groq.APIStatusError) and exc.status_code == 429
        extra = _RATE_LIMIT_RETRIES if limited and self._config.max_retries > 0 else 0
        return bool(stop_after_attempt(self._config.max_retries + 1 + extra)(state))

    def _retrying(self) -> Retrying:
        return Retrying(
            stop=self._stop,
            wait=self._wait_s,
            retry=retry_if_exception(self._retryable),
            before_sleep=self._before_sleep,
            reraise=True,
        )

    def _async_retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            stop=self._stop,
            wait=self._wait_s,
            retry=retry_if_exception(self._retryable),
            before_sleep=self._before_sleep,
            reraise=True,
        )

    # -- calls --------------------------------------------------------------------------------

    def _invoke(self, value: LanguageModelInput, extra: dict[str, Any] | None = None) -> BaseMessage:
        model: Runnable[LanguageModelInput, BaseMessage] = self._for_sync(tools=extra is not None)
        if extra:
            model = model.bind(**extra)
        prompt, tokens = self._estimate(value, extra)
        error: LLMError | None = None
        try:
            for attempt in self._retrying():
                with attempt:
                    self.budget.acquire_sync(tokens, self._config.max_budget_wait_s)
                    with self._sync_semaphore:
                        message = model.invoke(value)
                    self._learn(message, prompt)
                    return message
        except Exception as exc:
            error = self._translate(exc)
        # Raised outside the handler so the provider's exception is not even the implicit __context__.
        raise error or LLMError(f"{self.label}: no attempt was made")

    async def _ainvoke(self, value: LanguageModelInput, extra: dict[str, Any] | None = None) -> BaseMessage:
        res = self._for_running_loop()
        model: Runnable[LanguageModelInput, BaseMessage] = (
            res.tool_model.bind(**extra) if extra else res.model
        )
        prompt, tokens = self._estimate(value, extra)
        status = QUEUE_STATUS.get()
        error: LLMError | None = None
        try:
            async for attempt in self._async_retrying():
                with attempt:
                    on_wait = status.waiting if status is not None else None
                    await self.budget.acquire(tokens, self._config.max_budget_wait_s, on_wait)
                    if status is not None:
                        status.running()
                    async with res.semaphore:
                        message = await model.ainvoke(value)
                    self._learn(message, prompt)
                    return message
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
            retries = self._config.max_retries + (_RATE_LIMIT_RETRIES if self._config.max_retries else 0)
            return LLMRateLimited(f"{detail} (after {retries} retries, each after its retry-after)")
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
