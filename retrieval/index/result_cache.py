"""Whole-query cache: a repeated search is answered without an encoder call or an index search.

Two bounded LRU maps (retrieval.lru). Query vectors are keyed by what the encoder sees (text, image content,
weights, negative) and the model's fingerprint; results are keyed by the index version, the
query vector, the search parameters and the page asked for. A new index version changes the key,
so stale results are never served, and `Searcher.reload` clears both maps to free them at once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from retrieval.lru import LRU
from retrieval.types import Float32Array

#: Entries per map by default: results are small (a page of hits), vectors a few KiB.
DEFAULT_ENTRIES = 1024


def image_key(image: Image.Image) -> str:
    """A content key for a decoded query image (its pixels, size and mode), when no file hash is known."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}:{image.width}x{image.height}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def vector_key(vec: Float32Array) -> str:
    return hashlib.blake2b(np.ascontiguousarray(vec, np.float32).tobytes(), digest_size=16).hexdigest()


@dataclass
class ResultCache:
    """The two maps a `Searcher` consults; `max_entries` 0 turns caching off."""

    max_entries: int = DEFAULT_ENTRIES

    def __post_init__(self) -> None:
        # copied in and out: callers edit the results they get (confidence, ranks, `cached`)
        self.vectors: LRU[Float32Array] = LRU(self.max_entries, copies=True)
        self.results: LRU[object] = LRU(self.max_entries, copies=True)

    def clear(self) -> None:
        self.vectors.clear()
        self.results.clear()
