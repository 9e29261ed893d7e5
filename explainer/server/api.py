"""JSON routes: each parses and bounds its input, hands the work to the pipeline, and shapes the answer."""

from __future__ import annotations

import functools
import io
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from PIL import Image as PILImage
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from explainer.cards.model import DETAIL_SIZE, THUMB_SIZES, public_model_name
from explainer.cards.pipeline import CardPipeline
from explainer.errors import BadQuery
from explainer.explain.chain import Pending
from explainer.limit_messages import image_too_large, offset_too_far, too_many_results
from explainer.server import images, originals
from explainer.server.queries import QueryInput, UrlSpec, decode_base64, echo_for
from explainer.server.schemas import (
    NO_CAPTIONS_NOTE,
    SEARCH_REQUEST,
    ExplainedHit,
    ExplainRequest,
    ExplainResponse,
    HealthIndex,
    HealthPatches,
    HealthResponse,
    SearchRequest,
    SearchResponse,
    caption_cards,
    error_responses,
)
from explainer.server.state import ServerState, state_of
from retrieval.fetch import FetchConfig, fetch_bytes
from retrieval.folders import served_roots
from retrieval.query import IMAGE_KEY_PATTERN
from retrieval.search import CaptionHit
from retrieval.search import Query as LibraryQuery

router = APIRouter(prefix="/api", tags=["api"])

ImageId = Annotated[int, Path(ge=1, le=2**62, description="Catalog id of an indexed image")]

_SEARCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/SearchRequest"}},
            "multipart/form-data": {"schema": {"$ref": "#/components/schemas/SearchForm"}},
        },
    }
}


async def _read_search(request: Request, state: ServerState) -> tuple[SearchRequest, bytes | None]:
    """The request as a SearchRequest plus the raw image bytes; 415 for other content types."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limit = state.settings.max_upload_bytes
    if ctype == "application/json":
        try:
            req = SEARCH_REQUEST.validate_json(await request.body())
        except ValidationError as exc:
            raise _invalid(exc) from None
        data = decode_base64(req.image_base64, limit) if req.image_base64 is not None else None
    elif ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await request.form(max_files=1, max_fields=20)
        try:
            fields: dict[str, Any] = {}
            data = None
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if name != "image":
                        raise BadQuery(f"unexpected file field {name!r}; send the image as 'image'")
                    data = await value.read(limit + 1)
                    if not data:  # a browser sends an empty, unnamed part when no file was chosen
                        if value.filename:
                            raise BadQuery("the uploaded image file is empty (0 bytes)")
                        data = None
                elif value != "":
                    fields[name] = value
        finally:
            await form.close()
        if data is not None and len(data) > limit:
            raise HTTPException(413, image_too_large(limit))
        if "image_base64" in fields:
            raise BadQuery("send the image as the file field 'image' in a form")
        try:
            req = SEARCH_REQUEST.validate_python(fields)
        except ValidationError as exc:
            raise _invalid(exc) from None
        if data is not None and any(v is not None for v in (req.image_key, req.like_id, req.image_url)):
            raise BadQuery("give at most one query image: an upload, image_url, image_key or like_id")
    else:
        raise HTTPException(415, "send the search as application/json or multipart/form-data")
    if data is not None and len(data) > limit:
        raise HTTPException(413, image_too_large(limit))
    if req.image_url is not None:
        data = await anyio.to_thread.run_sync(_fetch_url, state, req.image_url)
    return req, data


def _fetch_url(state: ServerState, url: str) -> bytes:
    """The bytes of a query image URL, under the upload limits; refused unless the server allows it."""
    s = state.settings
    if not s.allow_url_queries:
        raise BadQuery("this server does not fetch image URLs; upload the image instead")
    config = FetchConfig(max_bytes=s.max_upload_bytes, max_pixels=s.max_upload_pixels)
    return fetch_bytes(url.strip(), config).data


def _invalid(exc: ValidationError) -> Exception:
    from fastapi.exceptions import RequestValidationError

    return RequestValidationError(
        [{**e, "loc": ("body", *e.get("loc", ()))} for e in exc.errors(include_input=False)]
    )


def _check_bounds(state: ServerState, top_k: int, offset: int) -> None:
    s = state.settings
    if top_k > s.top_k_max:
        raise BadQuery(too_many_results(s.top_k_max, top_k))
    if offset > s.offset_max:
        raise BadQuery(offset_too_far(s.offset_max, offset))


@router.post(
    "/search",
    response_model=SearchResponse,
    summary="Search by text, image, or both",
    description="A JSON body (SearchRequest, image as base64) or a multipart form (SearchForm, image file).",
    openapi_extra=_SEARCH_BODY,
    responses=error_responses(413, 415, 422, 503),
)
async def search(request: Request) -> SearchResponse:
    state = state_of(request)
    req, data = await _read_search(request, state)
    _check_bounds(state, req.top_k, req.offset)
    inp = QueryInput(req.spec(), data, req.top_k, req.offset)
    if not inp.has_query:
        raise BadQuery("give a text query, an image, or both")
    pipeline = await state.ready()
    if req.target == "captions":
        return await state.run(inp.top_k + 1, _search_captions, state, pipeline, inp)
    page = await state.run(inp.top_k, state.search, pipeline, inp)
    if req.explain:
        await pipeline.explain_cards(page)
    return SearchResponse.from_page(page)


def _search_captions(state: ServerState, pipeline: CardPipeline, inp: QueryInput) -> SearchResponse:
    """Image→text (or text→text): caption hits, each with its image's URLs."""
    result, query, echo = state.search_captions(pipeline, inp)
    if result is None:  # a state of the collection, not a bad request: say so, answer empty
        return SearchResponse(
            target="captions",
            results=[],
            query=echo,
            total=0,
            offset=query.offset,
            top_k=query.top_k,
            has_more=False,
            model=public_model_name(pipeline.searcher.index.manifest.model_name),
            no_confident_match=True,
            note=NO_CAPTIONS_NOTE,
        )
    hits = [h for h in result.results if isinstance(h, CaptionHit)]
    return SearchResponse(
        target="captions",
        results=caption_cards(hits),
        query=echo,
        total=result.total,
        offset=query.offset,
        top_k=query.top_k,
        has_more=result.has_more,
        model=public_model_name(result.model),
        no_confident_match=result.no_confident_match,
        cached=result.cached,
    )


@router.post(
    "/explain",
    response_model=ExplainResponse,
    summary="Explanations for given hits of a query",
    responses=error_responses(422, 503),
)
async def explain(body: ExplainRequest, request: Request) -> ExplainResponse:
    state = state_of(request)
    pipeline = await state.ready()
    inp = QueryInput(body.spec())
    items = list(zip(body.ids, body.ranks or [1] * len(body.ids), strict=True))

    def make_query() -> LibraryQuery:
        return state.resolve(inp, pipeline.searcher)[0]

    contexts = await state.run(len(items), pipeline.contexts, make_query, echo_for(inp), items)
    found = [i for i in dict.fromkeys(body.ids) if i in contexts]
    # Waits for the LLM's rate budget up to the setting; what is still queued then is answered
    # pending and keeps running, so asking again later collects it.
    wait_s = state.settings.explain_wait_s
    if body.wait_s is not None:
        wait_s = min(wait_s, body.wait_s)
    outs = await pipeline.explain_within([contexts[i] for i in found], wait_s)
    return ExplainResponse(
        explanations=[
            ExplainedHit(id=i, pending=True, queued_s=_round(o.queued_s), caption=contexts[i].caption)
            if isinstance(o, Pending)
            else ExplainedHit(id=i, explanation=o, caption=contexts[i].caption)
            for i, o in zip(found, outs, strict=True)
        ],
        missing=[i for i in dict.fromkeys(body.ids) if i not in contexts],
    )


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


@router.get(
    "/images/{image_id}",
    summary="The image file",
    response_class=FileResponse,
    responses={200: {"content": {"image/*": {}}}, **error_responses(404, 503)},
)
async def image_file(image_id: ImageId, request: Request) -> Response:
    """The original file, only while it is still the indexed image (see originals.py), location
    stripped when the server is shared beyond loopback (unless told to keep it)."""
    state = state_of(request)
    pipeline = await state.ready()
    catalog = pipeline.searcher.collection.catalog
    rec = images.indexed_record(catalog, image_id)
    open_it = functools.partial(
        originals.open_original, rec, served_roots(catalog), strip_location=state.strip_location
    )
    try:
        original = await anyio.to_thread.run_sync(open_it)
    except originals.OriginalChanged as exc:
        raise images.ImageChanged(image_id, exc.reason) from None
    headers = {"Content-Length": str(original.length), "Cache-Control": "private, max-age=3600"}
    return StreamingResponse(original.chunks(), media_type=original.media_type, headers=headers)


@router.get(
    "/images/{image_id}/thumb",
    summary="A cached JPEG thumbnail (EXIF orientation applied)",
    response_class=FileResponse,
    responses={200: {"content": {"image/jpeg": {}}}, **error_responses(404, 422, 503)},
)
async def thumbnail(
    image_id: ImageId,
    request: Request,
    size: Annotated[int, Query(ge=16, le=THUMB_SIZES[-1], description="Longest side in pixels")] = 384,
) -> Response:
    state = state_of(request)
    pipeline = await state.ready()
    rec = images.indexed_record(pipeline.searcher.collection.catalog, image_id)
    path = await anyio.to_thread.run_sync(_thumbs(state).path_for, rec, size)
    return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=86400"})


def _thumbs(state: ServerState) -> images.Thumbnails:
    root = state.settings.thumb_dir or state.data_dir / "thumbs"
    roots = served_roots(state.pipeline.searcher.collection.catalog) if state.pipeline is not None else []
    return images.Thumbnails(root, state.settings.max_image_pixels, roots)


@router.get(
    "/images/{image_id}/evidence.png",
    summary="The image with the evidence regions for a query drawn on",
    responses={200: {"content": {"image/png": {}}}, **error_responses(404, 422, 503)},
)
async def evidence_png(
    image_id: ImageId,
    request: Request,
    spec: UrlSpec,
    size: Annotated[int, Query(ge=64, le=DETAIL_SIZE)] = DETAIL_SIZE,
) -> Response:
    state = state_of(request)
    pipeline = await state.ready()
    inp = QueryInput(spec)
    if not inp.has_query:
        raise BadQuery("give the query (q, qimg or like) whose evidence to draw")
    rec = images.indexed_record(pipeline.searcher.collection.catalog, image_id)

    def draw() -> bytes:
        query, _ = state.resolve(inp, pipeline.searcher)
        roots = served_roots(pipeline.searcher.collection.catalog)
        view = images.view(rec, size, state.settings.max_image_pixels, roots)
        picture = pipeline.evidence_picture(image_id, query, view)
        if isinstance(picture, PILImage.Image):
            return images.png_bytes(picture)
        return images.draw_boxes(rec, view, picture)

    png = await state.run(1, draw)
    return Response(png, media_type="image/png")


@router.get(
    "/query-images/{key}",
    summary="An uploaded query image the server still holds (PNG)",
    responses={200: {"content": {"image/png": {}}}, **error_responses(404, 422)},
)
async def query_image(key: Annotated[str, Path(pattern=IMAGE_KEY_PATTERN)], request: Request) -> Response:
    image = state_of(request).query_images.get(key)
    if image is None:
        raise HTTPException(404, "that query image is no longer held by the server")
    buf = io.BytesIO()
    await anyio.to_thread.run_sync(lambda: image.save(buf, format="PNG"))
    return Response(
        buf.getvalue(), media_type="image/png", headers={"Cache-Control": "private, max-age=3600"}
    )


@router.get(
    "/health",
    response_model=HealthResponse,
    summary="Liveness and readiness: 200 when searches can be served, 503 with the reason otherwise",
    responses={503: {"model": HealthResponse, "description": "Degraded: the reason says what to do"}},
)
async def health(request: Request) -> Response:
    """Without the token (on a server that has one) only liveness: the status, nothing about the
    collection, its model or the reason it is down. With it, or on a token-free server, the details."""
    state = state_of(request)
    details = bool(getattr(request.state, "authenticated", False))
    try:
        pipeline = await state.ready()
    except Exception:
        body = HealthResponse(status="degraded", reason=(state.problem or "not ready") if details else None)
        return _health(body, 503, details)
    stale = state.index_problem
    status: Literal["ok", "stale"] = "stale" if stale is not None else "ok"
    if not details:
        return _health(HealthResponse(status=status), 200, details)
    index = pipeline.searcher.index
    explainer = pipeline.explainer.label if pipeline.explainer is not None else None
    body = HealthResponse(
        status=status,
        reason=stale,
        index=HealthIndex(
            version=index.version,
            images=index.images.ntotal,
            model=public_model_name(index.manifest.model_name),
        ),
        explainer=explainer,
        evidence=pipeline.evidence.name,
        stale_images=len(state.stale_images),
        patches=_patches(state),
    )
    return _health(body, 200, details)


def _patches(state: ServerState) -> HealthPatches | None:
    worker = state.patch_worker
    if worker is None:
        return None
    p = worker.progress()
    problem = state.public(p.problem) if p.problem else None
    return HealthPatches(done=p.done, total=p.total, idle=p.idle, problem=problem)


def _health(body: HealthResponse, status: int, details: bool) -> Response:
    exclude = None if details else {"version"}
    return Response(
        body.model_dump_json(exclude=exclude, exclude_none=not details),
        status_code=status,
        media_type="application/json",
    )
