"""What the routes share (one `ServerState` per app) and how a route gets it.

The state opens the collection lazily and keeps retrying while it cannot, so a server started
before `clearsight index` finishes comes up by itself; routes take it as a dependency (`State`).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import Depends, Request
from fastapi.templating import Jinja2Templates

from explainer.cards.captions import CatalogCaptions, ScheduledCaptions, server_captions
from explainer.cards.context import query_echo
from explainer.cards.evidence import EvidenceProvider, LibraryEvidence, make_evidence_provider
from explainer.cards.model import QueryEcho, public_model_name
from explainer.cards.pipeline import CardPipeline, ResultPage
from explainer.errors import ClearsightError, IndexError_, ModelUnavailable, server_message
from explainer.explain.backends import LLMConfig
from explainer.explain.cache import SQLiteExplanationCache, open_explanation_cache
from explainer.explain.chain import Explainer
from explainer.explain.factory import explainer_from_settings
from explainer.patch_worker import PatchFillWorker
from explainer.server.limits import WorkBudget
from explainer.server.queries import QueryImages, QueryInput, resolve
from explainer.server.security import is_loopback
from explainer.settings import Settings
from retrieval.duplicates import KeptDuplicates
from retrieval.search import Query, Searcher, SearchResult

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: How often a degraded server tries to open its collection again.
RETRY_OPEN_S = 5.0
_ERRNO = re.compile(r"\[Errno \d+\]\s*")
_QUOTED_PATH = re.compile(r"""(?:'(?:/|[A-Za-z]:\\)[^']*'|"(?:/|[A-Za-z]:\\)[^"]*")""")
#: Stale images remembered at most (a memory bound; the count in health saturates there).
MAX_STALE = 10_000
#: A searcher swapped out for a new index is closed this long after, once its requests are done.
RETIRE_GRACE_S = 120.0


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
    #: Indexed images whose file no longer is the image indexed (id -> why), until re-indexed.
    stale_images: dict[int, str] = field(default_factory=dict)
    #: Why the index served is not the one on disk (None: it is); shown on the page and in health.
    index_problem: str | None = None
    _failed_version: str | None = None
    _retired: list[tuple[float, Searcher]] = field(default_factory=list)
    #: Hits in work at once over every searching route (None: made from settings on first use).
    budget: WorkBudget | None = None
    #: The near-duplicate groups the duplicates page pages through, found once per index version.
    duplicates: KeptDuplicates = field(default_factory=KeptDuplicates)
    #: Fills stored patch features while idle (None: off, or evidence that does not use them).
    patch_worker: PatchFillWorker | None = None

    def __post_init__(self) -> None:
        if self.budget is None:
            self.budget = WorkBudget(self.settings.search_budget_hits)

    async def run(self, hits: int, fn: Callable[..., _T], *args: Any) -> _T:
        """Run blocking search work in a worker thread once the work budget has room for `hits` hits.

        Every route that searches goes through here, so together they hold at most the budget.
        """
        assert self.budget is not None
        async with self.budget.hold(hits):
            return await anyio.to_thread.run_sync(fn, *args)

    @property
    def strip_location(self) -> bool:
        """Whether originals leave without their GPS location: by default, when shared beyond loopback."""
        if self.settings.strip_location is not None:
            return self.settings.strip_location
        return not is_loopback(self.settings.host)

    @property
    def shows_paths(self) -> bool:
        """Whether pages may show a file's absolute path (the detail view's "copy the path"): only on a
        loopback server, whose every client is this computer's user. Shared beyond loopback, files are
        named relative to the indexed folder, as everywhere else, and the server's layout stays its own.
        """
        return is_loopback(self.settings.host)

    def mark_stale(self, image_id: int, reason: str) -> None:
        """Remember (and log once) an indexed image whose file changed; the next index run re-reads it."""
        if image_id in self.stale_images:
            return
        if len(self.stale_images) >= MAX_STALE:
            self.stale_images.pop(next(iter(self.stale_images)))
        self.stale_images[image_id] = reason
        log.warning("image %d is not served: %s; `clearsight index` will re-read it", image_id, reason)

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
        status: dict[str, object] = {
            "ready": pipeline is not None,
            "problem": self.problem,
            "stale": self.index_problem,
        }
        if pipeline is not None:
            status["images"] = pipeline.searcher.index.images.ntotal
            status["explainer"] = pipeline.explainer.label if pipeline.explainer is not None else None
            status["demo"] = is_demo_model(pipeline.searcher.index.manifest.model_id)
            if isinstance(pipeline.captions, ScheduledCaptions):
                status["captions"] = pipeline.captions.worker.progress().to_dict()
            if self.patch_worker is not None:
                status["patches"] = self.patch_worker.progress().to_dict()
        return status

    def public(self, message: str) -> str:
        """Server paths stay on the server: the data directory and indexed folders are named, not
        shown, and any other quoted absolute path (the OS's "[Errno 2] ...: '/x/y'") is dropped.

        Routes translate the errors they expect into path-free words; this is the boundary's last line
        for the ones they do not.
        """
        message = _QUOTED_PATH.sub("a file", _ERRNO.sub("", message))
        message = message.replace(str(self.data_dir), "the data directory")
        pipeline = self.pipeline
        if pipeline is not None:
            for root in pipeline.searcher.collection.catalog.roots():  # longest first
                message = message.replace(root.rstrip("/"), "the collection folder")
        return message

    def open(self) -> None:
        """Load the searcher, evidence and explainer (blocking; run in a worker thread)."""
        with self._open_lock:
            if self.pipeline is not None:
                return
            self._last_try = time.monotonic()
            try:
                searcher = self.injected_searcher or self._open_searcher()
                searcher.collapse = self.settings.collapse_duplicates
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
            # the store exists before the warm-up, so its probe page runs the path queries will take
            fill = start_patch_fill(self.settings, searcher, evidence, start=False)
            _warm_up(searcher, evidence)  # before the captioning worker starts sharing the cores
            captions = server_captions(self.settings, searcher)  # starts the captioning worker when on
            if fill is not None:
                fill.start()
            self.patch_worker = fill
            self.pipeline = CardPipeline(searcher, explainer, evidence, captions, public_reasons=True)
            self.problem = None

    def switch_index(self, why: str) -> None:
        """The index on disk can no longer be loaded beside the running model (rebuilt with another):
        open it afresh, with its own model, and swap it in; if that fails, keep serving the old one and
        say so (page and health) instead of answering "ok" from an index that is gone.

        Blocking; run in a worker thread. A version that failed is not tried again until it changes.
        """
        pipeline = self.pipeline
        if pipeline is None:
            return
        on_disk = pipeline.searcher.collection.store.current_version()
        if on_disk is None or on_disk == self._failed_version:
            return
        serving = pipeline.searcher.index
        old = f"version {serving.version}, model {public_model_name(serving.manifest.model_name)}"
        if self.injected_searcher is not None:
            fresh = None
            reason = "this server was started with a fixed searcher"
        else:
            try:
                fresh = self._open_searcher()
                reason = ""
            except Exception as exc:
                fresh = None
                reason = self.public(
                    server_message(exc) if isinstance(exc, ClearsightError) else type(exc).__name__
                )
        if fresh is None:
            self._failed_version = on_disk
            self.index_problem = (
                f"the collection was re-indexed ({self.public(why)}), and the new index could not be "
                f"loaded here ({reason}); this server still answers from the old index ({old}): "
                "restart it to serve the new one"
            )
            log.warning("%s", self.index_problem)
            return
        evidence = self.injected_evidence or make_evidence_provider(self.settings.evidence_regions)
        if isinstance(pipeline.captions, ScheduledCaptions):  # its worker captions the old collection
            pipeline.captions.close()
        if self.patch_worker is not None:  # it fills for the old model
            self.patch_worker.stop()
        captions = server_captions(self.settings, fresh)
        self.patch_worker = start_patch_fill(self.settings, fresh, evidence)
        self.pipeline = CardPipeline(fresh, pipeline.explainer, evidence, captions, public_reasons=True)
        self._retired.append((time.monotonic(), pipeline.searcher))
        self.index_problem = None
        self._failed_version = None
        log.info(
            "now serving index version %s (model %s)", fresh.index.version, fresh.index.manifest.model_id
        )

    def close_retired(self, grace_s: float = RETIRE_GRACE_S) -> None:
        """Close searchers swapped out more than `grace_s` ago: requests that began on them are done."""
        now = time.monotonic()
        keep: list[tuple[float, Searcher]] = []
        for at, searcher in self._retired:
            if now - at >= grace_s:
                searcher.close()
            else:
                keep.append((at, searcher))
        self._retired = keep

    def _open_searcher(self) -> Searcher:
        searcher = Searcher.open(self.data_dir)
        searcher.collapse = self.settings.collapse_duplicates
        if self.settings.engine != "ray":
            return searcher
        from retrieval.distributed.ingest import RayConfig, connect
        from retrieval.distributed.sharded import ShardedSearcher

        try:
            connect(RayConfig(address=self.settings.ray_address))
            sharded = ShardedSearcher(searcher, self.settings.shards)
            sharded.collapse = searcher.collapse
            return sharded
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
        """Resolve and search (blocking; run it through `run`, within the shared work budget)."""
        self.note_activity(pipeline)
        query, echo = self.resolve(inp, pipeline.searcher)
        return pipeline.search(query, echo, evidence_method=evidence_method)

    def note_activity(self, pipeline: CardPipeline) -> None:
        """A query is being served: background work (captions, patch features) waits before its next batch."""
        if isinstance(pipeline.captions, ScheduledCaptions):
            pipeline.captions.worker.note_activity()
        if self.patch_worker is not None:
            self.patch_worker.note_activity()

    def search_captions(
        self, pipeline: CardPipeline, inp: QueryInput
    ) -> tuple[SearchResult | None, Query, QueryEcho]:
        """Caption hits for the query; the result is None when the collection has no captions at all
        (blocking; run in a worker thread)."""
        self.note_activity(pipeline)
        query, echo = self.resolve(inp, pipeline.searcher)
        if pipeline.searcher.index.captions.ntotal == 0:
            return None, query, echo
        return pipeline.search_captions(query), query, echo

    def retry_due(self) -> bool:
        return self._last_try is None or time.monotonic() - self._last_try > RETRY_OPEN_S

    def close(self) -> None:
        self.close_retired(grace_s=0.0)
        pipeline, self.pipeline = self.pipeline, None
        if self.patch_worker is not None:  # before the searcher (and its encoder) is closed
            self.patch_worker.stop()
            self.patch_worker = None
        if self._cache is not None:
            self._cache.close()
            self._cache = None
        if pipeline is None:
            return
        if isinstance(pipeline.captions, ScheduledCaptions):
            pipeline.captions.close()
        if self.injected_explainer is None and pipeline.explainer is not None:
            pipeline.explainer.close()
        if self.injected_searcher is None:
            pipeline.searcher.close()


def _warm_up(searcher: Searcher, evidence: EvidenceProvider) -> None:
    """The first search costs what a later one does: its one-time costs (the text encoder's first run,
    the confidence calibration, the image tower that evidence runs) are paid before health says ready.
    One page is built for a probe query with the catalog's captions only, then forgotten."""
    started = time.perf_counter()
    try:
        searcher.warm_up()
        if searcher.index.images.ntotal:
            probe = CardPipeline(searcher, None, evidence, CatalogCaptions(searcher))
            query = Query(text="a photo", top_k=12)
            probe.search(query, query_echo(query))
            searcher.cache.clear()  # no trace of the probe in what users are answered from
    except Exception as exc:  # a warm-up is an optimisation: the first query pays, the server still serves
        log.warning("search warm-up failed (%s); the first query will be slower", type(exc).__name__)
        return
    log.info("search warmed up in %.2f s", time.perf_counter() - started)


def start_patch_fill(
    settings: Settings, searcher: Searcher, evidence: EvidenceProvider, start: bool = True
) -> PatchFillWorker | None:
    """The started background fill of stored patch features, where it pays: on (`patch_features`), the
    evidence draws from the store (method auto or stored) and the model gives patch features (CLIP)."""
    from retrieval.evidence import PatchStore, can_give_patches

    if settings.patch_features == "off" or not isinstance(evidence, LibraryEvidence):
        return None
    if evidence.config.method not in ("auto", "stored"):
        return None
    encoder = searcher.encoder
    if not can_give_patches(encoder):
        return None
    store = PatchStore(searcher.collection.data_dir, encoder.info, surgery=evidence.config.surgery)
    try:
        store.ensure()  # "auto" evidence reads the store from now on, storing each hit it computes
    except OSError as exc:  # a read-only data directory: evidence stays dense, the server still serves
        log.warning("patch features are not stored (%s); evidence runs the model per hit", type(exc).__name__)
        return None
    worker = PatchFillWorker(
        searcher.collection.catalog, encoder, store, config=evidence.config, batch=settings.patch_fill_batch
    )
    if start:
        worker.start()
    return worker


def state_of(request: Request) -> ServerState:
    state: ServerState = request.app.state.clearsight
    return state


#: A route's parameter that receives the app's state.
State = Annotated[ServerState, Depends(state_of)]
