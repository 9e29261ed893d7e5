"""Near-duplicate images, found from the embeddings the collection already stores (no model is loaded).

A photo library holds the same picture many times: resized for mail, recompressed by a phone app,
cropped a little. Their embeddings sit far closer to each other than any two different photos do, so
a range search over the stored vectors finds every pair above a cosine threshold, and pairs join into
groups (union-find): a copy of a copy lands in its original's group.

The threshold is a cosine two copies of one picture reach. It depends on the model: a sharper one
spreads different photos further apart, and one that cannot tell photos apart (random weights, an
unusual domain) puts every pair near 1. So the default is per collection (`collection_threshold`): the
recall-first 0.95, raised until a pair must be twice as close (in cosine distance) as the collection's
99th-percentile pair; `threshold=` overrides it. `bench/duplicates_bench.py` measures both on resized,
recompressed and cropped copies of coco-mini photos (figures in docs/EVAL.md).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from retrieval.disjoint import DisjointSets
from retrieval.errors import BadQuery, ConfigError
from retrieval.types import Float32Array, Int64Array

if TYPE_CHECKING:
    from retrieval.catalog import Catalog
    from retrieval.collection import Collection

#: The lowest default cosine at which two images count as copies of one picture (see the module docstring).
DEFAULT_THRESHOLD = 0.95
#: Rows of the range search per FAISS call: bounds the temporary result arrays on big collections.
CHUNK = 4096


@dataclass(frozen=True)
class DuplicateGroup:
    """Images that are copies of one picture: ids best first (the largest file, kept as the original)."""

    ids: list[int]
    paths: list[str]
    min_cosine: float  # the weakest link that joined the group

    def to_dict(self) -> dict[str, object]:
        return {"ids": self.ids, "paths": self.paths, "min_cosine": round(self.min_cosine, 4)}


def check_threshold(threshold: float) -> float:
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"a near-duplicate threshold is a cosine in (0, 1], got {threshold}")
    return threshold


def similar_pairs(
    vectors: Float32Array, threshold: float, chunk: int = CHUNK
) -> Iterator[tuple[int, int, float]]:
    """Every pair (i < j) of rows whose inner product reaches `threshold`, by exact range search."""
    import faiss

    check_threshold(threshold)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ConfigError(f"vectors must be a 2-d array, got shape {vectors.shape}")
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    for start in range(0, len(vectors), chunk):
        lims, sims, ids = index.range_search(vectors[start : start + chunk], threshold)
        for row in range(len(lims) - 1):
            i = start + row
            for k in range(int(lims[row]), int(lims[row + 1])):
                j = int(ids[k])
                if j > i:
                    yield i, j, float(sims[k])


def group_pairs(n: int, pairs: Sequence[tuple[int, int, float]]) -> list[tuple[list[int], float]]:
    """Union-find over `pairs` of row numbers: groups of two or more rows, with their weakest link."""
    sets = DisjointSets(n)
    for i, j, _ in pairs:
        sets.union(i, j)
    members: dict[int, list[int]] = {}
    weakest: dict[int, float] = {}
    for i in range(n):
        members.setdefault(sets.find(i), []).append(i)
    for i, _, sim in pairs:
        root = sets.find(i)
        weakest[root] = min(weakest.get(root, 1.0), sim)
    return [(rows, weakest[root]) for root, rows in members.items() if len(rows) > 1]


def find_groups(
    ids: Int64Array, vectors: Float32Array, threshold: float = DEFAULT_THRESHOLD
) -> list[tuple[list[int], float]]:
    """Groups of image ids whose vectors are near-duplicates, biggest groups first."""
    return _ranked_groups(ids, list(similar_pairs(vectors, threshold)))


def _ranked_groups(ids: Int64Array, pairs: Sequence[tuple[int, int, float]]) -> list[tuple[list[int], float]]:
    """The groups `pairs` (of rows of `ids`) make, as image ids, biggest groups first."""
    groups = [([int(ids[r]) for r in rows], weak) for rows, weak in group_pairs(len(ids), pairs)]
    return sorted(groups, key=lambda g: (-len(g[0]), g[0][0]))


def collection_threshold(catalog: Catalog, model: str, dim: int) -> float:
    """The near-duplicate cosine for this collection: `DEFAULT_THRESHOLD`, raised by `collapse_threshold`
    from a sample of its stored `model` vectors.

    The one default of every near-duplicate view (`clearsight duplicates`, its page, folded search
    results), so a pair listed as copies is also folded as copies, and the reverse.
    """
    _, sample = catalog.sample_indexed_vectors(model, dim, SEPARATION_SAMPLE)
    return collapse_threshold(sample)


@dataclass(frozen=True)
class SimilarPairs:
    """Every pair of a collection's indexed images at or above `threshold`, as rows of `ids`.

    Kept by a long-lived caller (the server's duplicates page): the groups at any stricter threshold
    follow from these pairs alone (`groups_at`), with no second search over the collection.
    """

    ids: Int64Array
    pairs: list[tuple[int, int, float]]
    threshold: float


def collection_pairs(collection: Collection, threshold: float | None = None) -> SimilarPairs:
    """The collection's near-duplicate pairs from its stored embeddings, at `threshold`, else at
    `collection_threshold`."""
    manifest = collection.store.read_manifest()
    catalog = collection.catalog
    if threshold is None:
        threshold = collection_threshold(catalog, manifest.fingerprint, manifest.dim)
    check_threshold(threshold)
    ids, vectors = catalog.indexed_vectors(manifest.fingerprint, manifest.dim)
    return SimilarPairs(ids, list(similar_pairs(vectors, threshold)), threshold)


def groups_at(catalog: Catalog, found: SimilarPairs, threshold: float | None = None) -> list[DuplicateGroup]:
    """The groups `found`'s pairs make at `threshold` (None: at their own; never below it), biggest
    groups first, each group's largest file first (kept as the original)."""
    at = found.threshold if threshold is None else check_threshold(threshold)
    if at < found.threshold:
        raise ConfigError(f"pairs found at cosine {found.threshold:g} cannot give the groups at {at:g}")
    pairs = found.pairs if at == found.threshold else [p for p in found.pairs if p[2] >= at]
    groups = _ranked_groups(found.ids, pairs)
    records = catalog.get_images([i for members, _ in groups for i in members])
    out: list[DuplicateGroup] = []
    for members, weakest in groups:
        ordered = sorted(members, key=lambda i: (-(records[i].byte_size or 0), i))
        out.append(DuplicateGroup(ordered, [records[i].path for i in ordered], weakest))
    return out


def collection_duplicates(
    collection: Collection, threshold: float | None = None
) -> tuple[list[DuplicateGroup], float]:
    """The collection's near-duplicate groups, from its stored embeddings, each group's largest file
    first, and the threshold used (`threshold`, else `collection_threshold`)."""
    found = collection_pairs(collection, threshold)
    return groups_at(collection.catalog, found), found.threshold


class KeptDuplicates:
    """A long-lived process's near-duplicate groups (the server's page): the pairs are found once per
    collection version at its default threshold, and the groups at that or any stricter threshold
    follow from them, the last `kept` thresholds asked kept. A caller can then ask for any stricter
    threshold without causing another search over the collection.
    """

    def __init__(self, kept: int = 4) -> None:
        self._lock = threading.Lock()  # a second request waits for the first's search, not repeats it
        self._pairs: tuple[object, SimilarPairs] | None = None
        self._groups: dict[float, list[DuplicateGroup]] = {}
        self._kept = kept

    def groups(
        self, collection: Collection, version: object, threshold: float | None = None
    ) -> tuple[list[DuplicateGroup], float, float]:
        """(groups, the threshold used, the collection's default threshold) for `collection` at
        `version`; BadQuery for a threshold below the default (its pairs were never searched for)."""
        with self._lock:
            if self._pairs is None or self._pairs[0] != version:
                self._pairs = (version, collection_pairs(collection))
                self._groups.clear()
            found = self._pairs[1]
            at = found.threshold if threshold is None else check_threshold(threshold)
            if at < found.threshold:
                raise BadQuery(
                    f"near-duplicates are listed here at the collection's threshold {found.threshold:.4f} "
                    f"or stricter, not at {at:g}"
                )
            if at not in self._groups:
                while len(self._groups) >= self._kept:
                    self._groups.pop(next(iter(self._groups)))
                self._groups[at] = groups_at(collection.catalog, found, at)
            return self._groups[at], at, found.threshold


# -- collapsing search results -------------------------------------------------------------------
#: Images sampled to see how close the collection's model puts unrelated photos (pairs: about 130k).
SEPARATION_SAMPLE = 512
#: Copies must be closer than this percentile of the sampled pairs, as well as above the threshold...
SEPARATION_PERCENTILE = 99.0
#: ...and at least this many times closer (in cosine distance, 1 - cos) than that percentile's pair: a
#: copy stands out from the crowd, not just tops it. Measured with the tiny test CLIP: planted copies of
#: a coco-mini photo sat at distance 0.0002 against 0.005 for the 99th-percentile pair (25x), while the
#: closest synthetic shapes that are not copies sat at 0.0007 against 0.0008 (1.2x). 2 keeps the
#: threshold at or below the measured 0.95 for a model whose 99th-percentile pair is at 0.9 or below.
SEPARATION_FACTOR = 2.0


def collapse_threshold(sample: Float32Array, threshold: float = DEFAULT_THRESHOLD) -> float:
    """The cosine above which two hits are shown as one card, for a collection whose sampled vectors
    are `sample`.

    The duplicates threshold is measured for real CLIP-family models, under which two different
    photos rarely come near it. A model that puts unrelated photos that close (a tiny test model,
    an unusual domain) would fold a whole page into one card, so copies must also stand out from the
    collection: the threshold is raised to `SEPARATION_FACTOR` times closer than the
    `SEPARATION_PERCENTILE` of the cosines between the sampled images' pairs (the higher sample
    value), so a small collection never collapses its most similar pair only because it is the most
    similar, nor a crowd of look-alikes that no copy stands out from.
    """
    check_threshold(threshold)
    n = len(sample)
    if n < 2:
        return threshold
    sims = np.asarray(sample, dtype=np.float32) @ np.asarray(sample, dtype=np.float32).T
    pairs = sims[np.triu_indices(n, 1)]
    spread = float(np.percentile(pairs, SEPARATION_PERCENTILE, method="higher"))
    return max(threshold, 1.0 - (1.0 - spread) / SEPARATION_FACTOR)


def collapse_rows(vectors: Float32Array, threshold: float) -> list[list[int]]:
    """Rows grouped greedily in rank order: each row joins the first kept row it is more than
    `threshold` similar to (a copy of a better hit), else it is kept; [kept, *its copies] per group.

    Greedy by rank, not union-find, so a row's fate depends only on the rows ranked above it: a
    longer result list never regroups the hits of an earlier page.
    """
    n = len(vectors)
    if n == 0:
        return []
    sims = np.asarray(vectors, dtype=np.float32) @ np.asarray(vectors, dtype=np.float32).T
    kept: list[int] = []
    groups: dict[int, list[int]] = {}
    for i in range(n):
        leader = next((k for k in kept if sims[i, k] > threshold), None)
        if leader is None:
            kept.append(i)
            groups[i] = [i]
        else:
            groups[leader].append(i)
    return [groups[k] for k in kept]


def fetch_collapsed(
    fetch: Callable[[int], list[tuple[float, int]]],
    vectors_of: Callable[[list[int]], dict[int, Float32Array]],
    want: int,
    threshold: float,
) -> tuple[list[tuple[float, int]], dict[int, list[int]]]:
    """The best `want` (score, id) hits once copies are folded into the hit they copy, and for each
    kept hit the ids folded into it (best first).

    `fetch(n)` gives the best n hits (fewer when there are no more); it is asked for more until
    `want` groups are found or the hits run out, so a page stays full however many copies it had.
    Only the hits' own stored vectors are compared (n x n dot products): no index search.
    """
    ask = max(want * 2, want + 8)
    while True:
        found = fetch(ask)
        vecs = vectors_of([i for _, i in found])
        rows = [k for k, (_, i) in enumerate(found) if i in vecs]
        alone = [[k] for k, (_, i) in enumerate(found) if i not in vecs]  # no vector: never folded
        matrix = np.stack([vecs[found[k][1]] for k in rows]) if rows else np.zeros((0, 1), np.float32)
        groups = [[rows[r] for r in g] for g in collapse_rows(matrix, threshold)] + alone
        groups.sort(key=lambda g: g[0])
        if len(groups) >= want or len(found) < ask:
            break
        ask *= 2
    kept = groups[:want]
    return [found[g[0]] for g in kept], {found[g[0]][1]: [found[k][1] for k in g[1:]] for g in kept}
