"""Sharded search: a collection's vectors split across Ray actors, queries fanned out, top-K merged.

Each shard is exact, so the merged top-K equals one exact search over the whole collection.
`clearsight serve --engine ray --shards N` serves through `ShardedSearcher`.

Each shard holds an exact (or any factory's) index over its slice of the ids; the driver sends a
query to every shard at once and merges their top-K lists. With exact shards the merge is exact:
the global top-K is the top-K of the union of every shard's top-K. A shard that fails or does not
answer in time is left out and the result says so (`partial`, `failed_shards`), rather than the
whole search failing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from retrieval.collection import Collection
from retrieval.errors import ConfigError
from retrieval.index.base import Index, check_vectors
from retrieval.index.faiss_index import VectorIndex
from retrieval.index.params import IndexParams, SearchParams
from retrieval.search import Searcher
from retrieval.types import Float32Array, Int64Array

#: Most shards a collection may be split into: each is an actor with its own process.
MAX_SHARDS = 256


@dataclass
class ShardedResult:
    scores: Float32Array
    ids: Int64Array
    partial: bool = False
    failed_shards: list[int] = field(default_factory=list)


def merge_topk(
    parts: list[tuple[Float32Array, Int64Array]], k: int, nq: int
) -> tuple[Float32Array, Int64Array]:
    """Exact top-k of several (scores, ids) lists per query: higher score first, then lower id."""
    if not parts:
        return np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64)
    scores = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    scores = np.where(ids < 0, -np.inf, scores)
    k = min(k, int((ids >= 0).sum(axis=1).max(initial=0)))
    out_s = np.zeros((nq, k), np.float32)
    out_i = np.full((nq, k), -1, np.int64)
    for q in range(nq):
        order = np.lexsort((ids[q], -scores[q]))[:k]
        out_s[q], out_i[q] = scores[q, order], ids[q, order]
    return out_s, out_i


def split_ids(ids: Int64Array, shards: int) -> list[np.ndarray]:
    """Which rows go to which shard: round-robin over the sorted ids, so shards stay even as ids grow."""
    order = np.argsort(ids, kind="stable")
    return [order[s::shards] for s in range(shards)]


class ShardActor:
    """One shard: an index over a slice of the collection, searched on request."""

    def __init__(self, ids: Int64Array, vectors: Float32Array, dim: int, factory: str) -> None:
        self.index = VectorIndex.build(ids, vectors, factory, dim)

    def search(self, queries: Float32Array, k: int, params: SearchParams | None) -> tuple[Any, Any]:
        return self.index.search(queries, k, params)

    def ntotal(self) -> int:
        return self.index.ntotal


class ShardedIndex:
    """N ShardActors over one collection's vectors; `search` fans out and merges exactly."""

    def __init__(
        self,
        ids: Int64Array,
        vectors: Float32Array,
        dim: int,
        shards: int,
        *,
        factory: str = "Flat",
        timeout_s: float = 10.0,
        ray_module: Any = None,
    ) -> None:
        if not 1 <= shards <= MAX_SHARDS:
            raise ConfigError(f"shards must be between 1 and {MAX_SHARDS}, got {shards}")
        if not timeout_s > 0:
            raise ConfigError(f"shard timeout must be positive, got {timeout_s}")
        vectors = check_vectors(vectors, dim)
        if ray_module is None:
            import ray as ray_module
        self._ray = ray_module
        self.dim = dim
        self.timeout_s = timeout_s
        self._ids = np.sort(np.asarray(ids, dtype=np.int64))  # the catalog ids the shards hold, together
        remote = self._ray.remote(num_cpus=0)(ShardActor)
        self.actors = [
            remote.remote(np.ascontiguousarray(ids[rows]), np.ascontiguousarray(vectors[rows]), dim, factory)
            for rows in split_ids(np.asarray(ids, dtype=np.int64), shards)
        ]
        self._ray.get([a.ntotal.remote() for a in self.actors])  # built and answering

    @classmethod
    def from_collection(
        cls, collection: Collection, fingerprint: str, dim: int, shards: int, **kw: Any
    ) -> ShardedIndex:
        ids, vecs = collection.catalog.indexed_vectors(fingerprint, dim)
        return cls(ids, vecs, dim, shards, **kw)

    @property
    def ntotal(self) -> int:
        return len(self._ids)

    def ids(self) -> Int64Array:
        return self._ids.copy()

    def search(self, queries: Float32Array, k: int, params: SearchParams | None = None) -> ShardedResult:
        queries = check_vectors(queries, self.dim, "queries")
        ray = self._ray
        refs = [a.search.remote(queries, k, params) for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
        ready_set = set(ready)
        parts: list[tuple[Float32Array, Int64Array]] = []
        failed: list[int] = []
        for n, ref in enumerate(refs):
            if ref not in ready_set:
                failed.append(n)
                ray.cancel(ref, force=False)
                continue
            try:
                parts.append(ray.get(ref))
            except Exception:  # the actor died or raised: this shard is missing from the answer
                failed.append(n)
        scores, ids = merge_topk(parts, k, len(queries))
        return ShardedResult(scores, ids, partial=bool(failed), failed_shards=failed)

    def close(self) -> None:
        for a in self.actors:
            self._ray.kill(a)
        self.actors = []


class ShardedVectorIndex(Index):
    """A ShardedIndex behind the Index interface, so the Searcher (and so the page and the API)
    search it unchanged. Which shards a search missed is kept per thread, for `missing_shards`."""

    what = "a sharded index"

    def __init__(self, sharded: ShardedIndex, factory: str, params: IndexParams) -> None:
        super().__init__(sharded.dim, factory, params)
        self.sharded = sharded
        self._local = threading.local()

    def with_params(self, params: IndexParams) -> ShardedVectorIndex:
        return ShardedVectorIndex(self.sharded, self.factory, params)

    @property
    def ntotal(self) -> int:
        return self.sharded.ntotal

    def ids(self) -> Int64Array:
        return self.sharded.ids()

    def search(
        self, queries: Float32Array, k: int, params: SearchParams | None = None
    ) -> tuple[Float32Array, Int64Array]:
        res = self.sharded.search(queries, k, params)
        self._local.missing = res.failed_shards
        return res.scores, res.ids

    @property
    def missing_shards(self) -> list[int]:
        """Shards that did not answer this thread's last search (empty: the result is complete)."""
        return list(getattr(self._local, "missing", []))

    def to_bytes(self) -> bytes:
        raise ConfigError("a sharded index lives in Ray actors; save the collection's own index instead")


class ShardedSearcher(Searcher):
    """A Searcher whose image index is split over Ray actors, rebuilt when a new version appears."""

    def __init__(self, searcher: Searcher, shards: int, timeout_s: float = 10.0) -> None:
        super().__init__(searcher.collection, searcher.encoder, searcher.index, searcher.params)
        self.shards = shards
        self.timeout_s = timeout_s
        self._shard()

    def _shard(self) -> None:
        info = self.encoder.info
        old = self.index.images
        sharded = ShardedIndex.from_collection(
            self.collection, info.fingerprint, info.dim, self.shards, timeout_s=self.timeout_s
        )
        self.index = replace(self.index, images=ShardedVectorIndex(sharded, "Flat", IndexParams()))
        if isinstance(old, ShardedVectorIndex):
            old.sharded.close()

    def reload(self) -> bool:
        if not super().reload():
            return False
        self._shard()
        return True

    def close(self) -> None:
        images = self.index.images
        if isinstance(images, ShardedVectorIndex):
            images.sharded.close()
        super().close()
