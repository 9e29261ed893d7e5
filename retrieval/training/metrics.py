"""Cross-modal retrieval metrics (Recall@K, MRR, nDCG@10, precision@K, ranks, rsum) from a similarity matrix.

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

from dataclasses import dataclass, field

import numpy as np

from retrieval.errors import ShapeError
from retrieval.types import Float32Array, Int64Array

#: Deepest cutoff any metric here looks at (R@10, P@10, nDCG@10).
TOP_K = 10
#: Elements of the similarity matrix handled per chunk (about 16 MB of float32 plus a boolean mask).
DEFAULT_CHUNK_ELEMENTS = 1 << 22

_DISCOUNTS = 1.0 / np.log2(np.arange(2, TOP_K + 2, dtype=np.float64))


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

    def to_dict(self) -> dict[str, float | int]:
        return {
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


def _direction(
    sim: Float32Array,
    offsets: Int64Array,
    relevant: Int64Array,
    max_chunk_elements: int,
    name: str,
) -> DirectionMetrics:
    """Score queries whose relevant items are `relevant[offsets[q]:offsets[q + 1]]` (CSR layout)."""
    n_queries, n_items = sim.shape
    rows_per_chunk = max(1, max_chunk_elements // n_items)
    ranks = np.empty(n_queries, dtype=np.int64)
    ndcg = np.empty(n_queries, dtype=np.float64)
    hits = {k: np.empty(n_queries, dtype=np.int64) for k in (1, 5, 10)}
    ideal_cumsum = np.concatenate([[0.0], np.cumsum(_DISCOUNTS)])

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
        # Best relevant scores first; only the first TOP_K can land inside any cutoff used here.
        depth = min(width, TOP_K)
        best = -np.sort(-relevant_scores, axis=1)[:, :depth]
        best_valid = valid[:, :depth]
        # From here `scores` holds only non-relevant items; relevant ones can never count as "ahead".
        scores[np.nonzero(valid)[0], columns[valid]] = -np.inf

        positions = np.full((stop - start, depth), np.iinfo(np.int64).max, dtype=np.int64)
        for j in range(depth):
            ahead = np.count_nonzero(scores >= best[:, j : j + 1], axis=1)
            positions[:, j] = np.where(best_valid[:, j], j + 1 + ahead, positions[:, j])
            # Positions only grow with j, so once every query is past the cutoff the rest cannot count.
            if not (positions[:, j] <= TOP_K).any():
                break

        ranks[start:stop] = positions[:, 0]
        for k in hits:
            hits[k][start:stop] = np.count_nonzero(positions <= k, axis=1)
        in_top = positions <= TOP_K
        gains = np.where(in_top, _DISCOUNTS[np.minimum(positions, TOP_K) - 1], 0.0).sum(axis=1)
        ndcg[start:stop] = gains / ideal_cumsum[np.minimum(counts, TOP_K)]

    return DirectionMetrics(
        recall_at_1=float(np.mean(ranks <= 1)),
        recall_at_5=float(np.mean(ranks <= 5)),
        recall_at_10=float(np.mean(ranks <= 10)),
        mrr=float(np.mean(1.0 / ranks)),
        ndcg_at_10=float(np.mean(ndcg)),
        precision_at_1=float(np.mean(hits[1] / 1.0)),
        precision_at_5=float(np.mean(hits[5] / 5.0)),
        precision_at_10=float(np.mean(hits[10] / 10.0)),
        median_rank=float(np.median(ranks)),
        mean_rank=float(np.mean(ranks)),
        n_queries=n_queries,
        ranks=ranks,
    )


def text_to_image_metrics(
    sim: Float32Array,
    caption_to_image: Int64Array,
    *,
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> DirectionMetrics:
    """Every caption queries the images (`sim` is captions x images); its own image is the one relevant item.

    Images without captions are allowed: they act as distractors.
    """
    _check_sim(sim, "text-to-image similarity")
    mapping = _check_mapping(caption_to_image, sim.shape[0], sim.shape[1])
    offsets = np.arange(sim.shape[0] + 1, dtype=np.int64)
    return _direction(sim, offsets, mapping, max_chunk_elements, "text-to-image similarity")


def image_to_text_metrics(
    sim: Float32Array,
    caption_to_image: Int64Array,
    *,
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
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
    return _direction(sim, offsets, relevant, max_chunk_elements, "image-to-text similarity")


def retrieval_metrics(
    text_image_sim: Float32Array,
    caption_to_image: Int64Array,
    *,
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> RetrievalMetrics:
    """Both directions from one captions x images matrix, so they can never be computed on different data."""
    return RetrievalMetrics(
        text_to_image=text_to_image_metrics(
            text_image_sim, caption_to_image, max_chunk_elements=max_chunk_elements
        ),
        image_to_text=image_to_text_metrics(
            text_image_sim.T, caption_to_image, max_chunk_elements=max_chunk_elements
        ),
    )
