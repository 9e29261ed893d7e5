"""What the routes share (one `ServerState` per app) and how a route gets it.

The state opens the collection lazily and keeps retrying while it cannot, so a server started
before `clearsight index` finishes comes up by itself; routes take it as a dependency (`State`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import anyio
from fastapi import Depends, Request
from fastapi.templating import Jinja2Templates

from explainer.cards.captions import CatalogCaptions
from explainer.cards.evidence import EvidenceProvider, make_evidence_provider
from explainer.cards.model import QueryEcho
from explainer.cards.pipeline import CardPipeline, ResultPage
from explainer.errors import ClearsightError, IndexError_, ModelUnavailable, server_message
from explainer.explain.backends import LLMConfig
from explainer.explain.cache import SQLiteExplanationCache, open_explanation_cache
from explainer.explain.chain import Explainer
from explainer.explain.factory import explainer_from_settings
from explainer.server.queries import QueryImages, QueryInput, resolve
from explainer.settings import Settings
from retrieval.search import Query, Searcher, SearchResult

log = logging.getLogger(__name__)

#: How often a degraded server tries to open its collection again.
RETRY_OPEN_S = 5.0


@dataclass
class ServerState:
    """Everything the routes share; one per app."""

    settings: Settings
    templates: Jinja2Templates
    query_images: QueryImages
    injected_searcher: Searcher | None = None
    injected_explainer: Explainer | None = None
    injected_evidence: EvidenceProvider | None = None
    pipeline: CardPipeline | None = None
    problem: str | None = None
    _problem_type: type[ClearsightError] = ModelUnavailable
    _last_try: float | None = None
    _cache: SQLiteExplanationCache | None = None
    _open_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def data_dir(self) -> Path:
        return Path(self.settings.data_dir).expanduser()

    def page_status(self) -> dict[str, object]:
        """What the page header shows of the server's state: ready (with counts) or the problem.

        Every page, error pages included, shows the same real state: a 404 for an unknown image on a
        ready server must not claim the server is "not ready".
        """
        from retrieval.paths import is_demo_model

        pipeline = self.pipeline
        status: dict[str, object] = {"ready": pipeline is not None, "problem": self.problem}
        if pipeline is not None:
            status["images"] = pipeline.searcher.index.images.ntotal
            status["explainer"] = pipeline.explainer.label if pipeline.explainer is not None else None
            status["demo"] = is_demo_model(pipeline.searcher.index.manifest.model_id)
        return status

    def public(self, message: str) -> str:
        """Server paths stay on the server: the data directory is named, not shown."""
        return message.replace(str(self.data_dir), "the data directory")

    def open(self) -> None:
        """Load the searcher, evidence and explainer (blocking; run in a worker thread)."""
        with self._open_lock:
            if self.pipeline is not None:
                return
            self._last_try = time.monotonic()
            try:
                searcher = self.injected_searcher or self._open_searcher()
            except ClearsightError as exc:
                self.problem = self.public(server_message(exc))
                self._problem_type = (
                    type(exc) if isinstance(exc, ModelUnavailable | IndexError_) else ModelUnavailable
                )
                log.warning("not ready: %s", self.problem)
                return
            except Exception as exc:  # weights that fail to load: the server still answers, degraded
                self.problem = f"the search model could not be loaded ({type(exc).__name__})"
                self._problem_type = ModelUnavailable
                log.exception("search model failed to load")
                return
            evidence = self.injected_evidence or make_evidence_provider(self.settings.evidence_regions)
            explainer = self.injected_explainer or self._explainer()
            self.pipeline = CardPipeline(
                searcher, explainer, evidence, CatalogCaptions(searcher), public_reasons=True
            )
            self.problem = None

    def _open_searcher(self) -> Searcher:
        searcher = Searcher.open(self.data_dir)
        if self.settings.engine != "ray":
            return searcher
        from retrieval.distributed.ingest import RayConfig, connect
        from retrieval.distributed.sharded import ShardedSearcher

        try:
            connect(RayConfig(address=self.settings.ray_address))
            return ShardedSearcher(searcher, self.settings.shards)
        except BaseException:
            searcher.close()
            raise

    def _explainer(self) -> Explainer:
        def warn(message: str) -> None:
            log.warning(self.public(message))

        cache = self._cache = open_explanation_cache(self.data_dir, warn)
        try:
            return explainer_from_settings(self.settings, cache=cache, warn=warn)
        except ClearsightError as exc:  # an unknown backend name: say so, and still explain
            log.warning("%s; explaining offline", self.public(str(exc)))
            return Explainer.from_config(LLMConfig(backend="offline"), cache=cache, environ={})

    async def ready(self) -> CardPipeline:
        """The pipeline, or a 503 saying why not (retrying the open now and then)."""
        if self.pipeline is None and self.retry_due():
            await anyio.to_thread.run_sync(self.open)
        if self.pipeline is None:
            raise self._problem_type(self.problem or "the search index is not loaded yet")
        return self.pipeline

    def resolve(self, inp: QueryInput, searcher: Searcher) -> tuple[Query, QueryEcho]:
        """The library query and its echo, under this server's upload store and pixel limit."""
        s = self.settings
        return resolve(inp, searcher, self.query_images, s.max_upload_pixels, s.max_image_pixels)

    def search(
        self, pipeline: CardPipeline, inp: QueryInput, evidence_method: str | None = None
    ) -> ResultPage:
        """Resolve and search (blocking; run in a worker thread)."""
        query, echo = self.resolve(inp, pipeline.searcher)
        return pipeline.search(query, echo, evidence_method=evidence_method)

    def search_captions(
        self, pipeline: CardPipeline, inp: QueryInput
    ) -> tuple[SearchResult | None, Query, QueryEcho]:
        """Caption hits for the query; the result is None when the collection has no captions at all
        (blocking; run in a worker thread)."""
        query, echo = self.resolve(inp, pipeline.searcher)
        if pipeline.searcher.index.captions.ntotal == 0:
            return None, query, echo
        return pipeline.search_captions(query), query, echo

    def retry_due(self) -> bool:
        return self._last_try is None or time.monotonic() - self._last_try > RETRY_OPEN_S

    def close(self) -> None:
        pipeline, self.pipeline = self.pipeline, None
        if self._cache is not None:
            self._cache.close()
            self._cache = None
        if pipeline is None:
            return
        if self.injected_explainer is None and pipeline.explainer is not None:
            pipeline.explainer.close()
        if self.injected_searcher is None:
            pipeline.searcher.close()


def state_of(request: Request) -> ServerState:
    state: ServerState = request.app.state.clearsight
    return state


#: A route's parameter that receives the app's state.
State = Annotated[ServerState, Depends(state_of)]
