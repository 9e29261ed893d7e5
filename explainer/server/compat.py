"""`POST /search`: the reference system's API, so its existing clients (and its page) work unchanged.

Its clients send `{"query": "...", "top_k": 5}` and read `results[].path` (straight into
`<img src>`), `filename`, `distance`, `caption` and `explanation` (plain strings); its README calls
the path `image_path`, so both are sent. Errors use its shape, `{"detail": ...}`, with 400 for an
empty query. Everything else is Clearsight's own card pipeline: the same cards, caches and limits
as `/api/search`; `path` is the URL this server serves the image at, never a file system path.
"""

from __future__ import annotations

import json
from pathlib import PurePath
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from explainer.cards.model import image_url
from explainer.errors import ClearsightError, http_status_for, server_message
from explainer.server.queries import QueryInput
from explainer.server.schemas import TEXT_MAX
from explainer.server.state import state_of
from retrieval.paths import display_path
from retrieval.query import QuerySpec

router = APIRouter(tags=["compatibility"])

#: The reference system's bounds on top_k; values outside are clamped, as it does.
TOP_K_MIN, TOP_K_MAX = 1, 10
DEFAULT_TOP_K = 5


class CompatSearchRequest(BaseModel):
    query: str = Field(max_length=TEXT_MAX, description="Text query (an empty one answers 400)")
    top_k: int = Field(default=DEFAULT_TOP_K, description="Results wanted; clamped to 1..10")


class CompatResult(BaseModel):
    path: str = Field(description="URL of the image on this server (use it as <img src>)")
    image_path: str = Field(description="The same URL, under the name the reference README uses")
    filename: str
    distance: float = Field(description="The similarity score (higher is closer), as the reference sends it")
    score: float
    caption: str
    explanation: str


class CompatSearchResponse(BaseModel):
    query: str
    top_k: int
    results: list[CompatResult]


class CompatError(BaseModel):
    detail: str


def _detail(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status)


def parse_request(body: bytes) -> tuple[str, int]:
    """The query and clamped top_k of a body, or an HTTPException(400/422) with the reason."""
    try:
        raw: Any = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HTTPException(422, 'the body must be JSON: {"query": "...", "top_k": 5}') from None
    if not isinstance(raw, dict) or not isinstance(raw.get("query", None), str):
        raise HTTPException(422, "the body must be a JSON object with a string 'query'")
    query = raw["query"]
    if len(query) > TEXT_MAX:
        raise HTTPException(422, f"query must be at most {TEXT_MAX} characters")
    if not query.strip():
        raise HTTPException(400, "Query cannot be empty")
    top_k = raw.get("top_k", DEFAULT_TOP_K)
    if isinstance(top_k, bool) or not isinstance(top_k, (int, float)) or top_k != top_k:
        raise HTTPException(422, "top_k must be a number")
    return query.strip(), int(min(TOP_K_MAX, max(TOP_K_MIN, int(top_k))))


@router.post(
    "/search",
    response_model=CompatSearchResponse,
    summary="Compatibility route: the reference system's search API",
    description="For existing clients of the system Clearsight replaces: `{query, top_k}` in, "
    "`{query, top_k, results: [{path, image_path, filename, distance, score, caption, explanation}]}` "
    "out, errors as `{detail}`. `top_k` is clamped to 1..10. New clients should use `/api/search`.",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": CompatSearchRequest.model_json_schema()}},
        }
    },
    responses={400: {"model": CompatError, "description": "Empty query"}, 422: {"model": CompatError}},
)
async def compat_search(request: Request) -> Any:
    try:
        query, top_k = parse_request(await request.body())
    except HTTPException as exc:
        return _detail(exc.status_code, str(exc.detail))
    state = state_of(request)
    try:
        pipeline = await state.ready()
        inp = QueryInput(QuerySpec(text=query), top_k=top_k)
        page = await state.run(top_k, state.search, pipeline, inp)
        await pipeline.explain_cards(page)
    except ClearsightError as exc:
        return _detail(http_status_for(exc), state.public(server_message(exc)))
    except HTTPException as exc:
        return _detail(exc.status_code, str(exc.detail))
    results = [
        CompatResult(
            path=image_url(card.id),
            image_path=image_url(card.id),
            filename=display_path(PurePath(hit.path).name),
            distance=card.score,
            score=card.score,
            caption=card.caption or "",
            explanation=card.explanation.text if card.explanation is not None else "",
        )
        for card, hit in zip(page.cards, page.hits, strict=True)
    ]
    return CompatSearchResponse(query=query, top_k=top_k, results=results)
