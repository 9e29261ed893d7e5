"""The captions stage: a caption for each hit of a page, from the catalog or generated on demand.

The server reads only what `clearsight caption` cached in the catalog (BLIP never runs inside a
request); `clearsight search --caption` may run BLIP for the hits that lack one, because a CLI
user asked and can wait, and writes what it generates to the same cache.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from explainer.captions.captioner import SOURCE_PREFIX, CaptionService
from retrieval.search import Hit, Searcher

Warn = Callable[[str], None]


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
        records = self._searcher.collection.catalog.captions_for([h.id for h in hits])
        out: list[CardCaptions] = []
        for hit in hits:
            caps = records.get(hit.id, [])
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
