"""The one LRU the result cache, the card pipeline and the server's query images share."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from explainer.server.queries import QueryImages
from retrieval.errors import ConfigError
from retrieval.lru import LRU


def test_evicts_the_least_recently_used_and_counts() -> None:
    lru: LRU[str] = LRU(2)
    lru.put("a", "A")
    lru.put("b", "B")
    assert lru.get("a") == "A"  # a is now the most recent: b goes first
    lru.put("c", "C")
    assert lru.get("b") is None and lru.get("a") == "A" and lru.get("c") == "C" and len(lru) == 2
    assert (lru.hits, lru.misses) == (3, 1)
    lru.put("a", "A2")  # replacing refreshes too
    lru.put("d", "D")
    assert lru.get("c") is None and lru.get("a") == "A2"
    lru.clear()
    assert len(lru) == 0


def test_copies_only_when_asked_and_zero_keeps_nothing() -> None:
    shared: LRU[list[int]] = LRU(4)
    copied: LRU[list[int]] = LRU(4, copies=True)
    value = [1, 2]
    shared.put("k", value)
    copied.put("k", value)
    value.append(3)
    assert shared.get("k") is value
    got = copied.get("k")
    assert got == [1, 2]
    assert got is not None
    got.append(9)
    assert copied.get("k") == [1, 2]
    off: LRU[int] = LRU(0)
    off.put("k", 1)
    assert off.get("k") is None and len(off) == 0
    for bad in (-1, 1_000_001):
        with pytest.raises(ConfigError):
            LRU(bad)


def test_copies_are_deep_and_keep_shared_references_and_types() -> None:
    import threading
    from dataclasses import dataclass, field

    import numpy as np

    from retrieval.lru import deep_copy

    @dataclass
    class Page:  # a local class: pickle refuses it, so the deepcopy fallback runs
        rows: list[np.ndarray] = field(default_factory=list)

    arr = np.arange(6, dtype=np.float32)
    nested = {"a": arr, "b": arr, "list": [arr, {"x": 1}]}
    got = deep_copy(nested)
    assert got["a"] is got["b"] and got["a"] is not arr  # one copy, still shared inside the value
    got["a"][0] = 99
    assert arr[0] == 0 and got["list"][0][0] == 99
    page = Page([arr])
    copied = deep_copy(page)
    assert isinstance(copied, Page) and copied.rows[0] is not arr and np.array_equal(copied.rows[0], arr)
    with pytest.raises(TypeError):  # neither copies a lock: the error is deepcopy's, as before
        deep_copy({"lock": threading.Lock()})


def test_a_cached_card_comes_back_equal_and_independent() -> None:
    from explainer.cards.model import Card

    card = Card(
        id=3,
        rank=1,
        score=0.31,
        confidence=0.8,
        image_url="/api/images/3",
        thumb_url="/api/images/3/thumb",
        detail_url="/image/3",
        like_url="/?like=3",
    )
    cache: LRU[list[Card]] = LRU(2, copies=True)
    cache.put("page", [card])
    card.score = 0.0  # the caller edits its own page afterwards
    got = cache.get("page")
    assert got is not None and got[0].score == 0.31 and got[0] == card.model_copy(update={"score": 0.31})
    got[0].confidence = None  # and edits what it got
    again = cache.get("page")
    assert again is not None and again[0].confidence == 0.8
    assert again[0].model_fields_set == card.model_fields_set  # pydantic's own state survives the copy


def _png(colour: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(out, format="PNG")
    return out.getvalue()


def test_query_images_keep_the_most_recent_uploads() -> None:
    images = QueryImages(capacity=2)
    first, k1 = images.add(_png("red"), max_pixels=10_000)
    _, k2 = images.add(_png("blue"), max_pixels=10_000)
    assert images.get(k1) is first  # kept as is, not copied
    _, k3 = images.add(_png("green"), max_pixels=10_000)
    assert images.get(k2) is None and images.get(k1) is first and images.get(k3) is not None
