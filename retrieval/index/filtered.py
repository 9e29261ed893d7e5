"""Fetching hits from any index kind until a page is full: past stale ids, and inside a filter.

Both functions return the best (score, id) pairs, best first, and are never short because of what
they leave out: `fetch_valid` widens an ordinary search until enough hits pass a validity check;
`fetch_among` searches among an allowed set of ids exactly, choosing per index kind between a FAISS
ID selector, scoring the allowed vectors itself, and widening (docs/FILTERS.md).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from retrieval.index.base import Index
from retrieval.index.params import SearchParams
from retrieval.types import Float32Array, Int64Array

#: Up to this many allowed images, a filtered search scores every allowed vector itself (about 2 ms
#: for 20,000 vectors of 512 floats): exact, and faster than steering an approximate index through a
#: selective filter, which also loses hits when few neighbours are allowed (bench/filter_bench.py).
EXACT_SCAN_MAX = 20_000

#: Gives (ids held, their vectors) for sorted ids: the index's own copy, else the catalog's.
VectorsOf = Callable[[Int64Array], tuple[Int64Array, Float32Array]]


def fetch_among(
    idx: Index,
    vec: Float32Array,
    want: int,
    allowed: Int64Array,
    vectors_of: VectorsOf,
    params: SearchParams | None,
    min_score: float | None = None,
) -> list[tuple[float, int]]:
    """The best `want` (score, id) pairs among the sorted ids `allowed`, best first.

    Never short because of the filter: a flat index searches with a FAISS ID selector (exact); a small
    allowed set is scored exactly; an approximate index searches with a selector and, if its beam
    found fewer than there are, the allowed set is scored exactly after all; kinds without selectors
    (on-disk IVF, sharded) widen an ordinary search until enough allowed hits are found or the index
    is exhausted, then fall back to the exact score as well. docs/FILTERS.md says which kind does what.
    """
    n = len(allowed)
    if n == 0 or want <= 0:
        return []
    enough = min(want, n)

    def scan() -> list[tuple[float, int]]:
        ids, vecs = vectors_of(allowed)
        scores = vecs @ vec[0]
        top = np.argsort(-scores, kind="stable")[:want]
        return [(float(scores[t]), int(ids[t])) for t in top]

    def pairs(found: tuple[Float32Array, Int64Array]) -> list[tuple[float, int]]:
        return [(float(s), int(i)) for s, i in zip(found[0][0], found[1][0], strict=True) if i >= 0]

    best: list[tuple[float, int]] | None = None
    if idx.exact and (res := idx.search_among(vec, want, allowed, params)) is not None:
        best = pairs(res)
    elif n <= EXACT_SCAN_MAX:
        best = scan()
    elif (res := idx.search_among(vec, want, allowed, params)) is not None:
        best = pairs(res)
        if len(best) < enough:
            best = scan()
    else:

        def valid(ids: list[int]) -> list[bool]:
            return np.isin(np.asarray(ids, dtype=np.int64), allowed).tolist()

        best = fetch_valid(idx, vec, want, None, valid, params)
        if len(best) < enough:
            best = scan()
    if min_score is not None:
        best = [(s, i) for s, i in best if s >= min_score]
    return best


#: The first fetch asks for this many more than wanted; each further round doubles the fetch.
FIRST_EXTRA = 16


def fetch_valid(
    idx: Index,
    vec: Float32Array,
    want: int,
    min_score: float | None,
    valid: Callable[[list[int]], list[bool]],
    params: SearchParams | None,
) -> list[tuple[float, int]]:
    """The best `want` (score, id) pairs whose ids `valid` accepts, best first.

    The live index can hold ids the catalog no longer counts as indexed (files deleted or changed
    since the index was written, until the next sync). However many there are, the fetch grows
    until `want` valid hits are found, the index has nothing more to give, or scores fall below
    `min_score`, so a page is never short because of them.
    """
    total = idx.ntotal
    fetch = min(want + FIRST_EXTRA, max(total, 1))
    while True:
        scores, ids = idx.search(vec, fetch, params)
        pairs = [(float(s), int(i)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]
        ok = valid([i for _, i in pairs])
        found: list[tuple[float, int]] = []
        below = False
        for (s, i), good in zip(pairs, ok, strict=True):
            if min_score is not None and s < min_score:
                below = True
                break
            if good:
                found.append((s, i))
                if len(found) == want:
                    return found
        exhausted = len(pairs) < fetch or fetch >= total
        if below or exhausted:
            return found
        fetch = min(total, fetch * 2)
