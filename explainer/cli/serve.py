"""`clearsight serve`: the page and the JSON API on uvicorn, over one collection."""

from __future__ import annotations

import errno
import logging
import socket
from pathlib import Path
from typing import Annotated

import typer

from explainer.cli.options import DataDir, Host, Port, note
from explainer.errors import ConfigError, IndexMissing
from retrieval.collection import exists as collection_exists


def serve_cmd(
    data_dir: DataDir = None,
    host: Host = None,
    port: Port = None,
    reload_interval: Annotated[
        float | None,
        typer.Option(
            "--reload-interval",
            min=0.0,
            help="Seconds between looks for a newer index version written by `clearsight index` (0: never)",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error")] = "info",
    engine: Annotated[
        str | None,
        typer.Option("--engine", help="local (default) or ray: the image index split over Ray actors"),
    ] = None,
    shards: Annotated[
        int | None,
        typer.Option("--shards", min=1, max=256, help="With --engine ray: index shards (default 2)"),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address", help="With --engine ray: auto or HOST:PORT (default: a private local cluster)"
        ),
    ] = None,
    generate_token: Annotated[
        bool,
        typer.Option(
            "--generate-token",
            help="On a non-loopback address without CLEARSIGHT_API_TOKEN: make a token, print it once "
            "and keep it in the data dir (mode 0600)",
        ),
    ] = False,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch", help="Follow the indexed folders and index what is added, changed or removed"
        ),
    ] = False,
) -> None:
    """Serve the search page and the JSON API (models load once, at start-up)."""
    if engine is not None and engine not in ("local", "ray"):
        raise ConfigError(f"unknown engine {engine!r}: use local or ray")
    if (shards is not None or ray_address is not None) and engine != "ray":
        raise ConfigError("--shards and --ray-address apply to --engine ray only")
    if ray_address is not None:
        from retrieval.distributed.ingest import RayConfig

        RayConfig(address=ray_address)  # refuse a malformed address before anything starts
    run_server(
        data_dir,
        host,
        port,
        reload_interval,
        log_level,
        engine=engine,
        shards=shards,
        ray_address=ray_address,
        generate_token=generate_token,
        watch=watch,
    )


def run_server(
    data_dir: Path | None,
    host: str | None = None,
    port: int | None = None,
    reload_interval: float | None = None,
    log_level: str = "info",
    *,
    engine: str | None = None,
    shards: int | None = None,
    ray_address: str | None = None,
    generate_token: bool = False,
    watch: bool = False,
    captions: bool | None = None,
) -> None:
    """Serve one collection with uvicorn until interrupted; None means "from settings".

    `captions`: generate captions in the server (True), never (False), or as CLEARSIGHT_SERVER_CAPTIONS says.

    A non-loopback address needs a token; without one this refuses before loading anything.
    """
    import uvicorn

    from explainer.server import create_app
    from explainer.server.security import auth_decision
    from explainer.settings import get_settings

    updates: dict[str, object] = {}
    if data_dir is not None:
        updates["data_dir"] = Path(data_dir).expanduser()
    if host is not None:
        updates["host"] = host
    if port is not None:
        updates["port"] = port
    if reload_interval is not None:
        updates["reload_interval_s"] = reload_interval
    for key, value in (("engine", engine), ("shards", shards), ("ray_address", ray_address)):
        if value is not None:
            updates[key] = value
    if generate_token:
        updates["generate_token"] = True
    if watch:
        updates["watch"] = True
    if captions is not None:
        updates["server_captions"] = "on" if captions else "off"
    settings = get_settings().model_copy(update=updates)
    if settings.watch and settings.engine == "ray":
        raise ConfigError("watching folders works with the local engine only, not --engine ray")
    decision = auth_decision(settings)  # ConfigError (one line, non-zero exit) when a token is missing
    if not collection_exists(settings.data_dir):  # nothing to serve, and nothing is created there
        raise IndexMissing(f"no collection at {settings.data_dir}", remedy="index_first")
    if decision.generated:
        where = f"kept in {decision.token_file}, mode 0600"
        note(f"clearsight: generated an access token ({where}), shown this once: {decision.token}")
    elif decision.token is not None:
        note("clearsight: the API needs the access token (Authorization: Bearer); the page asks for it")
    sock = bind(settings.host, settings.port)  # a busy port is reported before "serving on"
    logging.getLogger("explainer").setLevel(log_level.upper())
    note(f"clearsight: serving {settings.data_dir} on http://{settings.host}:{sock.getsockname()[1]}")
    config = uvicorn.Config(
        create_app(settings, token=decision.token),
        host=settings.host,
        port=settings.port,
        log_level=log_level.lower(),
        proxy_headers=False,
        server_header=False,
    )
    uvicorn.Server(config).run(sockets=[sock])


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a ConfigError saying the port is taken (or the host wrong)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # The protocol is named so that asyncio turns Nagle off on accepted connections (it does so only for
    # sockets whose proto is TCP, and they inherit the listener's): with Nagle on, each response on a
    # kept-alive connection waited ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"port {port} on {host} is already in use (another server?): choose another with --port"
            ) from None
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock
