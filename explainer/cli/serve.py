"""`clearsight serve`: the page and the JSON API on uvicorn, over one collection."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from explainer.cli.options import DataDir, Host, Port, note


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
    generate_token: Annotated[
        bool,
        typer.Option(
            "--generate-token",
            help="On a non-loopback address without CLEARSIGHT_API_TOKEN: make a token, print it once "
            "and keep it in the data dir (mode 0600)",
        ),
    ] = False,
) -> None:
    """Serve the search page and the JSON API (models load once, at start-up)."""
    run_server(data_dir, host, port, reload_interval, log_level, generate_token=generate_token)


def run_server(
    data_dir: Path | None,
    host: str | None = None,
    port: int | None = None,
    reload_interval: float | None = None,
    log_level: str = "info",
    *,
    generate_token: bool = False,
) -> None:
    """Serve one collection with uvicorn until interrupted; None means "from settings".

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
    if generate_token:
        updates["generate_token"] = True
    settings = get_settings().model_copy(update=updates)
    decision = auth_decision(settings)  # ConfigError (one line, non-zero exit) when a token is missing
    if decision.generated:
        where = f"kept in {decision.token_file}, mode 0600"
        note(f"clearsight: generated an access token ({where}), shown this once: {decision.token}")
    elif decision.token is not None:
        note("clearsight: the API needs the access token (Authorization: Bearer); the page asks for it")
    logging.getLogger("explainer").setLevel(log_level.upper())
    note(f"clearsight: serving {settings.data_dir} on http://{settings.host}:{settings.port}")
    uvicorn.run(
        create_app(settings, token=decision.token),
        host=settings.host,
        port=settings.port,
        log_level=log_level.lower(),
        proxy_headers=False,
        server_header=False,
    )
