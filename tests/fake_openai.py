"""A fake OpenAI-compatible chat server on 127.0.0.1, for driving the real groq client in tests.

The groq client (and so `ChatGroq`) posts to `<base_url>/openai/v1/chat/completions`. The server
answers from a script of `Reply`s (then from `default`), records every request, and tracks how
many requests were in flight at once, so tests can check retries, timeouts, malformed replies,
concurrency and headers without any real network.

    with FakeOpenAIServer() as server:
        server.script(Reply.rate_limited(retry_after="0.01"), Reply.ok({"explanation": ...}))
        config = LLMConfig(backend="groq", base_url=server.base_url, ...)

With `limits=ProviderLimits(...)` it behaves like Groq's free tier (tests/fake_groq.py): requests and
tokens per window and requests per day, Groq's `x-ratelimit-*` headers on every reply, 429 with
`retry-after` past a limit, and answers to page calls generated from the request's own tool schema.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.fake_groq import ProviderLimits

CHAT_PATH = "/openai/v1/chat/completions"

VALID_OUTPUT: dict[str, Any] = {
    "explanation": "The caption mentions a red bus, which the query asks for.",
    "matched_concepts": ["red", "bus"],
    "mismatches": [],
    "confidence": 0.8,
}


@dataclass(frozen=True)
class Reply:
    """One scripted answer: a status, a body (or assistant content), headers and a delay."""

    status: int = 200
    #: Assistant message content for a 200 reply (wrapped into a chat.completion object).
    content: str | None = None
    #: Raw body, sent as is (overrides `content`).
    body: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    #: Arguments of a function call (the page call's answer), sent as `tool_calls`.
    tool_args: dict[str, Any] | None = None

    @classmethod
    def ok(cls, output: dict[str, Any] | None = None, delay_s: float = 0.0) -> Reply:
        return cls(content=json.dumps(VALID_OUTPUT if output is None else output), delay_s=delay_s)

    def with_headers(self, headers: dict[str, str]) -> Reply:
        return dataclasses.replace(self, headers={**self.headers, **headers})

    @classmethod
    def text(cls, content: str) -> Reply:
        return cls(content=content)

    @classmethod
    def rate_limited(cls, retry_after: str = "0.01") -> Reply:
        body = json.dumps(
            {"error": {"message": "Rate limit reached", "type": "tokens", "code": "rate_limit_exceeded"}}
        )
        return cls(status=429, body=body, headers={"retry-after": retry_after})

    @classmethod
    def server_error(cls, status: int = 500, message: str = "internal error") -> Reply:
        body = json.dumps({"error": {"message": message, "type": "internal_server_error"}})
        return cls(status=status, body=body, headers={"retry-after-ms": "5"})


@dataclass
class Seen:
    """One request as the server received it."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class FakeOpenAIServer:
    """A real HTTP server in a thread; thread-safe scripting and inspection."""

    def __init__(self, limits: ProviderLimits | None = None) -> None:
        self.limits = limits
        self.default = Reply.ok()
        self.requests: list[Seen] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._script: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-openai", daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def calls(self) -> int:
        with self._lock:
            return len(self.requests)

    def script(self, *replies: Reply) -> None:
        """Answer the next requests with `replies`, in order; then fall back to `default`."""
        with self._lock:
            self._script.extend(replies)

    def start(self) -> FakeOpenAIServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- request handling ---------------------------------------------------------------------

    def _next_reply(self, seen: Seen) -> Reply:
        with self._lock:
            self.requests.append(seen)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return self._script.popleft() if self._script else self.default

    def _done(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _completion(self, content: str, model: str) -> str:
        with self._lock:
            n = len(self.requests)
        return json.dumps(
            {
                "id": f"chatcmpl-fake-{n}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                        "logprobs": None,
                    }
                ],
                "usage": {"prompt_tokens": 50, "completion_tokens": 20, "total_tokens": 70},
            }
        )

    def _tool_completion(self, args: dict[str, Any], request: dict[str, Any]) -> str:
        tools = request.get("tools") or [{}]
        name = tools[0].get("function", {}).get("name", "f")
        call = {"id": "call_0", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
        prompt = len(json.dumps(request.get("messages", []))) // 4
        return json.dumps(
            {
                "id": "chatcmpl-fake-tools",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": str(request.get("model", "")),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                        "finish_reason": "tool_calls",
                        "logprobs": None,
                    }
                ],
                "usage": {"prompt_tokens": prompt, "completion_tokens": 50, "total_tokens": prompt + 50},
            }
        )

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 10

            def log_message(self, format: str, *args: Any) -> None:
                """Silence the default stderr access log."""

            def _send(self, status: int, body: str, headers: dict[str, str]) -> None:
                data = body.encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    body = {}
                seen = Seen(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                if self.path != CHAT_PATH:
                    with server._lock:
                        server.requests.append(seen)
                    self._send(404, json.dumps({"error": {"message": f"no route {self.path}"}}), {})
                    return
                if server.limits is not None:
                    reply = server.limits.reply_for(seen)
                    with server._lock:
                        server.requests.append(seen)
                        server.in_flight += 1
                        server.max_in_flight = max(server.max_in_flight, server.in_flight)
                else:
                    reply = server._next_reply(seen)
                try:
                    if reply.delay_s and server._stopping.wait(reply.delay_s):
                        return
                    if reply.body is not None:
                        payload = reply.body
                    elif reply.tool_args is not None:
                        payload = server._tool_completion(reply.tool_args, body)
                    else:
                        payload = server._completion(reply.content or "", str(body.get("model", "")))
                    self._send(reply.status, payload, reply.headers)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout) before we answered
                finally:
                    server._done()

        return Handler


@pytest.fixture
def fake_openai_server() -> Iterator[FakeOpenAIServer]:
    """A started server, stopped after the test; import it into a conftest or a test module to use it."""
    with FakeOpenAIServer() as server:
        yield server
