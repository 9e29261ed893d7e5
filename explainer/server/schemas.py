"""Request and response schemas of the JSON API.

They are the public contract (what OpenAPI documents and clients send), kept apart from the
library's internal types so that either can change without silently changing the other. Bounds
live here, so a malformed request is refused with a 422 before any model work.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from explainer.cards.model import Card, ExplanationOut, QueryEcho, image_url, spec_config, thumb_url
from explainer.cards.pipeline import ResultPage
from explainer.version import version
from retrieval.query import TEXT_MAX as TEXT_MAX  # re-exported: older routes import it from here
from retrieval.query import Filters, QuerySpec
from retrieval.search import CaptionHit

#: Hard ceiling of `top_k`; `Settings.top_k_max` may lower it.
TOP_K_CEILING = 100
#: Hard ceiling of `offset`; `Settings.offset_max` may lower it.
OFFSET_CEILING = 10_000
#: Most images one /api/explain call may ask about (a page's worth, with room).
EXPLAIN_MAX_IDS = 100
URL_MAX = 2048


# The query's own fields (text, image_key, like_id, weight, negative, min_score and any filter added
# later) come from `retrieval.query.QuerySpec`, bounds and descriptions included: a request schema
# adds only what is the API's own (how the image is sent, the page, what to return).


@pydantic_dataclass(frozen=True, kw_only=True, config=spec_config(extra="forbid"))
class SearchFilters(Filters):
    """The query spec's filters as one object: `"filters": {"folder": ..., "after": ..., ...}`."""


def _filters_problem(spec: Filters) -> None:
    """What the library would refuse about the filters, refused here already (a 422 naming it)."""
    if (problem := spec.filter_problem()) is not None:
        raise ValueError(problem)


@pydantic_dataclass(frozen=True, kw_only=True, config=spec_config(extra="forbid"))
class SearchRequest(QuerySpec):
    """A search. Send it as JSON (image as `image_base64`) or as multipart form fields (image as `image`)."""

    image_base64: str | None = Field(
        default=None, description="Query image, base64 (a data: URL prefix is accepted)"
    )
    image_url: str | None = Field(
        default=None,
        max_length=URL_MAX,
        description="Query image by http(s) URL; fetched only when the server allows URL queries "
        "(CLEARSIGHT_ALLOW_URL_QUERIES), never from private, loopback or link-local addresses",
    )
    target: Literal["images", "captions"] = Field(
        default="images", description="images: image cards; captions: the captions nearest the query"
    )
    top_k: int = Field(default=12, ge=1, le=TOP_K_CEILING, description="Results per page")
    offset: int = Field(default=0, ge=0, le=OFFSET_CEILING, description="Skip this many results (paging)")
    explain: bool = Field(
        default=True, description="Explain every card now; false returns at once and leaves explanation null"
    )
    filters: SearchFilters | None = Field(
        default=None,
        description="Which photos may be hits (folder, after, before, type, min_size, orientation); "
        "the same as giving those fields at the top level",
    )

    @model_validator(mode="after")
    def _one_image(self) -> SearchRequest:
        given = [
            n for n in ("image_base64", "image_url", "image_key", "like_id") if getattr(self, n) is not None
        ]
        if len(given) > 1:
            raise ValueError(f"give at most one query image, got {' and '.join(given)}")
        if self.filters is not None:  # the object's filters become the spec's own fields
            for name, value in self.filters.filter_values().items():
                if getattr(self, name) not in (None, value):
                    raise ValueError(f"{name} is given twice, differently (at the top level and in filters)")
                object.__setattr__(self, name, value)  # frozen: set once, while validating
        _filters_problem(self)
        return self


#: Parses and validates a SearchRequest from JSON or from form fields.
SEARCH_REQUEST = TypeAdapter(SearchRequest)


def search_form_schema() -> dict[str, Any]:
    """The multipart form twin of SearchRequest's schema, derived from it (documentation only: the
    route parses the form). A form field is sent or not, never JSON null, so no field is nullable
    (a client generated from a nullable one would send the string "null"), and the image is a file."""
    schema = SEARCH_REQUEST.json_schema(ref_template="#/components/schemas/{model}")
    props: dict[str, Any] = {}
    for name, prop in schema["properties"].items():
        if name == "filters":  # a form names each filter as its own field
            continue
        if name == "image_base64":
            props["image"] = {"type": "string", "format": "binary", "title": "Image"}
            continue
        kinds = [k for k in prop.pop("anyOf", []) if k.get("type") != "null"]
        if kinds:
            prop = {**kinds[0], **{k: v for k, v in prop.items() if k != "default" or v is not None}}
        props[name] = prop
    return {
        "title": "SearchForm",
        "description": "SearchRequest as a multipart form: optional fields are left out when not used.",
        "type": "object",
        "properties": props,
    }


class CaptionCard(BaseModel):
    """A caption hit (target "captions"): the caption and the image it belongs to."""

    model_config = ConfigDict(extra="forbid")

    id: int = Field(description="Catalog id of the caption")
    text: str
    source: str = Field(description='"dataset" or "generated:<model>"')
    image_id: int
    score: float
    rank: int = Field(ge=1)
    confidence: float | None = Field(default=None, ge=0.0, le=1.0)
    image_url: str
    thumb_url: str


NO_CAPTIONS_NOTE = (
    "this collection has no captions yet: index a folder with a captions.jsonl, "
    "or generate captions with `clearsight caption`"
)


def caption_cards(hits: Sequence[CaptionHit]) -> list[CaptionCard]:
    """Caption hits as the API and the page show them: each with its image's URLs."""
    return [
        CaptionCard(
            id=h.id,
            text=h.text,
            source=h.source,
            image_id=h.image_id,
            score=h.score,
            rank=h.rank,
            confidence=h.confidence,
            image_url=image_url(h.image_id),
            thumb_url=thumb_url(h.image_id),
        )
        for h in hits
    ]


class SearchResponse(BaseModel):
    target: Literal["images", "captions"] = "images"
    results: list[Card] | list[CaptionCard]
    query: QueryEcho
    total: int = Field(description="Vectors in the searched index (images, or captions)")
    offset: int
    top_k: int
    has_more: bool
    model: str
    no_confident_match: bool | None = Field(
        default=None,
        description="true when even the best result does not stand out from what unrelated queries reach; "
        "the results are still returned",
    )
    cached: bool = Field(default=False, description="true when the search came from the result cache")
    note: str | None = Field(default=None, description="Why there are no results, when it is not the query")
    partial: bool = Field(
        default=False, description="True when some index shards did not answer: the results miss their images"
    )
    missing_shards: list[int] = Field(default_factory=list, description="Which shards did not answer")

    @classmethod
    def from_page(cls, page: ResultPage) -> SearchResponse:
        return cls(
            results=page.cards,
            query=page.query,
            total=page.total,
            offset=page.offset,
            top_k=page.top_k,
            has_more=page.has_more,
            model=page.model,
            no_confident_match=page.no_confident_match,
            cached=page.cached,
            partial=bool(page.missing_shards),
            missing_shards=page.missing_shards,
        )


@pydantic_dataclass(frozen=True, kw_only=True, config=spec_config(extra="forbid"))
class ExplainRequest(QuerySpec):
    """Explanations for some hits of a query (the page asks for its visible cards in one request)."""

    # item bounds live in the schema too, so clients (and schemathesis) see what the server accepts
    ids: list[Annotated[int, Field(ge=1, le=2**62)]] = Field(
        min_length=1, max_length=EXPLAIN_MAX_IDS, description="Catalog ids of the hits"
    )
    ranks: list[int] | None = Field(
        default=None, description="The hits' ranks, same length as ids (used when the page is not remembered)"
    )
    wait_s: float | None = Field(
        default=None,
        ge=0,
        le=3600,
        description="Answer within this many seconds (at most CLEARSIGHT_EXPLAIN_WAIT_S, its default); "
        "hits still waiting for the LLM's rate budget then come back pending",
    )

    @model_validator(mode="after")
    def _check(self) -> ExplainRequest:
        if any(i < 1 or i > 2**62 for i in self.ids):
            raise ValueError("ids must be positive catalog ids")
        if self.ranks is not None and (
            len(self.ranks) != len(self.ids) or any(r < 1 or r > 10**6 for r in self.ranks)
        ):
            raise ValueError("ranks must have one positive rank per id")
        if not (self.text and self.text.strip()) and self.image_key is None and self.like_id is None:
            raise ValueError("give the query: text, image_key or like_id")
        _filters_problem(self)
        return self


class ExplainedHit(BaseModel):
    id: int
    explanation: ExplanationOut | None = Field(
        default=None, description="null while pending: ask again for this id later"
    )
    pending: bool = Field(
        default=False, description="Still being written (waiting for the LLM's rate budget); ask again"
    )
    queued_s: float | None = Field(
        default=None, description="While pending: about how long the LLM rate limit keeps it queued"
    )
    caption: str | None = None
    caption_source: str | None = None


class ExplainResponse(BaseModel):
    explanations: list[ExplainedHit]
    missing: list[int] = Field(default_factory=list, description="Requested ids that are not indexed images")


class HealthIndex(BaseModel):
    version: str
    images: int
    model: str


class HealthPatches(BaseModel):
    """The background fill of stored patch features (evidence boxes without a model pass)."""

    done: int = Field(description="Indexed images whose patch features are stored")
    total: int = Field(description="Indexed images")
    idle: bool = Field(description="Nothing left to fill at the worker's last look")
    problem: str | None = None


class HealthResponse(BaseModel):
    """Without the token (when the server has one) only `status`: liveness, no details."""

    status: Literal["ok", "stale", "degraded"] = Field(
        description="ok; stale: serving an older index than the one on disk (reason says why); degraded"
    )
    version: str = Field(default_factory=version, description="The Clearsight version serving")
    reason: str | None = None
    index: HealthIndex | None = None
    explainer: str | None = None
    evidence: str | None = None
    stale_images: int | None = Field(default=None, description="Indexed images whose file changed since")
    patches: HealthPatches | None = Field(default=None, description="Patch features filled while idle")


class ErrorBody(BaseModel):
    type: str
    message: str
    details: list[dict[str, Any]] | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route can answer with."""
    text = {
        404: "Unknown image id",
        413: "Upload or body too large",
        415: "Unsupported content type",
        422: "Malformed request or unusable query",
        503: "Index or model unavailable",
    }
    return {c: {"model": ErrorResponse, "description": text.get(c, "Error")} for c in codes}
