"""The catalog: one SQLite database (WAL) that is the source of truth for a collection.

It records every image file seen (path, content hash, sizes, mtime, state, failure reason), the
captions attached to images, and the embeddings computed for each *content hash* and model. The
FAISS indexes are derived from it, which is what makes ingest resumable after `kill -9`: a batch
of embeddings and the state change of its images commit in one transaction, and the index is
rebuilt from whatever committed.

Paths are stored as TEXT, except a file name that is not valid UTF-8, which is stored as a BLOB of
its bytes (SQLite keeps a BLOB as it is in a TEXT column): lossless, so the file still opens, and
every ordinary path is stored exactly as before, so no catalog needs rewriting. Records hand paths
back as Python's own file-system str (undecodable bytes as `surrogateescape` surrogates).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from retrieval import imageio
from retrieval.errors import IndexCorrupt, ShapeError
from retrieval.paths import display_path, is_utf8, path_bytes
from retrieval.types import Float32Array

SCHEMA_VERSION = 3

# Each entry migrates from version i to i+1. Never edit a released entry; append a new one.
_MIGRATIONS: list[str] = [
    # 0 -> 1: the first schema
    """
    CREATE TABLE images (
        id INTEGER PRIMARY KEY AUTOINCREMENT,  -- ids are never reused: the index keys on them
        path TEXT NOT NULL UNIQUE,
        content_hash TEXT,
        byte_size INTEGER,
        width INTEGER,
        height INTEGER,
        mtime_ns INTEGER,
        state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'indexed', 'failed')),
        reason TEXT,
        updated_at REAL NOT NULL
    );
    CREATE INDEX images_hash ON images(content_hash);
    CREATE INDEX images_state ON images(state);
    CREATE TABLE captions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
        text TEXT NOT NULL,
        source TEXT NOT NULL,
        UNIQUE (image_id, source, text)
    );
    CREATE TABLE embeddings (
        content_hash TEXT NOT NULL,
        model TEXT NOT NULL,
        vector BLOB NOT NULL,
        PRIMARY KEY (content_hash, model)
    ) WITHOUT ROWID;
    CREATE TABLE text_embeddings (
        text TEXT NOT NULL,
        model TEXT NOT NULL,
        vector BLOB NOT NULL,
        PRIMARY KEY (text, model)
    ) WITHOUT ROWID;
    """,
    # 1 -> 2: generated captions are cached by content hash and captioner, not by image row,
    # so an image is captioned once whatever its path; and a small key/value table for state.
    """
    CREATE TABLE generated_captions (
        content_hash TEXT NOT NULL,
        model TEXT NOT NULL,
        text TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (content_hash, model)
    ) WITHOUT ROWID;
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 2 -> 3: what a photo library filters and sorts on (retrieval.photo_meta). Rows of older catalogs
    # keep NULL until the next `index` reads their headers; no vector changes.
    """
    ALTER TABLE images ADD COLUMN taken_at TEXT;  -- local date and time taken, ISO 8601, no offset
    ALTER TABLE images ADD COLUMN taken_source TEXT;  -- exif | exif-datetime | mtime; NULL: not read yet
    ALTER TABLE images ADD COLUMN format TEXT;  -- lower-case file type: jpeg, png, webp, ...
    ALTER TABLE images ADD COLUMN folder TEXT;  -- folder relative to its indexed root ('' at its top)
    CREATE INDEX images_taken ON images(taken_at);
    CREATE INDEX images_folder ON images(folder);
    """,
]
assert len(_MIGRATIONS) == SCHEMA_VERSION


#: Orders `Catalog.browse` offers: newest first by date taken, or by folder then file.
BROWSE_ORDERS = {
    "date": "taken_at IS NULL, taken_at DESC, id DESC",
    "folder": "folder IS NULL, folder, path, id",
}


@dataclass(frozen=True)
class ImageRecord:
    id: int
    path: str
    content_hash: str | None
    byte_size: int | None
    width: int | None
    height: int | None
    mtime_ns: int | None
    state: str
    reason: str | None
    taken_at: str | None = None  # see retrieval.photo_meta; None until the metadata was read
    taken_source: str | None = None
    format: str | None = None
    folder: str | None = None


@dataclass(frozen=True)
class CaptionRecord:
    id: int
    image_id: int
    text: str
    source: str


_IMAGE_COLS = (
    "id, path, content_hash, byte_size, width, height, mtime_ns, state, reason, "
    "taken_at, taken_source, format, folder"
)


def _db_path(path: str) -> str | bytes:
    """A path as stored: TEXT when it is valid UTF-8 (every ordinary name), else a BLOB of its bytes."""
    return path if is_utf8(path) else path_bytes(path)


def _py_path(value: str | bytes) -> str:
    """A stored path back as the str that opens the file (the inverse of `_db_path`)."""
    return os.fsdecode(value) if isinstance(value, bytes) else value


def _record(row: Sequence[Any]) -> ImageRecord:
    return ImageRecord(row[0], _py_path(row[1]), *row[2:])


class Catalog:
    """Thread-safe access to the catalog database; one connection guarded by a lock."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
        except sqlite3.DatabaseError as exc:
            raise IndexCorrupt(f"catalog {self.path} cannot be opened: {exc}") from exc
        self._lock = threading.RLock()
        self._migrate()

    # -- schema ------------------------------------------------------------------------------
    def _migrate(self) -> None:
        with self._lock:
            version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise IndexCorrupt(
                    f"catalog {self.path} has schema {version}, newer than this Clearsight "
                    f"understands ({SCHEMA_VERSION}); upgrade Clearsight"
                )
            for v in range(version, SCHEMA_VERSION):
                with self._db:  # each step in its own transaction
                    self._db.executescript("BEGIN;" + _MIGRATIONS[v] + f"PRAGMA user_version={v + 1};")

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _select_in(
        self, sql: str, keys: Sequence[object], params: Sequence[object] = ()
    ) -> list[tuple[Any, ...]]:
        """Run `sql` (ending in `IN ({marks})`) over `keys` in chunks below SQLite's variable limit."""
        rows: list[tuple[Any, ...]] = []
        with self._lock:
            for i in range(0, len(keys), 500):
                chunk = list(keys[i : i + 500])
                rows.extend(self._db.execute(sql.format(marks=",".join("?" * len(chunk))), [*params, *chunk]))
        return rows

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._db:
            yield self._db

    # -- images ------------------------------------------------------------------------------
    def get_image(self, image_id: int) -> ImageRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_IMAGE_COLS} FROM images WHERE id=?", (image_id,)).fetchone()
        return _record(row) if row else None

    def get_images(self, ids: Sequence[int]) -> dict[int, ImageRecord]:
        rows = self._select_in(
            f"SELECT {_IMAGE_COLS} FROM images WHERE id IN ({{marks}})", [int(x) for x in ids]
        )
        return {r[0]: _record(r) for r in rows}

    def image_by_path(self, path: str) -> ImageRecord | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_IMAGE_COLS} FROM images WHERE path=?", (_db_path(path),)
            ).fetchone()
        return _record(row) if row else None

    def images_under(self, root: str) -> dict[str, ImageRecord]:
        """Every record whose path lies under `root` (a directory path with no trailing slash).

        Compared as bytes, so that TEXT and BLOB paths (and a root that is not UTF-8) both match.
        """
        prefix = path_bytes(root.rstrip("/") + "/")
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_IMAGE_COLS} FROM images WHERE substr(CAST(path AS BLOB), 1, ?) = ?",
                (len(prefix), prefix),
            ).fetchall()
        records = [_record(r) for r in rows]
        return {r.path: r for r in records}

    def iter_images(self, state: str | None = None) -> list[ImageRecord]:
        with self._lock:
            if state is None:
                rows = self._db.execute(f"SELECT {_IMAGE_COLS} FROM images ORDER BY id").fetchall()
            else:
                rows = self._db.execute(
                    f"SELECT {_IMAGE_COLS} FROM images WHERE state=? ORDER BY id", (state,)
                ).fetchall()
        return [_record(r) for r in rows]

    def add_pending(self, path: str, byte_size: int, mtime_ns: int) -> int:
        """Record a new or changed file as pending under a fresh id.

        A changed file gets a new id: it is a different image, and the index, which only ever adds
        and removes ids, then replaces its vector without having to compare contents.
        """
        now = time.time()
        stored = _db_path(path)
        with self._lock, self._db:
            self._db.execute("DELETE FROM images WHERE path=?", (stored,))
            cur = self._db.execute(
                "INSERT INTO images(path, byte_size, mtime_ns, state, updated_at) "
                "VALUES (?, ?, ?, 'pending', ?)",
                (stored, byte_size, mtime_ns, now),
            )
        return int(cur.lastrowid or 0)

    def mark_failed(self, image_id: int, reason: str, content_hash: str | None = None) -> None:
        with self._lock, self._db:
            self._db.execute(
                "UPDATE images SET state='failed', reason=?, content_hash=?, updated_at=? WHERE id=?",
                (reason, content_hash, time.time(), image_id),
            )

    def delete_images(self, ids: Iterable[int]) -> int:
        ids = [int(i) for i in ids]
        with self._lock, self._db:
            self._select_in("DELETE FROM images WHERE id IN ({marks})", ids)
        return len(ids)

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM images GROUP BY state").fetchall()
        out = {"pending": 0, "indexed": 0, "failed": 0}
        out.update({s: int(n) for s, n in rows})
        return out

    def failures(self, limit: int = 1000) -> list[tuple[str, str]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT path, reason FROM images WHERE state='failed' ORDER BY path LIMIT ?", (limit,)
            ).fetchall()
        return [(_py_path(p), str(r)) for p, r in rows]

    # -- embeddings --------------------------------------------------------------------------
    def get_embeddings(self, hashes: Sequence[str], model: str) -> dict[str, Float32Array]:
        sql = "SELECT content_hash, vector FROM embeddings WHERE model=? AND content_hash IN ({marks})"
        return {h: np.frombuffer(b, dtype=np.float32) for h, b in self._select_in(sql, hashes, [model])}

    def embedded_hash_keys(self, model: str) -> np.ndarray:
        """The first 64 bits of every content hash embedded for `model`, sorted, as uint64.

        8 bytes a hash: compact enough to hand to every worker of a large collection, which checks
        membership with a binary search before decoding (a 64-bit prefix collides about once in 10^12
        lookups at 10M hashes; the caller treats a hit as a hint, not a fact).
        """
        with self._lock:
            rows = self._db.execute("SELECT content_hash FROM embeddings WHERE model=?", (model,)).fetchall()
        keys = np.fromiter((imageio.hash_key(r[0]) for r in rows), dtype=np.uint64, count=len(rows))
        keys.sort()
        return keys

    def commit_indexed(
        self,
        model: str,
        done: Sequence[tuple[int, str, int, int]],
        vectors: dict[str, Float32Array],
    ) -> None:
        """Store new vectors and mark images indexed, atomically (the unit of crash safety).

        `done` holds (image id, content hash, width, height); `vectors` maps new content hashes
        to their embeddings (hashes already stored need no entry).
        """
        now = time.time()
        for h, v in vectors.items():
            if v.dtype != np.float32 or v.ndim != 1:
                raise ShapeError(f"embedding for {h} must be a 1-d float32 vector, got {v.dtype} {v.shape}")
        with self._lock, self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO embeddings(content_hash, model, vector) VALUES (?, ?, ?)",
                [(h, model, v.tobytes()) for h, v in vectors.items()],
            )
            self._db.executemany(
                """UPDATE images SET state='indexed', reason=NULL, content_hash=?, width=?, height=?,
                   updated_at=? WHERE id=?""",
                [(h, w, ht, now, i) for i, h, w, ht in done],
            )

    def indexed_vectors(self, model: str, dim: int) -> tuple[np.ndarray, Float32Array]:
        """(ids, vectors) of every indexed image that has an embedding for `model`."""
        with self._lock:
            rows = self._db.execute(
                """SELECT i.id, e.vector FROM images i JOIN embeddings e
                   ON e.content_hash = i.content_hash AND e.model = ?
                   WHERE i.state = 'indexed' ORDER BY i.id""",
                (model,),
            ).fetchall()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vecs = np.zeros((len(rows), dim), dtype=np.float32)
        for k, (_, blob) in enumerate(rows):
            vecs[k] = np.frombuffer(blob, dtype=np.float32)
        return ids, vecs

    def sample_indexed_vectors(self, model: str, dim: int, limit: int) -> tuple[np.ndarray, Float32Array]:
        """(ids, vectors) of at most `limit` indexed images spread evenly over the id range.

        Deterministic, so a collection version always yields the same sample, and it reads only the
        chosen rows' vectors (the whole table of a million images would be gigabytes).
        """
        with self._lock:
            all_ids = [
                int(r[0])
                for r in self._db.execute(
                    """SELECT i.id FROM images i JOIN embeddings e
                       ON e.content_hash = i.content_hash AND e.model = ?
                       WHERE i.state = 'indexed' ORDER BY i.id""",
                    (model,),
                )
            ]
        if len(all_ids) > limit:
            picks = np.linspace(0, len(all_ids) - 1, limit).round().astype(np.int64)
            all_ids = [all_ids[int(k)] for k in picks]
        rows = self._select_in(
            """SELECT i.id, e.vector FROM images i JOIN embeddings e
               ON e.content_hash = i.content_hash AND e.model = ? WHERE i.id IN ({marks})""",
            all_ids,
            (model,),
        )
        rows.sort(key=lambda r: int(r[0]))
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vecs = np.zeros((len(rows), dim), dtype=np.float32)
        for k, (_, blob) in enumerate(rows):
            vecs[k] = np.frombuffer(blob, dtype=np.float32)
        return ids, vecs

    # -- photo metadata (retrieval.photo_meta) -----------------------------------------------
    def missing_photo_meta(self, root: str) -> list[tuple[int, str, int | None]]:
        """(id, path, mtime_ns) of the indexed images under `root` whose metadata was never read."""
        prefix = path_bytes(root.rstrip("/") + "/")
        with self._lock:
            rows = self._db.execute(
                """SELECT id, path, mtime_ns FROM images WHERE state='indexed' AND taken_source IS NULL
                   AND substr(CAST(path AS BLOB), 1, ?) = ? ORDER BY id""",
                (len(prefix), prefix),
            ).fetchall()
        return [(int(i), _py_path(p), m) for i, p, m in rows]

    def set_photo_meta(self, rows: Sequence[tuple[int, str, str, str | None, str]]) -> None:
        """Store (image id, taken_at, taken_source, format, folder) rows in one transaction."""
        with self._lock, self._db:
            self._db.executemany(
                "UPDATE images SET taken_at=?, taken_source=?, format=?, folder=? WHERE id=?",
                [(taken, source, fmt, folder, i) for i, taken, source, fmt, folder in rows],
            )

    # -- filtered views (retrieval.filters builds the conditions) -----------------------------
    def ids_where(self, condition: str, params: Sequence[object]) -> np.ndarray:
        """Sorted ids of the indexed images meeting an SQL `condition` on `images`, as int64."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT id FROM images WHERE state='indexed' AND ({condition}) ORDER BY id", list(params)
            ).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def browse(
        self, condition: str, params: Sequence[object], order: str, limit: int, offset: int
    ) -> tuple[list[ImageRecord], int]:
        """One page of the indexed images meeting `condition`, in `order`, and how many meet it."""
        sort = BROWSE_ORDERS[order]
        where = f"state='indexed' AND ({condition})"
        with self._lock:
            count = self._db.execute(f"SELECT COUNT(*) FROM images WHERE {where}", list(params))
            total = int(count.fetchone()[0])
            rows = self._db.execute(
                f"SELECT {_IMAGE_COLS} FROM images WHERE {where} ORDER BY {sort} LIMIT ? OFFSET ?",
                [*params, int(limit), int(offset)],
            ).fetchall()
        return [_record(r) for r in rows], total

    def vectors_of(self, ids: Sequence[int], model: str, dim: int) -> tuple[np.ndarray, Float32Array]:
        """(ids, vectors) of those of `ids` that are indexed and embedded for `model`, in id order."""
        rows = self._select_in(
            """SELECT i.id, e.vector FROM images i JOIN embeddings e
               ON e.content_hash = i.content_hash AND e.model = ?
               WHERE i.state = 'indexed' AND i.id IN ({marks})""",
            [int(x) for x in ids],
            (model,),
        )
        rows.sort(key=lambda r: int(r[0]))
        out_ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vecs = np.zeros((len(rows), dim), dtype=np.float32)
        for k, (_, blob) in enumerate(rows):
            vecs[k] = np.frombuffer(blob, dtype=np.float32)
        return out_ids, vecs

    def indexed_ids(self) -> set[int]:
        with self._lock:
            return {int(r[0]) for r in self._db.execute("SELECT id FROM images WHERE state='indexed'")}

    # -- captions ----------------------------------------------------------------------------
    def set_captions(self, image_id: int, source: str, texts: Sequence[str]) -> bool:
        """Replace the captions of one source for an image; True when anything changed."""
        clean = list(dict.fromkeys(t.strip() for t in texts if t and t.strip()))
        with self._lock, self._db:
            old = [
                r[0]
                for r in self._db.execute(
                    "SELECT text FROM captions WHERE image_id=? AND source=? ORDER BY id", (image_id, source)
                )
            ]
            if old == clean:
                return False
            self._db.execute("DELETE FROM captions WHERE image_id=? AND source=?", (image_id, source))
            self._db.executemany(
                "INSERT INTO captions(image_id, text, source) VALUES (?, ?, ?)",
                [(image_id, t, source) for t in clean],
            )
        return True

    def captions_for(self, image_ids: Sequence[int]) -> dict[int, list[CaptionRecord]]:
        sql = "SELECT id, image_id, text, source FROM captions WHERE image_id IN ({marks}) ORDER BY id"
        out: dict[int, list[CaptionRecord]] = {}
        for row in self._select_in(sql, [int(x) for x in image_ids]):
            out.setdefault(row[1], []).append(CaptionRecord(*row))
        return out

    def all_captions(self) -> list[CaptionRecord]:
        with self._lock:
            rows = self._db.execute(
                """SELECT c.id, c.image_id, c.text, c.source FROM captions c
                   JOIN images i ON i.id = c.image_id WHERE i.state = 'indexed' ORDER BY c.id"""
            ).fetchall()
        return [CaptionRecord(*r) for r in rows]

    def get_captions(self, caption_ids: Sequence[int]) -> dict[int, CaptionRecord]:
        sql = "SELECT id, image_id, text, source FROM captions WHERE id IN ({marks})"
        return {r[0]: CaptionRecord(*r) for r in self._select_in(sql, [int(x) for x in caption_ids])}

    def get_text_embeddings(self, texts: Sequence[str], model: str) -> dict[str, Float32Array]:
        sql = "SELECT text, vector FROM text_embeddings WHERE model=? AND text IN ({marks})"
        return {t: np.frombuffer(b, dtype=np.float32) for t, b in self._select_in(sql, texts, [model])}

    def put_text_embeddings(self, model: str, vectors: dict[str, Float32Array]) -> None:
        with self._lock, self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO text_embeddings(text, model, vector) VALUES (?, ?, ?)",
                [(t, model, np.asarray(v, np.float32).tobytes()) for t, v in vectors.items()],
            )

    # -- generated captions (cache by content, not by file) -----------------------------------
    def get_generated_captions(self, hashes: Sequence[str], model: str) -> dict[str, str]:
        sql = "SELECT content_hash, text FROM generated_captions WHERE model=? AND content_hash IN ({marks})"
        return {h: t for h, t in self._select_in(sql, hashes, [model])}

    def put_generated_captions(self, model: str, captions: dict[str, str]) -> None:
        now = time.time()
        with self._lock, self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO generated_captions(content_hash, model, text, created_at) "
                "VALUES (?, ?, ?, ?)",
                [(h, model, t, now) for h, t in captions.items()],
            )

    # -- indexed roots -----------------------------------------------------------------------
    def roots(self) -> list[str]:
        """The folders indexed into this collection, as the user named them (absolute), longest first."""
        raw = self.get_meta("roots")
        try:
            found = json.loads(raw) if raw else []
        except json.JSONDecodeError:
            found = []
        return sorted((str(r) for r in found if isinstance(r, str)), key=len, reverse=True)

    def add_root(self, root: str) -> None:
        """Remember an indexed folder, so results can name files relative to it."""
        roots = self.roots()
        if root not in roots:
            self.set_meta("roots", json.dumps(sorted([*roots, root])))

    def relative_path(self, path: str, roots: Sequence[str] | None = None) -> str:
        """`path` relative to the (longest) indexed folder holding it; the file name when none does.

        Collections indexed before roots were recorded know no folder, and fall back to the file name.
        This is the name results show, so undecodable bytes come back escaped (`display_path`).
        """
        for root in self.roots() if roots is None else roots:
            prefix = root.rstrip("/") + "/"
            if path.startswith(prefix):
                return display_path(path[len(prefix) :])
        return display_path(PurePosixPath(path).name)

    # -- the model indexing started with --------------------------------------------------------
    def indexing_model(self) -> tuple[str, str] | None:
        """(model id, fingerprint) of the model the last index run started with, or None.

        The index manifest names the model only once a first index is written; a first run killed
        before that would otherwise leave nothing saying which model its committed vectors are for,
        and a resumed run without `--model` would switch to the default model.
        """
        raw = self.get_meta("model")
        try:
            found = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return None
        if not isinstance(found, dict):
            return None
        model, fingerprint = found.get("id"), found.get("fingerprint")
        return (model, fingerprint) if isinstance(model, str) and isinstance(fingerprint, str) else None

    def set_indexing_model(self, model_id: str, fingerprint: str) -> None:
        """Remember the model an index run starts with (see `indexing_model`)."""
        self.set_meta("model", json.dumps({"id": model_id, "fingerprint": fingerprint}))

    # -- meta --------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return str(row[0]) if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))
