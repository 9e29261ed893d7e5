"""`clearsight serve`: the page and the JSON API on uvicorn, over one collection."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from explainer.cli.app import DataDir, Device, Host, Model, Port, _settings_data_dir, app, boundary


@app.command("serve")
@boundary
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
) -> None:
    """Serve the search page and the JSON API (models load once, at start-up)."""
    run_server(data_dir, host, port, reload_interval, log_level)


def run_server(
    data_dir: Path | None,
    host: str | None = None,
    port: int | None = None,
    reload_interval: float | None = None,
    log_level: str = "info",
) -> None:
    """Serve one collection with uvicorn until interrupted; None means "from settings"."""
    import uvicorn

    from explainer.server import create_app
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


@app.command("run")
@boundary
def run_cmd(
    path: Annotated[
        Path | None,
        typer.Argument(help="Folder of images to index and serve; without it, the offline demo"),
    ] = None,
    model: Model = None,
    data_dir: DataDir = None,
    host: Host = None,
    port: Port = None,
    device: Device = "auto",
    no_serve: Annotated[bool, typer.Option("--no-serve", help="Index (or build the demo) and exit")] = False,
) -> None:
    """The main job: index PATH, then serve it. Falls back to the offline demo without default weights."""
    from explainer.cli.app import index_cmd
    from explainer.cli.train import demo_cmd
    from retrieval.errors import ModelUnavailable

    serve_dir = data_dir
    if path is not None:
        try:
            # the undecorated command, so a missing model reaches this function instead of exiting
            index_cmd.__wrapped__(path=path, model=model, data_dir=data_dir, device=device)  # type: ignore[attr-defined]
        except ModelUnavailable as exc:
            if model is not None:
                raise  # the user named this model: falling back would hide their mistake
            typer.echo(f"clearsight: {exc}", err=True)
            typer.echo(
                "clearsight: the default encoder's weights are not on this machine, so this runs the "
                "offline DEMO instead (synthetic scenes and a tiny model trained on them, not your photos)",
                err=True,
            )
            path = None
    if path is None:
        demo_dir = _settings_data_dir(data_dir) / "demo"
        demo_cmd.__wrapped__(data_dir=demo_dir, no_serve=True, device=device)  # type: ignore[attr-defined]
        serve_dir = demo_dir
    if not no_serve:
        run_server(serve_dir, host, port)
