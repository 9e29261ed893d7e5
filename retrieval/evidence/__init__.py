"""Region evidence: where in each hit the query matches, as boxes in the displayed image's pixels.

Three methods, picked by `EvidenceConfig.method`: "grid" (encode grid cells, works with any
encoder), "dense" (one forward pass per hit, a per-patch map with value-value attention), "stored"
(dense from patch features saved at index time, no model pass). From a search:

    from retrieval.evidence import EvidenceConfig, evidence_for_hits
    result = searcher.search(query)
    for ev in evidence_for_hits(searcher, query, result.results, EvidenceConfig(method="dense")):
        print(ev.hit_id, [r.box for r in ev.regions])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from retrieval.encoders import Encoder
from retrieval.errors import ConfigError
from retrieval.evidence.dense import can_give_patches, dense_evidence, evidence_from_patches, view_geometry
from retrieval.evidence.grid import grid_boxes, grid_evidence, grid_evidence_per_hit, select_regions
from retrieval.evidence.render import render_evidence, write_evidence_pngs
from retrieval.evidence.stored import PatchStore, StoreReport, store_patch_features, stored_evidence
from retrieval.evidence.types import METHODS, Box, Evidence, EvidenceConfig, EvidenceTarget, Region
from retrieval.search import Hit
from retrieval.types import Float32Array

if TYPE_CHECKING:
    from retrieval.collection import Collection
    from retrieval.search import Query, Searcher

__all__ = [
    "METHODS",
    "Box",
    "Evidence",
    "EvidenceConfig",
    "EvidenceTarget",
    "PatchStore",
    "Region",
    "StoreReport",
    "can_give_patches",
    "default_method",
    "dense_evidence",
    "evidence_for_hits",
    "evidence_from_patches",
    "grid_boxes",
    "grid_evidence",
    "grid_evidence_per_hit",
    "render_evidence",
    "resolve_method",
    "select_regions",
    "store_collection_patches",
    "store_patch_features",
    "stored_evidence",
    "targets_for_hits",
    "view_geometry",
    "write_evidence_pngs",
]


def default_method(encoder: Encoder) -> str:
    """Dense where the encoder can give patch embeddings (CLIP), grid otherwise.

    Dense is the default because it is far faster (one pass per hit instead of one per cell) and
    at least as good on the synthetic-scene measurements (see tests/retrieval/evidence/test_quality.py).
    """
    return "dense" if can_give_patches(encoder) else "grid"


def resolve_method(config: EvidenceConfig, encoder: Encoder, store: PatchStore | None = None) -> str:
    """The method to run. "auto" resolves to `default_method(encoder)`, or to "stored" when that is
    dense and patch features were stored for this model (`clearsight index --patches`)."""
    if config.method != "auto":
        return config.method
    name = default_method(encoder)
    return "stored" if name == "dense" and store is not None and store.root.is_dir() else name


def _run_method(
    name: str,
    encoder: Encoder,
    query_vec: Float32Array,
    targets: Sequence[EvidenceTarget],
    config: EvidenceConfig,
    store: PatchStore | None,
) -> list[Evidence]:
    if name == "grid":
        return grid_evidence(encoder, query_vec, targets, config)
    if name == "dense":
        return dense_evidence(encoder, query_vec, targets, config)
    if store is None:
        raise ConfigError("stored evidence needs a patch store (a data directory); use dense or grid")
    return stored_evidence(encoder, query_vec, targets, config, store)


def targets_for_hits(hits: Sequence[Hit]) -> list[EvidenceTarget]:
    """Hits as evidence targets: path to decode, displayed size and content hash from the catalog."""
    return [EvidenceTarget.from_row(h) for h in hits]


def evidence_for_hits(
    searcher: Searcher,
    query: Query,
    hits: Sequence[Hit],
    config: EvidenceConfig | None = None,
    query_vec: Float32Array | None = None,
) -> list[Evidence]:
    """Evidence for each hit of a search, in the hits' order (pass `query_vec` to skip re-embedding)."""
    config = config or EvidenceConfig()
    if not hits:
        return []
    vec = searcher.embed_query(query) if query_vec is None else query_vec
    encoder = searcher.encoder
    store = PatchStore(searcher.collection.data_dir, encoder.info, surgery=config.surgery)
    name = resolve_method(config, encoder, store)
    return _run_method(name, encoder, vec, targets_for_hits(hits), config, store)


def store_collection_patches(
    collection: Collection, encoder: Encoder, config: EvidenceConfig | None = None, progress: bool = False
) -> tuple[PatchStore, StoreReport]:
    """Store patch features for every indexed image of a collection not stored yet, so "stored"
    evidence needs no model pass at query time (`clearsight index --patches`)."""
    config = config or EvidenceConfig()
    store = PatchStore(collection.data_dir, encoder.info, surgery=config.surgery)
    targets = [EvidenceTarget.from_row(r) for r in collection.catalog.iter_images(state="indexed")]
    return store, store_patch_features(encoder, store, targets, config, progress)
