"""One captioning worker per server process: captions for the hits pages show, then for the whole collection.

BLIP writes about one caption a second on a CPU, so it must never run inside a request: a page
answers at once with the captions already cached, and its uncaptioned hits are handed to this
worker, which captions them in batches (hits of several pages that arrive together share a batch)
and writes them to the catalog cache that `clearsight caption` fills, so nothing is captioned
twice. While no request needs the model, the worker captions the rest of the collection a small
batch at a time; since every caption is committed as it is made, a restarted server resumes where
the last one stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

from explainer.background import yield_to_queries
from explainer.captions.captioner import CaptionInterrupted, CaptionService
from retrieval.catalog import ImageRecord
from retrieval.collection import Collection
from retrieval.status import caption_progress

log = logging.getLogger(__name__)

#: Why a content was not captioned, when the captioner could not read or caption it.
FAILED = "could not be captioned"


@dataclass(frozen=True)
class WorkerProgress:
    """What the worker has done, in images of the collection (the same counts `clearsight status` reads)."""

    done: int  # indexed images with a generated caption
    total: int  # indexed images
    pending: int  # contents queued by requests
    background: bool  # the worker captions the collection while idle
    ready: bool  # the captioner is loaded
    idle: bool  # nothing queued, nothing left to caption at the last look over the collection
    problem: str | None = None  # why the worker does not caption (weights missing...)
    yielded: int = 0  # background batches abandoned mid-way so a request got the cores

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class CaptionWorker:
    """Captions contents asked for by requests first, then (when `background`) the rest of the collection.

    `make_service` loads the captioner; it runs on the worker's own thread, so a server starts at once
    and a missing model only turns captioning off (with the reason in `progress().problem`).
    Background batches wait while requests queue work and for `quiet_s` after the last request,
    so a page's captions never queue behind more than one small background batch. Queued work starts
    `grace_s` after it was queued: on two cores a caption started at once slows the very page that
    asked for it (measured: 0.32 s against 0.19 s for a page of 12 at ViT-B/32 size).
    """

    def __init__(
        self,
        collection: Collection,
        make_service: Callable[[], CaptionService],
        *,
        background: bool = True,
        background_batch: int = 1,
        quiet_s: float = 1.0,
        rescan_s: float = 30.0,
        grace_s: float = 0.1,
    ) -> None:
        self._collection = collection
        self._make_service = make_service
        self._background = background
        self._background_batch = max(1, background_batch)
        self._quiet_s = quiet_s
        self._rescan_s = rescan_s
        self._grace_s = grace_s
        self._cond = threading.Condition()
        self._urgent: OrderedDict[str, list[ImageRecord]] = OrderedDict()
        self._todo: deque[str] = deque()  # background: contents not cached at the last scan
        self._records: dict[str, list[ImageRecord]] = {}
        self._finished: dict[str, str | None] = {}  # content hash -> None (captioned) or why not
        self._service: CaptionService | None = None
        self._problem: str | None = None
        self._stopping = False
        self._last_request = 0.0
        self._interrupted = 0  # background batches that gave way to a request
        self._last_scan: float | None = None
        self._counts = (0, 0)
        self._busy = False  # a batch is being captioned
        self._cold = True  # no request's batch ran just before: the next one starts with one image
        self._queued_at = 0.0  # when the request queue last became non-empty
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="clearsight-captions", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the batch in progress (its captions are committed) and release the model."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)  # a daemon thread: a batch still running dies with the process

    # -- requests ------------------------------------------------------------------------------
    def request(self, records: Iterable[ImageRecord]) -> list[str]:
        """Queue these images' contents ahead of the background (in the order given: visible cards first).

        Returns the content hashes the caller may wait for; contents already captioned in this
        process or already queued are not queued twice.
        """
        hashes: list[str] = []
        with self._cond:
            self._last_request = time.monotonic()
            if self._problem is not None or self._stopping:
                return []
            if not self._urgent:
                self._queued_at = time.monotonic()
            for rec in records:
                h = rec.content_hash
                if not h:
                    continue
                hashes.append(h)
                if self._finished.get(h, FAILED) is None:
                    continue  # captioned already: the caller reads it from the catalog
                self._finished.pop(h, None)  # a failed content may be retried when asked again
                self._urgent.setdefault(h, []).append(rec)
            self._cond.notify_all()
        return list(dict.fromkeys(hashes))

    def note_activity(self) -> None:
        """A request ran: the background waits `quiet_s`, so it does not slow the pages being served."""
        with self._cond:
            self._last_request = time.monotonic()

    def finished(self, hashes: Sequence[str]) -> dict[str, str | None]:
        """Which of `hashes` are done: None when captioned, the reason when not (or when never will be)."""
        with self._cond:
            if self._problem is not None or self._stopping:
                return {h: self._finished.get(h, self._problem or "stopped") for h in hashes}
            return {h: self._finished[h] for h in hashes if h in self._finished}

    def wait(self, hashes: Sequence[str], timeout: float) -> dict[str, str | None]:
        """Block until every one of `hashes` is finished or `timeout` passes; what `finished` says then."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                done = self.finished(hashes)
                left = deadline - time.monotonic()
                if len(done) == len(set(hashes)) or left <= 0:
                    return done
                self._cond.wait(left)

    def progress(self) -> WorkerProgress:
        with self._cond:
            done, total = self._counts
            return WorkerProgress(
                done=done,
                total=total,
                pending=len(self._urgent),
                background=self._background,
                ready=self._service is not None,
                idle=self._idle_locked(),
                problem=self._problem,
                yielded=self._interrupted,
            )

    def wait_idle(self, timeout: float) -> bool:
        """Block until the worker has nothing left to do (or stopped, or `timeout` passed); True if idle."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._idle_locked() and self._problem is None and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return self._idle_locked()

    def _idle_locked(self) -> bool:
        scanned = self._last_scan is not None or not self._background
        queued = bool(self._urgent or self._todo) or self._busy
        return self._service is not None and scanned and not queued

    @property
    def active(self) -> bool:
        """False once the captioner failed to load or the worker stopped: nothing queued will be captioned."""
        with self._cond:
            return self._problem is None and not self._stopping

    # -- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        yield_to_queries()  # before the captioner starts its thread pool: the pool inherits the priority
        try:
            service = self._make_service()
            warm_up = getattr(service.captioner, "warm_up", None)
            if callable(warm_up):  # before `ready`: a page's first caption then takes one image's time
                warm_up()
        except Exception as exc:  # missing weights, a bad model name: the server serves without captions
            with self._cond:
                self._problem = f"captions are off: {exc}"
                self._cond.notify_all()
            log.warning("%s", self._problem)
            return
        with self._cond:
            self._service = service
        self._update_counts()
        try:
            while True:
                batch = self._next_batch(service.batch_size)
                if batch is None:
                    return
                self._caption(service, *batch)
        finally:
            service.captioner.close()

    def _next_batch(self, size: int) -> tuple[dict[str, list[ImageRecord]], bool] | None:
        """Queued contents first, up to `size`; else a small background batch once requests are quiet.

        The flag says whether the batch was asked for by requests (whose waiters need its outcome).
        """
        with self._cond:
            while not self._stopping:
                self._busy = False
                early = self._grace_s - (time.monotonic() - self._queued_at)
                if self._urgent and early > 0:
                    self._cond.wait(early)  # let the request that queued this finish its page first
                    continue
                if self._urgent:
                    # After a pause the first batch is one image, the page's first card: its caption then
                    # shows in one image's time, not a whole batch's; the rest follow in full batches.
                    keys = list(self._urgent)[: 1 if self._cold else size]
                    self._busy, self._cold = True, False
                    return {h: self._urgent.pop(h) for h in keys}, True
                self._cold = True
                if self._background:
                    wait = self._quiet_s - (time.monotonic() - self._last_request)
                    if wait <= 0:
                        batch = self._background_batch_locked()
                        if batch:
                            self._busy = True
                            return batch, False
                        self._cond.notify_all()  # idle now: tell whoever waits for it
                        wait = self._rescan_s
                    self._cond.wait(wait)
                else:
                    self._cond.notify_all()
                    self._cond.wait()
            return None

    def _background_batch_locked(self) -> dict[str, list[ImageRecord]]:
        if not self._todo and self._rescan_due():
            self._cond.release()  # the scan reads the catalog: requests may queue meanwhile
            try:
                self._scan()
            finally:
                self._cond.acquire()
        batch: dict[str, list[ImageRecord]] = {}
        while self._todo and len(batch) < self._background_batch:
            h = self._todo.popleft()
            if h not in self._finished and h in self._records:
                batch[h] = self._records[h]
        return batch

    def _rescan_due(self) -> bool:
        return self._last_scan is None or time.monotonic() - self._last_scan >= self._rescan_s

    def _scan(self) -> None:
        """What the collection still lacks a caption for: newly indexed images join at each rescan."""
        service = self._service
        if service is None:
            return
        records: dict[str, list[ImageRecord]] = {}
        for rec in self._collection.catalog.iter_images("indexed"):
            if rec.content_hash:
                records.setdefault(rec.content_hash, []).append(rec)
        catalog = self._collection.catalog
        cached = catalog.get_generated_captions(list(records), service.key)
        # A cached content whose copy was indexed later lacks the caption on that copy: it is queued too,
        # and the service attaches the cached text without running the model.
        attached = {c.image_id for c in catalog.all_captions() if c.source == service.source}
        with self._cond:
            self._records = records
            self._todo = deque(
                h
                for h, recs in records.items()
                if h not in self._finished and (h not in cached or any(r.id not in attached for r in recs))
            )
            self._last_scan = time.monotonic()

    def _caption(self, service: CaptionService, batch: dict[str, list[ImageRecord]], asked: bool) -> None:
        """Caption one batch; outcomes are kept for what requests asked, and failures for all (so the
        background does not retry an unreadable image at every rescan: a request still may)."""
        records = [rec for recs in batch.values() for rec in recs]
        started = time.monotonic()
        # A background batch gives way to any request that arrives while it runs (a search, a page's
        # captions): the cores go to the query within about one decoding step, the batch goes back first
        # in line. Requested batches run to the end: their pages wait for them.
        interrupt = None if asked else (lambda: bool(self._urgent) or self._last_request > started)
        try:
            report = service.caption_records(records, interrupt=interrupt)
            outcome: dict[str, str | None] = {h: None if h in report.captions else FAILED for h in batch}
        except CaptionInterrupted:
            with self._cond:
                self._todo.extendleft(reversed([h for h in batch if h not in self._finished]))
                self._interrupted += 1
                self._cond.notify_all()
            return
        except Exception as exc:  # a catalog or model error: these contents fail, the worker goes on
            log.warning("captioning %d images failed: %s", len(batch), exc)
            outcome = dict.fromkeys(batch, f"{FAILED} ({type(exc).__name__})")
        with self._cond:
            self._finished.update((h, why) for h, why in outcome.items() if asked or why is not None)
            self._cond.notify_all()
        self._update_counts()

    def _update_counts(self) -> None:
        counts = caption_progress(self._collection.catalog)
        with self._cond:
            self._counts = counts
