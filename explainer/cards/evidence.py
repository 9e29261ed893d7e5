"""The evidence stage: region evidence for a page of hits, from `retrieval.evidence`, never fatal.

Evidence is an aid, not the answer: when it fails for a page, cards still come, without boxes.
The stage hands on the library's `Evidence` objects (the CLI draws them into PNGs) and cards
take their first regions as the one box type, `retrieval.types.Region`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Protocol

from PIL import Image

from retrieval.evidence import Evidence, EvidenceConfig, evidence_for_hits, render_evidence
from retrieval.search import Hit, Query, Searcher
from retrieval.types import Float32Array, Region

log = logging.getLogger(__name__)


class EvidenceProvider(Protocol):
    """Evidence for a page of hits in one batch; an unreadable image gets None, not an error."""

    name: str
    #: Boxes a card carries (the detail view may ask for more).
    max_regions: int

    def for_hits(
        self, searcher: Searcher, query: Query, hits: Sequence[Hit], query_vec: Float32Array | None = None
    ) -> list[Evidence | None]: ...

    def render(
        self,
        searcher: Searcher,
        query: Query,
        hit: Hit,
        image: Image.Image,
        query_vec: Float32Array | None = None,
    ) -> Image.Image | None:
        """`image` (a view of the hit's image) with the evidence drawn on; None to let the caller draw."""
        ...


class NoEvidence:
    """Used when evidence is turned off or not asked for; `reason` says which."""

    name = "none"
    max_regions = 0

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def for_hits(
        self, searcher: Searcher, query: Query, hits: Sequence[Hit], query_vec: Float32Array | None = None
    ) -> list[Evidence | None]:
        return [None for _ in hits]

    def render(
        self,
        searcher: Searcher,
        query: Query,
        hit: Hit,
        image: Image.Image,
        query_vec: Float32Array | None = None,
    ) -> Image.Image | None:
        return None


class LibraryEvidence:
    """Region evidence from `retrieval.evidence`, at most `max_regions` boxes per card."""

    def __init__(self, config: EvidenceConfig, max_regions: int) -> None:
        self.config = config
        self.max_regions = max_regions
        self.name = f"retrieval.evidence:{config.method}"

    def with_method(self, method: str) -> LibraryEvidence:
        """The same evidence computed another way (grid, dense...), for one request that asks for it."""
        if method == self.config.method:
            return self
        return LibraryEvidence(dataclasses.replace(self.config, method=method), self.max_regions)

    def for_hits(
        self, searcher: Searcher, query: Query, hits: Sequence[Hit], query_vec: Float32Array | None = None
    ) -> list[Evidence | None]:
        if not hits:
            return []
        try:
            found = evidence_for_hits(searcher, query, list(hits), self.config, query_vec=query_vec)
        except Exception as exc:
            log.warning(
                "evidence failed for a page (%s: %s); cards go without boxes", type(exc).__name__, exc
            )
            return [None for _ in hits]
        if len(found) != len(hits):
            log.warning("evidence returned %d results for %d hits; ignored", len(found), len(hits))
            return [None for _ in hits]
        return list(found)

    def render(
        self,
        searcher: Searcher,
        query: Query,
        hit: Hit,
        image: Image.Image,
        query_vec: Float32Array | None = None,
    ) -> Image.Image | None:
        found = self.for_hits(searcher, query, [hit], query_vec)[0]
        if found is None:
            return None
        try:
            return render_evidence(image, found, "both")
        except Exception as exc:
            log.warning("evidence rendering failed (%s: %s)", type(exc).__name__, exc)
            return None


def card_regions(evidence: Evidence | None, limit: int) -> list[Region]:
    """The first `limit` regions of a hit's evidence, scores rounded for display and cache keys."""
    if evidence is None:
        return []
    return [
        Region(r.box, round(float(r.score), 6), rank, r.label or None)
        for rank, r in enumerate(evidence.regions[:limit], start=1)
    ]


def make_evidence_provider(max_regions: int, method: str = "auto") -> EvidenceProvider:
    """The library's evidence, or boxes-free cards when it is turned off (max_regions 0)."""
    if max_regions <= 0:
        return NoEvidence("evidence is turned off (CLEARSIGHT_EVIDENCE_REGIONS=0)")
    return LibraryEvidence(EvidenceConfig(method=method), max_regions)
