"""From a query to result cards: search, evidence, captions, then (now or later) explanations.

The split into a synchronous part (search, evidence, cached captions: model work, run on a worker
thread) and an asynchronous part (explanations: network-bound, run concurrently on the event
loop) is what lets the page show cards at once and fill explanations in per card, so a slow LLM
never holds a page back. The contexts built for a page are remembered for a while, so the page's
per-card explanation requests do not search again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
from PIL import Image

from explainer.cards.model import (
    Card,
    EvidenceBox,
    ExplanationOut,
    QueryEcho,
    detail_url,
    image_url,
    like_url,
    public_model_name,
    thumb_url,
)
from explainer.cards.sources import CaptionProvider, CardCaptions, EvidenceProvider
from explainer.errors import ClearsightError, ModelUnavailable
from explainer.explain.chain import Explainer
from explainer.explain.types import ExplainContext, QueryKind, RegionEvidence
from retrieval.search import Hit, Query, Searcher
from retrieval.types import Float32Array

log = logging.getLogger(__name__)

#: Evidence regions shown in the detail view and on its evidence picture.
DETAIL_REGIONS = 16


@dataclass
class ResultPage:
    """One page of cards plus what is needed to page on."""

    cards: list[Card]
    query: QueryEcho
    total: int  # vectors in the searched index
    offset: int
    top_k: int
    has_more: bool
    model: str


def query_token(echo: QueryEcho) -> str:
    """A stable key for "the same query", used to find a page's contexts again."""
    fields = echo.model_dump(include={"text", "image_key", "like_id", "weight", "negative"})
    if fields["text"]:
        fields["text"] = " ".join(fields["text"].split())
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class _ContextCache:
    """A bounded LRU of (query token, image id) -> ExplainContext."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._data: OrderedDict[tuple[str, int], ExplainContext] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> ExplainContext | None:
        with self._lock:
            ctx = self._data.get(key)
            if ctx is not None:
                self._data.move_to_end(key)
            return ctx

    def put(self, key: tuple[str, int], ctx: ExplainContext) -> None:
        with self._lock:
            self._data[key] = ctx
            self._data.move_to_end(key)
            while len(self._data) > self._size:
                self._data.popitem(last=False)


class CardPipeline:
    """Turns queries into cards; one per server process, shared by every request."""

    def __init__(
        self,
        searcher: Searcher,
        explainer: Explainer | None,
        evidence: EvidenceProvider,
        captions: CaptionProvider,
        *,
        context_cache_size: int = 4096,
    ) -> None:
        self.searcher = searcher
        self.explainer = explainer
        self.evidence = evidence
        self.captions = captions
        self._contexts = _ContextCache(context_cache_size)
        # Model calls are serialised: the encoder's tokenizer is not safe to share between threads
        # and two cores gain nothing from running two forward passes at once.
        self._model_lock = threading.Lock()

    # -- synchronous part (worker thread) ----------------------------------------------------

    def search(self, query: Query, echo: QueryEcho) -> ResultPage:
        """Search and build cards without explanations."""
        probe = dataclasses.replace(query, top_k=query.top_k + 1)  # one extra says if a next page exists
        with self._model_lock:
            try:
                vec = self.searcher.embed_query(probe)
                result = self.searcher.search_vector(vec, probe, kind=probe.kind)
            except ClearsightError:
                raise
            except Exception as exc:  # a model that fails at run time must not look like a bad request
                log.exception("search failed")
                raise ModelUnavailable(
                    f"the search model failed ({type(exc).__name__}); see the server log"
                ) from exc
            hits = [h for h in result.results if isinstance(h, Hit)]
            has_more = len(hits) > query.top_k
            hits = hits[: query.top_k]
            cards = [card for card, _ in self._cards_with_contexts(query, echo, hits, query_vec=vec)]
        model = public_model_name(result.model)
        return ResultPage(cards, echo, result.total, query.offset, query.top_k, has_more, model)

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
                hits, vec = self._rebuild_hits(query, missing)
                pairs = self._cards_with_contexts(query, echo, hits, query_vec=vec)
            out.update((card.id, ctx) for card, ctx in pairs if ctx is not None)
        return out

    def card_for(
        self,
        image_id: int,
        query: Query | None,
        echo: QueryEcho | None,
        rank: int = 1,
        limit: int = DETAIL_REGIONS,
    ) -> Card | None:
        """One image's card for the detail view, with up to `limit` evidence regions; None if not indexed.

        Without a query there is nothing to score or explain: the card carries the image and captions.
        """
        with self._model_lock:
            if query is not None and echo is not None:
                hits, vec = self._rebuild_hits(query, [(image_id, rank)])
                return self._cards_with_contexts(query, echo, hits, limit, vec)[0][0] if hits else None
            rec = self.searcher.collection.catalog.get_image(image_id)
            if rec is None or rec.state != "indexed":
                return None
            hit = Hit(rec.id, rec.path, 0.0, rank, rec.width, rec.height, rec.content_hash)
            return _card(hit, self.captions.lookup([hit])[0])

    def cards_for_hits(
        self,
        query: Query,
        echo: QueryEcho,
        hits: Sequence[Hit],
        query_vec: Float32Array | None = None,
    ) -> list[tuple[Card, ExplainContext | None]]:
        """Cards (without explanations) and their explainer contexts, for hits searched elsewhere.

        The CLI and notebooks search with the `Searcher` themselves; this gives their hits the very
        evidence, captions and explainer inputs a page's cards get. A context is None for an image
        without a content hash (nothing to key an explanation on).
        """
        with self._model_lock:
            return self._cards_with_contexts(query, echo, hits, query_vec=query_vec)

    def evidence_picture(
        self, image_id: int, query: Query, image: Image.Image, limit: int = DETAIL_REGIONS
    ) -> Image.Image | list[EvidenceBox]:
        """`image` (a view of the indexed image) with its evidence for `query` drawn by the evidence
        library (heatmap included); when that is unavailable, up to `limit` evidence boxes for the
        caller to draw (none for an image that is not indexed)."""
        with self._model_lock:
            hits, vec = self._rebuild_hits(query, [(image_id, 1)])
            if not hits:
                return []
            picture = self.evidence.render(self.searcher, query, hits[0], image, vec)
            if picture is not None:
                return picture
            return self.evidence.for_hits(self.searcher, query, hits, limit, vec)[0]

    def _rebuild_hits(self, query: Query, items: Sequence[tuple[int, int]]) -> tuple[list[Hit], Float32Array]:
        """Hits for (image id, rank) pairs, scored against `query` from stored embeddings, and the
        query's vector (for the evidence, so the query is embedded once)."""
        catalog = self.searcher.collection.catalog
        records = catalog.get_images([i for i, _ in items])
        vec = self.searcher.embed_query(query)
        hashes = [r.content_hash for r in records.values() if r.content_hash]
        stored = catalog.get_embeddings(hashes, self.searcher.encoder.info.fingerprint)
        hits: list[Hit] = []
        for image_id, rank in items:
            rec = records.get(image_id)
            if rec is None or rec.state != "indexed" or rec.content_hash not in stored:
                continue
            score = float(np.dot(stored[rec.content_hash], vec[0]))
            hits.append(Hit(rec.id, rec.path, round(score, 6), rank, rec.width, rec.height, rec.content_hash))
        return hits, vec

    def _cards_with_contexts(
        self,
        query: Query,
        echo: QueryEcho,
        hits: Sequence[Hit],
        limit: int | None = None,
        query_vec: Float32Array | None = None,
    ) -> list[tuple[Card, ExplainContext | None]]:
        boxes = self.evidence.for_hits(self.searcher, query, hits, limit, query_vec)
        captions = self.captions.lookup(hits)
        token = query_token(echo)
        out: list[tuple[Card, ExplainContext | None]] = []
        for hit, ev, caps in zip(hits, boxes, captions, strict=True):
            card = _card(hit, caps, echo, ev)
            ctx = _context(card, hit, echo)
            if ctx is not None:
                self._contexts.put((token, hit.id), ctx)
            out.append((card, ctx))
        return out

    # -- asynchronous part (event loop) ------------------------------------------------------

    async def explain(self, contexts: Sequence[ExplainContext]) -> list[ExplanationOut]:
        """Explanations of a page, concurrently; the explainer falls back per card, never raises per card."""
        if self.explainer is None or not contexts:
            return []
        explanations = await self.explainer.aexplain_many(contexts)
        return [ExplanationOut.from_explanation(e) for e in explanations]

    async def explain_cards(self, page: ResultPage) -> None:
        """Fill every card's explanation in place (the API's inline mode)."""
        token = query_token(page.query)
        pairs = [(c, self._contexts.get((token, c.id))) for c in page.cards]
        ready = [(c, ctx) for c, ctx in pairs if ctx is not None]
        outs = await self.explain([ctx for _, ctx in ready])
        for (card, _), out in zip(ready, outs, strict=True):
            card.explanation = out

    # -- lifecycle ---------------------------------------------------------------------------

    def reload(self) -> bool:
        """Swap in a newer index version written by a running `clearsight index`; True if it changed."""
        return self.searcher.reload()


def query_echo(query: Query) -> QueryEcho:
    """The echo of a library `Query` (what the CLI and notebooks search with), for contexts and cache keys."""
    return QueryEcho(
        text=query.text,
        kind=cast(QueryKind, query.kind),  # Query.kind is always one of QueryKind's values
        image_key=query.image_key,
        weight=query.weight,
        negative=query.negative,
        min_score=query.min_score,
    )


def _card(
    hit: Hit, caps: CardCaptions, echo: QueryEcho | None = None, evidence: list[EvidenceBox] | None = None
) -> Card:
    """A hit's card without its explanation; without `echo` its detail link names no query."""
    return Card(
        id=hit.id,
        rank=hit.rank,
        score=hit.score,
        image_url=image_url(hit.id),
        thumb_url=thumb_url(hit.id),
        detail_url=detail_url(hit.id, echo, hit.rank),
        like_url=like_url(hit.id),
        width=hit.width,
        height=hit.height,
        evidence=evidence or [],
        caption=caps.caption,
        caption_source=caps.source,
        dataset_captions=caps.dataset,
    )


def _context(card: Card, hit: Hit, echo: QueryEcho) -> ExplainContext | None:
    """The explainer's view of a card; None for an image without a content hash (nothing to key on)."""
    if not hit.content_hash:
        return None
    size = (card.width or 1, card.height or 1)
    return ExplainContext(
        query_text=echo.text if echo.text and echo.text.strip() else None,
        query_kind=echo.kind,
        query_image_key=echo.image_key or (f"like:{echo.like_id}" if echo.like_id is not None else None),
        caption=card.caption,
        dataset_captions=card.dataset_captions,
        evidence=[RegionEvidence(box=b.box, score=b.score, rank=b.rank) for b in card.evidence],
        image_size=size,
        score=card.score,
        rank=card.rank,
        image_key=hit.content_hash,
    )
