"""The context stage: what the explainer may know about one hit, built from the hit, its captions
and its evidence before any card exists (so the explanation never depends on presentation)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from explainer.cards.captions import CardCaptions
from explainer.cards.model import QueryEcho, echo_of
from explainer.explain.types import ExplainContext, QueryKind
from retrieval.search import Hit, Query
from retrieval.types import Region


def query_echo(query: Query) -> QueryEcho:
    """The echo of a library `Query` (what the CLI and notebooks search with), for contexts and cache keys."""
    return echo_of(query, cast(QueryKind, query.kind))  # Query.kind is always one of QueryKind's values


def build_context(
    hit: Hit, captions: CardCaptions, regions: Sequence[Region], echo: QueryEcho
) -> ExplainContext | None:
    """The explainer's inputs for one hit; None for an image without a content hash (nothing to key on)."""
    if not hit.content_hash:
        return None
    return ExplainContext(
        query_text=echo.text if echo.text and echo.text.strip() else None,
        query_kind=echo.kind,
        query_image_key=echo.image_key or (f"like:{echo.like_id}" if echo.like_id is not None else None),
        caption=captions.caption,
        dataset_captions=captions.dataset,
        evidence=list(regions),
        image_size=(hit.width or 1, hit.height or 1),
        score=hit.score,
        match_confidence=hit.confidence,
        rank=hit.rank,
        image_key=hit.content_hash,
    )
