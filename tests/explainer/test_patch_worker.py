"""The background fill of stored patch features: it fills every indexed content once (copies share a
file), resumes where a stopped run left off, waits while requests arrive, skips unreadable images, and
takes only bounded settings. A counting encoder makes every model pass observable; no test asserts on
time (WAIT only bounds a hang)."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from explainer.cards.evidence import NoEvidence, make_evidence_provider
from explainer.patch_worker import MAX_BATCH, PatchFillWorker
from explainer.server.state import start_patch_fill
from explainer.settings import Settings
from retrieval import Collection, IngestConfig
from retrieval.encoders import Encoder
from retrieval.errors import ConfigError
from retrieval.evidence import EvidenceConfig, EvidenceTarget, PatchStore, evidence_for_hits
from retrieval.ingest import ingest
from retrieval.search import Query, Searcher
from retrieval.status import collection_status
from retrieval.types import Float32Array
from tests.helpers import make_folder

WAIT = 60.0


class CountingEncoder:
    """The tiny CLIP, with each patch pass counted (images per call); `gate` holds passes until set."""

    supports_patches = True

    def __init__(self, inner: Encoder, gate: threading.Event | None = None) -> None:
        self.inner = inner
        self.calls: list[int] = []
        self.gate = gate
        self.entered = threading.Event()

    def patch_embeddings(self, pixels: Float32Array, surgery: bool = True) -> Float32Array:
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(WAIT)
        self.calls.append(len(pixels))
        return self.inner.patch_embeddings(pixels, surgery)  # type: ignore[attr-defined, no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Clock:
    """A clock the test moves: "requests were quiet for quiet_s" happens when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


@pytest.fixture()
def collection(tmp_path: Path, encoder: Encoder) -> Iterator[Collection]:
    images = tmp_path / "images"
    files = make_folder(images, 6)
    shutil.copy(files[0], images / "same_content.jpg")  # 7 images, 6 contents
    with Collection(tmp_path / "data") as c:
        ingest(images, c, encoder, IngestConfig(progress=False))
        yield c


def _worker(collection: Collection, enc: Any, **kw: Any) -> tuple[PatchFillWorker, PatchStore]:
    store = PatchStore(collection.data_dir, enc.info)
    kw.setdefault("quiet_s", 0.0)
    return PatchFillWorker(collection.catalog, enc, store, **kw), store


def test_fills_every_content_once_and_status_counts_images(collection: Collection, encoder: Encoder) -> None:
    enc = CountingEncoder(encoder)
    worker, store = _worker(collection, enc, batch=4)
    assert collection_status(collection.data_dir).patches == {"done": 0, "total": 7}
    worker.start()
    try:
        assert worker.wait_idle(WAIT)
        p = worker.progress()
        assert (p.done, p.total, p.failed, p.problem) == (7, 7, 0, None)
    finally:
        worker.stop()
    assert sum(enc.calls) == 6 and max(enc.calls) <= 4  # one pass per content, in batches of at most 4
    assert len(store.stored_keys()) == 6
    assert collection_status(collection.data_dir).patches == {"done": 7, "total": 7}


def test_a_restarted_fill_resumes_where_the_last_one_stopped(
    collection: Collection, encoder: Encoder
) -> None:
    gate = threading.Event()
    first = CountingEncoder(encoder, gate)
    worker, store = _worker(collection, first, batch=2)
    worker.start()
    assert first.entered.wait(WAIT)
    stopper = threading.Thread(target=worker.stop)  # asked to stop while its first batch runs
    stopper.start()
    while worker.progress().running:
        threading.Event().wait(0.01)
    gate.set()  # that batch still finishes and is written; no other starts
    stopper.join(WAIT)
    assert sum(first.calls) == 2 and len(store.stored_keys()) == 2
    second = CountingEncoder(encoder)
    again, _ = _worker(collection, second, batch=2)
    again.start()
    try:
        assert again.wait_idle(WAIT)
    finally:
        again.stop()
    assert sum(second.calls) == 4  # only what the first run did not store
    assert again.progress().done == 7


def test_waits_while_requests_arrive_and_yields_between_batches(
    collection: Collection, encoder: Encoder
) -> None:
    clock = Clock()
    gate = threading.Event()
    enc = CountingEncoder(encoder, gate)
    worker, _ = _worker(collection, enc, batch=1, quiet_s=0.05, clock=clock)
    worker.note_activity()  # a request at "now": nothing may start until the clock moves past quiet_s
    worker.start()
    try:
        seen = clock.reads
        while clock.reads < seen + 4:  # it looked at the clock again and again, and kept waiting
            threading.Event().wait(0.01)
        assert enc.calls == [] and not enc.entered.is_set()
        clock.now += 1.0  # requests have been quiet long enough
        assert enc.entered.wait(WAIT)
        clock.now += 0.001
        worker.note_activity()  # a request while the first batch runs
        gate.set()
        while worker.progress().yielded == 0:
            threading.Event().wait(0.01)
        seen = clock.reads
        while clock.reads < seen + 4:
            threading.Event().wait(0.01)
        assert enc.calls == [1]  # it finished its one-image batch and started no other
        clock.now += 1.0
        assert worker.wait_idle(WAIT)
        assert sum(enc.calls) == 6
    finally:
        gate.set()
        worker.stop()


def test_an_unreadable_image_is_skipped_and_not_retried(collection: Collection, encoder: Encoder) -> None:
    bad = collection.catalog.iter_images("indexed")[1]
    Path(bad.path).write_bytes(b"not an image any more")
    enc = CountingEncoder(encoder)
    worker, store = _worker(collection, enc, rescan_s=0.01)
    worker.start()
    try:
        assert worker.wait_idle(WAIT)
        p = worker.progress()
        assert p.failed == 1 and p.problem is None and p.done == 6
        passes = len(enc.calls)
        scanned = worker._last_scan
        while worker._last_scan == scanned:  # a later look over the collection (rescan_s is short)
            threading.Event().wait(0.01)
        assert worker.wait_idle(WAIT)  # the failed content was not queued again
        assert len(enc.calls) == passes
    finally:
        worker.stop()
    assert bad.content_hash not in store.stored_keys()


@pytest.mark.parametrize("batch", [0, MAX_BATCH + 1])
def test_batch_size_is_bounded(collection: Collection, encoder: Encoder, batch: int) -> None:
    with pytest.raises(ValueError, match="batch"):
        _worker(collection, encoder, batch=batch)


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("CLEARSIGHT_PATCH_FEATURES", "sometimes"),
        ("CLEARSIGHT_PATCH_FILL_BATCH", "0"),
        ("CLEARSIGHT_PATCH_FILL_BATCH", "65"),
    ],
)
def test_bad_settings_are_refused(monkeypatch: pytest.MonkeyPatch, env: str, value: str) -> None:
    from explainer.settings import get_settings

    monkeypatch.setenv(env, value)
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigError, match=env):
            get_settings()
    finally:
        get_settings.cache_clear()


def test_the_server_fills_by_default_and_opts_out(collection: Collection, tiny_clip_dir: Path) -> None:
    searcher = Searcher.open(collection.data_dir, precision="fp32")
    try:
        settings = Settings(_env_file=None, data_dir=collection.data_dir)  # type: ignore[call-arg]
        assert (
            start_patch_fill(
                settings.model_copy(update={"patch_features": "off"}), searcher, make_evidence_provider(3)
            )
            is None
        )
        assert start_patch_fill(settings, searcher, NoEvidence("off")) is None
        worker = start_patch_fill(settings, searcher, make_evidence_provider(3))
        assert worker is not None
        try:
            assert worker.wait_idle(WAIT) and worker.progress().done == 7
        finally:
            worker.stop()
    finally:
        searcher.close()


def test_stored_evidence_is_the_same_before_and_after_the_fill(
    collection: Collection, tiny_clip_dir: Path
) -> None:
    """A hit computed at query time gets the boxes it will get once its features are read back."""
    searcher = Searcher.open(collection.data_dir, precision="fp32")
    try:
        store = PatchStore(collection.data_dir, searcher.encoder.info)
        store.ensure()
        query = Query(text="a red circle", top_k=4)
        hits = searcher.search(query).results
        config = EvidenceConfig(method="auto")
        before = evidence_for_hits(searcher, query, hits, config)
        assert len(store.stored_keys()) == len({h.content_hash for h in hits})  # stored on the way
        after = evidence_for_hits(searcher, query, hits, config)
        assert [e.method for e in after] == ["stored"] * len(hits)
        for b, a in zip(before, after, strict=True):
            assert [r.box for r in b.regions] == [r.box for r in a.regions]
            assert np.allclose(b.heatmap, a.heatmap)
    finally:
        searcher.close()


def test_targets_need_a_content_hash(encoder: Encoder, tmp_path: Path) -> None:
    """A target without a content hash cannot be filed: the fill skips it rather than guessing a key."""
    from retrieval.evidence import store_patch_features

    store = PatchStore(tmp_path, encoder.info)
    report = store_patch_features(encoder, store, [EvidenceTarget(id=1, width=8, height=8, path="x.jpg")])
    assert report.written == 0 and store.stored_keys() == set()
    with pytest.raises(ConfigError):
        store.path("../etc")
