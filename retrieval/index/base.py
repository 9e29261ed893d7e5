"""The one interface every index kind implements, and the checks and durable writes they share.

The searcher, the store and the catalog→index sync talk to `Index` only, so a FAISS index held in
memory, the memory-mapped on-disk IVF and an index split over Ray actors are interchangeable: each
calls `Index.__init__`, says whether it can be edited in place, and answers `missing_shards` (empty
unless parts of it can fail to answer), so no caller has to ask which kind it holds.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retrieval.errors import ConfigError, ShapeError
from retrieval.index.ondisk import ShardRunner
from retrieval.index.params import IndexParams, SearchParams
from retrieval.types import Float32Array, Int64Array

#: The image index's file in a version directory (layouts of several files add their own).
IMAGES_FILE = "images.faiss"


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


@contextmanager
def omp_threads(n: int | None) -> Iterator[None]:
    """Cap faiss's OpenMP team at `n` threads in the calling thread, then restore it.

    OpenMP keeps the thread count per calling thread (the nthreads-var ICV belongs to each
    thread's data environment), so this neither races with nor slows other threads' searches.
    """
    before = faiss.omp_get_max_threads()
    if n is None or before <= n:
        yield
        return
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes) -> None:
    """Write and fsync: a version directory is renamed into place only once its files are on disk."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@dataclass(frozen=True)
class BuildJob:
    """What the sync hands a kind's builder: the vectors, what to build, and the knobs it decided.

    `previous` is what the index being replaced was built as (None for a first build), so a kind can
    tell whether recorded knobs are its own; `scratch` is where kinds that write files build them
    (the store removes what a failed build leaves there); `runner` fills shards of file-built kinds.
    """

    ids: Int64Array
    vectors: Float32Array
    dim: int
    factory: str
    ef_construction: int
    search: SearchParams | None
    previous: str | None
    scratch: Path
    runner: ShardRunner


class Index(ABC):
    """An inner-product index whose ids are catalog ids, of any kind.

    `factory` is what was built (a FAISS factory string, or a kind's own name such as `ivf-ondisk`)
    and `params` the knobs recorded for it. The defaults describe a read-only index (its vectors live
    elsewhere: files on disk, Ray actors): the sync rebuilds it rather than editing it; kinds that
    can be edited override `supports_add`/`supports_remove` and `add`/`remove`. `what` names the kind
    in errors.
    """

    what = "this index"

    def __init__(self, dim: int, factory: str, params: IndexParams) -> None:
        self.dim = dim
        self.factory = factory
        self.params = params

    @property
    @abstractmethod
    def ntotal(self) -> int: ...

    @abstractmethod
    def ids(self) -> Int64Array: ...

    @abstractmethod
    def search(
        self, queries: Float32Array, k: int, params: SearchParams | None = None
    ) -> tuple[Float32Array, Int64Array]:
        """Top-k by inner product; `params` None searches with the knobs the index records."""

    @abstractmethod
    def with_params(self, params: IndexParams) -> Index:
        """The same vectors searched with other recorded knobs (the sync's `--nprobe` and friends)."""

    def reconstruct(self, id_: int) -> Float32Array:
        raise ConfigError(f"{self.what} cannot give back stored vectors")

    @property
    def exact(self) -> bool:
        """Whether `search` is exhaustive and exact (a flat index): then a selector search is too."""
        return False

    def search_among(
        self, queries: Float32Array, k: int, allowed: Int64Array, params: SearchParams | None = None
    ) -> tuple[Float32Array, Int64Array] | None:
        """Top-k among the sorted ids `allowed` only, inside the index's own search (a FAISS ID
        selector); None for kinds that cannot (the searcher then filters another way,
        retrieval.search `_fetch_scoped`). Unfilled slots hold id -1, as in `search`."""
        return None

    def stored_vectors(self, ids: Int64Array) -> Float32Array | None:
        """The exact float vectors of `ids`, in order, when this index holds them uncompressed and
        holds every one of them; None otherwise (the catalog has them)."""
        return None

    @property
    def missing_shards(self) -> list[int]:
        """Parts that did not answer this thread's last search: empty when the answer is complete,
        which it always is for an index held by this process."""
        return []

    @property
    def supports_remove(self) -> bool:
        return False

    @property
    def supports_add(self) -> bool:
        return False

    def add(self, ids: Int64Array, vectors: Float32Array) -> None:
        raise ConfigError(f"{self.what} is read-only: rebuild it to add vectors")

    def remove(self, ids: Int64Array) -> None:
        raise ConfigError(f"{self.what} is read-only: rebuild it to remove vectors")

    def to_bytes(self) -> bytes:
        raise ConfigError(f"{self.what} is not one blob: save it through the index store")

    def write_into(self, directory: Path) -> None:
        """Put this index's file(s) into a version directory being written."""
        write_file(directory / IMAGES_FILE, self.to_bytes())
