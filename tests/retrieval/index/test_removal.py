"""Removing vectors in place keeps every other id right, or the index kind says it cannot."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.encoders import l2_normalise
from retrieval.index.faiss_index import VectorIndex


@pytest.mark.parametrize(
    ("factory", "in_place"),
    [("Flat", True), ("IVF16,Flat", False), ("IVF16,PQ4x4", False), ("HNSW8", False)],
)
def test_only_kinds_whose_ids_survive_a_removal_remove_in_place(factory: str, in_place: bool) -> None:
    x = l2_normalise(np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32))
    ids = np.arange(1, 2001, dtype=np.int64)
    idx = VectorIndex.build(ids, x, factory, 16)
    assert idx.supports_remove is in_place  # the sync rebuilds the others
    if in_place:
        idx.remove(np.array([3, 4], dtype=np.int64))
        _, found = idx.search(x[[4, 100, 1999]], 1)
        assert found[:, 0].tolist() == [5, 101, 2000]


@pytest.mark.parametrize("factory", ["Flat", "HNSW8", "IVF16,Flat"])
def test_uncompressed_kinds_give_back_their_vectors(factory: str) -> None:
    x = l2_normalise(np.random.default_rng(1).standard_normal((1000, 16)).astype(np.float32))
    idx = VectorIndex.build(np.arange(1, 1001, dtype=np.int64), x, factory, 16)
    got = idx.stored_vectors(np.array([5, 1, 1000], dtype=np.int64))
    assert got is not None and np.array_equal(got, x[[4, 0, 999]])
    assert idx.stored_vectors(np.array([5, 5000], dtype=np.int64)) is None
    compressed = VectorIndex.build(np.arange(1, 1001, dtype=np.int64), x, "IVF16,PQ4x4", 16)
    assert compressed.stored_vectors(np.array([5], dtype=np.int64)) is None
