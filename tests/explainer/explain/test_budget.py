"""The rate budget's rules on a fake clock: what the provider said, our own ledger, retry-after."""

from __future__ import annotations

import asyncio

import pytest

from explainer.errors import LLMRateLimited
from explainer.explain.budget import RateBudget, RateHeaders, estimate_tokens, parse_duration


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def budget(rpm: int = 30, tpm: int = 6000, window_s: float = 60.0) -> tuple[RateBudget, Clock]:
    clock = Clock()
    return RateBudget(rpm, tpm, window_s, clock=clock), clock


def send(b: RateBudget, tokens: int) -> None:
    """Take a grant at once (the budget must allow it)."""
    assert b.check(tokens) == 0
    asyncio.run(b.acquire(tokens, max_wait_s=0))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("7.66s", 7.66), ("2m59.56s", 179.56), ("120ms", 0.12), ("1h2m", 3720.0), ("3", 3.0), ("soon", None)],
)
def test_groq_durations(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_headers_parse() -> None:
    rh = RateHeaders.parse(
        {
            "x-ratelimit-limit-tokens": "6000",
            "x-ratelimit-remaining-requests": "14370",
            "x-ratelimit-remaining-tokens": "812",
            "x-ratelimit-reset-tokens": "51.9s",
            "retry-after": "12",
        }
    )
    assert (rh.limit_tokens, rh.remaining_requests, rh.remaining_tokens) == (6000, 14370, 812)
    assert rh.reset_tokens_s == pytest.approx(51.9) and rh.retry_after_s == 12.0
    assert RateHeaders.parse({}).empty


def test_remaining_tokens_in_the_last_headers_hold_a_call_back_until_their_reset() -> None:
    b, clock = budget()
    b.observe({"x-ratelimit-remaining-tokens": "500", "x-ratelimit-reset-tokens": "10s"}, sent=clock.now)
    assert b.check(400) == 0
    assert b.check(600) == pytest.approx(10.25)
    clock.now += 10.3
    assert b.check(600) == 0


def test_calls_sent_since_the_headers_count_against_them() -> None:
    b, clock = budget()
    b.observe({"x-ratelimit-remaining-tokens": "1000", "x-ratelimit-reset-tokens": "30s"}, sent=clock.now)
    clock.now += 1
    send(b, 700)
    assert b.check(400) > 0  # 700 + 400 > 1000, though the headers alone would allow 400


def test_an_older_reply_does_not_overrule_a_newer_one() -> None:
    b, clock = budget()
    b.observe({"x-ratelimit-remaining-tokens": "100", "x-ratelimit-reset-tokens": "30s"}, sent=clock.now)
    b.observe({"x-ratelimit-remaining-tokens": "5000", "x-ratelimit-reset-tokens": "1s"}, sent=clock.now - 5)
    assert b.check(200) > 0


def test_retry_after_blocks_every_call() -> None:
    b, clock = budget()
    b.observe({"retry-after": "5"}, sent=clock.now)
    assert b.check(1) == pytest.approx(5.25)
    clock.now += 5.3
    assert b.check(1) == 0


def test_our_ledger_keeps_requests_and_tokens_per_window() -> None:
    b, clock = budget(rpm=3, tpm=1000, window_s=10)
    for _ in range(3):
        send(b, 100)
        clock.now += 1
    assert b.check(100) == pytest.approx(10.25 - 3)  # the first call leaves the window
    clock.now += 7.3
    assert b.check(100) == 0
    send(b, 100)
    assert b.check(800) > 0  # 3 calls of 100 still in the window


def test_the_provider_token_limit_replaces_ours() -> None:
    b, clock = budget(tpm=6000)
    b.observe({"x-ratelimit-limit-tokens": "12000"}, sent=clock.now)
    assert b.tokens_per_window == 12000


def test_a_call_that_can_never_fit_is_refused_at_once() -> None:
    b, _ = budget(tpm=1000)
    with pytest.raises(LLMRateLimited, match="never fit"):
        b.check(1001)


def test_a_call_gives_up_when_the_wait_is_longer_than_allowed() -> None:
    b, clock = budget()
    b.observe({"retry-after": "30"}, sent=clock.now)
    with pytest.raises(LLMRateLimited, match="30 s"):
        asyncio.run(b.acquire(10, max_wait_s=5))
    assert b.sent_calls == 0


def test_waiters_are_served_in_arrival_order() -> None:
    """A small call that asked later does not overtake a large one waiting for the window."""
    b = RateBudget(30, 1000, 0.4)
    order: list[str] = []

    async def main() -> None:
        await b.acquire(900, 5)

        async def call(name: str, tokens: int) -> None:
            await b.acquire(tokens, 5)
            order.append(name)

        first = asyncio.create_task(call("large", 900))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(call("small", 50))
        await asyncio.gather(first, second)

    asyncio.run(main())
    assert order == ["large", "small"]


def test_usage_teaches_the_estimate() -> None:
    b, _ = budget()
    assert b.scaled(100, 50) == 150
    b.learn_usage(100, 130)
    assert b.scaled(100, 50) == 180
    b.learn_usage(100, 80)  # a lower count never lowers the estimate
    assert b.scaled(100, 50) == 180


def test_estimate_counts_the_request_and_the_completion_ceiling() -> None:
    small = estimate_tokens({"m": [{"role": "user", "content": "hi"}]}, 0)
    big = estimate_tokens({"m": [{"role": "user", "content": "hi" * 400}]}, 0)
    assert big - small == pytest.approx(200, abs=1)
    assert estimate_tokens({"m": []}, 300) - estimate_tokens({"m": []}, 0) == 300
