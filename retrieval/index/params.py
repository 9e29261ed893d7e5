"""What an index is built and searched with: its knobs, their defaults, and the sizing rules.

Every index kind reads its structural knobs (IVF lists, PQ sub-quantisers) from the rules here, so the
in-memory IVF-PQ, the on-disk IVF and tune-index size their indexes the same way, and a change to a
rule is made once. Nothing here imports faiss: the table of kinds, the store and the on-disk builder
all sit above this module.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

#: Training points per centroid that faiss asks for (it warns below 39): an IVF index of `nlist` lists
#: needs `POINTS_PER_CENTROID * nlist` vectors before it can be trained.
POINTS_PER_CENTROID = 39
#: Most inverted lists any rule picks (faiss's k-means slows past it, and no collection here needs more).
MAX_LISTS = 65536

DEFAULT_NPROBE = 32
#: Candidates re-ranked per result by a refine step (`…,Refine(SQ8)`, `ivf-ondisk`). PQ64 codes alone
#: cap recall@10 near 0.73 (100k) / 0.63 (1M) whatever nprobe is. Re-scoring with SQ8 codes at 1M:
#: 4x 0.937, 8x 0.978 for 3 % more latency, 16x 0.986 for 10 % (at 100k: 4x 0.983, 8x 0.993); 8x is the
#: smallest depth past 0.95 at 1M (bench/RESULTS.md). Indexes keep the depth they were built with.
DEFAULT_REFINE_K = 8
DEFAULT_EF_SEARCH = 128
#: HNSW build beam. faiss's default (40) left recall@10 at 0.887 on 1M clustered vectors, where
#: 128 reached 0.988 for about twice the build time (bench/RESULTS.md).
DEFAULT_EF_CONSTRUCTION = 128
#: faiss's default efConstruction, which every HNSW index written under manifest schema 1 was built with.
FAISS_DEFAULT_EF_CONSTRUCTION = 40
#: Links per HNSW node when the user names no M.
DEFAULT_HNSW_M = 32


def ivf_lists(n: int, floor: int = 1) -> int:
    """Inverted lists for `n` vectors: about 4 sqrt(n) (autofaiss's rule of thumb), a power of two,
    never more than `n` can train (POINTS_PER_CENTROID each) nor MAX_LISTS, and at least `floor`."""
    raw = 2 ** round(math.log2(4 * math.sqrt(max(n, 1))))
    return max(floor, min(raw, n // POINTS_PER_CENTROID, MAX_LISTS))


def pq_subquantizers(dim: int, min_bytes: int = 1) -> int:
    """PQ sub-quantisers (code bytes per vector) for `dim`: one per 8 dimensions, but at least
    `min_bytes` (capped at `dim`), and always a divisor of `dim`, as faiss requires."""
    most = max(dim // 8, min(dim, min_bytes))
    return max(d for d in range(1, dim + 1) if dim % d == 0 and d <= most)


@dataclass(frozen=True)
class SearchParams:
    """Query-time knobs of approximate indexes (ignored by exact search).

    `single_query_threads` caps faiss's OpenMP team while one query vector is searched: there is
    nothing to split across threads, and waking them costs more than it saves (it stalls for a
    scheduler tick when another process holds a core). None leaves faiss's setting alone.
    """

    nprobe: int = DEFAULT_NPROBE
    ef_search: int = DEFAULT_EF_SEARCH
    single_query_threads: int | None = 1
    k_factor: int = DEFAULT_REFINE_K


@dataclass(frozen=True)
class IndexParams:
    """What an index was built with and searches with by default, recorded in the manifest.

    `nlist`, `pq_m` and `hnsw_m` are read from the factory string (`IVF{nlist}`, `PQ{m}`,
    `HNSW{M}`); the others are not expressible there. A field is None when the index has no such knob.
    """

    nlist: int | None = None
    pq_m: int | None = None
    hnsw_m: int | None = None
    ef_construction: int | None = None
    ef_search: int | None = None
    nprobe: int | None = None
    k_factor: int | None = None  # candidates per result that a refine step re-scores

    @classmethod
    def for_factory(
        cls,
        factory: str,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        search: SearchParams | None = None,
    ) -> IndexParams:
        search = search or SearchParams()
        nlist = pq_m = hnsw_m = None
        for part in factory.split(","):
            part = part.strip()
            if found := re.match(r"^IVF(\d+)", part):
                nlist = int(found.group(1))
            elif found := re.match(r"^PQ(\d+)", part):
                pq_m = int(found.group(1))
            elif found := re.match(r"^HNSW(\d+)", part):
                hnsw_m = int(found.group(1))
        hnsw = hnsw_m is not None
        refined = bool(re.search(r"(^|,)\s*(RFlat|Refine\(|ivf-ondisk)", factory))
        return cls(
            nlist=nlist,
            pq_m=pq_m,
            hnsw_m=hnsw_m,
            ef_construction=ef_construction if hnsw else None,
            ef_search=search.ef_search if hnsw else None,
            nprobe=search.nprobe if nlist is not None else None,
            k_factor=search.k_factor if refined else None,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexParams:
        return cls(**{k: int(v) for k, v in data.items() if k in cls.__dataclass_fields__ and v is not None})

    def with_search(self, search: SearchParams) -> IndexParams:
        """These parameters with other query-time knobs, where the index has them."""
        return replace(
            self,
            ef_search=search.ef_search if self.hnsw_m is not None else None,
            nprobe=search.nprobe if self.nlist is not None else None,
            k_factor=search.k_factor if self.k_factor is not None else None,
        )

    @property
    def search(self) -> SearchParams:
        """The recorded query-time knobs, defaults where the index has none."""
        return SearchParams(
            nprobe=self.nprobe or DEFAULT_NPROBE,
            ef_search=self.ef_search or DEFAULT_EF_SEARCH,
            k_factor=self.k_factor or DEFAULT_REFINE_K,
        )
