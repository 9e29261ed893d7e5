"""The captions stage: a caption for each hit of a page, from the catalog or generated on demand.

BLIP never runs inside a server request: the server reads what the catalog holds and hands the
hits that lack a caption to its captioning worker (`ScheduledCaptions`), whose captions the page
fetches per card; `clearsight search --caption` may run BLIP for the hits that lack one, because a
CLI user asked and can wait. Both write what they generate to the cache `clearsight caption` fills.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from explainer.captions.captioner import SOURCE_PREFIX, CaptionerConfig, CaptionService, create_captioner
from explainer.captions.worker import CaptionWorker
from retrieval.search import Hit, Searcher

if TYPE_CHECKING:
    from explainer.settings import Settings

Warn = Callable[[str], None]

#: How long an explanation waits for its hit's caption before it is written without one.
SETTLE_S = 60.0


@dataclass(frozen=True)
class CardCaptions:
    caption: str | None
    source: str | None  # "generated:<model>", "dataset" or None
    dataset: list[str]


class CaptionProvider(Protocol):
    """Captions for a page of hits."""

    def lookup(self, hits: Sequence[Hit]) -> list[CardCaptions]: ...


class CatalogCaptions:
    """A generated caption when `clearsight caption` has written one, else the dataset's first caption.

    `clearsight caption` attaches each generated caption to its images under the source
    "generated:<model>", so one catalog read per page answers both kinds.
    """

    def __init__(self, searcher: Searcher) -> None:
        self._searcher = searcher

    def lookup(self, hits: Sequence[Hit]) -> list[CardCaptions]:
        return self.by_ids([h.id for h in hits])

    def by_ids(self, image_ids: Sequence[int]) -> list[CardCaptions]:
        records = self._searcher.collection.catalog.captions_for(list(image_ids))
        out: list[CardCaptions] = []
        for image_id in image_ids:
            caps = records.get(image_id, [])
            generated = [c for c in caps if c.source.startswith(SOURCE_PREFIX)]
            dataset = [c.text for c in caps if not c.source.startswith(SOURCE_PREFIX)]
            if generated:
                out.append(CardCaptions(generated[0].text, generated[0].source, dataset))
            elif dataset:
                out.append(CardCaptions(dataset[0], "dataset", dataset))
            else:
                out.append(CardCaptions(None, None, []))
        return out


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


class ScheduledCaptions:
    """What the catalog holds at once; hits without a caption are queued on the worker, in rank order.

    Rank order is the page's order, so the cards a user sees first are captioned first. `settle`
    is how an explanation waits for its hit's caption, so the caption grounds it.
    """

    def __init__(self, searcher: Searcher, worker: CaptionWorker) -> None:
        self._searcher = searcher
        self._catalog = CatalogCaptions(searcher)
        self.worker = worker

    def lookup(self, hits: Sequence[Hit]) -> list[CardCaptions]:
        found = self._catalog.lookup(hits)
        self.worker.note_activity()
        missing = [h.id for h, c in zip(hits, found, strict=True) if c.caption is None]
        if missing:
            self.schedule(missing)
        return found

    def by_ids(self, image_ids: Sequence[int]) -> list[CardCaptions]:
        return self._catalog.by_ids(image_ids)

    def schedule(self, image_ids: Sequence[int]) -> dict[int, str]:
        """Queue these images (in this order) for captioning; their content hashes by id, to wait on."""
        records = self._searcher.collection.catalog.get_images(list(image_ids))
        hashes: dict[int, str] = {}
        for i in image_ids:
            content = records[i].content_hash if i in records else None
            if content:
                hashes[i] = content
        self.worker.request(records[i] for i in hashes)
        return hashes

    def settle(self, image_ids: Sequence[int], timeout: float) -> dict[int, CardCaptions]:
        """The images' captions after waiting up to `timeout` for the ones still being generated."""
        found = self._catalog.by_ids(image_ids)
        missing = [i for i, c in zip(image_ids, found, strict=True) if c.caption is None]
        if missing and self.worker.active:
            self.worker.wait(list(self.schedule(missing).values()), timeout)
            found = self._catalog.by_ids(image_ids)
        return dict(zip(image_ids, found, strict=True))

    def close(self) -> None:
        """Stop the worker after its current batch (what it captioned is committed) and free the model."""
        self.worker.stop()


def server_captions(settings: Settings, searcher: Searcher) -> CaptionProvider:
    """The server's captions stage: scheduled on a started worker when captioning is on, else the catalog's.

    `auto` captions only when a captioner was chosen (CLEARSIGHT_CAPTION_MODEL), so a plain `clearsight
    serve` never loads the default BLIP unasked, and the demo (captioned before serving, with its own
    generation settings) is not captioned again.
    """
    model = settings.caption_model
    if settings.server_captions == "off" or (settings.server_captions == "auto" and model is None):
        return CatalogCaptions(searcher)
    collection = searcher.collection

    def make_service() -> CaptionService:
        config = CaptionerConfig.from_settings(settings, model=model)
        captioner = create_captioner(config)
        return CaptionService(
            collection, captioner, batch_size=config.resolved_batch_size(), prefix=settings.caption_prefix
        )

    worker = CaptionWorker(collection, make_service, background=settings.caption_background)
    worker.start()
    return ScheduledCaptions(searcher, worker)
