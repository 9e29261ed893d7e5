"""Refuse oversized request bodies before they are buffered, and bound the work searches hold at once.

A declared Content-Length over the limit is refused without reading the body into memory; a body
without one (chunked) is counted as it streams and refused the moment it passes the limit. Before
answering, the rest of the body is read and thrown away (up to a cap): a client still writing its
upload would otherwise see the connection reset instead of the 413, the same reason web servers
do a "lingering close".
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Renders the 413 answer; the app passes one that speaks JSON under /api and HTML elsewhere.
Renderer = Callable[[Request, int, str], Awaitable[Response]]


class BodyTooLarge(HTTPException):
    def __init__(self, message: str) -> None:
        super().__init__(413, message)


async def _drain(receive: Receive, cap: int) -> bool:
    """Read and discard the rest of a body, at most `cap` bytes; True when the body ended."""
    seen = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return False
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return True
        if seen > cap:
            return False


class BodyLimitMiddleware:
    """ASGI middleware; `limit` bounds every request body, `drain_cap` bounds what is thrown away."""

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        render: Renderer,
        message: str | Callable[[Request], str] | None = None,
        drain_cap: int | None = None,
    ) -> None:
        self.app = app
        self.limit = limit
        self.render = render
        self.message = message or f"the request body is larger than the limit of {limit} bytes"
        self.drain_cap = drain_cap if drain_cap is not None else max(8 * limit, 64 * 1024 * 1024)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        words = self.message if isinstance(self.message, str) else self.message(request)
        declared = _content_length(request)
        if declared is not None and declared > self.limit:
            if declared <= self.drain_cap and "100-continue" not in request.headers.get("expect", "").lower():
                await _drain(receive, self.drain_cap)
            response = await self.render(request, 413, words)
            await response(scope, receive, send)
            return

        total = 0

        async def counted() -> Message:
            nonlocal total
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.limit:
                    if message.get("more_body", False):
                        await _drain(receive, self.drain_cap)
                    raise BodyTooLarge(words)
            return message

        await self.app(scope, counted, send)


def _content_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


class BodyBudgetMiddleware:
    """Large bodies wait their turn: together they hold at most `budget` bytes while being handled.

    The body limit bounds one request; this bounds many at once. A request declaring more than
    `small` bytes (or sending chunked, counted at `limit`) reserves its size before its body is read
    and releases it when its response is done, so 16 clients sending maximum-size JSON bodies cost
    the memory of a few, not of sixteen. A body larger than the whole budget still runs, alone.
    """

    def __init__(self, app: ASGIApp, budget: int, limit: int, small: int = 256 * 1024) -> None:
        self.app = app
        self.budget = budget
        self.limit = limit
        self.small = small
        self._used = 0
        self._cond: asyncio.Condition | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = _content_length(Request(scope))
        size = self.limit if declared is None else min(declared, self.limit)
        if size <= self.small:
            await self.app(scope, receive, send)
            return
        need = min(size, self.budget)
        if self._cond is None:
            self._cond = asyncio.Condition()
        cond = self._cond
        async with cond:
            await cond.wait_for(lambda: self._used + need <= self.budget)
            self._used += need
        try:
            await self.app(scope, receive, send)
        finally:
            async with cond:
                self._used -= need
                cond.notify_all()


class WorkBudget:
    """Hits in work at once, over every route that searches: the memory bound searches share.

    Each hit of a search costs its evidence, caption context and card while the search runs, so 50
    concurrent page loads of 96 hits cost 50 x 96 of them unless they wait their turn. A search
    holds `min(top_k, capacity)` units while it runs and waits, in the event loop, while the others
    hold too many; a search larger than the whole budget runs alone. Waiting happens before a
    worker thread is taken, so waiting requests hold no thread (and no thread's malloc arena grows
    for them). `peak` is what tests check.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self.peak = 0
        self._cond: asyncio.Condition | None = None

    @contextlib.asynccontextmanager
    async def hold(self, cost: int) -> AsyncIterator[None]:
        need = max(1, min(cost, self.capacity))
        if self._cond is None:
            self._cond = asyncio.Condition()
        cond = self._cond
        async with cond:
            await cond.wait_for(lambda: self.used + need <= self.capacity)
            self.used += need
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            async with cond:
                self.used -= need
                cond.notify_all()
