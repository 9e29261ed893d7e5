"""The on-disk IVF index behind the VectorIndex interface, and its place in the versioned index store.

Kept apart from retrieval.index (which it extends) so that module stays readable and needs not
import this one: the store finds the layout through `FILE_LAYOUTS`, registered below.
"""

from __future__ import annotations

from pathlib import Path

from retrieval import ondisk
from retrieval.errors import ConfigError
from retrieval.index import (
    FILE_LAYOUTS,
    IndexParams,
    Manifest,
    ReadOnlyIndex,
    SearchParams,
    VectorIndex,
    check_vectors,
    omp_threads,
)
from retrieval.types import Float32Array, Int64Array


class OnDiskVectorIndex(ReadOnlyIndex):
    """`ivf-ondisk` behind the VectorIndex interface: memory-mapped, read-only, rebuilt on change."""

    what = "an on-disk IVF index"

    def __init__(self, disk: ondisk.OnDiskIndex, params: IndexParams) -> None:
        self.disk = disk
        super().__init__(disk.index, disk.dim, ondisk.ONDISK, params)

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

    def to_bytes(self) -> bytes:
        raise ConfigError("an on-disk IVF index is a set of files, not one blob: use IndexStore.save")

    def write_into(self, directory: Path) -> None:
        self.disk.copy_to(directory)  # hard links: the build wrote and fsynced the files


def _open(directory: Path, manifest: Manifest) -> VectorIndex:
    search = manifest.params.search
    disk = ondisk.OnDiskIndex.load(
        directory, manifest.dim, ondisk.ONDISK, nprobe=search.nprobe, k_factor=search.k_factor
    )
    return OnDiskVectorIndex(disk, manifest.params)


FILE_LAYOUTS[ondisk.ONDISK] = _open
