"""`/docs` and `/redoc` from assets packaged on this machine, so the API docs work offline and under the CSP.

FastAPI's own pages load Swagger UI and ReDoc from a CDN and start Swagger UI with an inline
script, which the server's Content-Security-Policy forbids. These pages take the same assets from
the `fastapi-offline` wheel (served under /docs-assets/) and start Swagger UI from a static file.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.requests import Request
from starlette.responses import HTMLResponse

from explainer.errors import ConfigError

ASSETS_URL = "/docs-assets"


def assets_dir() -> Path:
    """Where the packaged Swagger UI and ReDoc files live (a dependency in pyproject.toml)."""
    try:
        import fastapi_offline
    except ImportError as exc:  # pragma: no cover - a broken install
        raise ConfigError("the API docs need the fastapi-offline package: pip install it") from exc
    path = Path(fastapi_offline.__file__).parent / "static"
    if not (path / "swagger-ui-bundle.js").is_file():  # pragma: no cover - a broken install
        raise ConfigError(f"Swagger UI assets missing from {path} (broken install?)")
    return path


def _swagger(request: Request) -> HTMLResponse:
    return HTMLResponse(f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Clearsight API · Swagger UI</title>
<link rel="stylesheet" href="{ASSETS_URL}/swagger-ui.css"></head>
<body><div id="swagger-ui" data-openapi-url="/openapi.json"></div>
<script src="{ASSETS_URL}/swagger-ui-bundle.js"></script>
<script src="/static/docs-init.js"></script></body></html>""")


def _redoc(request: Request) -> HTMLResponse:
    return HTMLResponse(f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Clearsight API · ReDoc</title></head>
<body><redoc spec-url="/openapi.json"></redoc>
<script src="{ASSETS_URL}/redoc.standalone.js"></script></body></html>""")


def mount_docs(app: FastAPI) -> None:
    """Serve /docs, /redoc and their assets (create the app with docs_url=None, redoc_url=None)."""
    app.mount(ASSETS_URL, StaticFiles(directory=str(assets_dir())), name="docs-assets")
    app.add_route("/docs", _swagger, methods=["GET"], include_in_schema=False)
    app.add_route("/redoc", _redoc, methods=["GET"], include_in_schema=False)
