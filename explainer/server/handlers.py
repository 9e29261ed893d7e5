"""Errors leave the server as one shape: JSON `{"error": {"type", "message"}}` for the API, a page otherwise.

Typed errors are translated here (status and wording from `explainer.errors`), so routes raise
library and application errors as they are.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from explainer.errors import ClearsightError, http_status_for, server_message
from explainer.server.images import ImageChanged
from explainer.server.state import state_of

log = logging.getLogger(__name__)

_HTTP_KINDS = {
    401: "Unauthorized",
    429: "TooManyRequests",
    404: "NotFound",
    405: "MethodNotAllowed",
    413: "PayloadTooLarge",
    415: "UnsupportedMediaType",
}


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api") or request.url.path.startswith("/openapi")


def error_json(
    status: int, kind: str, message: str, details: list[dict[str, Any]] | None = None
) -> JSONResponse:
    body: dict[str, Any] = {"type": kind, "message": message}
    if details is not None:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status)


#: The compatibility route speaks its reference system's error shape, `{"detail": ...}`, for every
#: status (refusals by the middlewares included): its clients parse that, not HTML or our own shape.
COMPAT_PATH = "/search"


async def render_error(request: Request, status: int, message: str, kind: str | None = None) -> Response:
    kind = kind or _HTTP_KINDS.get(status, "Error")
    if request.url.path == COMPAT_PATH:
        return JSONResponse({"detail": message}, status_code=status)
    if _wants_json(request):
        return error_json(status, kind, message)
    state = state_of(request)
    context = {"status": state.page_status(), "http_status": status, "message": message, "kind": kind}
    return state.templates.TemplateResponse(request, "error.html", context, status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    async def on_clearsight(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ClearsightError)
        message = state_of(request).public(server_message(exc))
        return await render_error(request, http_status_for(exc), message, type(exc).__name__.rstrip("_"))

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if isinstance(exc, ImageChanged):
            state_of(request).mark_stale(exc.image_id, exc.reason)
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
        if _wants_json(request) and request.url.path != COMPAT_PATH:
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
