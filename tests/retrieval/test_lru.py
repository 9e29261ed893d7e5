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
