"""`clearsight search --explain / --caption`: the cards' caption and explanation, added to CLI hits.

The CLI searches with the `Searcher` itself (its JSON is the library's), then hands the hits to the
same `CardPipeline` the server uses, so a hit gets the very evidence, caption and explainer inputs
its card would get, and explanations share the server's cache (`<data dir>/explanations.sqlite`).

Unlike the server, `--caption` may run BLIP: a CLI user asked for captions and can wait for a
few images; what it writes is cached in the catalog exactly as `clearsight caption` would. When
BLIP's weights are missing the search still answers, with cached or dataset captions (what the
server always shows), after one line saying why.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from explainer.captions.captioner import Captioner, CaptionerConfig, CaptionService, create_captioner
from explainer.cards.model import EvidenceBox
from explainer.cards.pipeline import CardPipeline, query_echo
from explainer.cards.sources import (
    CaptionProvider,
    CardCaptions,
    CatalogCaptions,
    EvidenceProvider,
    NoEvidence,
    make_evidence_provider,
)
from explainer.errors import BadQuery, ModelUnavailable
from explainer.explain.cache import SQLiteExplanationCache, open_explanation_cache
from explainer.explain.chain import Explainer
from explainer.explain.factory import explainer_from_settings
from explainer.settings import Settings
from retrieval.search import Hit, Query, Searcher, SearchResult
from retrieval.types import Float32Array

Warn = Callable[[str], None]


class GeneratingCaptions:
    """Captions for hits, generating the missing ones with a captioner through the catalog cache."""

    def __init__(self, searcher: Searcher, service: CaptionService, warn: Warn) -> None:
        self._searcher = searcher
        self._service = service
        self._warn = warn

    def lookup(self, hits: Sequence[Hit]) -> list[CardCaptions]:
        records = self._searcher.collection.catalog.get_images([h.id for h in hits])
        report = self._service.caption_records(list(records.values()), progress=sys.stderr.isatty())
        if report.failed:
            reasons = ", ".join(f"{n} x {r}" for r, n in sorted(report.failures.items()))
            self._warn(f"{report.failed} images could not be captioned ({reasons})")
        stored = CatalogCaptions(self._searcher).lookup(hits)  # generated ones are attached by now
        out: list[CardCaptions] = []
        for hit, caps in zip(hits, stored, strict=True):
            text = report.captions.get(hit.content_hash) if hit.content_hash else None
            out.append(CardCaptions(text, self._service.source, caps.dataset) if text else caps)
        return out


class PayloadEvidence:
    """Evidence `--evidence` already put into the JSON rows, so the explainer needs no second pass."""

    name = "payload"

    def __init__(self, rows: Sequence[dict[str, Any]], max_regions: int) -> None:
        self._boxes: dict[int, list[EvidenceBox]] = {}
        for row in rows:
            boxes = [EvidenceBox.model_validate(r) for r in row.get("evidence") or []]
            self._boxes[int(row["id"])] = boxes[:max_regions]

    def for_hits(
        self,
        searcher: Searcher,
        query: Query,
        hits: Sequence[Hit],
        limit: int | None = None,
        query_vec: Float32Array | None = None,
    ) -> list[list[EvidenceBox]]:
        return [self._boxes.get(h.id, []) for h in hits]

    def render(
        self,
        searcher: Searcher,
        query: Query,
        hit: Hit,
        image: Image.Image,
        query_vec: Float32Array | None = None,
    ) -> Image.Image | None:
        return None


def _captions(
    searcher: Searcher, settings: Settings, device: str | None, warn: Warn
) -> tuple[CaptionProvider, Captioner | None]:
    """(provider, captioner to close): generating with BLIP, or the catalog's when BLIP is unavailable."""
    config = CaptionerConfig.from_settings(settings, device=device)
    try:
        captioner = create_captioner(config)
    except ModelUnavailable as exc:
        warn(f"captioner unavailable, showing cached or dataset captions instead: {exc}")
        return CatalogCaptions(searcher), None
    service = CaptionService(
        searcher.collection, captioner, batch_size=config.batch_size, prefix=settings.caption_prefix
    )
    return GeneratingCaptions(searcher, service, warn), captioner


def _evidence(payload: dict[str, Any], explain: bool, settings: Settings) -> EvidenceProvider:
    if not explain:
        return NoEvidence("captions only: no evidence needed")
    rows = payload["results"]
    if rows and all("evidence" in r for r in rows):
        return PayloadEvidence(rows, settings.evidence_regions)
    return make_evidence_provider(settings.evidence_regions)


def describe_results(
    searcher: Searcher,
    query: Query,
    result: SearchResult,
    payload: dict[str, Any],
    settings: Settings,
    *,
    explain: bool,
    caption: bool,
    backend: str | None = None,
    device: str | None = None,
    query_vec: Float32Array | None = None,
    warn: Warn,
) -> None:
    """Add `caption`, `caption_source` and (with `explain`) `explanation` to every row of `payload`."""
    if result.target != "images":
        raise BadQuery(
            "--explain and --caption describe image results; they cannot be combined with --captions"
        )
    hits = [h for h in result.results if isinstance(h, Hit)]
    captions: CaptionProvider = CatalogCaptions(searcher)
    captioner: Captioner | None = None
    cache: SQLiteExplanationCache | None = None
    explainer: Explainer | None = None
    try:
        if caption:
            captions, captioner = _captions(searcher, settings, device, warn)
        if explain:
            cache = open_explanation_cache(searcher.collection.data_dir, warn)
            explainer = explainer_from_settings(settings, backend, cache, warn=warn)
        pipeline = CardPipeline(searcher, explainer, _evidence(payload, explain, settings), captions)
        pairs = pipeline.cards_for_hits(query, query_echo(query), hits, query_vec=query_vec)
        explained: dict[int, dict[str, Any]] = {}
        if explainer is not None:
            ready = [(card.id, ctx) for card, ctx in pairs if ctx is not None]
            outs = explainer.explain_many([ctx for _, ctx in ready])
            explained = {i: e.model_dump(mode="json") for (i, _), e in zip(ready, outs, strict=True)}
            payload["explainer"] = {"backend": explainer.label, "prompt": explainer.prompt_id}
        for row, (card, _) in zip(payload["results"], pairs, strict=True):
            row["caption"] = card.caption
            row["caption_source"] = card.caption_source
            if explain:
                row["explanation"] = explained.get(card.id)
    finally:
        if explainer is not None:
            explainer.close()
        if cache is not None:
            cache.close()
        if captioner is not None:
            captioner.close()


def detail_lines(row: dict[str, Any], width: int, indent: int = 6) -> list[str]:
    """The caption and explanation of one table row, wrapped under it."""
    pad = " " * indent
    lines: list[str] = []
    if row.get("caption"):
        source = f" ({row['caption_source']})" if row.get("caption_source") else ""
        lines += textwrap.wrap(
            f"caption: {row['caption']}{source}", width, initial_indent=pad, subsequent_indent=pad + "  "
        )
    explanation = row.get("explanation")
    if explanation:
        text = f"why: {explanation['text']} [{explanation['backend']}]"
        lines += textwrap.wrap(text, width, initial_indent=pad, subsequent_indent=pad + "  ")
    return lines
