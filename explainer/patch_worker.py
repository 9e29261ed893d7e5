"""Patch features filled in the background, so a page's evidence boxes need no image-tower pass.

Dense evidence runs the image tower once per hit: on a 2-core CPU that was ~180 ms of a ~230 ms page
of 12 hits at ViT-B/32. With an image's patch features stored (`retrieval.evidence.stored`, int8,
~25 KB per image at ViT-B/32) its boxes come from a file read and a matrix product instead. Indexing
stores them from the pass that embeds each image (`IngestConfig.patch_features`); this worker fills
in the rest (images indexed before that) while the server is idle,
like the background captioner: at a lowered priority,
a few images at a time, never while requests arrive (it waits `quiet_s` after the last one). Every
image's features are written as soon as its batch is done, so a restarted server resumes where the
last one stopped. A hit whose features are not stored yet still gets dense evidence, stored on the
way (`stored_evidence`), so a query never waits for the fill.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass

from explainer.background import yield_to_queries
from retrieval.catalog import Catalog
from retrieval.encoders import Encoder
from retrieval.evidence import EvidenceConfig, EvidenceTarget, PatchStore, store_patch_features

log = logging.getLogger(__name__)

#: Images per background batch: a query that arrives mid-batch waits at most this many niced forwards
#: when it needs the encoder's lock (a hit not filled yet), and gets the cores otherwise.
DEFAULT_BATCH = 4
#: Largest background batch accepted (a bound on how long one batch may hold the encoder).
MAX_BATCH = 64


@dataclass(frozen=True)
class FillProgress:
    """How far filling got, in indexed images (the counts `clearsight status` reads from disk)."""

    done: int
    total: int
    running: bool  # the worker's thread is alive and not stopping
    idle: bool  # nothing was left to fill at its last look over the collection
    problem: str | None = None  # why it stopped filling (a failed model pass)
    failed: int = 0  # images it could not read this run (dense evidence says why, per hit)
    yielded: int = 0  # times it paused because requests arrived

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class PatchFillWorker:
    """Fills `store` with the patch features of every indexed image of `catalog` that lacks them.

    The encoder is shared with queries; its own lock serialises model passes, so a batch here is kept
    small (`batch`) and starts only once no request came for `quiet_s`. A rescan every `rescan_s`
    picks up images indexed since (a watched folder, a re-index).
    """

    def __init__(
        self,
        catalog: Catalog,
        encoder: Encoder,
        store: PatchStore,
        *,
        config: EvidenceConfig | None = None,
        batch: int = DEFAULT_BATCH,
        quiet_s: float = 1.0,
        rescan_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"batch must be 1..{MAX_BATCH}, got {batch}")
        if quiet_s < 0 or rescan_s <= 0:
            raise ValueError("quiet_s must be >= 0 and rescan_s > 0")
        self._catalog = catalog
        self._encoder = encoder
        self._store = store
        self._config = config or EvidenceConfig()
        self._batch = batch
        self._quiet_s = quiet_s
        self._rescan_s = rescan_s
        self._clock = clock
        self._cond = threading.Condition()
        self._todo: deque[EvidenceTarget] = deque()
        self._last_scan: float | None = None
        self._last_request = float("-inf")
        self._stopping = False
        self._busy = False
        self._problem: str | None = None
        self._failed: set[str] = set()  # unreadable contents: not retried by later scans
        self._yielded = 0
        self._counts = (0, 0)
        self._copies: dict[str, int] = {}  # content hash -> indexed images with it, of those not stored
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="clearsight-patches", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the batch in progress (its features are written)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- requests -----------------------------------------------------------------------------
    def note_activity(self) -> None:
        """A request is being served: the fill waits until requests have been quiet for `quiet_s`."""
        with self._cond:
            self._last_request = self._clock()

    def progress(self) -> FillProgress:
        with self._cond:
            done, total = self._counts
            return FillProgress(
                done=done,
                total=total,
                running=self._thread is not None and not self._stopping and self._problem is None,
                idle=self._idle_locked(),
                problem=self._problem,
                failed=len(self._failed),
                yielded=self._yielded,
            )

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is left to fill (or the worker stopped, or `timeout` passed); True if idle."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._idle_locked() and self._problem is None and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
            return self._idle_locked()

    def _idle_locked(self) -> bool:
        return self._last_scan is not None and not self._todo and not self._busy

    # -- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        yield_to_queries()  # before any model pass: torch's threads for this one inherit the priority
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                self._fill(batch)
        except Exception as exc:  # a store or model failure: stop filling; queries still get dense evidence
            with self._cond:
                self._problem = f"patch features are not filled: {type(exc).__name__}: {exc}"
                self._busy = False
                self._cond.notify_all()
            log.warning("%s", self._problem)

    def _next_batch(self) -> list[EvidenceTarget] | None:
        """The next few images once requests are quiet; None when stopping. Waits while there is nothing."""
        with self._cond:
            while not self._stopping:
                self._busy = False
                wait = self._quiet_s - (self._clock() - self._last_request)
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                if not self._todo and self._rescan_due():
                    self._cond.release()  # the scan reads the catalog and the store's listing
                    try:
                        self._scan()
                    finally:
                        self._cond.acquire()
                if self._todo:
                    self._busy = True
                    return [self._todo.popleft() for _ in range(min(self._batch, len(self._todo)))]
                self._cond.notify_all()  # idle: tell whoever waits for it
                self._cond.wait(max(0.05, self._rescan_s - (self._clock() - (self._last_scan or 0.0))))
            return None

    def _scan(self) -> None:
        """What the collection still lacks, one target per content (copies share a file), and the counts."""
        keys = self._store.stored_keys()
        copies: dict[str, int] = {}
        todo: dict[str, EvidenceTarget] = {}
        done = total = 0
        for rec in self._catalog.iter_images("indexed"):
            total += 1
            h = rec.content_hash
            if h in keys:
                done += 1
            elif h:
                copies[h] = copies.get(h, 0) + 1
                if h not in self._failed:
                    todo.setdefault(h, EvidenceTarget.from_row(rec))
        with self._cond:
            self._todo = deque(todo.values())
            self._copies = copies
            self._counts = (done, total)
            self._last_scan = self._clock()

    def _rescan_due(self) -> bool:
        return self._last_scan is None or self._clock() - self._last_scan >= self._rescan_s

    def _fill(self, batch: list[EvidenceTarget]) -> None:
        started = self._clock()
        store_patch_features(self._encoder, self._store, batch, self._config)
        stored = [t.key for t in batch if t.key and self._store.has(t.key)]
        with self._cond:
            self._failed.update(t.key for t in batch if t.key and t.key not in stored)
            done, total = self._counts
            self._counts = (min(total, done + sum(self._copies.pop(h, 1) for h in stored)), total)
            if self._last_request > started:
                self._yielded += 1  # a request came meanwhile: the next batch waits for quiet
            self._cond.notify_all()
