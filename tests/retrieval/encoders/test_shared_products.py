"""The text tower's products split with a helper thread: same numbers, and never waiting on the helper."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from retrieval.encoders import texttower
from retrieval.encoders.texttower import SharedProducts, _Half


def _pair(rows: int, inner: int, cols: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((rows, inner)).astype(np.float32),
        rng.standard_normal((inner, cols)).astype(np.float32),
    )


@pytest.mark.parametrize("shape", [(11, 512, 1536), (1, 2048, 512), (77, 512, 2048), (3, 8, 100), (2, 4, 5)])
def test_split_products_equal_one_product(shape: tuple[int, int, int]) -> None:
    x, w = _pair(*shape)
    got = SharedProducts().matmul(x, w)
    assert got.dtype == np.float32 and got.shape == (shape[0], shape[2])
    np.testing.assert_allclose(got, x @ w, rtol=1e-5, atol=1e-4)


def test_a_strided_weight_view_is_split_too() -> None:
    x, w = _pair(5, 64, 512)
    view = w[:, ::2]  # (64, 256), not contiguous
    np.testing.assert_allclose(SharedProducts().matmul(x, view), x @ view, rtol=1e-5, atol=1e-4)


def test_the_caller_finishes_alone_when_the_helper_never_runs() -> None:
    products = SharedProducts()
    stuck = threading.Event()
    products._helper = threading.Thread(target=stuck.wait, daemon=True)  # a helper with no core
    products._helper.start()
    try:
        x, w = _pair(11, 512, 1536)
        np.testing.assert_allclose(products.matmul(x, w), x @ w, rtol=1e-5, atol=1e-4)
        assert products._tasks.qsize() == 1  # the offered half is still queued: the caller took it back
    finally:
        stuck.set()


def test_a_half_claimed_once_and_its_failure_reaches_the_waiter() -> None:
    x, w = _pair(4, 16, 8)
    half = _Half(x, w[:3], np.empty((4, 8), np.float32))  # (4, 16) @ (3, 8): the product fails
    assert half.claim() and not half.claim()
    half.run()
    with pytest.raises(ValueError):
        half.wait()


def test_the_tower_gives_the_same_embedding_split_or_not(tmp_path: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    folder = texttower.tower_dir(tmp_path, encoder.info.fingerprint)
    texttower.export(encoder.model, encoder.tokenizer, encoder.info, folder)
    tower = texttower.TextTower.open(folder)
    assert tower is not None
    texts = ["a dog on a couch", "two people playing tennis on a sunny day"]
    tower.products = None
    alone = tower.encode_texts(texts)
    split = SharedProducts(min_half=1)  # the tiny model's products are narrow: split them anyway
    tower.products = split
    np.testing.assert_allclose(tower.encode_texts(texts), alone, rtol=1e-6, atol=1e-6)
    assert split._helper is not None  # the split path ran
