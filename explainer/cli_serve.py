"""`clearsight serve`: the page and the JSON API on uvicorn, over one collection."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from .cli import DataDir, app, boundary


@app.command("serve")
@boundary
def serve_cmd(
    data_dir: DataDir = None,
    host: Annotated[
        str | None, typer.Option("--host", help="Interface to listen on (default: 127.0.0.1)")
    ] = None,
    port: Annotated[
        int | None, typer.Option("--port", "-p", min=0, max=65535, help="Port (default: 8000)")
    ] = None,
    reload_interval: Annotated[
        float | None,
        typer.Option(
            "--reload-interval",
            min=0.0,
            help="Seconds between looks for a newer index version written by `clearsight index` (0: never)",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error")] = "info",
) -> None:
    """Serve the search page and the JSON API (models load once, at start-up)."""
    import uvicorn

    from .server import create_app
    from .settings import get_settings

    updates: dict[str, object] = {}
    if data_dir is not None:
        updates["data_dir"] = Path(data_dir).expanduser()
    if host is not None:
        updates["host"] = host
    if port is not None:
        updates["port"] = port
    if reload_interval is not None:
        updates["reload_interval_s"] = reload_interval
    settings = get_settings().model_copy(update=updates)
    logging.getLogger("explainer").setLevel(log_level.upper())
    typer.echo(
        f"clearsight: serving {settings.data_dir} on http://{settings.host}:{settings.port}",
        err=True,
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=log_level.lower(),
        proxy_headers=False,
        server_header=False,
    )
