"""A fake Groq that behaves like Groq's free tier, for tests and bench/explain_bench.py.

`ProviderLimits` plugs into `fake_openai.FakeOpenAIServer(limits=...)`. Per window (60 s, shorter in
tests: the logic is the same, only the clock is scaled) it admits at most `rpm` requests and `tpm`
tokens, and `rpd` a day; every reply carries Groq's `x-ratelimit-*` headers (durations written the
way Groq writes them, "1m2.5s"), and a request past a limit gets 429 with `retry-after`.

Tokens are counted the way the explainer estimates them (its rule, written again here rather than
imported, so a mistake in one shows against the other): the characters of the request's messages,
tools and response format as JSON, divided by 4, plus its `max_tokens`.

Page calls (a tool in the request) are answered from the tool's own schema: one item per hit number
in its enum, each matching the first word of that hit's caption, plus an optional planted concept
that no context holds. `mangle` lets a test drop or repeat items; `cut_next` makes the provider
refuse the next request with a given retry-after although the budget allows it (a provider that
cuts the budget mid-page). The log records, for every request, whether the last headers the fake
sent before it arrived said it would be refused.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.fake_openai import VALID_OUTPUT, Reply, Seen

_HIT_RE = re.compile(r"^Hit (\d+) \(score [^)]*\)\ncaption: ([^\n]*)", re.M)


def count_tokens(body: dict[str, Any]) -> int:
    payload = {"m": body.get("messages"), "t": body.get("tools"), "r": body.get("response_format")}
    text = json.dumps(payload, ensure_ascii=False, separators=(", ", ": "))
    return len(text) // 4 + int(body.get("max_tokens") or body.get("max_completion_tokens") or 0)


def groq_duration(seconds: float) -> str:
    """Seconds as Groq writes them: "7.66s", "2m59.56s"."""
    minutes, rest = divmod(max(0.0, seconds), 60.0)
    return f"{int(minutes)}m{rest:.2f}s" if minutes >= 1 else f"{rest:.2f}s"


@dataclass
class Logged:
    t: float
    tokens: int
    ok: bool
    told_refused: bool
    hits: int


@dataclass
class _Told:
    """The last headers sent: when, and what they said."""

    at: float
    requests: int
    tokens: int
    requests_until: float
    tokens_until: float


@dataclass
class ProviderLimits:
    rpm: int = 30
    tpm: int = 6000
    rpd: int = 14_400
    window_s: float = 60.0
    latency_s: float = 0.0
    planted: str | None = None
    mangle: deque[Callable[[dict[str, Any]], dict[str, Any]]] = field(default_factory=deque)
    log: list[Logged] = field(default_factory=list)
    _window: deque[tuple[float, int]] = field(default_factory=deque)
    _day: int = 0
    _told: _Told | None = None
    _cut: deque[float] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def refused(self) -> int:
        return sum(1 for x in self.log if not x.ok)

    @property
    def answered(self) -> list[Logged]:
        return [x for x in self.log if x.ok]

    def cut_next(self, retry_after_s: float) -> None:
        with self._lock:
            self._cut.append(retry_after_s)

    def _trim(self, now: float) -> None:
        while self._window and now - self._window[0][0] >= self.window_s:
            self._window.popleft()

    def _headers(self, now: float) -> dict[str, str]:
        self._trim(now)
        used = sum(t for _, t in self._window)
        reset = self.window_s - (now - self._window[0][0]) if self._window else 0.0
        requests = max(0, min(self.rpd - self._day, self.rpm - len(self._window)))
        tokens = max(0, self.tpm - used)
        self._told = _Told(now, requests, tokens, now + reset, now + reset)
        return {
            "x-ratelimit-limit-requests": str(self.rpd),
            "x-ratelimit-limit-tokens": str(self.tpm),
            "x-ratelimit-remaining-requests": str(requests),
            "x-ratelimit-remaining-tokens": str(tokens),
            "x-ratelimit-reset-requests": groq_duration(reset),
            "x-ratelimit-reset-tokens": groq_duration(reset),
        }

    def _told_refused(self, now: float, tokens: int) -> bool:
        told = self._told
        if told is None:
            return False
        since = [(t, n) for t, n in self._window if t > told.at]
        by_requests = now < told.requests_until and len(since) + 1 > told.requests
        by_tokens = now < told.tokens_until and sum(n for _, n in since) + tokens > told.tokens
        return by_requests or by_tokens

    def reply_for(self, seen: Seen) -> Reply:
        body = seen.body
        tokens = count_tokens(body)
        hits = _enum_of(body)
        with self._lock:
            now = time.monotonic()
            self._trim(now)
            told_refused = self._told_refused(now, tokens)
            used = sum(t for _, t in self._window)
            over = len(self._window) >= self.rpm or used + tokens > self.tpm or self._day >= self.rpd
            cut = self._cut.popleft() if self._cut and not over else None
            if over or cut is not None:
                self.log.append(Logged(now, tokens, False, told_refused, len(hits)))
                wait = (
                    cut
                    if cut is not None
                    else (self._window[0][0] + self.window_s - now if self._window else 1.0)
                )
                headers = {**self._headers(now), "retry-after": f"{max(wait, 0.01):.2f}"}
                return Reply.rate_limited(retry_after=headers.pop("retry-after")).with_headers(headers)
            self._window.append((now, tokens))
            self._day += 1
            self.log.append(Logged(now, tokens, True, told_refused, len(hits)))
            mangle = self.mangle.popleft() if self.mangle else None
        if self.latency_s:
            time.sleep(self.latency_s)
        args = self._answer(body, hits)
        if mangle is not None and args is not None:
            args = mangle(args)
        with self._lock:
            headers = self._headers(time.monotonic())
        if args is None:
            return Reply(content=json.dumps(VALID_OUTPUT), headers=headers)
        return Reply(tool_args=args, headers=headers)

    def _answer(self, body: dict[str, Any], hits: list[int]) -> dict[str, Any] | None:
        if not body.get("tools"):
            return None
        text = "\n".join(str(m.get("content") or "") for m in body.get("messages", []))
        captions = {int(n): c for n, c in _HIT_RE.findall(text)}
        items = []
        for n in hits:
            words = [w for w in re.findall(r"[a-z]+", captions.get(n, "").lower()) if len(w) > 2]
            matched = words[:1] + ([self.planted] if self.planted else [])
            items.append(
                {
                    "hit": n,
                    "explanation": f"Hit {n}: the caption says {' '.join(words[:4]) or 'little'}.",
                    "matched_concepts": matched,
                    "mismatches": [],
                    "confidence": 0.7,
                }
            )
        return {"hits": items}


def _enum_of(body: dict[str, Any]) -> list[int]:
    try:
        schema = body["tools"][0]["function"]["parameters"]
        return list(schema["properties"]["hits"]["items"]["properties"]["hit"]["enum"])
    except (KeyError, IndexError, TypeError):
        return []
