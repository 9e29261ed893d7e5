"""Where a card's caption and evidence come from, behind small interfaces the pipeline is given.

Both must answer at query time on a CPU, so neither runs a heavy model per request: captions come
from what `clearsight caption` cached in the catalog (BLIP never runs in a request), and region
evidence comes from `retrieval.evidence`, whose default method needs one forward pass per hit.
Evidence is an aid, not the answer: when it fails, cards still come, without boxes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from PIL import Image

from explainer.captions.captioner import SOURCE_PREFIX
from explainer.cards.model import EvidenceBox
from retrieval.search import Hit, Query, Searcher
from retrieval.types import Float32Array

log = logging.getLogger(__name__)

#: Catalog caption sources written by `clearsight caption` start with this.


@dataclass(frozen=True)
class CardCaptions:
    caption: str | None
    source: str | None  # "generated:<model>", "dataset" or None
    dataset: list[str]


class CaptionProvider(Protocol):
    """Captions for a page of hits, from caches only."""

    def lookup(self, hits: Sequence[Hit]) -> list[CardCaptions]: ...


class CatalogCaptions:
    """A generated caption when `clearsight caption` has written one, else the dataset's first caption.

    `clearsight caption` attaches each generated caption to its images under the source
    "generated:<model>", so one catalog read per page answers both kinds.
    """

    def __init__(self, searcher: Searcher) -> None:
        self._searcher = searcher

    def lookup(self, hits: Sequence[Hit]) -> list[CardCaptions]:
        records = self._searcher.collection.catalog.captions_for([h.id for h in hits])
        out: list[CardCaptions] = []
        for hit in hits:
            caps = records.get(hit.id, [])
            generated = [c for c in caps if c.source.startswith(SOURCE_PREFIX)]
            dataset = [c.text for c in caps if not c.source.startswith(SOURCE_PREFIX)]
            if generated:
                out.append(CardCaptions(generated[0].text, generated[0].source, dataset))
            elif dataset:
                out.append(CardCaptions(dataset[0], "dataset", dataset))
            else:
                out.append(CardCaptions(None, None, []))
        return out


class EvidenceProvider(Protocol):
    """Evidence boxes for a page of hits in one batch; an unreadable image gets no boxes, not an error."""

    name: str

    def for_hits(
        self,
        searcher: Searcher,
        query: Query,
        hits: Sequence[Hit],
        limit: int | None = None,
        query_vec: Float32Array | None = None,
    ) -> list[list[EvidenceBox]]: ...

    def render(
        self,
        searcher: Searcher,
        query: Query,
        hit: Hit,
        image: Image.Image,
        query_vec: Float32Array | None = None,
    ) -> Image.Image | None:
        """`image` (a view of the hit's image) with the evidence drawn on; None to let the caller draw.

        `query_vec` is the query's embedding when the caller has it (saves embedding it again)."""
        ...


class NoEvidence:
    """Used when evidence is turned off or its module cannot be loaded; `reason` says which."""

    name = "none"

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def for_hits(
        self,
        searcher: Searcher,
        query: Query,
        hits: Sequence[Hit],
        limit: int | None = None,
        query_vec: Float32Array | None = None,
    ) -> list[list[EvidenceBox]]:
        return [[] for _ in hits]

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

    def __init__(self, module: Any, config: Any, max_regions: int) -> None:
        self._module = module
        self._config = config
        self.max_regions = max_regions
        self.name = f"retrieval.evidence:{getattr(config, 'method', 'auto')}"

    def _evidence(
        self, searcher: Searcher, query: Query, hits: Sequence[Hit], query_vec: Float32Array | None
    ) -> list[Any] | None:
        try:
            found = list(
                self._module.explain_hits(searcher, query, list(hits), self._config, query_vec=query_vec)
            )
        except Exception as exc:
            log.warning(
                "evidence failed for a page (%s: %s); cards go without boxes", type(exc).__name__, exc
            )
            return None
        if len(found) != len(hits):
            log.warning("evidence returned %d results for %d hits; ignored", len(found), len(hits))
            return None
        return found

    def for_hits(
        self,
        searcher: Searcher,
        query: Query,
        hits: Sequence[Hit],
        limit: int | None = None,
        query_vec: Float32Array | None = None,
    ) -> list[list[EvidenceBox]]:
        """`limit` overrides `max_regions` (the detail view shows every region)."""
        found = self._evidence(searcher, query, hits, query_vec) if hits else []
        if found is None:
            return [[] for _ in hits]
        return [_boxes(ev, limit or self.max_regions) for ev in found]

    def render(
        self,
        searcher: Searcher,
        query: Query,
        hit: Hit,
        image: Image.Image,
        query_vec: Float32Array | None = None,
    ) -> Image.Image | None:
        found = self._evidence(searcher, query, [hit], query_vec)
        if not found:
            return None
        try:
            rendered: Image.Image = self._module.render_evidence(image, found[0], "both")
        except Exception as exc:
            log.warning("evidence rendering failed (%s: %s)", type(exc).__name__, exc)
            return None
        return rendered


def _boxes(evidence: Any, limit: int) -> list[EvidenceBox]:
    out: list[EvidenceBox] = []
    for region in list(getattr(evidence, "regions", ()))[:limit]:
        x0, y0, x1, y1 = (int(v) for v in region.box)
        if x1 > x0 >= 0 and y1 > y0 >= 0:
            out.append(
                EvidenceBox(
                    box=(x0, y0, x1, y1),
                    score=round(float(region.score), 6),
                    rank=len(out) + 1,
                    label=getattr(region, "label", None) or None,
                )
            )
    return out


def make_evidence_provider(max_regions: int) -> EvidenceProvider:
    """The library's evidence when it is installed and enabled, else boxes-free cards with a reason."""
    if max_regions <= 0:
        return NoEvidence("evidence is turned off (CLEARSIGHT_EVIDENCE_REGIONS=0)")
    try:
        from retrieval import evidence as module

        config = module.EvidenceConfig()
    except (ImportError, AttributeError) as exc:
        log.warning("region evidence unavailable: %s", exc)
        return NoEvidence(f"region evidence is unavailable ({exc})")
    return LibraryEvidence(module, config, max_regions)
