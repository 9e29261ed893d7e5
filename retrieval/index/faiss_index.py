"""A FAISS index held in memory: the `Index` kind behind flat, hnsw, ivf, ivfpq and factory strings.

The manifest records the knobs the index was built and is searched with (`IndexParams`), so a
loaded index searches as it was configured; every search passes its knobs per call rather than
setting them on the shared faiss object, so concurrent searches with different knobs cannot race.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retrieval.errors import IndexCorrupt
from retrieval.index.base import Index, check_vectors, omp_threads
from retrieval.index.params import DEFAULT_EF_CONSTRUCTION, IndexParams, SearchParams
from retrieval.types import Float32Array, Int64Array

#: faiss's bundled type stubs lack SearchParametersHNSW and the keyword constructors of the SWIG classes.
_faiss_untyped: Any = faiss


def _unwrap(index: Any) -> tuple[Any, list[float]]:
    """The index that holds the data, through IDMap, pre-transform and refine wrappers, and the
    k_factor of each refine wrapper passed, outermost first."""
    index = faiss.downcast_index(index)
    refines: list[float] = []
    for _ in range(8):
        if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
            index = faiss.downcast_index(index.index)
        elif isinstance(index, faiss.IndexRefine):
            refines.append(float(index.k_factor))
            index = faiss.downcast_index(index.base_index)
        else:
            break
    return index, refines


def id_selector(allowed: Int64Array) -> tuple[Any, Any]:
    """A FAISS selector admitting the sorted ids `allowed`, and what must stay alive while it is used.

    A bitmap over the id range when that is no more than 8 bytes an allowed id (catalog ids are dense
    rowids, so nearly always): a bit test per candidate, built in one NumPy call. Otherwise a batch
    selector (a hash set with a Bloom filter in front).
    """
    top = int(allowed[-1]) + 1 if len(allowed) else 0
    if top <= 64 * len(allowed) + (1 << 20):
        bits = np.zeros(top, dtype=bool)
        bits[allowed] = True
        bitmap = np.packbits(bits, bitorder="little")  # faiss tests bit (i & 7) of byte i >> 3
        # faiss takes the bitmap's length in bytes, and admits nothing past it
        return _faiss_untyped.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap)), bitmap
    return _faiss_untyped.IDSelectorBatch(allowed), allowed


def _ivf(index: Any) -> Any | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index
        return None


class VectorIndex(Index):
    """A FAISS inner-product index whose ids are catalog ids."""

    def __init__(self, index: Any, dim: int, factory: str, params: IndexParams | None = None) -> None:
        super().__init__(dim, factory, params or IndexParams.for_factory(factory))
        self.index = index
        inner, self._refines = _unwrap(index)
        self._ivf = _ivf(index)  # the IVF or HNSW part found through any wrappers, or None
        self._hnsw = inner.hnsw if hasattr(inner, "hnsw") else None
        self._direct_map_lock = threading.Lock()
        self._set_defaults()

    @classmethod
    def build(
        cls,
        ids: Int64Array,
        vectors: Float32Array,
        factory: str,
        dim: int,
        *,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        search: SearchParams | None = None,
    ) -> VectorIndex:
        vectors = check_vectors(vectors, dim)
        index = faiss.index_factory(dim, f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
        params = IndexParams.for_factory(factory, ef_construction, search)
        refine = faiss.downcast_index(_faiss_untyped.downcast_index(index).index)
        if isinstance(refine, faiss.IndexRefine) and params.k_factor is not None:
            refine.k_factor = float(params.k_factor)  # serialized with the index; faiss's default is 1
        out = cls(index, dim, factory, params)
        if not index.is_trained:
            index.train(vectors)
        if len(ids):
            index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
        return out

    def with_params(self, params: IndexParams) -> VectorIndex:
        return VectorIndex(self.index, self.dim, self.factory, params)

    def _set_defaults(self) -> None:
        """Store the recorded knobs in the faiss object itself, found through any wrappers.

        Searches pass their knobs per call anyway (see `search`); this keeps the serialized index
        and anyone using `self.index` directly in line with the manifest, and gives later
        additions to an HNSW graph the recorded efConstruction.
        """
        if self._ivf is not None and self.params.nprobe is not None:
            self._ivf.nprobe = self.params.nprobe
        if self._hnsw is not None:
            if self.params.ef_construction is not None:
                self._hnsw.efConstruction = self.params.ef_construction
            if self.params.ef_search is not None:
                self._hnsw.efSearch = self.params.ef_search

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def ids(self) -> Int64Array:
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    @property
    def supports_remove(self) -> bool:
        """Only a flat index: faiss's IDMap compacts its id map after a removal, assuming the inner
        index renumbers what is left, as IndexFlat does. An IVF keeps its numbers, so removing ids
        through the IDMap made every later id wrong (a search for image 5 answered 7); HNSW cannot
        remove and IndexRefine has no remove_ids. The others are rebuilt by the sync instead."""
        return isinstance(_unwrap(self.index)[0], faiss.IndexFlat) and not self._refines

    @property
    def supports_add(self) -> bool:
        return True

    def add(self, ids: Int64Array, vectors: Float32Array) -> None:
        vectors = check_vectors(vectors, self.dim)
        if len(ids):
            self.index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: Int64Array) -> None:
        if len(ids):
            self.index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64))

    def search(
        self, queries: Float32Array, k: int, params: SearchParams | None = None
    ) -> tuple[Float32Array, Int64Array]:
        """Top-k by inner product; `params` None searches with the knobs the index was built with."""
        queries = check_vectors(queries, self.dim, "queries")
        k = max(0, min(int(k), self.ntotal))
        if k == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        params = params or self.params.search
        threads = params.single_query_threads if len(queries) == 1 else None
        chain = self._faiss_params(params)
        with omp_threads(threads):
            scores, ids = self.index.search(queries, k, params=chain[-1] if chain else None)
        return scores.astype(np.float32), ids.astype(np.int64)

    def _faiss_params(self, params: SearchParams) -> list[Any]:
        """Per-call faiss parameters, outermost last (empty for exact search).

        Unlike attributes set on the shared index, they cannot race with another thread's search.
        faiss hands them through IDMap and pre-transform wrappers by itself; a refine wrapper wants
        them inside its own parameters, which hold only a raw pointer: the caller keeps the whole
        list alive until the search returns.
        """
        if self._ivf is not None:
            chain = [_faiss_untyped.SearchParametersIVF(nprobe=params.nprobe)]
        elif self._hnsw is not None:
            chain = [_faiss_untyped.SearchParametersHNSW(efSearch=params.ef_search)]
        else:
            return []
        for k_factor in reversed(self._refines):
            if self.params.k_factor is not None:  # the recorded default, or this call's override
                k_factor = float(params.k_factor)
            chain.append(
                _faiss_untyped.IndexRefineSearchParameters(k_factor=k_factor, base_index_params=chain[-1])
            )
        return chain

    def reconstruct(self, id_: int) -> Float32Array:
        return np.asarray(self.index.reconstruct(int(id_)), dtype=np.float32)

    @property
    def exact(self) -> bool:
        return isinstance(_unwrap(self.index)[0], faiss.IndexFlat)

    def search_among(
        self, queries: Float32Array, k: int, allowed: Int64Array, params: SearchParams | None = None
    ) -> tuple[Float32Array, Int64Array] | None:
        """A selector search (flat, HNSW, IVF). Not for refine wrappers: faiss's IndexRefine does not
        hand the selector through reliably (it returned 2 of 10 allowed hits in a test), so they
        filter as kinds without a selector do."""
        if self._refines:
            return None
        queries = check_vectors(queries, self.dim, "queries")
        allowed = np.ascontiguousarray(allowed, dtype=np.int64)
        k = max(0, min(int(k), len(allowed), self.ntotal))
        if k == 0:
            return np.zeros((len(queries), 0), np.float32), np.full((len(queries), 0), -1, np.int64)
        params = params or self.params.search
        sel, _keep = id_selector(allowed)
        if self._ivf is not None:
            chosen = _faiss_untyped.SearchParametersIVF(sel=sel, nprobe=params.nprobe)
        elif self._hnsw is not None:  # the beam must hold k allowed hits
            chosen = _faiss_untyped.SearchParametersHNSW(sel=sel, efSearch=max(params.ef_search, k))
        else:
            chosen = _faiss_untyped.SearchParameters(sel=sel)
        with omp_threads(params.single_query_threads if len(queries) == 1 else None):
            scores, ids = self.index.search(queries, k, params=chosen)
        return scores.astype(np.float32), ids.astype(np.int64)

    def stored_vectors(self, ids: Int64Array) -> Float32Array | None:
        inner = _unwrap(self.index)[0]
        if self._refines:
            return None
        if isinstance(inner, faiss.IndexIVFFlat):
            # the lists hold the floats; reaching one by id needs a direct map, made on first use
            # (a hash table, about 16 bytes a vector; an IVF is never edited by removal, see above)
            with self._direct_map_lock:
                if inner.direct_map.type == _faiss_untyped.DirectMap.NoMap:
                    inner.set_direct_map_type(_faiss_untyped.DirectMap.Hashtable)
        elif not isinstance(inner, (faiss.IndexFlat, faiss.IndexHNSWFlat)):
            return None  # compressed codes (PQ, SQ): the catalog holds the floats
        try:
            out = self.index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))
        except RuntimeError:  # an id the index does not hold
            return None
        return np.asarray(out, dtype=np.float32)

    def to_bytes(self) -> bytes:
        return bytes(faiss.serialize_index(self.index))

    @classmethod
    def from_file(cls, path: Path, dim: int, factory: str, params: IndexParams | None = None) -> VectorIndex:
        try:
            index = faiss.read_index(str(path))
        except Exception as exc:
            raise IndexCorrupt(f"cannot read {path}: {exc}", remedy="rebuild") from exc
        if index.d != dim:
            raise IndexCorrupt(f"{path} holds {index.d}-d vectors but the manifest says {dim}")
        return cls(index, dim, factory, params)
