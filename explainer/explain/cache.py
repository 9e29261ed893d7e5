"""The explanation cache: a repeated results page must not pay for (or wait on) the LLM again.

Entries are keyed by a sha256 of everything that decides the text: the query (text and image),
the hit's image, its caption, the prompt version and the backend model. Only LLM explanations
are stored; offline texts are cheap to recompute and fallbacks must be retried next time.
The SQLite variant survives restarts and is shared by the server's threads (WAL lets readers
proceed while one writer writes); the in-memory one serves tests and notebooks.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from pydantic import ValidationError

from explainer.errors import ClearsightError, ConfigError
from explainer.explain.types import Explanation

#: Bump when the key or the stored JSON changes shape; older tables are dropped, not migrated.
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ExplanationKey:
    """The fields that decide an explanation's text; `digest()` is the stored key."""

    query_text: str | None
    query_image_key: str | None
    image_key: str
    prompt: str
    backend: str
    caption: str | None = None

    def digest(self) -> str:
        fields = asdict(self)
        if self.query_text is not None:
            fields["query_text"] = " ".join(self.query_text.split())
        blob = json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ExplanationCache(Protocol):
    """What the explainer needs from a cache; any object with these two methods will do."""

    def get(self, key: ExplanationKey) -> Explanation | None: ...

    def put(self, key: ExplanationKey, explanation: Explanation) -> None: ...


class MemoryExplanationCache:
    """A dict behind a lock; `hits` and `misses` let tests and notebooks see what happened."""

    def __init__(self) -> None:
        self._data: dict[str, str] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: ExplanationKey) -> Explanation | None:
        with self._lock:
            blob = self._data.get(key.digest())
            if blob is None:
                self.misses += 1
                return None
            self.hits += 1
        return Explanation.model_validate_json(blob)

    def put(self, key: ExplanationKey, explanation: Explanation) -> None:
        blob = explanation.model_copy(update={"cached": False}).model_dump_json()
        with self._lock:
            self._data[key.digest()] = blob

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


class SQLiteExplanationCache:
    """Explanations in one SQLite file; one connection shared under a lock (calls are short)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except (OSError, sqlite3.DatabaseError) as exc:
            raise ConfigError(
                f"explanation cache {self.path} cannot be opened ({exc}); delete the file to start afresh"
            ) from None

    def _migrate(self) -> None:
        (version,) = self._conn.execute("PRAGMA user_version").fetchone()
        with self._conn:
            if version != SCHEMA_VERSION:
                self._conn.execute("DROP TABLE IF EXISTS explanations")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS explanations ("
                " key TEXT PRIMARY KEY, prompt TEXT NOT NULL, backend TEXT NOT NULL,"
                " created_at REAL NOT NULL, payload TEXT NOT NULL)"
            )
            self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def get(self, key: ExplanationKey) -> Explanation | None:
        digest = key.digest()
        with self._lock:
            row = self._conn.execute("SELECT payload FROM explanations WHERE key = ?", (digest,)).fetchone()
        if row is None:
            return None
        try:
            return Explanation.model_validate_json(row[0])
        except ValidationError:
            with self._lock, self._conn:
                self._conn.execute("DELETE FROM explanations WHERE key = ?", (digest,))
            return None

    def put(self, key: ExplanationKey, explanation: Explanation) -> None:
        blob = explanation.model_copy(update={"cached": False}).model_dump_json()
        with self._lock, self._conn:
            self._conn.execute(
                "INSERT OR REPLACE INTO explanations (key, prompt, backend, created_at, payload)"
                " VALUES (?, ?, ?, ?, ?)",
                (key.digest(), key.prompt, key.backend, time.time(), blob),
            )

    def __len__(self) -> int:
        with self._lock:
            (count,) = self._conn.execute("SELECT COUNT(*) FROM explanations").fetchone()
        return int(count)

    def clear(self) -> None:
        with self._lock, self._conn:
            self._conn.execute("DELETE FROM explanations")

    def close(self) -> None:
        with self._lock:
            self._conn.close()


#: The collection's explanation cache, shared by the server and `clearsight search --explain`.
CACHE_FILE = "explanations.sqlite"


def open_explanation_cache(data_dir: Path, warn: Callable[[str], None]) -> SQLiteExplanationCache | None:
    """The collection's cache, or None (with a warning) where it cannot be opened, e.g. a read-only
    data dir: explanations still come, just without the cache."""
    try:
        return SQLiteExplanationCache(Path(data_dir) / CACHE_FILE)
    except ClearsightError as exc:
        warn(f"explanations will not be cached: {exc}")
        return None
