"""`GET /api/images`: the collection without a query, by date taken or by folder, paged and filtered.

The filters are the query spec's own (`retrieval.query.Filters`), read from the URL under their field
names with the spec's bounds, so a filter added to the spec is a parameter here without a change.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from explainer.cards.model import detail_url, image_url, thumb_url
from explainer.server.schemas import error_responses
from explainer.server.state import state_of
from retrieval.catalog import Catalog, ImageRecord
from retrieval.filters import browse
from retrieval.paths import display_path
from retrieval.query import DOC, Filters, bounds_of

router = APIRouter(prefix="/api", tags=["api"])

#: Most images one page of the collection lists.
PER_PAGE_MAX = 100
#: Furthest page (with PER_PAGE_MAX, a million images deep).
PAGE_MAX = 10_000


class CollectionImage(BaseModel):
    """One image of the collection as a browsing page shows it (named by id, never by absolute path)."""

    id: int
    file_name: str
    relative_path: str = Field(description="Relative to the folder that was indexed")
    folder: str | None = Field(
        default=None, description='Its folder, relative to the indexed folder ("" at its top)'
    )
    taken_at: str | None = Field(
        default=None,
        description="When it was taken, local time, ISO 8601; null until the next index reads it",
    )
    taken_source: str | None = Field(default=None, description="exif, exif-datetime or mtime")
    format: str | None = None
    width: int | None = None
    height: int | None = None
    image_url: str
    thumb_url: str
    detail_url: str


class CollectionPage(BaseModel):
    images: list[CollectionImage]
    total: int = Field(description="Images the filters admit, on every page")
    page: int
    per_page: int
    has_more: bool
    sort: Literal["date", "folder"]


def _url_filters() -> Callable[..., Filters]:
    """A route dependency reading the filters from the URL, each under its field name, bounds and
    description taken from the spec (FastAPI takes bounds as keywords)."""
    hints = typing.get_type_hints(Filters)
    params = [
        inspect.Parameter(
            f.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=Query(None, description=f.metadata.get(DOC), **bounds_of(f.name)),
            annotation=hints[f.name],
        )
        for f in dataclasses.fields(Filters)
    ]

    def from_url(**values: Any) -> Filters:
        return Filters(**values)

    from_url.__signature__ = inspect.Signature(params, return_annotation=Filters)  # type: ignore[attr-defined]
    return from_url


UrlFilters = Annotated[Filters, Depends(_url_filters())]


def collection_page(
    catalog: Catalog, filters: Filters, sort: Literal["date", "folder"], page: int, per_page: int
) -> CollectionPage:
    """One page of the collection (blocking: SQLite), as the API and the page's empty state show it."""
    records, total = browse(catalog, filters, sort, (page - 1) * per_page, per_page)
    roots = catalog.roots()
    return CollectionPage(
        images=[collection_image(catalog, r, roots) for r in records],
        total=total,
        page=page,
        per_page=per_page,
        has_more=page * per_page < total,
        sort=sort,
    )


def collection_image(catalog: Catalog, rec: ImageRecord, roots: list[str]) -> CollectionImage:
    """An image as the browsing views name it: by id, relative path and folder."""
    return CollectionImage(
        id=rec.id,
        file_name=display_path(rec.path.rsplit("/", 1)[-1]),
        relative_path=catalog.relative_path(rec.path, roots),
        folder=display_path(rec.folder) if rec.folder is not None else None,
        taken_at=rec.taken_at,
        taken_source=rec.taken_source,
        format=rec.format,
        width=rec.width,
        height=rec.height,
        image_url=image_url(rec.id),
        thumb_url=thumb_url(rec.id),
        detail_url=detail_url(rec.id),
    )


@router.get(
    "/images",
    response_model=CollectionPage,
    summary="Browse the collection without a query: by date taken or by folder, paged, filtered",
    responses=error_responses(422, 503),
)
async def list_images(
    request: Request,
    filters: UrlFilters,
    sort: Annotated[
        Literal["date", "folder"], Query(description="date: newest taken first; folder: by folder, then file")
    ] = "date",
    page: Annotated[int, Query(ge=1, le=PAGE_MAX, description="1-based page number")] = 1,
    per_page: Annotated[int, Query(ge=1, le=PER_PAGE_MAX, description="Images a page")] = 24,
) -> CollectionPage:
    state = state_of(request)
    pipeline = await state.ready()
    catalog = pipeline.searcher.collection.catalog
    return await state.run(per_page, collection_page, catalog, filters, sort, page, per_page)
