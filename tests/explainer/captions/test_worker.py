"""The server's captioning worker: requests first and batched together, the collection while idle, the
catalog cache shared with `clearsight caption` (so nothing is captioned twice), and a clear stop when
the model cannot load. A fake captioner makes every call observable; no test asserts on time."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from PIL import Image

from explainer.captions.captioner import CaptionInterrupted, CaptionService
from explainer.captions.worker import FAILED, CaptionWorker
from explainer.errors import ModelUnavailable
from retrieval import Collection, IngestConfig
from retrieval.catalog import ImageRecord
from retrieval.encoders import Encoder
from retrieval.ingest import ingest
from retrieval.status import caption_progress
from tests.helpers import make_folder

WAIT = 60.0  # seconds a test waits for the worker at most: a bound on a hang, never a measured figure


class FakeCaptioner:
    """Captions an image by its mean colour; records every batch; `gate` holds the first call."""

    name = "fake-blip"
    fingerprint = "fake-blip|v1"

    def __init__(self, gate: threading.Event | None = None, bad_size: tuple[int, int] | None = None) -> None:
        self.batches: list[list[tuple[int, int, int]]] = []
        self.gate = gate
        self.started = threading.Event()
        self.bad_size = bad_size
        self.closed = False
        self.interrupted = 0
        self.created = time.monotonic()

    def caption(
        self,
        images: Sequence[Image.Image],
        prefix: str | None = None,
        interrupt: Callable[[], bool] | None = None,
    ) -> list[str]:
        self.started.set()
        if self.gate is not None:
            while not self.gate.wait(0.01):  # "decoding": a step at a time, asking whether to yield
                if interrupt is not None and interrupt():
                    self.interrupted += 1
                    raise CaptionInterrupted("yielded")
                assert time.monotonic() - self.created < WAIT
        if self.bad_size is not None and any(im.size == self.bad_size for im in images):
            raise ValueError("this image breaks the model")
        colours = [im.convert("RGB").resize((1, 1)).getpixel((0, 0)) for im in images]
        self.batches.append(colours)  # type: ignore[arg-type]
        return [f"a picture coloured {c}" for c in colours]

    def close(self) -> None:
        self.closed = True

    @property
    def captioned(self) -> int:
        return sum(len(b) for b in self.batches)


@pytest.fixture()
def collection(tmp_path: Path, encoder: Encoder) -> Iterator[Collection]:
    images = tmp_path / "images"
    files = make_folder(images, 10)
    shutil.copy(files[0], images / "same_content.jpg")  # 11 images, 10 contents
    with Collection(tmp_path / "data") as c:
        ingest(images, c, encoder, IngestConfig(progress=False))
        yield c


def _records(collection: Collection) -> list[ImageRecord]:
    return collection.catalog.iter_images("indexed")


def _worker(collection: Collection, captioner: FakeCaptioner, batch: int = 4, **kw: object) -> CaptionWorker:
    def make() -> CaptionService:
        return CaptionService(collection, captioner, batch_size=batch)  # type: ignore[arg-type]

    return CaptionWorker(collection, make, **kw)  # type: ignore[arg-type]


def test_requests_are_batched_together_in_order_and_cached(collection: Collection) -> None:
    gate = threading.Event()
    fake = FakeCaptioner(gate)
    worker = _worker(collection, fake, batch=4, background=False)
    worker.start()
    recs = _records(collection)
    try:
        first = worker.request(recs[:2])
        assert fake.started.wait(WAIT)  # the worker is inside its first batch, held by the gate
        page_a = worker.request(recs[1:3])  # two pages arrive while the model is busy...
        page_b = worker.request(recs[3:5])
        gate.set()
        done = worker.wait(first + page_a + page_b, WAIT)
        assert done == dict.fromkeys(first + page_a + page_b)  # every one captioned (None: no failure)
        # ...and share the next batch, in the order they were asked for (visible cards first); the first
        # batch after a pause held one image, so the first card's caption came after one image's work.
        assert [len(b) for b in fake.batches] == [1, 4]
        cached = collection.catalog.get_generated_captions(page_a + page_b, "fake-blip|v1")
        assert set(cached) == set(page_a + page_b)
        attached = collection.catalog.captions_for([r.id for r in recs[1:5]])
        assert all(caps[0].source == "generated:fake-blip" for caps in attached.values())

        again = worker.request(recs[1:3])  # asked again: answered from what is done, not captioned twice
        assert worker.wait(again, WAIT) == dict.fromkeys(again)
        assert fake.captioned == 5
    finally:
        worker.stop()
    assert fake.closed


def test_background_captions_the_rest_once_and_a_restart_resumes(collection: Collection) -> None:
    # `clearsight caption` ran on part of the collection before: the worker must not redo it
    service = CaptionService(collection, FakeCaptioner(), batch_size=4)  # type: ignore[arg-type]
    service.caption_records(_records(collection)[:4])

    fake = FakeCaptioner()
    worker = _worker(collection, fake, background=True, background_batch=2, quiet_s=0.0)
    worker.start()
    hashes = list(dict.fromkeys(r.content_hash or "" for r in _records(collection)))
    try:
        assert worker.wait_idle(WAIT)
        assert worker.progress().done == 11
    finally:
        worker.stop()
    assert fake.captioned == len(hashes) - 4  # each content once; the 4 cached ones not at all
    assert max(len(b) for b in fake.batches) <= 2  # small background batches: a page waits little
    done, total = caption_progress(collection.catalog)
    assert (done, total) == (11, 11)  # the duplicate file shares its content's caption

    restarted = FakeCaptioner()
    worker = _worker(collection, restarted, background=True, quiet_s=0.0, rescan_s=3600.0)
    worker.start()
    try:
        assert worker.wait_idle(WAIT)
    finally:
        worker.stop()
    assert restarted.captioned == 0  # resumed: everything was committed already


def test_background_waits_while_requests_need_the_model(collection: Collection) -> None:
    fake = FakeCaptioner()
    # quiet_s is an hour: a request just came, so the background must not start at all
    worker = _worker(collection, fake, background=True, quiet_s=3600.0)
    recs = _records(collection)
    asked = worker.request(recs[5:7])  # before the thread starts: its first look sees a request
    worker.start()
    try:
        assert worker.wait(asked, WAIT) == dict.fromkeys(asked)
    finally:
        worker.stop()
    assert fake.captioned == 2
    assert worker.progress().background is True


def test_a_background_batch_gives_way_to_a_request_and_is_captioned_later(collection: Collection) -> None:
    gate = threading.Event()
    fake = FakeCaptioner(gate)
    worker = _worker(collection, fake, background=True, background_batch=2, quiet_s=0.0)
    worker.start()
    recs = _records(collection)
    try:
        assert fake.started.wait(WAIT)  # a background batch is "decoding", held by the gate
        worker.note_activity()  # a search starts: the batch must stop, not run to its end
        deadline = time.monotonic() + WAIT
        while worker.progress().yielded == 0:
            assert time.monotonic() < deadline, "the background batch never gave way"
            time.sleep(0.01)
        assert fake.interrupted == 1 and fake.captioned == 0  # nothing was stored from the cut batch
        gate.set()
        asked = worker.request(recs[:1])
        assert worker.wait(asked, WAIT) == dict.fromkeys(asked)  # a request's own batch is never cut
        assert worker.wait_idle(WAIT)
    finally:
        worker.stop()
    assert caption_progress(collection.catalog) == (11, 11)  # the cut batch went back in line
    assert fake.interrupted == 1


def test_an_image_the_model_cannot_caption_fails_alone(collection: Collection) -> None:
    recs = _records(collection)
    fake = FakeCaptioner(bad_size=(96, 72))  # every synthetic image has this size: the batch fails...
    worker = _worker(collection, fake, background=False)
    worker.start()
    try:
        asked = worker.request(recs[:3])
        done = worker.wait(asked, WAIT)
    finally:
        worker.stop()
    assert set(done) == set(asked)
    assert all(reason == FAILED for reason in done.values())  # ...and each says so: nobody waits forever


def test_a_missing_model_turns_captioning_off_with_the_reason(collection: Collection) -> None:
    def make() -> CaptionService:
        raise ModelUnavailable("no weights for 'blip-base' on this machine")

    worker = CaptionWorker(collection, make, background=True)
    worker.start()
    hashes = [r.content_hash or "" for r in _records(collection)[:2]]
    finished = worker.wait(hashes, WAIT)  # waiters are released with the reason, not left hanging
    assert all("no weights" in str(reason) for reason in finished.values())
    progress = worker.progress()
    assert progress.problem is not None and "no weights" in progress.problem
    assert not worker.active
    assert worker.request(_records(collection)[:2]) == []  # nothing is queued for a worker that cannot run
    worker.stop()


def test_the_captioner_is_warmed_up_before_the_worker_says_ready(collection: Collection) -> None:
    gate = threading.Event()

    class WarmedCaptioner(FakeCaptioner):
        warmed = 0

        def warm_up(self) -> None:
            assert gate.wait(WAIT)  # held: the worker must not say ready meanwhile
            self.warmed += 1

    fake = WarmedCaptioner()
    worker = _worker(collection, fake, background=False)
    worker.start()
    try:
        assert not worker.progress().ready  # still warming up: a page would wait on cold kernels
        gate.set()
        recs = _records(collection)[:1]
        assert worker.wait(worker.request(recs), WAIT) == dict.fromkeys(r.content_hash for r in recs)
        assert worker.progress().ready and fake.warmed == 1
        assert fake.captioned == 1  # the warm-up captions nothing of the collection
    finally:
        worker.stop()
