"""The LLM provider's rate budget, per process and per model: wait for it instead of firing into a 429.

Groq's free tier allows a model 30 requests and 6,000 tokens a minute (and a daily request count); a
page of cards explained carelessly spends that in one search, and every later card falls back to the
offline text. So every call asks the budget first, with its estimated tokens, and the budget says
when it may go. Three views are combined, and a call goes only when all three allow it:

- **our own ledger**: what this process sent in the last window (60 s), against the limits we know
  (the settings' requests and tokens per minute, the tokens limit replaced by the provider's
  `x-ratelimit-limit-tokens` once seen). It is exact for what we sent, whatever the provider's
  accounting (a sliding window or a refilling bucket: the ledger is the stricter of the two);
- **the provider's last word**: `x-ratelimit-remaining-{requests,tokens}` of the latest reply, minus
  what we sent since the request that reply answers (in-flight calls may not be counted in it), valid
  until its `x-ratelimit-reset-*` duration has passed (then our ledger decides alone);
- **a 429's `retry-after`**: nothing goes before it has passed.

Waiters are served in arrival order (a page's visible cards and the CLI's top ranks ask first), so a
small late call cannot overtake a large early one forever. Waiting is polling with short sleeps: the
budget is shared by several event loops and threads (the server's, the explainer's own), which a
threading lock serves and an asyncio primitive would not.

Token estimates count characters of the request's JSON (messages, tools, response format) / 4, plus
`max_tokens`, since providers count the completion's ceiling against the minute's tokens before the
call runs. The ratio of the provider's `usage.prompt_tokens` to our estimate is learnt from replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import json
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field

from explainer.errors import LLMRateLimited

#: Seconds added to every provider-given duration and to our window, against clock skew and rounding.
MARGIN_S = 0.25
_DURATION_RE = re.compile(r"(?P<value>\d+(?:\.\d+)?)(?P<unit>ms|h|m|s)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str | None) -> float | None:
    """Groq's reset durations ("2m59.56s", "7.66s", "120ms") or plain seconds, in seconds."""
    if text is None:
        return None
    text = text.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    parts = list(_DURATION_RE.finditer(text))
    if not parts or "".join(p.group(0) for p in parts) != text:
        return None
    return sum(float(p["value"]) * _UNITS[p["unit"]] for p in parts)


def estimate_tokens(payload: Mapping[str, object], max_tokens: int) -> int:
    """Tokens a call may count against the minute: its request JSON / 4, plus the completion ceiling."""
    text = json.dumps(payload, ensure_ascii=False, separators=(", ", ": "))
    return math.ceil(len(text) / 4) + max_tokens


@dataclass(frozen=True)
class RateHeaders:
    """What one reply said about the budget (any field may be missing)."""

    limit_tokens: int | None = None
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests_s: float | None = None
    reset_tokens_s: float | None = None
    retry_after_s: float | None = None

    @classmethod
    def parse(cls, headers: Mapping[str, str]) -> RateHeaders:
        def num(name: str) -> int | None:
            raw = headers.get(name)
            try:
                return int(float(raw)) if raw is not None else None
            except ValueError:
                return None

        retry = parse_duration(headers.get("retry-after"))
        retry_ms = headers.get("retry-after-ms")
        if retry_ms is not None:
            with contextlib.suppress(ValueError):
                retry = float(retry_ms) / 1000.0
        return cls(
            limit_tokens=num("x-ratelimit-limit-tokens"),
            remaining_requests=num("x-ratelimit-remaining-requests"),
            remaining_tokens=num("x-ratelimit-remaining-tokens"),
            reset_requests_s=parse_duration(headers.get("x-ratelimit-reset-requests")),
            reset_tokens_s=parse_duration(headers.get("x-ratelimit-reset-tokens")),
            retry_after_s=retry,
        )

    @property
    def empty(self) -> bool:
        return all(v is None for v in vars(self).values())


@dataclass
class _Seen:
    """The provider's last word, with when it was asked (`sent`) and when it stops holding."""

    sent: float
    remaining_requests: int | None
    remaining_tokens: int | None
    requests_until: float
    tokens_until: float


@dataclass
class Grant:
    """A permission to send one call; `sent` is its place in the ledger."""

    sent: float
    tokens: int
    waited_s: float


@dataclass
class RateBudget:
    """Requests and tokens per window for one model; see the module docstring for the rules."""

    requests_per_window: int = 30
    tokens_per_window: int = 6000
    window_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    #: Learnt from replies: provider prompt tokens / our estimate (never below 1).
    token_ratio: float = 1.0
    _ledger: deque[tuple[float, int]] = field(default_factory=deque)
    _seen: _Seen | None = None
    _blocked_until: float = 0.0
    _queue: deque[int] = field(default_factory=deque)
    _tickets: itertools.count[int] = field(default_factory=itertools.count)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    sent_calls: int = 0
    waits: int = 0

    # -- what the provider tells us -------------------------------------------------------------

    def observe(self, headers: Mapping[str, str], sent: float) -> None:
        """Take a reply's rate-limit headers into account; `sent` is when its request left."""
        rh = RateHeaders.parse(headers)
        now = self.clock()
        with self._lock:
            if rh.limit_tokens:
                self.tokens_per_window = rh.limit_tokens
            if rh.retry_after_s is not None:
                self._blocked_until = max(self._blocked_until, now + rh.retry_after_s + MARGIN_S)
            if rh.remaining_requests is None and rh.remaining_tokens is None:
                return
            if self._seen is not None and self._seen.sent > sent:
                return  # an older request's reply: the newer word stands
            self._seen = _Seen(
                sent=sent,
                remaining_requests=rh.remaining_requests,
                remaining_tokens=rh.remaining_tokens,
                requests_until=now + (rh.reset_requests_s or 0.0) + MARGIN_S,
                tokens_until=now + (rh.reset_tokens_s or 0.0) + MARGIN_S,
            )

    def learn_usage(self, estimated_prompt: int, provider_prompt: int) -> None:
        """Scale later estimates when the provider counted more prompt tokens than we estimated."""
        if estimated_prompt > 0 and provider_prompt > estimated_prompt:
            with self._lock:
                self.token_ratio = max(self.token_ratio, provider_prompt / estimated_prompt)

    def scaled(self, prompt_estimate: int, max_tokens: int) -> int:
        return math.ceil(prompt_estimate * self.token_ratio) + max_tokens

    # -- deciding ---------------------------------------------------------------------------------

    def _trim(self, now: float) -> None:
        horizon = self.window_s + MARGIN_S
        while self._ledger and now - self._ledger[0][0] >= horizon:
            self._ledger.popleft()

    def _wait_needed(self, tokens: int, now: float) -> float:
        """0 when a call of `tokens` may go now, else how long until something may change."""
        self._trim(now)
        waits: list[float] = []
        if now < self._blocked_until:
            waits.append(self._blocked_until - now)
        horizon = self.window_s + MARGIN_S
        if len(self._ledger) >= self.requests_per_window:
            waits.append(self._ledger[0][0] + horizon - now)
        used = sum(t for _, t in self._ledger)
        if used + tokens > self.tokens_per_window and self._ledger:
            free, expire_at = self.tokens_per_window - used, now
            for at, t in self._ledger:  # oldest first: when enough has left the window
                free += t
                expire_at = at + horizon
                if free >= tokens:
                    break
            waits.append(expire_at - now)
        seen = self._seen
        if seen is not None:
            since = [(at, t) for at, t in self._ledger if at > seen.sent]
            requests = seen.remaining_requests
            if requests is not None and now < seen.requests_until and len(since) + 1 > requests:
                waits.append(seen.requests_until - now)
            left = seen.remaining_tokens
            if left is not None and now < seen.tokens_until and sum(t for _, t in since) + tokens > left:
                waits.append(seen.tokens_until - now)
        return max(waits, default=0.0)

    def check(self, tokens: int) -> float:
        """How long a call of `tokens` would wait now (0: it may go); raises when it never could."""
        if tokens > self.tokens_per_window:
            raise LLMRateLimited(
                f"a call of about {tokens} tokens can never fit the provider's {self.tokens_per_window} "
                "tokens a minute; explain fewer hits per call"
            )
        with self._lock:
            return self._wait_needed(tokens, self.clock())

    def _try(self, ticket: int, tokens: int) -> tuple[Grant | None, float]:
        with self._lock:
            now = self.clock()
            if self._queue and self._queue[0] != ticket:
                return None, 0.05  # someone asked first
            wait = self._wait_needed(tokens, now)
            if wait > 0:
                return None, wait
            self._queue.popleft()
            self._ledger.append((now, tokens))
            self.sent_calls += 1
            return Grant(sent=now, tokens=tokens, waited_s=0.0), 0.0

    def _enter(self, tokens: int) -> int:
        self.check(tokens)  # fails at once for a call that can never fit
        with self._lock:
            ticket = next(self._tickets)
            self._queue.append(ticket)
            return ticket

    def _leave(self, ticket: int) -> None:
        with self._lock:
            if ticket in self._queue:
                self._queue.remove(ticket)

    def _turns(self, tokens: int, max_wait_s: float) -> Generator[float, None, Grant]:
        """The waits before a call of `tokens` may go, then its grant as the generator's value: the one
        loop behind `acquire` and `acquire_sync`, which differ only in how they sleep. Closing the
        generator (a cancelled wait) leaves the queue."""
        start = self.clock()
        ticket = self._enter(tokens)
        try:
            while True:
                grant, wait = self._try(ticket, tokens)
                if grant is not None:
                    grant.waited_s = self.clock() - start
                    return grant
                self._give_up_if_late(start, wait, max_wait_s)
                yield wait
        finally:
            self._leave(ticket)

    async def acquire(
        self, tokens: int, max_wait_s: float, on_wait: Callable[[float], None] | None = None
    ) -> Grant:
        """Wait (asynchronously) until a call of `tokens` may go; LLMRateLimited past `max_wait_s`."""
        turns = self._turns(tokens, max_wait_s)
        try:
            while True:
                wait = next(turns)
                if on_wait is not None:
                    on_wait(wait)
                await asyncio.sleep(min(wait, 0.5))
        except StopIteration as done:
            grant: Grant = done.value
            return grant
        finally:
            turns.close()

    def acquire_sync(self, tokens: int, max_wait_s: float) -> Grant:
        """`acquire` for plain threads (the sync API)."""
        turns = self._turns(tokens, max_wait_s)
        try:
            while True:
                time.sleep(min(next(turns), 0.5))
        except StopIteration as done:
            grant: Grant = done.value
            return grant
        finally:
            turns.close()

    def _give_up_if_late(self, start: float, wait: float, max_wait_s: float) -> None:
        waited = self.clock() - start
        if waited + wait > max_wait_s + 0.05 and wait > 0.05:
            with self._lock:
                self.waits += 1
            raise LLMRateLimited(
                f"the provider's rate budget needs about {wait:.0f} s more, past the {max_wait_s:g} s "
                "an explanation may wait"
            )


class QueueStatus:
    """Where one explanation call stands, so a card can say "queued: LLM rate limit, about N s".

    The explainer sets one per call in `QUEUE_STATUS`; the backend reports waits into it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.queued_until: float | None = None

    def waiting(self, seconds: float) -> None:
        self.queued_until = self._clock() + seconds

    def running(self) -> None:
        self.queued_until = None

    def queued_s(self) -> float | None:
        """Seconds left to wait for the budget, or None when the call is not waiting for it."""
        if self.queued_until is None:
            return None
        return max(0.0, self.queued_until - self._clock())


QUEUE_STATUS: contextvars.ContextVar[QueueStatus | None] = contextvars.ContextVar(
    "QUEUE_STATUS", default=None
)


_REGISTRY: dict[tuple[str, str], RateBudget] = {}
_REGISTRY_LOCK = threading.Lock()


def budget_for(
    provider: str, model: str, requests_per_window: int, tokens_per_window: int, window_s: float = 60.0
) -> RateBudget:
    """The process's one budget for (provider URL, model): every client of the server shares it."""
    with _REGISTRY_LOCK:
        budget = _REGISTRY.get((provider, model))
        if budget is None or budget.window_s != window_s:
            budget = RateBudget(requests_per_window, tokens_per_window, window_s)
            _REGISTRY[(provider, model)] = budget
        return budget


def forget_budgets() -> None:
    """Drop every budget (tests start from a fresh provider)."""
    with _REGISTRY_LOCK:
        _REGISTRY.clear()
