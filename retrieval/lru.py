"""The one bounded least-recently-used map: the search's result cache, the card pipeline's page and
context caches, and the server's recent query images all keep their entries in it.

Thread-safe, because the server shares each cache between request threads. `copies=True` deep-copies
values in and out, for callers that edit what they get (a cached search result's confidence, ranks);
without it the very objects are kept, for values nobody edits (contexts, decoded images). The copy is a
pickle round trip, the same deep copy as `copy.deepcopy` for plain data (both go through
`__reduce_ex__` or pydantic's state) at about 40 % of its time on a page of cards (0.53 against 1.34 ms);
a value pickle refuses is deep-copied as before. Nothing is pickled to or from outside the process.
"""

from __future__ import annotations

import copy
import pickle
import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar, cast

from retrieval.errors import ConfigError

V = TypeVar("V")

#: Most entries any cache may hold: past it a cache is a memory leak with a lookup.
MAX_ENTRIES = 1_000_000


def deep_copy(value: V) -> V:
    """A deep copy of `value`: a pickle round trip, or `copy.deepcopy` where pickle refuses."""
    try:
        return cast(V, pickle.loads(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)))
    except (pickle.PicklingError, TypeError, AttributeError):  # a lambda, a lock, a local class
        return copy.deepcopy(value)


class LRU(Generic[V]):
    """A thread-safe, bounded LRU map; `max_entries` 0 keeps nothing (caching off)."""

    def __init__(self, max_entries: int, *, copies: bool = False) -> None:
        if not 0 <= max_entries <= MAX_ENTRIES:
            raise ConfigError(f"cache size must be in 0..{MAX_ENTRIES} entries, got {max_entries}")
        self.max_entries = max_entries
        self.copies = copies
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
        return deep_copy(value) if self.copies else value

    def put(self, key: Hashable, value: V) -> None:
        if self.max_entries == 0:
            return
        stored = deep_copy(value) if self.copies else value
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
