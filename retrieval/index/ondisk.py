"""An IVF index whose inverted lists and re-ranking vectors stay on disk, for collections past RAM.

Layout of one version directory (written by `build`, read by `OnDiskIndex.load`):

    images.faiss      the trained IVF-PQ index; its inverted lists point at images.ivfdata
    images.ivfdata    every list's PQ codes and ids, merged from shards by faiss's on-disk merge
    images.ids.npy    the catalog ids, sorted
    images.vecs.npy   the exact float32 vectors in that order, for re-ranking

When loaded, the lists are memory-mapped and the vectors read row by row (`RowFile`), so a process
serving the index holds only the coarse centroids, the PQ tables and the list pages the queries
touch. A search scans `nprobe` lists with the compressed codes, then re-scores `k_factor * k`
candidates against the exact vectors: recall then depends on whether the true neighbours reach the
candidate list, not on the PQ error.

The build has three stages that a distributed engine can spread: `train` (one process, on a
sample), `fill_shard` (independent, one per slice of the vectors: Ray tasks in
retrieval.distributed, a plain loop here) and `merge` (one process, streaming).
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

from retrieval.errors import ConfigError, IndexCorrupt, ShapeError
from retrieval.index.params import DEFAULT_NPROBE, ivf_lists, pq_subquantizers
from retrieval.types import Float32Array, Int64Array

#: The name `--index` takes and the manifest records.
ONDISK = "ivf-ondisk"
INDEX_FILE = "images.faiss"
DATA_FILE = "images.ivfdata"
IDS_FILE = "images.ids.npy"
VECS_FILE = "images.vecs.npy"
FILES = (INDEX_FILE, DATA_FILE, IDS_FILE, VECS_FILE)
#: Candidates re-ranked per result. 4 (the in-memory refine default) left recall@10 at 0.918 on 1M
#: clustered 512-d vectors with PQ64 lists (bench/RESULTS.md); exact re-ranking of 16x reads 160 rows of
#: 2 KB per top-10 query, a few hundred KB from the page cache.
DEFAULT_K_FACTOR = 16
#: Below this many vectors the lists hold SQ8 codes instead of PQ (see OnDiskLayout.factory).
SQ8_BELOW = 65536
#: Vectors a training sample holds at most: k-means and PQ training cost grow with it, quality barely.
MAX_TRAIN = 100_000


@dataclass(frozen=True)
class OnDiskLayout:
    """The IVF shape for `n` vectors of `dim`: lists, PQ sub-quantisers, and the factory string."""

    nlist: int
    pq_m: int

    @classmethod
    def for_size(cls, n: int, dim: int) -> OnDiskLayout:
        # at least 16 code bytes for small dims: the lists are re-ranked, but candidates must reach them
        return cls(nlist=ivf_lists(n), pq_m=pq_subquantizers(dim, min_bytes=16))

    def factory(self, n: int) -> str:
        """PQ codes for large collections; below SQ8_BELOW vectors 8-bit scalar codes, whose few MB do
        not matter and which rank well enough that small, near-uniform sets keep their recall; the
        tiniest get exact lists."""
        if n < 64:
            return f"IVF{self.nlist},Flat"
        if n < SQ8_BELOW:
            return f"IVF{self.nlist},SQ8"
        return f"IVF{self.nlist},PQ{self.pq_m}np"


@contextmanager
def _c_stdout_to_stderr() -> Iterator[None]:
    """faiss's on-disk lists print progress with C printf; keep it off stdout, which may carry JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


class RowFile:
    """Rows of a float32 .npy matrix read with `os.pread`, never memory-mapped.

    A memory map of the re-ranking vectors made the serving process's resident set grow to the whole
    file at 1M vectors (bench/RESULTS.md): on every page fault Linux also maps the neighbouring pages
    already in the page cache ("fault-around", 64 KiB), MADV_RANDOM does not turn that off, and a file
    just written is entirely in the cache. Reading rows with pread copies only the candidates into the
    process; the file's pages stay in the shared, reclaimable page cache, as a database's would. At 1M
    vectors the serving process then held 88 MiB more than a bare one (4.5% of the flat index).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        # kept open for the object's life (closed by close): the header is read through it, rows with pread
        self._file = open(path, "rb")  # noqa: SIM115
        try:
            try:
                version = np.lib.format.read_magic(self._file)
                header = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape, fortran, dtype = header(self._file)
            except ValueError as exc:  # not a .npy file, or a header numpy cannot parse
                raise IndexCorrupt(f"{path} is not a .npy matrix ({exc}); rebuild the index") from exc
            self._offset = self._file.tell()
            if len(shape) != 2 or fortran or dtype != np.dtype("<f4"):
                raise IndexCorrupt(f"{path} is not a C-ordered float32 matrix ({dtype}, {shape})")
            self.shape: tuple[int, int] = (int(shape[0]), int(shape[1]))
            self._row_bytes = 4 * self.shape[1]
            if os.fstat(self._file.fileno()).st_size < self._offset + self.shape[0] * self._row_bytes:
                raise IndexCorrupt(f"{path} is shorter than its header says; rebuild the index")
        except BaseException:
            self._file.close()
            raise

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, rows: np.ndarray) -> Float32Array:
        """The given rows, in the given order; runs of adjacent rows are read in one call."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.shape[1]), dtype=np.float32)
        if not len(rows):
            return out
        if rows.min() < 0 or rows.max() >= self.shape[0]:
            raise IndexError(f"row out of range 0..{self.shape[0] - 1}")
        order = np.argsort(rows, kind="stable")
        wanted = rows[order]
        starts = np.flatnonzero(np.diff(wanted, prepend=wanted[0] - 2) > 1)  # first row of each run
        ends = np.append(starts[1:], len(wanted))
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            first, last = int(wanted[a]), int(wanted[b - 1])
            size = (last - first + 1) * self._row_bytes
            data = os.pread(self._file.fileno(), size, self._offset + first * self._row_bytes)
            if len(data) != size:
                raise IndexCorrupt(f"{self.path} ended early; rebuild the index")
            block = np.frombuffer(data, dtype="<f4").reshape(-1, self.shape[1])
            out[order[a:b]] = block[wanted[a:b] - first]
        return out

    def close(self) -> None:
        self._file.close()

    def __del__(self) -> None:
        if hasattr(self, "_file"):  # a failed open leaves nothing to close
            self.close()


def _check(ids: Int64Array, vectors: Float32Array, dim: int) -> tuple[Int64Array, Float32Array]:
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[1] != dim or vectors.dtype != np.float32:
        raise ShapeError(f"vectors must be float32 of shape (n, {dim}), got {vectors.dtype} {vectors.shape}")
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if len(ids) != len(vectors):
        raise ShapeError(f"{len(ids)} ids for {len(vectors)} vectors")
    return ids, np.ascontiguousarray(vectors)


def train(vectors: Float32Array, dim: int, factory: str, seed: int = 0) -> bytes:
    """Train the coarse quantiser and PQ on a sample; the empty trained index, serialized."""
    n = len(vectors)
    take = min(n, MAX_TRAIN)
    rng = np.random.default_rng(seed)
    sample = vectors if take == n else vectors[np.sort(rng.choice(n, size=take, replace=False))]
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return bytes(faiss.serialize_index(index))


def fill_shard(trained: bytes, ids: Int64Array, vectors: Float32Array, out: str) -> int:
    """Add one slice of the vectors to a copy of the trained index and write it to `out`.

    Independent of every other shard: this is the step a cluster runs in parallel.
    """
    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids))
    tmp = out + ".tmp"
    faiss.write_index(index, tmp)
    os.replace(tmp, out)
    return int(index.ntotal)


#: How shard jobs run: given (trained index, [(ids, vectors, output path)]), fill every shard.
ShardRunner = Callable[[bytes, Sequence[tuple[Int64Array, Float32Array, str]]], None]


def run_shards_here(trained: bytes, jobs: Sequence[tuple[Int64Array, Float32Array, str]]) -> None:
    """The single-process runner: one shard after another."""
    for ids, vecs, out in jobs:
        fill_shard(trained, ids, vecs, out)


def build(
    ids: Int64Array,
    vectors: Float32Array,
    dim: int,
    out_dir: Path,
    *,
    shards: int = 4,
    runner: ShardRunner = run_shards_here,
    nprobe: int = DEFAULT_NPROBE,
    k_factor: int = DEFAULT_K_FACTOR,
    timings: dict[str, float] | None = None,
) -> OnDiskIndex:
    """Train, fill `shards` shard indexes through `runner`, merge them on disk, and write the
    re-ranking vectors; everything lands in `out_dir` (created), which then holds a loadable index."""
    import time

    ids, vectors = _check(ids, vectors, dim)
    n = len(ids)
    if n == 0:
        raise ConfigError("an on-disk IVF index needs at least one vector")
    if len(np.unique(ids)) != n:
        raise ShapeError("ids must be unique")
    out_dir.mkdir(parents=True, exist_ok=True)
    layout = OnDiskLayout.for_size(n, dim)
    factory = layout.factory(n)
    clock = timings if timings is not None else {}

    t0 = time.perf_counter()
    trained = train(vectors, dim, factory)
    clock["train_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    work = out_dir / ".shards"
    work.mkdir(exist_ok=True)
    bounds = np.linspace(0, n, max(1, min(shards, n)) + 1).astype(int)
    jobs = [
        (ids[a:b], vectors[a:b], str(work / f"shard-{i:04d}.faiss"))
        for i, (a, b) in enumerate(itertools.pairwise(bounds))
    ]
    runner(trained, jobs)
    clock["fill_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    data_path = out_dir / DATA_FILE
    if data_path.exists():
        data_path.unlink()
    with _c_stdout_to_stderr():
        merge_ondisk(index, [j[2] for j in jobs], str(data_path))
    faiss.write_index(index, str(out_dir / INDEX_FILE))
    shutil.rmtree(work, ignore_errors=True)
    clock["merge_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    order = np.argsort(ids, kind="stable")
    np.save(out_dir / IDS_FILE, ids[order])
    vec_out = np.lib.format.open_memmap(out_dir / VECS_FILE, mode="w+", dtype=np.float32, shape=(n, dim))
    for a in range(0, n, 65536):  # in chunks: a gather of the whole array would double the memory
        vec_out[a : a + 65536] = vectors[order[a : a + 65536]]
    vec_out.flush()
    del vec_out
    clock["vectors_s"] = time.perf_counter() - t0
    return OnDiskIndex.load(out_dir, dim, factory, nprobe=nprobe, k_factor=k_factor)


class OnDiskIndex:
    """A loaded, memory-mapped on-disk IVF index with exact re-ranking. Read-only."""

    def __init__(
        self,
        index: Any,
        ids: Int64Array,
        vectors: RowFile,
        directory: Path,
        dim: int,
        factory: str,
        nprobe: int,
        k_factor: int,
    ) -> None:
        self.index = index
        self._ids = ids
        self._vectors = vectors
        self.directory = directory
        self.dim = dim
        self.factory = factory
        self.nprobe = nprobe
        self.k_factor = k_factor
        self._ivf = faiss.extract_index_ivf(index)

    @classmethod
    def load(
        cls,
        directory: Path,
        dim: int,
        factory: str,
        *,
        nprobe: int = DEFAULT_NPROBE,
        k_factor: int = DEFAULT_K_FACTOR,
    ) -> OnDiskIndex:
        missing = [f for f in FILES if not (directory / f).exists()]
        if missing:
            raise IndexCorrupt(f"on-disk index in {directory} lacks {', '.join(missing)}; rebuild it")
        try:
            # ONDISK_SAME_DIR: the lists file is looked up beside images.faiss, wherever the version
            # directory was renamed to; the lists are mmap'ed, not read
            with _c_stdout_to_stderr():
                index = faiss.read_index(str(directory / INDEX_FILE), faiss.IO_FLAG_ONDISK_SAME_DIR)
            ids = np.load(directory / IDS_FILE, mmap_mode="r")
            vecs = RowFile(directory / VECS_FILE)
        except Exception as exc:
            raise IndexCorrupt(f"cannot read the on-disk index in {directory}: {exc}") from exc
        if index.d != dim or vecs.shape != (len(ids), dim) or int(index.ntotal) != len(ids):
            raise IndexCorrupt(
                f"on-disk index in {directory} is inconsistent: {index.ntotal} listed, {len(ids)} ids, "
                f"vectors {vecs.shape}, expected dimension {dim}"
            )
        return cls(index, ids, vecs, directory, dim, factory, nprobe, k_factor)

    @property
    def ntotal(self) -> int:
        return len(self._ids)

    def ids(self) -> Int64Array:
        return np.asarray(self._ids, dtype=np.int64)

    def reconstruct(self, id_: int) -> Float32Array:
        row = int(np.searchsorted(self._ids, id_))
        if row >= len(self._ids) or int(self._ids[row]) != int(id_):
            raise KeyError(id_)
        return self._vectors.rows(np.array([row]))[0]

    def stored_vectors(self, ids: Int64Array) -> Float32Array | None:
        """The float vectors of `ids` from the memory-mapped rows; None when one is not held."""
        ids = np.asarray(ids, dtype=np.int64)
        rows = np.searchsorted(self._ids, ids)
        if len(ids) and (rows.max() >= len(self._ids) or not np.array_equal(self._ids[rows], ids)):
            return None
        return self._vectors.rows(rows)

    def search(
        self, queries: Float32Array, k: int, nprobe: int | None = None, k_factor: int | None = None
    ) -> tuple[Float32Array, Int64Array]:
        """Top-k by exact inner product among the IVF-PQ candidates (queries already validated)."""
        nq = len(queries)
        k = max(0, min(int(k), self.ntotal))
        if k == 0:
            return np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64)
        depth = min(self.ntotal, k * max(1, k_factor or self.k_factor))
        params = faiss.SearchParametersIVF()
        params.nprobe = min(int(nprobe or self.nprobe), self._ivf.nlist)
        _, cand = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), depth, params=params)
        scores = np.full((nq, k), -np.inf, dtype=np.float32)
        found = np.full((nq, k), -1, dtype=np.int64)
        for qi in range(nq):
            c = cand[qi][cand[qi] >= 0]
            if not len(c):
                continue
            rows = np.searchsorted(self._ids, c)
            s = self._vectors.rows(rows) @ queries[qi]
            top = np.argsort(-s, kind="stable")[:k]
            scores[qi, : len(top)] = s[top]
            found[qi, : len(top)] = c[top]
        return scores, found

    def copy_to(self, directory: Path) -> None:
        """Put this index's files into another version directory (hard links where the disk allows)."""
        for name in FILES:
            src, dst = self.directory / name, directory / name
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
