"""The result card: the one model the page and the JSON API both render.

A card names its image only by catalog id and URLs built from it, never by filesystem path, so
nothing a client receives says where the collection lives and nothing a client sends can point
the server at a file. The URL helpers live here (not in the server) so that the pipeline, the
templates and the tests agree on them without importing FastAPI.
"""

from __future__ import annotations

import dataclasses
from pathlib import PurePath
from typing import Any
from urllib.parse import urlencode

from pydantic import BaseModel, ConfigDict, Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

from explainer.explain.types import Explanation, QueryKind
from retrieval.query import DOC, QuerySpec
from retrieval.search import Hit
from retrieval.types import Region

#: Thumbnail edge (pixels) the grid asks for; the detail view asks for DETAIL_SIZE.
CARD_THUMB_SIZE = 384
DETAIL_SIZE = 1024
#: Sizes the thumbnail endpoint renders; any other requested size snaps to the next one up, which
#: bounds the thumbnail cache at a few files per image.
THUMB_SIZES = (128, 256, 384, 512, 768, 1024)


class ExplanationOut(BaseModel):
    """An explanation as shown to users: the text, who wrote it, and why an LLM text was replaced."""

    text: str
    backend: str = Field(description='Who wrote the text: "groq:<model>", "offline", "local:<file>"...')
    prompt: str | None = Field(default=None, description='The prompt (or offline template) used, "name@vN"')
    matched_concepts: list[str] = Field(default_factory=list)
    mismatches: list[str] = Field(default_factory=list)
    unsupported_concepts: list[str] = Field(
        default_factory=list, description="Claimed matches the hit's captions and regions do not say"
    )
    confidence: float = Field(ge=0.0, le=1.0)
    fallback_reason: str | None = None
    cached: bool = False

    @classmethod
    def from_explanation(cls, e: Explanation) -> ExplanationOut:
        return cls(
            text=e.text,
            backend=e.backend,
            prompt=e.prompt,
            matched_concepts=list(e.matched_concepts),
            mismatches=list(e.mismatches),
            unsupported_concepts=list(e.unsupported_concepts),
            confidence=e.confidence,
            fallback_reason=e.fallback_reason,
            cached=e.cached,
        )


class Card(BaseModel):
    """One hit as users see it."""

    model_config = ConfigDict(extra="forbid")

    id: int = Field(description="Catalog id of the image; the only way to refer to it")
    rank: int = Field(ge=1, description="1-based rank over the whole result list (offset included)")
    score: float
    confidence: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Calibrated per collection: how far the score stands above unrelated queries' best",
    )
    image_url: str
    thumb_url: str
    detail_url: str
    like_url: str = Field(description='Page URL of a "more like this" query from this image')
    file_name: str = Field(default="", description="The image file's name")
    relative_path: str = Field(
        default="",
        description="The file's path relative to the folder that was indexed (never the absolute path)",
    )
    folder: str | None = Field(
        default=None,
        description='The folder holding the file, relative to the indexed folder ("" at its top)',
    )
    taken_at: str | None = Field(
        default=None,
        description="When the photo was taken, local time, ISO 8601 (EXIF DateTimeOriginal, else the "
        "file's modification time: see taken_source); null until the next index reads it",
    )
    taken_source: str | None = Field(default=None, description="exif, exif-datetime or mtime")
    width: int | None = None
    height: int | None = None
    evidence: list[Region] = Field(
        default_factory=list, description="Evidence regions, best first, in the original image's pixels"
    )
    evidence_total: int | None = Field(
        default=None,
        description="Regions the evidence rule selected (top 4 plus all within 95% of the best); "
        "`evidence` holds the first CLEARSIGHT_EVIDENCE_REGIONS of them (up to 16 in the detail view)",
    )
    caption: str | None = None
    caption_source: str | None = Field(
        default=None, description='"generated:<model>", "dataset", or null when there is no caption'
    )
    dataset_captions: list[str] = Field(default_factory=list)
    explanation: ExplanationOut | None = Field(
        default=None, description="null when explanations were deferred: fetch them with POST /api/explain"
    )
    similar: list[int] = Field(
        default_factory=list,
        description="Ids of near-duplicates of this image folded into its card, best first "
        "(shown as cards of their own with show_all)",
    )


def _describe(schema: dict[str, Any], cls: type) -> None:
    """Fill each property's description from the spec field's own (`retrieval.query` declares it once)."""
    docs = (
        {f.name: f.metadata.get(DOC) for f in dataclasses.fields(cls)}
        if dataclasses.is_dataclass(cls)
        else {}
    )
    for name, prop in schema.get("properties", {}).items():
        if docs.get(name) and "description" not in prop:
            prop["description"] = docs[name]


def spec_config(**config: Any) -> ConfigDict:
    """The pydantic config of a schema built on `QuerySpec`: descriptions come from the spec."""
    return ConfigDict(json_schema_extra=_describe, **config)  # type: ignore[typeddict-item]


@pydantic_dataclass(frozen=True, kw_only=True, config=spec_config())
class QueryEcho(QuerySpec):
    """The query as the server understood it; enough to ask for the next page or for explanations."""

    kind: QueryKind


def echo_of(spec: QuerySpec, kind: QueryKind) -> QueryEcho:
    """The echo of a spec (a `Query` included: only its spec fields are taken)."""
    return QueryEcho(**spec.spec_values(), kind=kind)


def echo_values(echo: QueryEcho) -> dict[str, Any]:
    """The echo as plain JSON-able values (the page embeds it for its explanation requests)."""
    return dataclasses.asdict(echo)


def make_card(
    hit: Hit,
    caption: str | None,
    caption_source: str | None,
    dataset_captions: list[str],
    regions: list[Region],
    echo: QueryEcho | None = None,
    evidence_total: int | None = None,
) -> Card:
    """A hit's card without its explanation; without `echo` its detail link names no query."""
    return Card(
        id=hit.id,
        rank=hit.rank,
        score=hit.score,
        confidence=hit.confidence,
        image_url=image_url(hit.id),
        thumb_url=thumb_url(hit.id),
        detail_url=detail_url(hit.id, echo, hit.rank),
        like_url=like_url(hit.id),
        file_name=hit.file_name,
        relative_path=hit.relative_path,
        folder=hit.folder,
        taken_at=hit.taken_at,
        taken_source=hit.taken_source,
        width=hit.width,
        height=hit.height,
        evidence=regions,
        evidence_total=evidence_total,
        caption=caption,
        caption_source=caption_source,
        dataset_captions=dataset_captions,
        similar=list(hit.similar),
    )


def image_url(image_id: int) -> str:
    return f"/api/images/{image_id}"


def thumb_url(image_id: int, size: int = CARD_THUMB_SIZE) -> str:
    return f"/api/images/{image_id}/thumb?size={size}"


#: Page URL parameter names of the spec's fields, where they are shorter than the field's own name
#: (the names the page has always used); any other spec field is named as it is.
URL_NAMES = {"text": "q", "image_key": "qimg", "like_id": "like", "negative": "neg", "weight": "w"}


def url_name(field: str) -> str:
    return URL_NAMES.get(field, field)


def query_params(q: QueryEcho) -> dict[str, str]:
    """Page query-string parameters that reproduce `q` (the names the page routes read).

    Every spec field that differs from its default is named, so a new filter travels in links by
    itself; the text's share is named only for a text+image query, where it means something.
    """
    out: dict[str, str] = {}
    for f in dataclasses.fields(QuerySpec):
        value = getattr(q, f.name)
        if value is None or value == "" or (f.name == "weight" and q.kind != "text+image"):
            continue
        if f.name != "weight" and value == f.default:
            continue
        out[url_name(f.name)] = f"{value:g}" if isinstance(value, float) else str(value)
    return out


def detail_url(image_id: int, q: QueryEcho | None = None, rank: int | None = None) -> str:
    params = query_params(q) if q is not None else {}
    if q is not None and rank is not None:
        params["r"] = str(rank)
    return f"/images/{image_id}" + (f"?{urlencode(params)}" if params else "")


def like_url(image_id: int) -> str:
    return "/?" + urlencode({"like": str(image_id)})


def evidence_png_url(image_id: int, q: QueryEcho) -> str:
    params = urlencode(query_params(q))
    return f"/api/images/{image_id}/evidence.png" + (f"?{params}" if params else "")


def snap_thumb_size(size: int) -> int:
    """The smallest rendered size at least `size` (the largest when `size` exceeds them all)."""
    return next((s for s in THUMB_SIZES if s >= size), THUMB_SIZES[-1])


def public_model_name(name: str) -> str:
    """A model as clients may see it: a hub id as is, a local directory by its last part only."""
    if name.startswith(("/", "~", "./", "../")) or "\\" in name:
        return PurePath(name).name or "local model"
    return name
