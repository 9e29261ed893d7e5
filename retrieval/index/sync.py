"""Bring the FAISS indexes in line with the catalog, and save a new version only when they changed.

The catalog is the source of truth; the indexes are derived. This is what lets every writer
(ingest, captioning, a crashed run's successor) finish by calling one function.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from retrieval.catalog import Catalog
from retrieval.collection import Collection
from retrieval.encoders import Encoder
from retrieval.errors import IndexMismatch
from retrieval.index import ondisk
from retrieval.index.auto import choose_index
from retrieval.index.base import BuildJob, Index
from retrieval.index.faiss_index import VectorIndex
from retrieval.index.kinds import AUTO, builder_for, captions_kind, resolve_factory, same_layout
from retrieval.index.params import DEFAULT_EF_CONSTRUCTION, SearchParams
from retrieval.index.store import LoadedIndex, Manifest
from retrieval.types import Float32Array


@dataclass(frozen=True)
class SyncReport:
    images: int
    captions: int
    added: int
    removed: int
    rebuilt: bool
    saved_version: str | None
    built_factory: str
    note: str


def embed_texts_cached(
    cache: Catalog | None,
    encoder: Encoder,
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    progress: bool = False,
) -> tuple[Float32Array, int]:
    """Text embeddings through a catalog's text cache, so captions are embedded once per model.

    `cache` None encodes everything. Returns the embeddings in `texts` order (repeats included) and how
    many distinct texts had to be encoded; the other distinct texts were cache hits.
    """
    fp = encoder.info.fingerprint
    unique = list(dict.fromkeys(texts))
    have = cache.get_text_embeddings(unique, fp) if cache is not None else {}
    missing = [t for t in unique if t not in have]
    bar = tqdm(total=len(missing), desc="captions", unit="text", disable=not progress or not missing)
    for i in range(0, len(missing), batch_size):
        chunk = missing[i : i + batch_size]
        vecs = encoder.encode_texts(chunk, batch_size=batch_size)
        new = dict(zip(chunk, vecs, strict=True))
        if cache is not None:
            cache.put_text_embeddings(fp, new)
        have.update(new)
        bar.update(len(chunk))
    bar.close()
    if not texts:
        return np.zeros((0, encoder.info.dim), np.float32), len(missing)
    return np.stack([have[t] for t in texts]).astype(np.float32, copy=False), len(missing)


def sync_indexes(
    collection: Collection,
    encoder: Encoder,
    factory: str | None = None,
    force_rebuild: bool = False,
    progress: bool = False,
    search: SearchParams | None = None,
    ef_construction: int = DEFAULT_EF_CONSTRUCTION,
    memory_budget: int | None = None,
    shard_runner: ondisk.ShardRunner = ondisk.run_shards_here,
) -> SyncReport:
    """Update (or rebuild) the indexes from the catalog.

    `search` sets the query-time knobs recorded in the manifest (default: keep what the current
    index records); `ef_construction` applies when an HNSW index is (re)built. `factory` "auto"
    picks a layout from the collection's size and `memory_budget` (bytes) at every sync.
    `shard_runner` fills the shards of an `ivf-ondisk` build (in this process by default; the Ray
    engine passes one that runs them as Ray tasks).
    """
    info = encoder.info
    store = collection.store
    current: LoadedIndex | None = None
    if store.exists() and not force_rebuild:
        manifest = store.read_manifest()
        if manifest.fingerprint != info.fingerprint:
            raise IndexMismatch(
                f"{collection.data_dir} holds an index built with {manifest.model_name!r}, not {info.name!r}",
                remedy="other_data_dir",
            )
        current = store.load()
        factory = factory or manifest.factory
        search = search or current.images.params.search
    factory = factory or "flat"

    ids, vecs = collection.catalog.indexed_vectors(info.fingerprint, info.dim)
    kind = factory  # the kind both indexes follow: "auto" resolved to what it chose
    if factory == AUTO:
        choice = choose_index(len(ids), info.dim, memory_budget)
        kind = choice.kind
        built, note = resolve_factory(choice.kind, len(ids), info.dim)
        note = f"auto: {choice.reason}" + (f"; {note}" if note else "")
    else:
        built, note = resolve_factory(factory, len(ids), info.dim)
    added = removed = 0
    rebuilt = params_changed = False
    images: Index

    def build() -> Index:
        previous = current.manifest.built_factory if current is not None else None
        job = BuildJob(
            ids, vecs, info.dim, built, ef_construction, search, previous, store.root, shard_runner
        )
        return builder_for(built)(job)

    store.root.mkdir(parents=True, exist_ok=True)
    if current is None or not same_layout(current.manifest.built_factory, built):
        images = build()
        rebuilt, added = True, len(ids)
    else:
        images = current.images
        params = images.params.with_search(search) if search is not None else images.params
        if params != images.params:
            images = images.with_params(params)
            params_changed = True
        have = images.ids()
        to_remove = np.setdiff1d(have, ids, assume_unique=True)
        to_add = np.isin(ids, have, invert=True)
        if (len(to_remove) and not images.supports_remove) or (to_add.any() and not images.supports_add):
            images = build()
            rebuilt, added, removed = True, len(ids), len(to_remove)
        else:
            images.remove(to_remove)
            images.add(ids[to_add], vecs[to_add])
            added, removed = int(to_add.sum()), len(to_remove)

    caps = collection.catalog.all_captions()
    cap_ids = np.asarray([c.id for c in caps], dtype=np.int64)
    cap_vecs, _ = embed_texts_cached(collection.catalog, encoder, [c.text for c in caps], progress=progress)
    # the captions index follows the images index's kind (resolved for its own count: too few
    # captions to train IVF stay exact) unless the kind's row names another, and its search knobs
    cap_built, _ = resolve_factory(captions_kind(built, kind), len(cap_ids), info.dim)
    captions_changed = (
        current is None
        or rebuilt
        or not same_layout(current.manifest.captions_factory, cap_built)
        or not np.array_equal(np.sort(current.captions.ids()), np.sort(cap_ids))
    )
    captions = (
        current.captions
        if current is not None and not captions_changed
        else VectorIndex.build(
            cap_ids, cap_vecs, cap_built, info.dim, ef_construction=ef_construction, search=search
        )
    )
    if params_changed and not captions_changed:
        cap_params = captions.params.with_search(images.params.search)
        captions = captions.with_params(cap_params)

    changed = rebuilt or added or removed or captions_changed or params_changed
    version = None
    if changed:
        manifest = Manifest(
            model_name=info.name,
            model_id=info.model_id,
            fingerprint=info.fingerprint,
            dim=info.dim,
            factory=factory,
            built_factory=images.factory,  # an index kept by `same_layout` says what it really is
            count=images.ntotal,
            captions_count=captions.ntotal,
            note=note,
            params=images.params,
            captions_factory=captions.factory,
            captions_params=captions.params,
            precision=info.precision,
        )
        version = store.save(manifest, images, captions)
    return SyncReport(images.ntotal, captions.ntotal, added, removed, rebuilt, version, images.factory, note)
