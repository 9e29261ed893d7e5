"""The listening socket `clearsight serve` hands to uvicorn. asyncio turns Nagle off only on sockets whose
protocol is TCP, and accepted sockets inherit the listener's: a socket made without it left Nagle on, and
every query on a kept-alive connection waited ~40 ms for the client's delayed ACK (issue 28)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from explainer.cli.serve import bind
from explainer.errors import ConfigError


def accepted_nodelay(host: str) -> int:
    listener = bind(host, 0)
    port = listener.getsockname()[1]
    seen: list[int] = []

    async def main() -> None:
        def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=listener)
        async with server:
            _, writer = await asyncio.open_connection(host, port)
            for _ in range(100):
                if seen:
                    break
                await asyncio.sleep(0.01)
            writer.close()

    asyncio.run(main())
    assert len(seen) == 1
    return seen[0]


def test_accepted_connections_have_nagle_off() -> None:
    assert accepted_nodelay("127.0.0.1") != 0


def test_accepted_ipv6_connections_have_nagle_off() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    assert accepted_nodelay("::1") != 0


def test_a_busy_port_is_a_one_line_error() -> None:
    first = bind("127.0.0.1", 0)
    try:
        with pytest.raises(ConfigError, match="already in use"):
            bind("127.0.0.1", first.getsockname()[1])
    finally:
        first.close()
