"""Retrieval metrics against hand-computed values on planted similarity matrices, ties included."""

from __future__ import annotations

import math

import numpy as np
import pytest

from retrieval.errors import ShapeError
from retrieval.training.metrics import (
    DirectionMetrics,
    image_to_text_metrics,
    retrieval_metrics,
    rsum,
    text_to_image_metrics,
)
from retrieval.types import Float32Array, Int64Array


def _f32(rows: list[list[float]]) -> Float32Array:
    return np.asarray(rows, dtype=np.float32)


def _i64(values: list[int]) -> Int64Array:
    return np.asarray(values, dtype=np.int64)


def _dcg(positions: list[int]) -> float:
    return sum(1.0 / math.log2(p + 1) for p in positions if p <= 10)


def test_perfect_diagonal_scores_perfectly() -> None:
    sim = np.eye(4, dtype=np.float32)
    m = retrieval_metrics(sim, _i64([0, 1, 2, 3]))
    for d in (m.text_to_image, m.image_to_text):
        assert d.recall_at_1 == d.recall_at_5 == d.recall_at_10 == 1.0
        assert d.mrr == d.ndcg_at_10 == d.precision_at_1 == 1.0
        assert d.median_rank == d.mean_rank == 1.0
        assert d.n_queries == 4
        assert d.ranks.tolist() == [1, 1, 1, 1]
    assert m.rsum == pytest.approx(600.0)
    assert m.mean_recall == pytest.approx(100.0)


def test_constant_matrix_gets_the_pessimistic_rank() -> None:
    # 4 images, 2 captions each: a collapsed encoder scores everything the same.
    c2i = _i64([0, 0, 1, 1, 2, 2, 3, 3])
    sim = np.full((8, 4), 0.3, dtype=np.float32)
    m = retrieval_metrics(sim, c2i)
    t2i, i2t = m.text_to_image, m.image_to_text
    assert t2i.ranks.tolist() == [4] * 8  # all 3 other images are placed ahead
    assert (t2i.recall_at_1, t2i.recall_at_5, t2i.mrr) == (0.0, 1.0, 0.25)
    assert t2i.ndcg_at_10 == pytest.approx(1 / math.log2(5))
    # Each image: 6 non-relevant captions ahead, its own two at positions 7 and 8.
    assert i2t.ranks.tolist() == [7] * 4
    assert (i2t.recall_at_5, i2t.recall_at_10) == (0.0, 1.0)
    assert i2t.precision_at_10 == pytest.approx(0.2)
    assert i2t.ndcg_at_10 == pytest.approx(_dcg([7, 8]) / _dcg([1, 2]))
    assert m.rsum == pytest.approx(100 * (0 + 1 + 1 + 0 + 0 + 1))


def test_text_to_image_hand_computed_with_a_tie() -> None:
    sim = _f32(
        [
            [0.9, 0.5, 0.9],  # target 0 ties with image 2 -> rank 2
            [0.8, 0.1, 0.3],  # target 1 is last -> rank 3
            [0.2, 0.4, 0.7],  # target 2 is first -> rank 1
            [0.6, 0.5, 0.4],  # target 0 is first -> rank 1
        ]
    )
    m = text_to_image_metrics(sim, _i64([0, 1, 2, 0]))
    assert m.ranks.tolist() == [2, 3, 1, 1]
    assert m.ranks.dtype == np.int64
    assert m.recall_at_1 == 0.5
    assert m.recall_at_5 == 1.0
    assert m.mrr == pytest.approx((1 / 2 + 1 / 3 + 1 + 1) / 4)
    assert m.ndcg_at_10 == pytest.approx((1 / math.log2(3) + 1 / math.log2(4) + 1 + 1) / 4)
    assert m.precision_at_1 == 0.5
    assert m.precision_at_5 == pytest.approx(1 / 5)
    assert m.median_rank == 1.5
    assert m.mean_rank == pytest.approx(7 / 4)


def test_image_to_text_multi_caption_hand_computed() -> None:
    c2i = _i64([0, 0, 1, 1, 1])
    sim = _f32(
        [
            # image 0 owns captions 0, 1; order: c2 c1* c4 c3 c0* -> relevant at 2 and 5
            [0.1, 0.8, 0.9, 0.2, 0.5],
            # image 1 owns captions 2, 3, 4; c3* first, c2* ties with c0, c1 (placed ahead), then c4*
            [0.3, 0.3, 0.3, 0.9, 0.1],
        ]
    )
    m = image_to_text_metrics(sim, c2i)
    assert m.ranks.tolist() == [2, 1]
    assert m.recall_at_1 == 0.5
    assert m.mrr == pytest.approx((1 / 2 + 1) / 2)
    assert m.precision_at_1 == 0.5
    assert m.precision_at_5 == pytest.approx((2 / 5 + 3 / 5) / 2)
    assert m.precision_at_10 == pytest.approx((2 / 10 + 3 / 10) / 2)
    ndcg0 = _dcg([2, 5]) / _dcg([1, 2])
    ndcg1 = _dcg([1, 4, 5]) / _dcg([1, 2, 3])
    assert m.ndcg_at_10 == pytest.approx((ndcg0 + ndcg1) / 2)


def test_ideal_dcg_is_capped_at_ten_relevant_items() -> None:
    # One image with 12 captions, one distractor image with 1: the first image's captions fill the
    # top 12, so its nDCG@10 must be exactly 1 and precision@10 must be 1.
    c2i = _i64([0] * 12 + [1])
    sim = np.zeros((2, 13), dtype=np.float32)
    sim[0, :12] = np.linspace(1.0, 0.5, 12)
    sim[1, 12] = 1.0
    m = image_to_text_metrics(sim, c2i)
    assert m.ndcg_at_10 == pytest.approx(1.0)
    assert m.precision_at_10 == pytest.approx((1.0 + 0.1) / 2)


def _reference_ranks(sim: Float32Array, relevant: list[set[int]]) -> list[list[int]]:
    """Positions of relevant items by a full sort with ties broken against relevance (pessimistic)."""
    out = []
    for row, rel in zip(sim, relevant, strict=True):
        is_rel = np.array([j in rel for j in range(row.size)])
        order = np.lexsort((is_rel, -row))  # by score descending, then non-relevant first
        out.append([pos + 1 for pos, j in enumerate(order) if is_rel[j]])
    return out


@pytest.mark.parametrize("chunk", [1, 7, 1 << 22])
def test_counting_matches_a_full_sort_on_tied_random_scores(chunk: int) -> None:
    rng = np.random.default_rng(0)
    n_images, per_image = 15, 3
    c2i = np.repeat(np.arange(n_images), per_image).astype(np.int64)
    rng.shuffle(c2i)
    sim = np.round(rng.random((c2i.size, n_images)), 1).astype(np.float32)  # coarse: many ties
    m = retrieval_metrics(sim, c2i, max_chunk_elements=chunk)

    t2i_ref = _reference_ranks(sim, [{int(i)} for i in c2i])
    assert m.text_to_image.ranks.tolist() == [p[0] for p in t2i_ref]

    i2t_ref = _reference_ranks(sim.T, [set(np.flatnonzero(c2i == i).tolist()) for i in range(n_images)])
    assert m.image_to_text.ranks.tolist() == [p[0] for p in i2t_ref]
    ndcg = np.mean([_dcg(p) / _dcg([1, 2, 3]) for p in i2t_ref])
    p5 = np.mean([sum(x <= 5 for x in p) / 5 for p in i2t_ref])
    assert m.image_to_text.ndcg_at_10 == pytest.approx(ndcg)
    assert m.image_to_text.precision_at_5 == pytest.approx(p5)


def test_retrieval_metrics_equals_the_two_directions() -> None:
    rng = np.random.default_rng(1)
    c2i = _i64([0, 0, 1, 2, 2, 2])
    sim = rng.random((6, 3)).astype(np.float32)
    both = retrieval_metrics(sim, c2i)
    assert both.text_to_image == text_to_image_metrics(sim, c2i)
    assert both.image_to_text == image_to_text_metrics(np.ascontiguousarray(sim.T), c2i)
    assert both.rsum == pytest.approx(rsum(both.text_to_image, both.image_to_text))
    assert both.to_dict()["mean_recall"] == pytest.approx(both.rsum / 6)


def test_to_dict_keys() -> None:
    m = text_to_image_metrics(np.eye(2, dtype=np.float32), _i64([0, 1]))
    d = m.to_dict()
    assert list(d) == [
        "recall@1",
        "recall@5",
        "recall@10",
        "mrr",
        "ndcg@10",
        "precision@1",
        "precision@5",
        "precision@10",
        "median_rank",
        "mean_rank",
        "n_queries",
        "ndcg@1",  # the default cutoffs 1, 5, 10 add nDCG at 1 and 5
        "ndcg@5",
        "chance",
    ]
    assert d["n_queries"] == 2
    assert isinstance(m, DirectionMetrics)


def test_images_without_captions_are_distractors_for_text_to_image() -> None:
    sim = _f32([[0.2, 0.9, 0.1]])  # image 1 has no caption but outscores the target
    assert text_to_image_metrics(sim, _i64([0])).ranks.tolist() == [2]
    with pytest.raises(ShapeError, match="no caption"):
        image_to_text_metrics(np.ascontiguousarray(sim.T), _i64([0]))


@pytest.mark.parametrize(
    ("sim", "c2i", "message"),
    [
        (np.zeros(3, dtype=np.float32), [0, 1, 2], "2-D"),
        (np.zeros((2, 2), dtype=np.int64), [0, 1], "floats"),
        (np.zeros((0, 2), dtype=np.float32), [], "empty"),
        (np.zeros((2, 2), dtype=np.float32), [0], "2 captions"),
        (np.zeros((2, 2), dtype=np.float32), [0, 2], "outside"),
        (np.array([[0.1, np.nan], [0.1, 0.2]], dtype=np.float32), [0, 1], "NaN"),
    ],
)
def test_bad_inputs_raise_shape_errors(sim: Float32Array, c2i: list[int], message: str) -> None:
    with pytest.raises(ShapeError, match=message):
        text_to_image_metrics(sim, _i64(c2i))


def test_float_mapping_is_refused() -> None:
    with pytest.raises(ShapeError, match="integer"):
        text_to_image_metrics(np.eye(2, dtype=np.float32), np.array([0.0, 1.0]))
