"""The on-disk IVF index behind the `Index` interface, and how its version directory opens.

Kept apart from retrieval.index.ondisk, which builds and searches the files and knows nothing of
manifests or of the interface; the table of kinds names `open_version` as this kind's opener.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from retrieval.index import ondisk
from retrieval.index.base import BuildJob, Index, check_vectors, omp_threads
from retrieval.index.params import IndexParams, SearchParams
from retrieval.types import Float32Array, Int64Array


class OnDiskVectorIndex(Index):
    """`ivf-ondisk` behind the Index interface: memory-mapped, read-only, rebuilt on change."""

    what = "an on-disk IVF index"

    def __init__(self, disk: ondisk.OnDiskIndex, params: IndexParams) -> None:
        super().__init__(disk.dim, ondisk.ONDISK, params)
        self.disk = disk

    @classmethod
    def build_in(
        cls,
        directory: Path,
        ids: Int64Array,
        vectors: Float32Array,
        dim: int,
        *,
        search: SearchParams | None = None,
        runner: ondisk.ShardRunner = ondisk.run_shards_here,
        shards: int = 4,
    ) -> OnDiskVectorIndex:
        vectors = check_vectors(vectors, dim)
        search = search or SearchParams(k_factor=ondisk.DEFAULT_K_FACTOR)
        disk = ondisk.build(
            ids,
            vectors,
            dim,
            directory,
            shards=shards,
            runner=runner,
            nprobe=search.nprobe,
            k_factor=search.k_factor,
        )
        return cls(disk, cls.params_for(disk, search))

    @staticmethod
    def params_for(disk: ondisk.OnDiskIndex, search: SearchParams) -> IndexParams:
        layout = IndexParams.for_factory(disk.factory)
        return IndexParams(
            nlist=layout.nlist, pq_m=layout.pq_m, nprobe=search.nprobe, k_factor=search.k_factor
        )

    def with_params(self, params: IndexParams) -> OnDiskVectorIndex:
        return OnDiskVectorIndex(self.disk, params)

    @property
    def ntotal(self) -> int:
        return self.disk.ntotal

    def ids(self) -> Int64Array:
        return self.disk.ids()

    def search(
        self, queries: Float32Array, k: int, params: SearchParams | None = None
    ) -> tuple[Float32Array, Int64Array]:
        queries = check_vectors(queries, self.dim, "queries")
        params = params or self.params.search
        with omp_threads(params.single_query_threads if len(queries) == 1 else None):
            return self.disk.search(queries, k, nprobe=params.nprobe, k_factor=params.k_factor)

    def reconstruct(self, id_: int) -> Float32Array:
        return self.disk.reconstruct(id_)

    def stored_vectors(self, ids: Int64Array) -> Float32Array | None:
        return self.disk.stored_vectors(ids)

    def write_into(self, directory: Path) -> None:
        self.disk.copy_to(directory)  # hard links: the build wrote and fsynced the files


def build_version(job: BuildJob) -> Index:
    """Build the files in a fresh directory under the store, for `IndexStore.save` to link in."""
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=job.scratch))
    # another kind's recorded knobs (k_factor 8 for in-memory refinement) do not carry over
    kept = job.search if job.previous == ondisk.ONDISK else None
    return OnDiskVectorIndex.build_in(work, job.ids, job.vectors, job.dim, search=kept, runner=job.runner)


def open_version(directory: Path, dim: int, factory: str, params: IndexParams) -> Index:
    """Open the on-disk IVF files of a version directory, searched with the recorded knobs."""
    search = params.search
    disk = ondisk.OnDiskIndex.load(directory, dim, factory, nprobe=search.nprobe, k_factor=search.k_factor)
    return OnDiskVectorIndex(disk, params)
