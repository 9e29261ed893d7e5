"""Bring the FAISS indexes in line with the catalog, and save a new version only when they changed.

The catalog is the source of truth; the indexes are derived. This is what lets every writer
(ingest, captioning, a crashed run's successor) finish by calling one function.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from .collection import Collection
from .encoders import Encoder
from .errors import IndexMismatch
from .index import (
    DEFAULT_EF_CONSTRUCTION,
    LoadedIndex,
    Manifest,
    SearchParams,
    VectorIndex,
    resolve_factory,
    same_layout,
)
from .types import Float32Array


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
    collection: Collection, encoder: Encoder, texts: list[str], progress: bool = False
) -> Float32Array:
    """Text embeddings through the catalog's cache, so captions are embedded once per model."""
    fp = encoder.info.fingerprint
    unique = list(dict.fromkeys(texts))
    have = collection.catalog.get_text_embeddings(unique, fp)
    missing = [t for t in unique if t not in have]
    step = 256
    bar = tqdm(total=len(missing), desc="captions", unit="text", disable=not progress or not missing)
    for i in range(0, len(missing), step):
        chunk = missing[i : i + step]
        vecs = encoder.encode_texts(chunk)
        new = {t: vecs[k] for k, t in enumerate(chunk)}
        collection.catalog.put_text_embeddings(fp, new)
        have.update(new)
        bar.update(len(chunk))
    bar.close()
    if not texts:
        return np.zeros((0, encoder.info.dim), np.float32)
    return np.stack([have[t] for t in texts]).astype(np.float32)


def sync_indexes(
    collection: Collection,
    encoder: Encoder,
    factory: str | None = None,
    force_rebuild: bool = False,
    progress: bool = False,
    search: SearchParams | None = None,
    ef_construction: int = DEFAULT_EF_CONSTRUCTION,
) -> SyncReport:
    """Update (or rebuild) the indexes from the catalog.

    `search` sets the query-time knobs recorded in the manifest (default: keep what the current
    index records); `ef_construction` applies when an HNSW index is (re)built.
    """
    info = encoder.info
    store = collection.store
    current: LoadedIndex | None = None
    if store.exists() and not force_rebuild:
        manifest = store.read_manifest()
        if manifest.fingerprint != info.fingerprint:
            raise IndexMismatch(
                f"{collection.data_dir} holds an index built with {manifest.model_name!r}; "
                f"to index with {info.name!r} use another --data-dir or pass --rebuild"
            )
        current = store.load()
        factory = factory or manifest.factory
        search = search or current.images.params.search
    factory = factory or "flat"

    ids, vecs = collection.catalog.indexed_vectors(info.fingerprint, info.dim)
    built, note = resolve_factory(factory, len(ids), info.dim)
    added = removed = 0
    rebuilt = params_changed = False
    images: VectorIndex
    if current is None or not same_layout(current.manifest.built_factory, built):
        images = VectorIndex.build(ids, vecs, built, info.dim, ef_construction=ef_construction, search=search)
        rebuilt, added = True, len(ids)
    else:
        images = current.images
        if search is not None and images.params.with_search(search) != images.params:
            params = images.params.with_search(search)
            images = VectorIndex(images.index, info.dim, images.factory, params)
            params_changed = True
        have = images.ids()
        to_remove = np.setdiff1d(have, ids, assume_unique=True)
        to_add = np.isin(ids, have, invert=True)
        if len(to_remove) and not images.supports_remove:
            images = VectorIndex.build(
                ids, vecs, built, info.dim, ef_construction=ef_construction, search=search
            )
            rebuilt, added, removed = True, len(ids), len(to_remove)
        else:
            images.remove(to_remove)
            images.add(ids[to_add], vecs[to_add])
            added, removed = int(to_add.sum()), len(to_remove)

    caps = collection.catalog.all_captions()
    cap_ids = np.asarray([c.id for c in caps], dtype=np.int64)
    cap_vecs = embed_texts_cached(collection, encoder, [c.text for c in caps], progress=progress)
    captions_changed = current is None or not np.array_equal(np.sort(current.captions.ids()), cap_ids)
    captions = (
        current.captions
        if current is not None and not captions_changed
        else VectorIndex.build(cap_ids, cap_vecs, "Flat", info.dim)
    )

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
        )
        version = store.save(manifest, images, captions)
    return SyncReport(images.ntotal, captions.ntotal, added, removed, rebuilt, version, images.factory, note)
