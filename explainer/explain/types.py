"""Types that cross the explainer's boundary: what goes in (a hit's context), what the model must
return (structured output) and what a card carries (an explanation, with who wrote it and why).

They are pydantic models so that the LLM's JSON is validated on the way in and the card's JSON
is produced on the way out by the same definitions; inputs are frozen because they are shared
between concurrent calls and used to build cache keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from retrieval.types import Region

QueryKind = Literal["text", "image", "text+image"]


class ExplainContext(BaseModel):
    """Everything the explainer may know about one hit; nothing else reaches the prompt."""

    model_config = ConfigDict(frozen=True)

    query_text: str | None = None
    query_kind: QueryKind = "text"
    #: Content hash of the query image, when the query has one (part of the cache key).
    query_image_key: str | None = None
    caption: str | None = None
    #: Sequences so callers may pass lists; stored as tuples, so a context cannot change once built.
    dataset_captions: Sequence[str] = ()
    evidence: Sequence[Region] = ()
    image_size: tuple[int, int]
    score: float
    #: The hit's confidence calibrated on its collection (retrieval.confidence), when known.
    match_confidence: float | None = Field(default=None, ge=0.0, le=1.0)
    rank: int = Field(ge=1)
    #: Content hash of the hit's image (part of the cache key).
    image_key: str = Field(min_length=1)

    @field_validator("dataset_captions", "evidence", mode="after")
    @classmethod
    def _as_tuple(cls, value: Sequence[object]) -> tuple[object, ...]:
        return tuple(value)

    @field_validator("image_size")
    @classmethod
    def _positive_size(cls, size: tuple[int, int]) -> tuple[int, int]:
        if size[0] <= 0 or size[1] <= 0:
            raise ValueError(f"image_size must be positive (w, h), got {size}")
        return size

    @model_validator(mode="after")
    def _text_when_kind_says_so(self) -> ExplainContext:
        has_text = bool(self.query_text and self.query_text.strip())
        if self.query_kind in ("text", "text+image") and not has_text:
            raise ValueError(f"query_kind {self.query_kind!r} needs a non-empty query_text")
        return self


#: Bounds of the structured answer, in the schema the model is given and checked on the way in, so a
#: runaway reply is refused rather than shown (and a page call's completion ceiling can be sized).
MAX_EXPLANATION_CHARS = 320
MAX_CONCEPTS = 6
MAX_CONCEPT_CHARS = 48

Concept = Annotated[str, Field(min_length=1, max_length=MAX_CONCEPT_CHARS)]


class ExplanationOutput(BaseModel):
    """The structured answer the prompt asks the model for (parsed from its JSON reply).

    Every field is required: a reply that leaves out its matched concepts says nothing checkable.
    """

    model_config = ConfigDict(extra="ignore")

    explanation: str = Field(
        min_length=1,
        max_length=MAX_EXPLANATION_CHARS,
        description="Two or three sentences on why the image fits.",
    )
    matched_concepts: list[Concept] = Field(
        max_length=MAX_CONCEPTS, description="Query concepts the caption or evidence supports."
    )
    mismatches: list[Concept] = Field(
        max_length=MAX_CONCEPTS, description="Query concepts that nothing in the inputs supports."
    )
    confidence: float = Field(ge=0.0, le=1.0, description="How well the image answers the query, 0..1.")


class Explanation(BaseModel):
    """What a card carries: the text plus provenance, so the user can tell who wrote it and why."""

    text: str
    #: Who wrote the text: "groq:<model>", "fake", "local:<file>" or "offline".
    backend: str
    matched_concepts: list[str] = Field(default_factory=list)
    mismatches: list[str] = Field(default_factory=list)
    #: Claimed matches that the hit's caption, dataset captions and regions do not say (grounding.py).
    unsupported_concepts: list[str] = Field(default_factory=list)
    confidence: float = Field(ge=0.0, le=1.0)
    #: The prompt (or offline template) that produced the text, as "name@vN".
    prompt: str
    #: Why an LLM explanation was replaced by the offline one; None when nothing failed.
    fallback_reason: str | None = None
    cached: bool = False
    latency_ms: float = 0.0


@dataclass(frozen=True)
class Pending:
    """A hit whose explanation is still being written; `queued_s` is the rate-budget wait, if any.

    Here rather than beside the chain, so code that only passes results along (the card pipeline, a
    search without --explain) does not import LangChain.
    """

    queued_s: float | None
