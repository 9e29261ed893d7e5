"""Whole-query cache: a repeated search is answered without an encoder call or an index search.

Two bounded LRU maps. Query vectors are keyed by what the encoder sees (text, image content,
weights, negative) and the model's fingerprint; results are keyed by the index version, the
query vector, the search parameters and the page asked for. A new index version changes the key,
so stale results are never served, and `Searcher.reload` clears both maps to free them at once.
"""

from __future__ import annotations

import copy
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
from PIL import Image

from retrieval.errors import ConfigError
from retrieval.types import Float32Array

V = TypeVar("V")

#: Entries per map by default: results are small (a page of hits), vectors a few KiB.
DEFAULT_ENTRIES = 1024


class LRU(Generic[V]):
    """A thread-safe, bounded least-recently-used map; values are deep-copied in and out."""

    def __init__(self, max_entries: int) -> None:
        if not 0 <= max_entries <= 1_000_000:
            raise ConfigError(f"cache size must be in 0..1000000 entries, got {max_entries}")
        self.max_entries = max_entries
        self._data: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
        return copy.deepcopy(value)  # callers may edit what they get (confidence, ranks)

    def put(self, key: Hashable, value: V) -> None:
        if self.max_entries == 0:
            return
        stored = copy.deepcopy(value)
        with self._lock:
            self._data[key] = stored
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)


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
        self.vectors: LRU[Float32Array] = LRU(self.max_entries)
        self.results: LRU[object] = LRU(self.max_entries)

    def clear(self) -> None:
        self.vectors.clear()
        self.results.clear()
