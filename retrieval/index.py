"""FAISS indexes and their versioned, atomically replaced home on disk.

Layout of `<data-dir>/index/`:

    CURRENT            name of the live version directory (replaced with os.replace)
    v000007/           one complete version: manifest.json, images.faiss, captions.faiss

A new version is written into a temporary directory, fsynced, renamed into place, and only then
does CURRENT point to it, so a crash at any instant leaves the previous version intact and no
reader ever sees a half-written index. The manifest records what the vectors mean (model,
dimension, factory); loading an index under a different model is refused.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from .errors import ConfigError, IndexCorrupt, IndexMismatch, IndexMissing, ShapeError
from .types import Float32Array, Int64Array

INDEX_SCHEMA_VERSION = 1

#: Friendly names for the factory strings users ask for.
ALIASES: dict[str, str] = {"flat": "Flat", "exact": "Flat", "hnsw": "HNSW32", "ivfpq": "ivfpq"}
#: The auto IVF-PQ layout needs this many vectors before it can be trained.
IVFPQ_MIN_VECTORS = 1024


@dataclass(frozen=True)
class SearchParams:
    """Query-time knobs of approximate indexes (ignored by exact search)."""

    nprobe: int = 32
    ef_search: int = 128


@dataclass
class Manifest:
    model_name: str
    model_id: str
    fingerprint: str
    dim: int
    factory: str  # what the user asked for (alias or factory string)
    built_factory: str  # what was built: differs from `factory` while IVF-PQ waits for data
    count: int
    captions_count: int = 0
    schema_version: int = INDEX_SCHEMA_VERSION
    metric: str = "inner_product"
    created_at: float = field(default_factory=time.time)
    note: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def check_vectors(x: Any, dim: int, what: str = "vectors") -> Float32Array:
    """Refuse arrays that would silently corrupt an inner-product index."""
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ShapeError(
            f"{what} must have shape (n, {dim}), got {arr.shape}: was the index built with another model?"
        )
    if arr.dtype != np.float32:
        raise ShapeError(f"{what} must be float32, got {arr.dtype}: convert with .astype(np.float32)")
    if not np.isfinite(arr).all():
        raise ShapeError(f"{what} contain NaN or infinity")
    if len(arr):
        norms = np.linalg.norm(arr, axis=1)
        bad = np.abs(norms - 1.0) > 1e-3
        if bad.any():
            raise ShapeError(
                f"{what} must be L2-normalised for inner-product search ({int(bad.sum())} rows are not, "
                f"e.g. norm {float(norms[bad][0]):.4f}): normalise with retrieval.encoders.l2_normalise"
            )
    return np.ascontiguousarray(arr)


def resolve_factory(requested: str, n: int, dim: int) -> tuple[str, str]:
    """Turn an alias or factory string into the factory to build for `n` vectors, and a note."""
    name = ALIASES.get(requested.lower(), requested)
    if name == "ivfpq":
        if n < IVFPQ_MIN_VECTORS:
            return "Flat", (
                f"IVF-PQ needs at least {IVFPQ_MIN_VECTORS} vectors to train; the collection has {n}, "
                "so exact search is used until it grows (re-run `clearsight index` then)"
            )
        nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
        nlist = max(16, min(nlist, n // 39, 65536))
        m = max(d for d in range(1, dim + 1) if dim % d == 0 and d <= max(1, dim // 8))
        return f"IVF{nlist},PQ{m}", ""
    ivf = re.match(r"^IVF(\d+)", name)
    if ivf and n < 39 * int(ivf.group(1)):
        return "Flat", (
            f"{name} needs at least {39 * int(ivf.group(1))} vectors to train ({n} so far): "
            "exact search is used until then"
        )
    try:  # validate the string before anything is written
        faiss.index_factory(dim, name, faiss.METRIC_INNER_PRODUCT)
    except Exception as exc:
        raise ConfigError(
            f"FAISS cannot build {requested!r} ({exc}); use flat, hnsw, ivfpq or a FAISS factory string"
        ) from exc
    return name, ""


class VectorIndex:
    """A FAISS inner-product index whose ids are catalog ids."""

    def __init__(self, index: Any, dim: int, factory: str) -> None:
        self.index = index
        self.dim = dim
        self.factory = factory

    @classmethod
    def build(cls, ids: Int64Array, vectors: Float32Array, factory: str, dim: int) -> VectorIndex:
        vectors = check_vectors(vectors, dim)
        index = faiss.index_factory(dim, f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(vectors)
        if len(ids):
            index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
        return cls(index, dim, factory)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def ids(self) -> Int64Array:
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    @property
    def supports_remove(self) -> bool:
        return not self.factory.startswith("HNSW")

    def add(self, ids: Int64Array, vectors: Float32Array) -> None:
        vectors = check_vectors(vectors, self.dim)
        if len(ids):
            self.index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: Int64Array) -> None:
        if len(ids):
            self.index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64))

    def search(
        self, queries: Float32Array, k: int, params: SearchParams | None = None
    ) -> tuple[Float32Array, Int64Array]:
        queries = check_vectors(queries, self.dim, "queries")
        k = max(0, min(int(k), self.ntotal))
        if k == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        self._apply(params or SearchParams())
        scores, ids = self.index.search(queries, k)
        return scores.astype(np.float32), ids.astype(np.int64)

    def _apply(self, params: SearchParams) -> None:
        inner = faiss.downcast_index(self.index.index)
        if hasattr(inner, "nprobe"):
            inner.nprobe = params.nprobe
        if hasattr(inner, "hnsw"):
            inner.hnsw.efSearch = params.ef_search

    def reconstruct(self, id_: int) -> Float32Array:
        return np.asarray(self.index.reconstruct(int(id_)), dtype=np.float32)

    def to_bytes(self) -> bytes:
        return bytes(faiss.serialize_index(self.index))

    @classmethod
    def from_file(cls, path: Path, dim: int, factory: str) -> VectorIndex:
        try:
            index = faiss.read_index(str(path))
        except Exception as exc:
            raise IndexCorrupt(
                f"cannot read {path}: {exc}; rebuild with `clearsight index --rebuild`"
            ) from exc
        if index.d != dim:
            raise IndexCorrupt(f"{path} holds {index.d}-d vectors but the manifest says {dim}")
        return cls(index, dim, factory)


@dataclass
class LoadedIndex:
    manifest: Manifest
    images: VectorIndex
    captions: VectorIndex
    version: str


def _fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class IndexStore:
    """The versioned index directory of one collection."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def current_file(self) -> Path:
        return self.root / "CURRENT"

    def current_version(self) -> str | None:
        try:
            name = self.current_file.read_text().strip()
        except FileNotFoundError:
            return None
        return name if (self.root / name / "manifest.json").exists() else None

    def exists(self) -> bool:
        return self.current_version() is not None

    def read_manifest(self) -> Manifest:
        version = self.current_version()
        if version is None:
            raise IndexMissing(f"no index in {self.root.parent}: run `clearsight index PATH` first")
        try:
            manifest = Manifest.from_json((self.root / version / "manifest.json").read_text())
        except (OSError, ValueError, TypeError) as exc:
            raise IndexCorrupt(f"index manifest in {self.root / version} is unreadable: {exc}") from exc
        if manifest.schema_version > INDEX_SCHEMA_VERSION:
            raise IndexMismatch(
                f"the index in {self.root.parent} has schema {manifest.schema_version}, newer than this "
                f"Clearsight ({INDEX_SCHEMA_VERSION}): upgrade Clearsight"
            )
        return manifest

    def load(self, expect_fingerprint: str | None = None, expect_model: str | None = None) -> LoadedIndex:
        manifest = self.read_manifest()
        if expect_fingerprint is not None and manifest.fingerprint != expect_fingerprint:
            raise IndexMismatch(
                f"the index in {self.root.parent} was built with model {manifest.model_name!r}"
                + (f" and cannot be searched with {expect_model!r}" if expect_model else "")
                + ": search without --model to use the model it was built with, or re-index with "
                "`clearsight index PATH --model ...` into another --data-dir"
            )
        version = self.current_version()
        assert version is not None
        d = self.root / version
        images = VectorIndex.from_file(d / "images.faiss", manifest.dim, manifest.built_factory)
        captions = VectorIndex.from_file(d / "captions.faiss", manifest.dim, "Flat")
        return LoadedIndex(manifest, images, captions, version)

    def save(self, manifest: Manifest, images: VectorIndex, captions: VectorIndex) -> str:
        """Write a complete new version and switch CURRENT to it atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        try:
            _write_file(tmp / "images.faiss", images.to_bytes())
            _write_file(tmp / "captions.faiss", captions.to_bytes())
            _write_file(tmp / "manifest.json", manifest.to_json().encode())
            _fsync_dir(tmp)
            existing = [int(p.name[1:]) for p in self.root.glob("v[0-9]*") if p.name[1:].isdigit()]
            version = f"v{(max(existing) + 1 if existing else 1):06d}"
            os.rename(tmp, self.root / version)
            pointer = self.root / ".CURRENT.tmp"
            _write_file(pointer, version.encode())
            os.replace(pointer, self.current_file)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._collect_garbage(keep={version})
        return version

    def _collect_garbage(self, keep: set[str]) -> None:
        """Drop old versions and debris from crashed writers; the previous version is kept for readers."""
        versions = sorted(p.name for p in self.root.glob("v[0-9]*"))
        keep = keep | set(versions[-2:])
        for p in self.root.iterdir():
            if (p.name.startswith("v") and p.name not in keep) or (p.name.startswith(".tmp-") and p.is_dir()):
                shutil.rmtree(p, ignore_errors=True)

    def delete(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
