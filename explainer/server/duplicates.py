"""The near-duplicates view: `GET /duplicates` (the page) and `GET /api/duplicates` (the same groups as JSON).

The groups are `clearsight duplicates`'s, from the stored embeddings at the same collection threshold
(retrieval/duplicates.py), so the page never disagrees with the command. Finding them is one range
search over every stored vector: it runs once per index version at the default threshold
(`KeptDuplicates`), and a stricter threshold asked for is grouped from the pairs already found, so
no request makes the server search the whole collection again. Members are named as the browse view
names them (relative path and folder, never the absolute path).
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from explainer.server.browse import CollectionImage, collection_image
from explainer.server.schemas import error_responses
from explainer.server.state import ServerState, state_of
from retrieval.search import Searcher

router = APIRouter()

#: Most groups one page lists.
GROUPS_MAX = 50
#: Most members of one group a page shows (a group of 500 copies shows these and says how many more).
MEMBERS_MAX = 48
#: Furthest page (with GROUPS_MAX, half a million groups deep).
PAGE_MAX = 10_000
#: Groups a page and members a group shown when not asked (the page's links leave these out).
PER_PAGE = 20
MEMBERS = 12


class DuplicateSet(BaseModel):
    """One group of copies of a picture: the largest file first, as `clearsight duplicates` orders it."""

    ids: list[int] = Field(description="The ids of the members shown, largest file first")
    size: int = Field(description="Images in the group, shown or not")
    min_cosine: float = Field(description="The weakest link that joined the group")
    members: list[CollectionImage]


class DuplicatesPage(BaseModel):
    threshold: float = Field(description="The cosine from which two images count as copies")
    default_threshold: float = Field(description="This collection's default (what the command uses)")
    total_groups: int
    total_copies: int = Field(description="Images beside the largest file of each group, in all groups")
    page: int
    per_page: int
    has_more: bool
    groups: list[DuplicateSet]


def duplicates_page(
    state: ServerState, searcher: Searcher, threshold: float | None, page: int, per_page: int, members: int
) -> DuplicatesPage:
    """One page of the near-duplicate groups, each cut to `members` images (blocking)."""
    groups, used, default = state.duplicates.groups(searcher.collection, searcher.index.version, threshold)
    start = (page - 1) * per_page
    shown = groups[start : start + per_page]
    catalog = searcher.collection.catalog
    records = catalog.get_images([i for g in shown for i in g.ids[:members]])
    roots = catalog.roots()
    sets = []
    for g in shown:
        kept = [i for i in g.ids[:members] if i in records]
        sets.append(
            DuplicateSet(
                ids=kept,
                size=len(g.ids),
                min_cosine=round(g.min_cosine, 4),
                members=[collection_image(catalog, records[i], roots) for i in kept],
            )
        )
    return DuplicatesPage(
        threshold=used,
        default_threshold=default,
        total_groups=len(groups),
        total_copies=sum(len(g.ids) - 1 for g in groups),
        page=page,
        per_page=per_page,
        has_more=start + per_page < len(groups),
        groups=sets,
    )


Threshold = Annotated[
    float | None,
    Query(
        gt=0.0,
        le=1.0,
        description="Cosine from which images count as copies; at least the collection's default "
        "(omitted: the default, as `clearsight duplicates` uses)",
    ),
]
Page = Annotated[int, Query(ge=1, le=PAGE_MAX, description="1-based page number")]
PerPage = Annotated[int, Query(ge=1, le=GROUPS_MAX, description="Groups a page")]
Members = Annotated[int, Query(ge=2, le=MEMBERS_MAX, description="Images shown of each group")]


@router.get(
    "/api/duplicates",
    response_model=DuplicatesPage,
    tags=["api"],
    summary="Groups of near-duplicate images (as `clearsight duplicates`), paged",
    responses=error_responses(422, 503),
)
async def list_duplicates(
    request: Request,
    threshold: Threshold = None,
    page: Page = 1,
    per_page: PerPage = PER_PAGE,
    members: Members = MEMBERS,
) -> DuplicatesPage:
    state = state_of(request)
    pipeline = await state.ready()
    return await state.run(
        per_page, duplicates_page, state, pipeline.searcher, threshold, page, per_page, members
    )


@router.get("/duplicates", name="duplicates", include_in_schema=False)
async def duplicates_view(
    request: Request,
    threshold: Threshold = None,
    page: Page = 1,
    per_page: PerPage = PER_PAGE,
    members: Members = MEMBERS,
) -> Response:
    """The groups as rows of thumbnails, each image with its file name and folder."""
    state = state_of(request)
    pipeline = await state.ready()
    listed = await state.run(
        per_page, duplicates_page, state, pipeline.searcher, threshold, page, per_page, members
    )
    base: dict[str, str] = {}
    if threshold is not None:
        base["threshold"] = f"{threshold:g}"
    if per_page != PER_PAGE:
        base["per_page"] = str(per_page)
    if members != MEMBERS:
        base["members"] = str(members)
    ctx: dict[str, Any] = {
        "status": state.page_status(),
        "listed": listed,
        "first": (page - 1) * per_page + 1,
        "prev": "/duplicates?" + urlencode(base | {"page": str(page - 1)}) if page > 1 else None,
        "next": "/duplicates?" + urlencode(base | {"page": str(page + 1)}) if listed.has_more else None,
    }
    return state.templates.TemplateResponse(request, "duplicates.html", ctx)
