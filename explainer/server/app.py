"""The app factory: models are loaded once in the lifespan, and every error leaves as a clear answer.

A server that cannot load its index or model still starts: `/api/health` says what is wrong
(503, with the reason), searches answer 503 JSON and the page shows the message. It keeps trying
to open the collection, so a server started before `clearsight index` finishes comes up by
itself, and it swaps in each newer index version that a running `clearsight index` writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException

from explainer.cards.model import QueryEcho
from explainer.cards.pipeline import CardPipeline, ResultPage
from explainer.cards.sources import CatalogCaptions, EvidenceProvider, make_evidence_provider
from explainer.errors import ClearsightError, ConfigError, ModelUnavailable
from explainer.explain.backends import LLMConfig
from explainer.explain.cache import SQLiteExplanationCache, open_explanation_cache
from explainer.explain.chain import Explainer
from explainer.explain.factory import explainer_from_settings
from explainer.server.limits import BodyLimitMiddleware
from explainer.server.queries import QueryImages, QueryInput, resolve
from explainer.server.schemas import SearchForm, SearchRequest
from explainer.settings import Settings, get_settings
from retrieval.assets import asset_dir
from retrieval.search import Query, Searcher

log = logging.getLogger(__name__)

#: How often a degraded server tries to open its collection again.
RETRY_OPEN_S = 5.0


@dataclass
class ServerState:
    """Everything the routes share; one per app."""

    settings: Settings
    templates: Jinja2Templates
    query_images: QueryImages
    injected_searcher: Searcher | None = None
    injected_explainer: Explainer | None = None
    injected_evidence: EvidenceProvider | None = None
    pipeline: CardPipeline | None = None
    problem: str | None = None
    _problem_type: type[ClearsightError] = ModelUnavailable
    _last_try: float | None = None
    _cache: SQLiteExplanationCache | None = None
    _open_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def data_dir(self) -> Path:
        return Path(self.settings.data_dir).expanduser()

    def public(self, message: str) -> str:
        """Server paths stay on the server: the data directory is named, not shown."""
        return message.replace(str(self.data_dir), "the data directory")

    def open(self) -> None:
        """Load the searcher, evidence and explainer (blocking; run in a worker thread)."""
        with self._open_lock:
            if self.pipeline is not None:
                return
            self._last_try = time.monotonic()
            try:
                searcher = self.injected_searcher or Searcher.open(self.data_dir)
            except ClearsightError as exc:
                self.problem = self.public(str(exc))
                self._problem_type = type(exc) if exc.http_status == 503 else ModelUnavailable
                log.warning("not ready: %s", self.problem)
                return
            except Exception as exc:  # weights that fail to load: the server still answers, degraded
                self.problem = f"the search model could not be loaded ({type(exc).__name__})"
                self._problem_type = ModelUnavailable
                log.exception("search model failed to load")
                return
            evidence = self.injected_evidence or make_evidence_provider(self.settings.evidence_regions)
            explainer = self.injected_explainer or self._explainer()
            self.pipeline = CardPipeline(searcher, explainer, evidence, CatalogCaptions(searcher))
            self.problem = None

    def _explainer(self) -> Explainer:
        def warn(message: str) -> None:
            log.warning(self.public(message))

        cache = self._cache = open_explanation_cache(self.data_dir, warn)
        try:
            return explainer_from_settings(self.settings, cache=cache, warn=warn)
        except ClearsightError as exc:  # an unknown backend name: say so, and still explain
            log.warning("%s; explaining offline", self.public(str(exc)))
            return Explainer.from_config(LLMConfig(backend="offline"), cache=cache, environ={})

    async def ready(self) -> CardPipeline:
        """The pipeline, or a 503 saying why not (retrying the open now and then)."""
        if self.pipeline is None and self.retry_due():
            await anyio.to_thread.run_sync(self.open)
        if self.pipeline is None:
            raise self._problem_type(self.problem or "the search index is not loaded yet")
        return self.pipeline

    def resolve(self, inp: QueryInput, searcher: Searcher) -> tuple[Query, QueryEcho]:
        """The library query and its echo, under this server's upload store and pixel limit."""
        return resolve(inp, searcher, self.query_images, self.settings.max_upload_pixels)

    def search(self, pipeline: CardPipeline, inp: QueryInput) -> ResultPage:
        """Resolve and search (blocking; run in a worker thread)."""
        query, echo = self.resolve(inp, pipeline.searcher)
        return pipeline.search(query, echo)

    def retry_due(self) -> bool:
        return self._last_try is None or time.monotonic() - self._last_try > RETRY_OPEN_S

    def close(self) -> None:
        pipeline, self.pipeline = self.pipeline, None
        if self._cache is not None:
            self._cache.close()
            self._cache = None
        if pipeline is None:
            return
        if self.injected_explainer is None and pipeline.explainer is not None:
            pipeline.explainer.close()
        if self.injected_searcher is None:
            pipeline.searcher.close()


def state_of(request: Request) -> ServerState:
    state: ServerState = request.app.state.clearsight
    return state


# -- errors -----------------------------------------------------------------------------------


_HTTP_KINDS = {404: "NotFound", 405: "MethodNotAllowed", 413: "PayloadTooLarge", 415: "UnsupportedMediaType"}


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api") or request.url.path.startswith("/openapi")


def error_json(
    status: int, kind: str, message: str, details: list[dict[str, Any]] | None = None
) -> JSONResponse:
    body: dict[str, Any] = {"type": kind, "message": message}
    if details is not None:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status)


async def render_error(request: Request, status: int, message: str, kind: str | None = None) -> Response:
    kind = kind or _HTTP_KINDS.get(status, "Error")
    if _wants_json(request):
        return error_json(status, kind, message)
    state = state_of(request)
    return state.templates.TemplateResponse(
        request, "error.html", {"status": status, "message": message, "kind": kind}, status_code=status
    )


def _install_error_handlers(app: FastAPI) -> None:
    async def on_clearsight(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ClearsightError)
        message = state_of(request).public(str(exc))
        return await render_error(request, exc.http_status, message, type(exc).__name__.rstrip("_"))

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = _HTTP_KINDS.get(exc.status_code, "HTTPError")
        response = await render_error(request, exc.status_code, str(exc.detail), kind)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        details = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in exc.errors()
        ]
        summary = "; ".join(f"{'.'.join(d['loc'][1:]) or d['loc'][0]}: {d['msg']}" for d in details[:5])
        message = f"malformed request: {summary}" if summary else "malformed request"
        if _wants_json(request):
            return error_json(422, "ValidationError", message, details)
        return await render_error(request, 422, message, "ValidationError")

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.error("unexpected %s on %s", type(exc).__name__, request.url.path, exc_info=exc)
        return await render_error(
            request, 500, "internal error; the server log has the details", "InternalError"
        )

    app.add_exception_handler(ClearsightError, on_clearsight)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(Exception, on_unexpected)


# -- the factory ------------------------------------------------------------------------------


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the two body schemas of /api/search, which the route parses itself."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (SearchRequest, SearchForm):
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
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
        except Exception as exc:  # a half-written or vanished version: keep serving the one we have
            log.warning("index reload skipped: %s", state.public(str(exc)))


def create_app(
    settings: Settings | None = None,
    searcher: Searcher | None = None,
    explainer: Explainer | None = None,
    *,
    evidence: EvidenceProvider | None = None,
) -> FastAPI:
    """Build the app; `searcher`, `explainer` and `evidence` replace what settings would load (tests)."""
    from explainer.server import api, pages

    settings = settings or get_settings()
    templates_dir = asset_dir("templates")
    static_dir = templates_dir / "static"
    if not static_dir.is_dir():
        raise ConfigError(f"static files missing from {templates_dir} (broken install?)")
    keep_dir = (settings.upload_dir or Path(settings.data_dir) / "uploads") if settings.keep_uploads else None
    state = ServerState(
        settings=settings,
        templates=Jinja2Templates(directory=str(templates_dir)),
        query_images=QueryImages(keep_dir=keep_dir),
        injected_searcher=searcher,
        injected_explainer=explainer,
        injected_evidence=evidence,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(state.open)
        task = (
            asyncio.create_task(_reload_loop(state, settings.reload_interval_s))
            if settings.reload_interval_s > 0
            else None
        )
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await anyio.to_thread.run_sync(state.close)

    app = FastAPI(
        title="Clearsight",
        version="0.1.0",
        description="Explainable image search: cards with evidence regions, captions and explanations.",
        lifespan=lifespan,
    )
    app.state.clearsight = state
    _install_error_handlers(app)
    body_limit = (settings.max_upload_bytes * 4) // 3 + 64 * 1024  # base64 and multipart overhead
    mib = settings.max_upload_bytes / (1024 * 1024)
    app.add_middleware(
        BodyLimitMiddleware,
        limit=body_limit,
        render=render_error,
        message=f"the upload is too large: images are limited to {mib:.3g} MiB",
    )
    app.include_router(api.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=str(static_dir)), name="static")
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app
