"""The app factory: models are loaded once in the lifespan, and every error leaves as a clear answer.

A server that cannot load its index or model still starts: `/api/health` says what is wrong
(503, with the reason), searches answer 503 JSON and the page shows the message. It keeps trying
to open the collection, so a server started before `clearsight index` finishes comes up by
itself, and it swaps in each newer index version that a running `clearsight index` writes; an
index rebuilt with another model is opened with that model and switched to, or, when it cannot be
loaded here, the page and health say the server answers from the old one and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from explainer.cards.evidence import EvidenceProvider
from explainer.errors import ConfigError, IndexMismatch
from explainer.explain.chain import Explainer
from explainer.server import api, browse, captions, compat, duplicates, pages, security
from explainer.server.docs import mount_docs
from explainer.server.handlers import install_error_handlers, render_error
from explainer.server.limits import BodyBudgetMiddleware, BodyLimitMiddleware
from explainer.server.queries import QueryImages
from explainer.server.schemas import SEARCH_REQUEST, search_form_schema
from explainer.server.state import ServerState
from explainer.server.watching import start_watcher
from explainer.settings import Settings, get_settings
from explainer.version import version
from retrieval import imageio
from retrieval.assets import asset_dir
from retrieval.search import Searcher

log = logging.getLogger(__name__)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the two body schemas of /api/search, which the route parses itself."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    body = SEARCH_REQUEST.json_schema(ref_template="#/components/schemas/{model}")
    components.update(body.pop("$defs", {}))
    components["SearchRequest"] = body
    components["SearchForm"] = search_form_schema()
    app.openapi_schema = schema
    return schema


async def _reload_loop(state: ServerState, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        pipeline = state.pipeline
        if pipeline is None:
            if state.retry_due():
                await anyio.to_thread.run_sync(state.open)
            continue
        try:
            if await anyio.to_thread.run_sync(pipeline.reload):
                log.info("now serving index version %s", pipeline.searcher.index.version)
                state.index_problem = None
        except IndexMismatch as exc:  # rebuilt with another model: switch to it, or say it is stale
            await anyio.to_thread.run_sync(state.switch_index, str(exc))
        except Exception as exc:  # a half-written or vanished version: keep serving the one we have
            log.warning("index reload skipped: %s", state.public(str(exc)))
        await anyio.to_thread.run_sync(state.close_retired)


def _too_large(image_limit: int, body_limit: int, request: Request) -> str:
    """The 413's words name the limit the client passed: a JSON body's, or an uploaded image's."""
    mib = image_limit / (1024 * 1024)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype.endswith("json"):
        return (
            f"the request body is too large: a JSON body is limited to {body_limit / (1024 * 1024):.3g} MiB "
            f"(an image in it, as base64, to {mib:.3g} MiB of file)"
        )
    return f"the upload is too large: images are limited to {mib:.3g} MiB"


def create_app(
    settings: Settings | None = None,
    searcher: Searcher | None = None,
    explainer: Explainer | None = None,
    *,
    evidence: EvidenceProvider | None = None,
    token: str | None = None,
) -> FastAPI:
    """Build the app; `searcher`, `explainer` and `evidence` replace what settings would load (tests).

    `token`: the one `clearsight serve` decided on; None decides from settings (see security.py).
    """
    settings = settings or get_settings()
    if token is None:
        token = security.auth_decision(settings).token
    imageio.set_decode_budget(settings.decode_budget_mb * 1024 * 1024)
    templates_dir = asset_dir("templates")
    static_dir = templates_dir / "static"
    if not static_dir.is_dir():
        raise ConfigError(f"static files missing from {templates_dir} (broken install?)")
    keep_dir = (settings.upload_dir or Path(settings.data_dir) / "uploads") if settings.keep_uploads else None
    state = ServerState(
        settings=settings,
        templates=Jinja2Templates(directory=str(templates_dir)),
        query_images=QueryImages(keep_dir=keep_dir, ttl_s=settings.upload_ttl_s),
        injected_searcher=searcher,
        injected_explainer=explainer,
        injected_evidence=evidence,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(state.open)
        watcher = start_watcher(state) if settings.watch else None
        task = (
            asyncio.create_task(_reload_loop(state, settings.reload_interval_s))
            if settings.reload_interval_s > 0
            else None
        )
        try:
            yield
        finally:
            if watcher is not None:
                await anyio.to_thread.run_sync(watcher.stop)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await anyio.to_thread.run_sync(state.close)

    app = FastAPI(
        title="Clearsight",
        version=version(),
        description="Explainable image search: cards with evidence regions, captions and explanations.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.clearsight = state
    app.state.security = security.SecurityConfig.from_settings(settings, token)
    install_error_handlers(app)
    body_limit = (settings.max_upload_bytes * 4) // 3 + 64 * 1024  # base64 and multipart overhead
    app.add_middleware(
        BodyLimitMiddleware,
        limit=body_limit,
        render=render_error,
        message=functools.partial(_too_large, settings.max_upload_bytes, body_limit),
    )
    app.add_middleware(BodyBudgetMiddleware, budget=settings.body_budget_mb * 1024 * 1024, limit=body_limit)
    app.add_middleware(security.SecurityMiddleware, config=app.state.security, render=render_error)
    app.add_route(security.LOGIN_PATH, security.login_form, methods=["GET"], include_in_schema=False)
    app.add_route(security.LOGIN_PATH, security.login_submit, methods=["POST"], include_in_schema=False)
    mount_docs(app)
    app.include_router(api.router)
    app.include_router(browse.router)
    app.include_router(captions.router)
    app.include_router(compat.router)
    app.include_router(duplicates.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=str(static_dir)), name="static")
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app
