"""Page routes: the search page and the image detail view, rendered from the same cards as the API.

The page never waits for explanations: cards are rendered with image, score, evidence and caption,
and a few lines of JavaScript ask /api/explain for each card. Errors are shown on the page itself,
with the search form kept, and with the HTTP status that the API would have given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

import anyio
from fastapi import APIRouter, Form, Path, Query, Request, UploadFile
from fastapi.responses import RedirectResponse, Response
from starlette.exceptions import HTTPException

from explainer.cards.model import (
    DETAIL_SIZE,
    QueryEcho,
    echo_values,
    evidence_png_url,
    query_params,
    thumb_url,
    url_name,
)
from explainer.cards.pipeline import CardPipeline, DetailCard, ResultPage
from explainer.errors import BadImage, BadQuery, ClearsightError, http_status_for, server_message
from explainer.limit_messages import image_too_large
from explainer.server.browse import PAGE_MAX, collection_page
from explainer.server.queries import QueryInput, UrlSpec
from explainer.server.schemas import NO_CAPTIONS_NOTE, OFFSET_CEILING, TOP_K_CEILING, caption_cards
from explainer.server.state import ServerState, state_of
from retrieval.fetch import FetchConfig, fetch_bytes, is_url
from retrieval.paths import display_path
from retrieval.query import FILE_TYPES, IMAGE_KEY_PATTERN, ORIENTATIONS, TEXT_MAX, Filters, QuerySpec
from retrieval.search import CaptionHit

router = APIRouter(include_in_schema=False)

#: The filter fields the search form sends (the query spec's, named as the spec names them).
FILTER_NAMES = tuple(f.name for f in dataclasses.fields(Filters))
#: Photos the empty page lists at a time.
BROWSE_PER_PAGE = 24

Target = Annotated[Literal["images", "captions"], Query()]
EvidenceMethod = Annotated[Literal["auto", "grid", "dense"], Query()]


def _page_url(echo: QueryEcho, top_k: int, offset: int, target: str = "images", ev: str = "auto") -> str:
    params = {**query_params(echo), "k": str(top_k)}
    if offset:
        params["o"] = str(offset)
    if target != "images":
        params["t"] = target
    if ev != "auto":
        params["ev"] = ev
    return "/?" + urlencode(params)


def _form(
    text: str | None,
    weight: float,
    top_k: int,
    neg: str | None,
    qimg: str | None,
    like: int | None,
    target: str = "images",
    ev: str = "auto",
) -> dict[str, Any]:
    return {
        "text": text or "",
        "weight": weight,
        "top_k": top_k,
        "negative": neg or "",
        "qimg": qimg,
        "like": like,
        "target": target,
        "ev": ev,
    }


def _spec_form(spec: QuerySpec, top_k: int, target: str = "images", ev: str = "auto") -> dict[str, Any]:
    form = _form(spec.text, spec.weight, top_k, spec.negative, spec.image_key, spec.like_id, target, ev)
    return form | {"filters": spec.filter_values()}


def _collection(
    state: ServerState, spec: QuerySpec, sort: Literal["date", "folder"], page: int
) -> dict[str, Any] | None:
    """The page's empty state: the collection itself, newest first (or by folder), with the filters.

    Only from a loaded collection: the first page of a server still loading its model shows the form.
    """
    pipeline = state.pipeline
    if pipeline is None:
        return None
    listed = collection_page(
        pipeline.searcher.collection.catalog, Filters(**spec.filter_values()), sort, page, BROWSE_PER_PAGE
    )
    base = {url_name(k): str(v) for k, v in spec.filter_values().items()} | {"sort": sort}
    return {
        "page": listed,
        "prev": "/?" + urlencode(base | {"p": str(page - 1)}) if page > 1 else None,
        "next": "/?" + urlencode(base | {"p": str(page + 1)}) if listed.has_more else None,
        "by_date": "/?" + urlencode(base | {"sort": "date"}),
        "by_folder": "/?" + urlencode(base | {"sort": "folder"}),
    }


def _context(state: ServerState, **extra: Any) -> dict[str, Any]:
    return {
        "status": state.page_status(),
        "file_types": sorted(set(FILE_TYPES.values())),
        "file_type_of": FILE_TYPES,
        "orientations": ORIENTATIONS,
        "top_k_max": min(state.settings.top_k_max, TOP_K_CEILING),
        "allow_urls": state.settings.allow_url_queries,
        **extra,
    }


@router.get("/", name="index")
async def index(
    request: Request,
    spec: UrlSpec,
    k: Annotated[int | None, Query(ge=1, le=TOP_K_CEILING)] = None,
    o: Annotated[int, Query(ge=0, le=OFFSET_CEILING)] = 0,
    t: Target = "images",
    ev: EvidenceMethod = "auto",
    sort: Annotated[Literal["date", "folder"], Query()] = "date",
    p: Annotated[int, Query(ge=1, le=PAGE_MAX)] = 1,
) -> Response:
    state = state_of(request)
    top_k = min(k or state.settings.default_top_k, state.settings.top_k_max)
    inp = QueryInput(spec, None, top_k, min(o, state.settings.offset_max))
    form = _spec_form(spec, top_k, t, ev)
    if not inp.has_query:
        try:
            listing = await anyio.to_thread.run_sync(_collection, state, spec, sort, p)
        except ClearsightError as exc:  # a filter the collection cannot answer (a folder outside it)
            status, message = _status_message(state, exc)
            ctx = _context(state, form=form, error={"status": status, "message": message})
            return state.templates.TemplateResponse(request, "index.html", ctx, status_code=status)
        ctx = _context(state, form=form, collection=listing)
        return state.templates.TemplateResponse(request, "index.html", ctx)
    try:
        pipeline = await state.ready()
        if t == "captions":
            return await _captions_page(request, state, pipeline, inp, form)
        method = None if ev == "auto" else ev
        page: ResultPage = await state.run(top_k, state.search, pipeline, inp, method)
    except (ClearsightError, HTTPException) as exc:
        status, message = _status_message(state, exc)
        ctx = _context(state, form=form, error={"status": status, "message": message})
        return state.templates.TemplateResponse(request, "index.html", ctx, status_code=status)
    echo = page.query
    nav = {
        "prev": _page_url(echo, top_k, max(0, page.offset - top_k), t, ev) if page.offset > 0 else None,
        "next": _page_url(echo, top_k, page.offset + top_k, t, ev) if page.has_more else None,
        "first": page.offset + 1,
        "last": page.offset + len(page.cards),
        "pages": page_numbers(page.offset, top_k, page.has_more, lambda o: _page_url(echo, top_k, o, t, ev)),
        # near-duplicates folded into this page's cards, and the same query with them shown (or folded)
        "folded": sum(len(c.similar) for c in page.cards),
        "toggle_similar": _page_url(dataclasses.replace(echo, show_all=not echo.show_all), top_k, 0, t, ev),
    }
    ctx = _context(state, form=form, page=page, cards=page.cards, query=echo_values(echo), nav=nav)
    return state.templates.TemplateResponse(request, "index.html", ctx)


async def _captions_page(
    request: Request, state: ServerState, pipeline: CardPipeline, inp: QueryInput, form: dict[str, Any]
) -> Response:
    """The "find captions" mode: the captions nearest the query, each with its image."""
    result, query, echo = await state.run(inp.top_k + 1, state.search_captions, pipeline, inp)
    hits = [h for h in (result.results if result else []) if isinstance(h, CaptionHit)]
    has_more = result is not None and result.has_more
    top_k = query.top_k
    nav = {
        "prev": _page_url(echo, top_k, max(0, query.offset - top_k), "captions")
        if query.offset > 0
        else None,
        "next": _page_url(echo, top_k, query.offset + top_k, "captions") if has_more else None,
        "first": query.offset + 1,
        "last": query.offset + len(hits),
    }
    ctx = _context(
        state,
        form=form,
        caption_results=caption_cards(hits),
        captions_note=None if result is not None else NO_CAPTIONS_NOTE,
        no_confident_match=result.no_confident_match if result is not None else True,
        captions_total=result.total if result is not None else 0,
        query=echo_values(echo),
        nav=nav,
    )
    return state.templates.TemplateResponse(request, "index.html", ctx)


def page_numbers(
    offset: int, top_k: int, has_more: bool, url: Callable[[int], str], around: int = 3
) -> list[dict[str, object]]:
    """Numbered links for the pager: a few pages back, this one, and the next one when there is more.

    The number of pages is not known (results run until the scores give out), so the pager never
    promises a last page it cannot show.
    """
    current = offset // top_k + 1
    last = current + (1 if has_more else 0)
    return [
        {"number": n, "url": url((n - 1) * top_k), "current": n == current}
        for n in range(max(1, current - around), last + 1)
    ]


def _status_message(state: ServerState, exc: Exception) -> tuple[int, str]:
    if isinstance(exc, ClearsightError):
        return http_status_for(exc), state.public(server_message(exc))
    assert isinstance(exc, HTTPException)
    return exc.status_code, str(exc.detail)


@router.post("/", name="upload")
async def upload(
    request: Request,
    text: Annotated[str | None, Form(max_length=TEXT_MAX)] = None,
    image: UploadFile | None = None,
    w: Annotated[float, Form(ge=0.0, le=1.0)] = 0.5,
    k: Annotated[int | None, Form(ge=1, le=TOP_K_CEILING)] = None,
    neg: Annotated[str | None, Form(max_length=TEXT_MAX)] = None,
    qimg: Annotated[str | None, Form(pattern=IMAGE_KEY_PATTERN)] = None,
    like: Annotated[int | None, Form(ge=1, le=2**62)] = None,
    t: Annotated[Literal["images", "captions"], Form()] = "images",
    ev: Annotated[Literal["auto", "grid", "dense"], Form()] = "auto",
) -> Response:
    """The form with a file: remember the image, then redirect to a plain GET page that names it.

    Without a new file, an image the page already searched with (qimg or like) is kept. A box that
    holds only an image URL is an image query: fetched when the server allows URL queries.
    """
    state = state_of(request)
    params: dict[str, str] = {}
    if t != "images":
        params["t"] = t
    if ev != "auto":
        params["ev"] = ev
    data = await image.read(state.settings.max_upload_bytes + 1) if image is not None else b""
    if image is not None and image.filename and not data:  # chosen, but empty: say so, not "no query"
        form = _form(text, w, k or state.settings.default_top_k, neg, None, None, t, ev)
        message = "The uploaded image file is empty (0 bytes)."
        ctx = _context(state, form=form, error={"status": 422, "message": message})
        return state.templates.TemplateResponse(request, "index.html", ctx, status_code=422)
    if text and is_url(text.strip()) and not data:
        try:
            data = await anyio.to_thread.run_sync(_fetch_for_page, state, text.strip())
        except ClearsightError as exc:
            form = _form(text, w, k or state.settings.default_top_k, neg, None, None, t, ev)
            status, message = _status_message(state, exc)
            ctx = _context(state, form=form, error={"status": status, "message": message})
            return state.templates.TemplateResponse(request, "index.html", ctx, status_code=status)
        text = None
    if text and text.strip():
        params["q"] = text.strip()
    if neg and neg.strip():
        params["neg"] = neg.strip()
    if k:
        params["k"] = str(k)
    if image is not None:
        await image.close()
    if len(data) > state.settings.max_upload_bytes:
        raise HTTPException(413, image_too_large(state.settings.max_upload_bytes))
    if data:
        try:
            _, key = await anyio.to_thread.run_sync(
                state.query_images.add, data, state.settings.max_upload_pixels
            )
        except BadImage as exc:
            form = _form(text, w, k or state.settings.default_top_k, neg, None, None)
            message = f"That upload could not be used as a query image: {exc.reason}."
            ctx = _context(state, form=form, error={"status": 422, "message": message})
            return state.templates.TemplateResponse(request, "index.html", ctx, status_code=422)
        params["qimg"] = key
    elif qimg:
        params["qimg"] = qimg
    elif like:
        params["like"] = str(like)
    if "q" in params and ("qimg" in params or "like" in params):
        params["w"] = f"{w:g}"
    sent = await request.form()  # parsed already for the fields above: the filters travel as sent
    for name in FILTER_NAMES:
        value = sent.get(name)
        if isinstance(value, str) and value.strip():
            params[url_name(name)] = value.strip()
    return RedirectResponse("/?" + urlencode(params), status_code=303)


def _fetch_for_page(state: ServerState, url: str) -> bytes:
    """An image URL typed into the box, under the upload limits; refused unless URL queries are on."""
    s = state.settings
    if not s.allow_url_queries:
        raise BadQuery(
            "this server does not fetch image URLs (CLEARSIGHT_ALLOW_URL_QUERIES is off): "
            "save the image and drop or paste it into the box instead"
        )
    config = FetchConfig(max_bytes=s.max_upload_bytes, max_pixels=s.max_upload_pixels)
    return fetch_bytes(url, config).data


@router.get("/images/{image_id}", name="detail")
async def detail(
    request: Request,
    image_id: Annotated[int, Path(ge=1, le=2**62)],
    spec: UrlSpec,
    r: Annotated[int, Query(ge=1, le=10**6)] = 1,
) -> Response:
    """`r`, the rank the link was made with, is accepted (old links keep working) but not believed:
    the rank, score and confidence shown are the search's own."""
    state = state_of(request)
    pipeline = await state.ready()
    inp = QueryInput(spec)

    def build() -> tuple[DetailCard | None, QueryEcho | None]:
        if not inp.has_query:
            return pipeline.card_for(image_id, None, None), None
        query, echo = state.resolve(inp, pipeline.searcher)
        return pipeline.card_for(image_id, query, echo), echo

    found, echo = await state.run(1, build)  # the detail view searches too: same budget
    if found is None:
        raise HTTPException(404, f"no indexed image with id {image_id}")
    card = found.card
    local_path = None
    if state.shows_paths:  # only this computer can reach the server: its user may see where files are
        rec = await anyio.to_thread.run_sync(pipeline.searcher.collection.catalog.get_image, image_id)
        local_path = display_path(rec.path) if rec is not None else None
    ctx = _context(
        state,
        card=card,
        ranked=found.ranked,
        query=echo_values(echo) if echo is not None else None,
        back_url=_page_url(echo, state.settings.default_top_k, 0) if echo is not None else "/",
        large_url=thumb_url(card.id, DETAIL_SIZE),
        evidence_url=evidence_png_url(card.id, echo) if echo is not None else None,
        form=_spec_form(spec, state.settings.default_top_k),
        local_path=local_path,
    )
    return state.templates.TemplateResponse(request, "detail.html", ctx)
