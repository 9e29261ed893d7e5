"""A server pays a first query's one-time costs before it says ready, and keeps no trace of its probe."""

from __future__ import annotations

from explainer.cards.evidence import NoEvidence, make_evidence_provider
from explainer.server.state import _warm_up
from retrieval.encoders.serving import ServingEncoder
from retrieval.search import Searcher
from tests.helpers import index_shapes


def test_warm_up_loads_what_the_first_page_needs(tmp_path, tiny_clip_dir) -> None:  # type: ignore[no-untyped-def]
    _, data, _ = index_shapes(tmp_path, tiny_clip_dir, 6)
    searcher = Searcher.open(data, precision="fp32")
    try:
        encoder = searcher.encoder
        assert isinstance(encoder, ServingEncoder) and not encoder.loaded
        _warm_up(searcher, make_evidence_provider(4))  # dense evidence on CLIP runs the image tower
        assert encoder.loaded and searcher._calibrations
        assert len(searcher.cache.results) == 0 and len(searcher.cache.vectors) == 0
    finally:
        searcher.close()


def test_without_evidence_the_image_tower_stays_unloaded(tmp_path, tiny_clip_dir) -> None:  # type: ignore[no-untyped-def]
    _, data, _ = index_shapes(tmp_path, tiny_clip_dir, 4)
    searcher = Searcher.open(data, precision="fp32")
    try:
        _warm_up(searcher, NoEvidence("off"))
        assert isinstance(searcher.encoder, ServingEncoder) and not searcher.encoder.loaded
        assert searcher._calibrations
    finally:
        searcher.close()
