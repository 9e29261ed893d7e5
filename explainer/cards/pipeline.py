"""The one card pipeline: hits → evidence → captions → context → explanation → card.

Each stage is a small object given to the pipeline (evidence.py, captions.py, context.py, the
explainer), and this module only wires them, for the server and the CLI alike, so the same query
on the same collection gives the same cards everywhere.

The split into a synchronous part (search, evidence, captions: model work, run on a worker thread)
and an asynchronous part (explanations: network-bound, run concurrently on the event loop) is what
lets the page show cards at once and fill explanations in per card, so a slow LLM never holds a page
back. The contexts built for a page are remembered for a while, so the page's per-card explanation
requests do not search again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from PIL import Image

from explainer.cards.captions import SETTLE_S, CaptionProvider
from explainer.cards.context import build_context
from explainer.cards.evidence import EvidenceProvider, card_regions
from explainer.cards.model import Card, ExplanationOut, QueryEcho, make_card, public_model_name
from explainer.errors import ClearsightError, ModelUnavailable, public_fallback_reason
from explainer.explain.types import ExplainContext, Explanation, Pending
from retrieval.evidence import Evidence
from retrieval.lru import LRU
from retrieval.search import Hit, Query, Searcher, SearchResult
from retrieval.types import Float32Array, Region

if TYPE_CHECKING:
    from explainer.explain.chain import Explainer  # LangChain: imported only where explaining runs

log = logging.getLogger(__name__)

#: Evidence regions shown in the detail view and on its evidence picture.
DETAIL_REGIONS = 16


@dataclass
class ResultPage:
    """One page of cards plus what is needed to page on, and the library's view of the same hits."""

    cards: list[Card]
    query: QueryEcho
    total: int  # vectors in the searched index
    offset: int
    top_k: int
    has_more: bool
    model: str
    #: The hits behind the cards (paths included: for local callers, never sent to web clients).
    hits: list[Hit] = field(default_factory=list)
    #: The library's evidence per card (heatmaps included), for callers that draw it.
    evidence: list[Evidence | None] = field(default_factory=list)
    #: The search result's own facts (query kind, index factory...), for the CLI's JSON.
    result: SearchResult | None = None
    #: True when even the best hit is not confidently a match (retrieval.confidence); None: not calibrated.
    no_confident_match: bool | None = None
    #: True when the search itself came from the searcher's result cache.
    cached: bool = False
    #: Shards of a sharded index that did not answer: the cards are the best of the others.
    missing_shards: list[int] = field(default_factory=list)


def query_token(echo: QueryEcho) -> str:
    """A stable key for "the same query", used to find a page's contexts again."""
    fields = echo.spec_values()
    if fields["text"]:
        fields["text"] = " ".join(fields["text"].split())
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass
class DetailCard:
    """The detail view's card; `ranked`: the query's search returns this image (its rank is real)."""

    card: Card
    ranked: bool


@dataclass
class _Built:
    """What the stages made for one page of hits."""

    cards: list[Card]
    contexts: list[ExplainContext | None]
    evidence: list[Evidence | None]


class CardPipeline:
    """Turns queries into cards; one per server process (shared by every request) or CLI call."""

    def __init__(
        self,
        searcher: Searcher,
        explainer: Explainer | None,
        evidence: EvidenceProvider,
        captions: CaptionProvider,
        *,
        context_cache_size: int = 4096,
        page_cache_size: int = 256,
        public_reasons: bool = False,
    ) -> None:
        """`public_reasons`: explanations served to remote clients carry only the fallback reason's code
        and a fixed sentence; the full reason is logged (the server sets it, the CLI keeps details)."""
        self.searcher = searcher
        self.public_reasons = public_reasons
        self.explainer = explainer
        self.evidence = evidence
        self.captions = captions
        # (query token, image id) -> the context its explanation needs; nobody edits one once built
        self._contexts: LRU[ExplainContext] = LRU(context_cache_size)
        self._pages: LRU[ResultPage] = LRU(page_cache_size, copies=True)
        # Model calls are serialised: the encoder's tokenizer is not safe to share between threads
        # and two cores gain nothing from running two forward passes at once.
        self._model_lock = threading.Lock()

    # -- synchronous part (worker thread) ----------------------------------------------------

    def search(
        self,
        query: Query,
        echo: QueryEcho,
        query_vec: Float32Array | None = None,
        evidence_method: str | None = None,
    ) -> ResultPage:
        """Search and build cards without explanations (`query_vec`: the query already embedded;
        `evidence_method`: grid or dense for this page instead of the configured method)."""
        # The same page again (same query, page, evidence method and index version) is answered from
        # the page cache: no encoder call at all, not even evidence's. Explanations come from their cache.
        page_key = (
            self.searcher.index.version,
            query_token(echo),
            query.offset,
            query.top_k,
            evidence_method,
        )
        if query_vec is None:
            hit = self._pages.get(page_key)
            if hit is not None:
                hit.cached = True
                self._refresh_captions(hit)
                return hit
        page = self._search(query, echo, query_vec, evidence_method)
        if query_vec is None and not page.missing_shards:  # partial pages are never replayed
            self._pages.put(page_key, page)
        return page

    def _search(
        self,
        query: Query,
        echo: QueryEcho,
        query_vec: Float32Array | None,
        evidence_method: str | None,
    ) -> ResultPage:
        with self._model_lock:
            try:
                vec = self.searcher.embed_query(query) if query_vec is None else query_vec
                result = self.searcher.search_vector(vec, query, kind=query.kind)
            except ClearsightError:
                raise
            except Exception as exc:  # a model that fails at run time must not look like a bad request
                log.exception("search failed")
                raise ModelUnavailable(
                    f"the search model failed ({type(exc).__name__}); see the server log"
                ) from exc
            hits = [h for h in result.results if isinstance(h, Hit)]
            built = self._build(query, echo, hits, vec, evidence_method=evidence_method)
        result.results = hits
        model = public_model_name(result.model)
        return ResultPage(
            built.cards,
            echo,
            result.total,
            query.offset,
            query.top_k,
            result.has_more,
            model,
            hits=hits,
            evidence=built.evidence,
            result=result,
            no_confident_match=result.no_confident_match,
            cached=result.cached,
            missing_shards=list(result.missing_shards),
        )

    def search_captions(self, query: Query) -> SearchResult:
        """Image→text (or text→text): caption hits, under the same model lock as every search."""
        with self._model_lock:
            return self.searcher.search_captions(query)

    def contexts(
        self, make_query: Callable[[], Query], echo: QueryEcho, items: Sequence[tuple[int, int]]
    ) -> dict[int, ExplainContext]:
        """Contexts for (image id, rank) pairs: remembered from the page, else rebuilt from the catalog.

        `make_query` resolves the query (decoding its image) and is only called when something
        must be rebuilt; ids that are not indexed images are left out of the answer.
        """
        token = query_token(echo)
        out: dict[int, ExplainContext] = {}
        missing: list[tuple[int, int]] = []
        for image_id, rank in items:
            ctx = self._contexts.get((token, image_id))
            if ctx is not None:
                out[image_id] = ctx
            else:
                missing.append((image_id, rank))
        if missing:
            query = make_query()
            with self._model_lock:
                vec = self.searcher.embed_query(query)
                hits = self.searcher.score_ids(vec, missing, query.kind)
                built = self._build(query, echo, hits, vec)
            out.update((h.id, ctx) for h, ctx in zip(hits, built.contexts, strict=True) if ctx is not None)
        self._settle_captions(token, out)
        return out

    def _refresh_captions(self, page: ResultPage) -> None:
        """A remembered page gets the captions generated since it was built (one catalog read)."""
        todo = [(card, hit) for card, hit in zip(page.cards, page.hits, strict=False) if card.caption is None]
        if not todo:
            return
        token = query_token(page.query)
        for (card, hit), caps in zip(todo, self.captions.lookup([h for _, h in todo]), strict=True):
            if caps.caption is not None:
                card.caption, card.caption_source = caps.caption, caps.source
                card.dataset_captions = caps.dataset
                ctx = self._contexts.get((token, hit.id))
                if ctx is not None and ctx.caption is None:
                    self._contexts.put((token, hit.id), ctx.model_copy(update={"caption": caps.caption}))

    def _settle_captions(self, token: str, contexts: dict[int, ExplainContext]) -> None:
        """Contexts built before their hit's caption existed wait for it (when a captioning worker is
        writing it), so the caption grounds the explanation."""
        settle = getattr(self.captions, "settle", None)  # only the server's scheduled captions settle
        ids = [i for i, ctx in contexts.items() if ctx.caption is None]
        if settle is None or not ids:
            return
        for image_id, caps in settle(ids, SETTLE_S).items():
            if caps.caption is not None:
                ctx = contexts[image_id].model_copy(
                    update={"caption": caps.caption, "dataset_captions": tuple(caps.dataset)}
                )
                contexts[image_id] = ctx
                self._contexts.put((token, image_id), ctx)

    def card_for(
        self,
        image_id: int,
        query: Query | None,
        echo: QueryEcho | None,
        limit: int = DETAIL_REGIONS,
    ) -> DetailCard | None:
        """One image's card for the detail view, with up to `limit` evidence regions; None if not indexed.

        Its rank, score and confidence are the search's own (`Searcher.locate`), never a caller's: an
        image the search does not return is shown with its score against the query but no rank, and
        is not explained (an explanation would speak of a rank it does not have). Without a query
        there is nothing to score or explain: the card carries the image and captions.
        """
        with self._model_lock:
            if query is not None and echo is not None:
                vec = self.searcher.embed_query(query)
                hit = self.searcher.locate(vec, query, image_id)
                if hit is not None:
                    return DetailCard(self._build(query, echo, [hit], vec, limit).cards[0], ranked=True)
                hits = self.searcher.score_ids(
                    vec, [(image_id, 1)], query.kind
                )  # the rank is a placeholder, not shown
                if not hits:
                    return None
                built = self._build(query, echo, hits, vec, limit, remember=False)
                return DetailCard(built.cards[0], ranked=False)
            catalog = self.searcher.collection.catalog
            rec = catalog.get_image(image_id)
            if rec is None or rec.state != "indexed":
                return None
            hit = Hit.from_record(rec, 0.0, 1, relative_path=catalog.relative_path(rec.path))
            caps = self.captions.lookup([hit])[0]
            return DetailCard(make_card(hit, caps.caption, caps.source, caps.dataset, []), ranked=False)

    def evidence_picture(
        self, image_id: int, query: Query, image: Image.Image, limit: int = DETAIL_REGIONS
    ) -> Image.Image | list[Region]:
        """`image` (a view of the indexed image) with its evidence for `query` drawn by the evidence
        library (heatmap included); when that is unavailable, up to `limit` evidence regions for the
        caller to draw (none for an image that is not indexed)."""
        with self._model_lock:
            vec = self.searcher.embed_query(query)
            hits = self.searcher.score_ids(vec, [(image_id, 1)])
            if not hits:
                return []
            picture = self.evidence.render(self.searcher, query, hits[0], image, vec)
            if picture is not None:
                return picture
            return card_regions(self.evidence.for_hits(self.searcher, query, hits, vec)[0], limit)

    def _build(
        self,
        query: Query,
        echo: QueryEcho,
        hits: Sequence[Hit],
        query_vec: Float32Array | None = None,
        limit: int | None = None,
        evidence_method: str | None = None,
        remember: bool = True,
    ) -> _Built:
        """The stages in order: evidence and captions per hit, then contexts, then cards (`remember`:
        keep the contexts for the page's explanation requests; not for a hit the search did not rank)."""
        stage = self.evidence
        switch = getattr(stage, "with_method", None)  # stages without methods (none, fakes) stay as they are
        if evidence_method is not None and switch is not None:
            stage = switch(evidence_method)
        evidence = stage.for_hits(self.searcher, query, hits, query_vec)
        captions = self.captions.lookup(hits)
        token = query_token(echo)
        built = _Built([], [], evidence)
        for hit, ev, caps in zip(hits, evidence, captions, strict=True):
            regions = card_regions(ev, limit or self.evidence.max_regions)
            ctx = build_context(hit, caps, regions, echo)
            if ctx is not None and remember:
                self._contexts.put((token, hit.id), ctx)
            built.contexts.append(ctx)
            total = len(ev.regions) + ev.dropped_by_cap if ev is not None else None
            built.cards.append(make_card(hit, caps.caption, caps.source, caps.dataset, regions, echo, total))
        return built

    # -- explanations ------------------------------------------------------------------------

    def page_contexts(self, page: ResultPage) -> list[tuple[Card, ExplainContext]]:
        token = query_token(page.query)
        pairs = [(c, self._contexts.get((token, c.id))) for c in page.cards]
        return [(c, ctx) for c, ctx in pairs if ctx is not None]

    async def explain(self, contexts: Sequence[ExplainContext]) -> list[ExplanationOut]:
        """Explanations of a page, concurrently; the explainer falls back per card, never raises per card."""
        if self.explainer is None or not contexts:
            return []
        explanations = await self.explainer.aexplain_many(contexts)
        return [self._out(e) for e in explanations]

    async def explain_within(
        self, contexts: Sequence[ExplainContext], wait_s: float
    ) -> list[ExplanationOut | Pending]:
        """Explanations ready within `wait_s`; the rest `Pending` (still running, to be asked again)."""
        if self.explainer is None or not contexts:
            return []
        results = await self.explainer.aexplain_within(contexts, wait_s)
        return [r if isinstance(r, Pending) else self._out(r) for r in results]

    def _out(self, explanation: Explanation) -> ExplanationOut:
        out = ExplanationOut.from_explanation(explanation)
        if self.public_reasons and out.fallback_reason is not None:
            log.warning("explanation fell back to %s: %s", out.backend, out.fallback_reason)
            out.fallback_reason = public_fallback_reason(out.fallback_reason)
        return out

    async def explain_cards(self, page: ResultPage) -> None:
        """Fill every card's explanation in place (the API's inline mode)."""
        ready = self.page_contexts(page)
        outs = await self.explain([ctx for _, ctx in ready])
        for (card, _), out in zip(ready, outs, strict=True):
            card.explanation = out

    def explain_cards_sync(self, page: ResultPage) -> None:
        """The same as `explain_cards`, from plain code (the CLI, a notebook)."""
        if self.explainer is None:
            return
        ready = self.page_contexts(page)
        outs = self.explainer.explain_many([ctx for _, ctx in ready])
        for (card, _), out in zip(ready, outs, strict=True):
            card.explanation = self._out(out)

    # -- lifecycle ---------------------------------------------------------------------------

    def reload(self) -> bool:
        """Swap in a newer index version written by a running `clearsight index`; True if it changed."""
        changed = self.searcher.reload()
        if changed:
            self._pages.clear()  # keyed by version anyway; this frees the old pages at once
        return changed
