"""Cross-modal retrieval metrics (Recall@K, MRR, nDCG@K, precision@K, ranks, rsum) from a similarity matrix.

The fixed fields (R@1/5/10, P@1/5/10, nDCG@10) are what papers compare on; `ks` adds recall, precision and
nDCG at any other cutoffs a user asks for (`at_k`), computed in the same pass.

Ranks are found by counting, per query, the items scored at least as high as each relevant item, in
chunks of queries: a full argsort of a 40k x 8k matrix would cost O(n log n) per row and gigabytes of
indices, while counting is one pass and memory is bounded by `max_chunk_elements`.

Ties are broken pessimistically: every non-relevant item whose score equals a relevant item's score is
ranked ahead of it. A collapsed encoder that maps everything to the same vector yields a constant
similarity matrix; an optimistic policy would give it a perfect score, and an averaged policy would still
reward exact ties that real models almost never produce. The pessimistic rank is a lower bound that
degenerate output cannot game, and it is deterministic (no random tie-breaking, no dependence on item order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from retrieval.errors import ConfigError, ShapeError
from retrieval.types import Float32Array, Int64Array

#: Deepest cutoff the fixed fields look at (R@10, P@10, nDCG@10); `ks` may ask for deeper ones.
TOP_K = 10
#: The cutoffs reported when none are asked for.
DEFAULT_KS = (1, 5, 10)
#: The deepest cutoff a user may ask for: nDCG past it says little, and the pass grows with it.
MAX_K = 1000
#: Elements of the similarity matrix handled per chunk (about 16 MB of float32 plus a boolean mask).
DEFAULT_CHUNK_ELEMENTS = 1 << 22


def parse_ks(text: str | Sequence[int]) -> tuple[int, ...]:
    """Cutoffs from "1,5,10" (or a sequence): positive, at most MAX_K, sorted, without repeats."""
    raw = text.split(",") if isinstance(text, str) else list(text)
    ks: set[int] = set()
    for part in raw:
        try:
            k = int(str(part).strip())
        except ValueError:
            raise ConfigError(f"cutoffs must be whole numbers separated by commas, got {part!r}") from None
        if not 1 <= k <= MAX_K:
            raise ConfigError(f"each cutoff K must be between 1 and {MAX_K}, got {k}")
        ks.add(k)
    if not ks:
        raise ConfigError("give at least one cutoff K, e.g. 1,5,10")
    return tuple(sorted(ks))


@dataclass(frozen=True)
class DirectionMetrics:
    """Metrics of one direction; `ranks` (1-based, first relevant item per query) allows error analysis."""

    recall_at_1: float
    recall_at_5: float
    recall_at_10: float
    mrr: float
    ndcg_at_10: float
    precision_at_1: float
    precision_at_5: float
    precision_at_10: float
    median_rank: float
    mean_rank: float
    n_queries: int
    ranks: Int64Array = field(repr=False, compare=False)
    #: "recall@K", "precision@K", "ndcg@K" for every K asked for (the fixed fields' cutoffs included).
    at_k: dict[str, float] = field(default_factory=dict, compare=False)
    #: The same three at chance: what a model that ranks at random scores on this very data.
    chance: dict[str, float] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, object]:
        """The fixed fields first (the paper table), then the other asked-for cutoffs, then chance."""
        fixed: dict[str, object] = {
            "recall@1": self.recall_at_1,
            "recall@5": self.recall_at_5,
            "recall@10": self.recall_at_10,
            "mrr": self.mrr,
            "ndcg@10": self.ndcg_at_10,
            "precision@1": self.precision_at_1,
            "precision@5": self.precision_at_5,
            "precision@10": self.precision_at_10,
            "median_rank": self.median_rank,
            "mean_rank": self.mean_rank,
            "n_queries": self.n_queries,
        }
        extra = {k: v for k, v in self.at_k.items() if k not in fixed}
        return {**fixed, **extra, "chance": self.chance}


def rsum(text_to_image: DirectionMetrics, image_to_text: DirectionMetrics) -> float:
    """Sum of R@1, R@5, R@10 of both directions in percent (max 600), the figure papers compare on."""
    total = sum(d.recall_at_1 + d.recall_at_5 + d.recall_at_10 for d in (text_to_image, image_to_text))
    return 100.0 * total


@dataclass(frozen=True)
class RetrievalMetrics:
    text_to_image: DirectionMetrics
    image_to_text: DirectionMetrics

    @property
    def rsum(self) -> float:
        return rsum(self.text_to_image, self.image_to_text)

    @property
    def mean_recall(self) -> float:
        return self.rsum / 6.0

    def to_dict(self) -> dict[str, object]:
        return {
            "text_to_image": self.text_to_image.to_dict(),
            "image_to_text": self.image_to_text.to_dict(),
            "rsum": self.rsum,
            "mean_recall": self.mean_recall,
        }


def _check_sim(sim: Float32Array, name: str) -> None:
    if not isinstance(sim, np.ndarray) or sim.ndim != 2:
        shape = getattr(sim, "shape", None)
        raise ShapeError(f"{name} must be a 2-D array (queries x items), got shape {shape}")
    if not np.issubdtype(sim.dtype, np.floating):
        raise ShapeError(f"{name} must hold floats (e.g. float32 cosine similarities), got dtype {sim.dtype}")
    if sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ShapeError(f"{name} is empty (shape {sim.shape}); there is nothing to evaluate")


def _check_mapping(caption_to_image: Int64Array, n_captions: int, n_images: int) -> Int64Array:
    mapping = np.asarray(caption_to_image)
    if mapping.ndim != 1 or not np.issubdtype(mapping.dtype, np.integer):
        raise ShapeError(
            "caption_to_image must be a 1-D integer array, "
            f"got shape {mapping.shape} and dtype {mapping.dtype}"
        )
    if mapping.shape[0] != n_captions:
        raise ShapeError(
            f"caption_to_image has {mapping.shape[0]} entries but the similarity matrix has "
            f"{n_captions} captions; pass one image index per caption"
        )
    if mapping.min() < 0 or mapping.max() >= n_images:
        raise ShapeError(
            f"caption_to_image holds image indices in [{mapping.min()}, {mapping.max()}], "
            f"outside [0, {n_images}); indices must point at columns of the image axis"
        )
    return mapping.astype(np.int64, copy=False)


def chance_at_k(counts: Int64Array, n_items: int, ks: Sequence[int]) -> dict[str, float]:
    """Expected recall@K and precision@K of a random ranking, query by query, averaged.

    A query with c relevant items among n: precision@K is c/n for K <= n; recall (at least one relevant
    item in the top K) is 1 - C(n-c, K)/C(n, K), the hypergeometric chance of missing them all. nDCG of a
    random ranking is not reported: it has no closed form as simple, and recall carries the same signal.
    """
    c = np.asarray(counts, dtype=np.float64)
    out: dict[str, float] = {}
    for k in ks:
        kk = min(k, n_items)
        miss = np.ones_like(c)
        for j in range(kk):  # product of (n-c-j)/(n-j): drawing K items, none relevant
            miss *= np.clip((n_items - c - j) / (n_items - j), 0.0, None)
        out[f"recall@{k}"] = float(np.mean(1.0 - miss))
        out[f"precision@{k}"] = float(np.mean(kk * c / n_items / k))  # expected relevant in top K, over K
    return out


def _direction(
    sim: Float32Array,
    offsets: Int64Array,
    relevant: Int64Array,
    max_chunk_elements: int,
    name: str,
    ks: Sequence[int] = DEFAULT_KS,
) -> DirectionMetrics:
    """Score queries whose relevant items are `relevant[offsets[q]:offsets[q + 1]]` (CSR layout)."""
    n_queries, n_items = sim.shape
    cutoffs = sorted(set(ks) | set(DEFAULT_KS))
    ndcg_ks = sorted(set(ks) | {TOP_K})
    deepest = max(cutoffs)
    discounts = 1.0 / np.log2(np.arange(2, deepest + 2, dtype=np.float64))
    ideal_cumsum = np.concatenate([[0.0], np.cumsum(discounts)])
    rows_per_chunk = max(1, max_chunk_elements // n_items)
    ranks = np.empty(n_queries, dtype=np.int64)
    ndcg = {k: np.empty(n_queries, dtype=np.float64) for k in ndcg_ks}
    hits = {k: np.empty(n_queries, dtype=np.int64) for k in cutoffs}

    for start in range(0, n_queries, rows_per_chunk):
        stop = min(start + rows_per_chunk, n_queries)
        scores = np.array(sim[start:stop], copy=True)
        if not np.isfinite(scores).all():
            raise ShapeError(
                f"{name} holds NaN or infinite values in query rows {start}..{stop - 1}; "
                "check for zero-norm embeddings before normalising"
            )
        counts = offsets[start + 1 : stop + 1] - offsets[start:stop]
        width = int(counts.max())
        valid = np.arange(width) < counts[:, None]
        columns = np.zeros((stop - start, width), dtype=np.int64)
        columns[valid] = relevant[offsets[start] : offsets[stop]]
        relevant_scores = np.take_along_axis(scores, columns, axis=1)
        relevant_scores[~valid] = -np.inf
        # Best relevant scores first; only the first `deepest` can land inside any cutoff used here.
        depth = min(width, deepest)
        best = -np.sort(-relevant_scores, axis=1)[:, :depth]
        best_valid = valid[:, :depth]
        # From here `scores` holds only non-relevant items; relevant ones can never count as "ahead".
        scores[np.nonzero(valid)[0], columns[valid]] = -np.inf

        positions = np.full((stop - start, depth), np.iinfo(np.int64).max, dtype=np.int64)
        for j in range(depth):
            ahead = np.count_nonzero(scores >= best[:, j : j + 1], axis=1)
            positions[:, j] = np.where(best_valid[:, j], j + 1 + ahead, positions[:, j])
            # Positions only grow with j, so once every query is past the cutoff the rest cannot count.
            if not (positions[:, j] <= deepest).any():
                break

        ranks[start:stop] = positions[:, 0]
        for k in hits:
            hits[k][start:stop] = np.count_nonzero(positions <= k, axis=1)
        for k in ndcg_ks:
            in_top = positions <= k
            gains = np.where(in_top, discounts[np.minimum(positions, k) - 1], 0.0).sum(axis=1)
            ndcg[k][start:stop] = gains / ideal_cumsum[np.minimum(counts, k)]

    at_k: dict[str, float] = {}
    for k in sorted(ks):
        at_k[f"recall@{k}"] = float(np.mean(ranks <= k))
        at_k[f"precision@{k}"] = float(np.mean(hits[k] / k))
        at_k[f"ndcg@{k}"] = float(np.mean(ndcg[k]))
    return DirectionMetrics(
        recall_at_1=float(np.mean(ranks <= 1)),
        recall_at_5=float(np.mean(ranks <= 5)),
        recall_at_10=float(np.mean(ranks <= 10)),
        mrr=float(np.mean(1.0 / ranks)),
        ndcg_at_10=float(np.mean(ndcg[TOP_K])),
        precision_at_1=float(np.mean(hits[1] / 1.0)),
        precision_at_5=float(np.mean(hits[5] / 5.0)),
        precision_at_10=float(np.mean(hits[10] / 10.0)),
        median_rank=float(np.median(ranks)),
        mean_rank=float(np.mean(ranks)),
        n_queries=n_queries,
        ranks=ranks,
        at_k=at_k,
        chance=chance_at_k(np.diff(offsets), n_items, sorted(ks)),
    )


def text_to_image_metrics(
    sim: Float32Array,
    caption_to_image: Int64Array,
    *,
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ks: Sequence[int] = DEFAULT_KS,
) -> DirectionMetrics:
    """Every caption queries the images (`sim` is captions x images); its own image is the one relevant item.

    Images without captions are allowed: they act as distractors.
    """
    _check_sim(sim, "text-to-image similarity")
    mapping = _check_mapping(caption_to_image, sim.shape[0], sim.shape[1])
    offsets = np.arange(sim.shape[0] + 1, dtype=np.int64)
    return _direction(sim, offsets, mapping, max_chunk_elements, "text-to-image similarity", ks)


def image_to_text_metrics(
    sim: Float32Array,
    caption_to_image: Int64Array,
    *,
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ks: Sequence[int] = DEFAULT_KS,
) -> DirectionMetrics:
    """Every image queries the captions (`sim` is images x captions); any of its captions is a hit.

    Recall and rank use the best-placed caption; nDCG@10 and precision@K count all of them, with the ideal
    DCG built from min(number of captions, 10) so an image with five captions can reach 1.0.
    """
    _check_sim(sim, "image-to-text similarity")
    n_images, n_captions = sim.shape
    mapping = _check_mapping(caption_to_image, n_captions, n_images)
    per_image = np.bincount(mapping, minlength=n_images)
    if (per_image == 0).any():
        lonely = np.flatnonzero(per_image == 0)
        raise ShapeError(
            f"{lonely.size} image(s) have no caption (first: index {int(lonely[0])}), so image-to-text "
            "recall is undefined for them; drop captionless images from the evaluation set"
        )
    offsets = np.concatenate([[0], np.cumsum(per_image)]).astype(np.int64)
    relevant = np.argsort(mapping, kind="stable").astype(np.int64)
    return _direction(sim, offsets, relevant, max_chunk_elements, "image-to-text similarity", ks)


def retrieval_metrics(
    text_image_sim: Float32Array,
    caption_to_image: Int64Array,
    *,
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ks: Sequence[int] = DEFAULT_KS,
) -> RetrievalMetrics:
    """Both directions from one captions x images matrix, so they can never be computed on different data."""
    return RetrievalMetrics(
        text_to_image=text_to_image_metrics(
            text_image_sim, caption_to_image, max_chunk_elements=max_chunk_elements, ks=ks
        ),
        image_to_text=image_to_text_metrics(
            text_image_sim.T, caption_to_image, max_chunk_elements=max_chunk_elements, ks=ks
        ),
    )


def bootstrap_recall_ci(
    ranks: Int64Array,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    samples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals of recall@K, resampling queries with replacement.

    Two models (or two runs) whose intervals overlap widely are not shown apart by this test set; a
    point estimate alone hides that. The seed is fixed so a report is reproducible. Queries are treated
    as independent: several captions of one image make text→image queries mildly correlated, which makes
    these intervals somewhat narrower than a per-image (cluster) bootstrap would.
    """
    if samples < 1:
        raise ConfigError(f"bootstrap samples must be at least 1, got {samples}")
    if not 0.0 < level < 1.0:
        raise ConfigError(f"confidence level must be between 0 and 1, got {level}")
    r = np.asarray(ranks)
    if r.ndim != 1 or r.size == 0:
        raise ShapeError(f"ranks must be a non-empty 1-D array, got shape {r.shape}")
    rng = np.random.default_rng(seed)
    hits = np.stack([r <= k for k in ks]).astype(np.float64)  # (len(ks), n)
    means = np.empty((samples, len(ks)), dtype=np.float64)
    # in chunks of resamples, so a 25k-query set does not draw a 1000 x 25k index array at once
    step = max(1, (1 << 22) // r.size)
    for start in range(0, samples, step):
        stop = min(start + step, samples)
        idx = rng.integers(0, r.size, size=(stop - start, r.size))
        means[start:stop] = hits[:, idx].mean(axis=2).T
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail], axis=0)
    return {f"recall@{k}": (float(lo[i]), float(hi[i])) for i, k in enumerate(ks)}
