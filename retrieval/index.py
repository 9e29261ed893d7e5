"""FAISS indexes and their versioned, atomically replaced home on disk.

Layout of `<data-dir>/index/`:

    CURRENT            name of the live version directory (replaced with os.replace)
    v000007/           one complete version: manifest.json, images.faiss, captions.faiss

A new version is written into a temporary directory, fsynced, renamed into place, and only then
does CURRENT point to it, so a crash at any instant leaves the previous version intact and no
reader ever sees a half-written index. The manifest records what the vectors mean (model,
dimension, factory) and the knobs the index was built and is searched with (`IndexParams`), so a
loaded index searches as it was configured; loading an index under a different model is refused.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retrieval import ondisk
from retrieval.errors import ConfigError, IndexCorrupt, IndexMismatch, IndexMissing, ShapeError
from retrieval.types import Float32Array, Int64Array

#: 2 added `params` (nlist, m, efConstruction, efSearch, nprobe); version 1 manifests are migrated.
#: 3 added `params.k_factor` (re-ranking depth) and the memory-mapped `ivf-ondisk` layout; schema 2
#: manifests load unchanged (their indexes have no re-ranking step).
INDEX_SCHEMA_VERSION = 3

#: faiss's bundled type stubs lack SearchParametersHNSW and the keyword constructors of the SWIG classes.
_faiss_untyped: Any = faiss

#: Friendly names for the factory strings users ask for.
ALIASES: dict[str, str] = {
    "flat": "Flat",
    "exact": "Flat",
    "hnsw": "HNSW32",
    "ivfpq": "ivfpq",
    ondisk.ONDISK: ondisk.ONDISK,
}
#: The auto IVF-PQ layout needs this many vectors before it can be trained.
IVFPQ_MIN_VECTORS = 1024

DEFAULT_NPROBE = 32
#: Candidates re-ranked per result by a refine step (`…,Refine(SQ8)`, `ivf-ondisk`). PQ64 codes alone
#: cap recall@10 near 0.73 (100k) / 0.63 (1M) whatever nprobe is. Re-scoring with SQ8 codes at 1M:
#: 4x 0.937, 8x 0.978 for 3 % more latency, 16x 0.986 for 10 % (at 100k: 4x 0.983, 8x 0.993); 8x is the
#: smallest depth past 0.95 at 1M (bench/RESULTS.md). Indexes keep the depth they were built with.
DEFAULT_REFINE_K = 8
DEFAULT_EF_SEARCH = 128
#: HNSW build beam. faiss's default (40) left recall@10 at 0.887 on 1M clustered vectors, where
#: 128 reached 0.988 for about twice the build time (bench/RESULTS.md).
DEFAULT_EF_CONSTRUCTION = 128
#: faiss's default efConstruction, which every HNSW index written under manifest schema 1 was built with.
FAISS_DEFAULT_EF_CONSTRUCTION = 40


@dataclass(frozen=True)
class SearchParams:
    """Query-time knobs of approximate indexes (ignored by exact search).

    `single_query_threads` caps faiss's OpenMP team while one query vector is searched: there is
    nothing to split across threads, and waking them costs more than it saves (it stalls for a
    scheduler tick when another process holds a core). None leaves faiss's setting alone.
    """

    nprobe: int = DEFAULT_NPROBE
    ef_search: int = DEFAULT_EF_SEARCH
    single_query_threads: int | None = 1
    k_factor: int = DEFAULT_REFINE_K


@dataclass(frozen=True)
class IndexParams:
    """What an index was built with and searches with by default, recorded in the manifest.

    `nlist`, `pq_m` and `hnsw_m` are read from the factory string (`IVF{nlist}`, `PQ{m}`,
    `HNSW{M}`); the others are not expressible there. A field is None when the index has no such knob.
    """

    nlist: int | None = None
    pq_m: int | None = None
    hnsw_m: int | None = None
    ef_construction: int | None = None
    ef_search: int | None = None
    nprobe: int | None = None
    k_factor: int | None = None  # candidates per result that a refine step re-scores

    @classmethod
    def for_factory(
        cls,
        factory: str,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        search: SearchParams | None = None,
    ) -> IndexParams:
        search = search or SearchParams()
        nlist = pq_m = hnsw_m = None
        for part in factory.split(","):
            part = part.strip()
            if found := re.match(r"^IVF(\d+)", part):
                nlist = int(found.group(1))
            elif found := re.match(r"^PQ(\d+)", part):
                pq_m = int(found.group(1))
            elif found := re.match(r"^HNSW(\d+)", part):
                hnsw_m = int(found.group(1))
        hnsw = hnsw_m is not None
        refined = bool(re.search(r"(^|,)\s*(RFlat|Refine\(|ivf-ondisk)", factory))
        return cls(
            nlist=nlist,
            pq_m=pq_m,
            hnsw_m=hnsw_m,
            ef_construction=ef_construction if hnsw else None,
            ef_search=search.ef_search if hnsw else None,
            nprobe=search.nprobe if nlist is not None else None,
            k_factor=search.k_factor if refined else None,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexParams:
        return cls(**{k: int(v) for k, v in data.items() if k in cls.__dataclass_fields__ and v is not None})

    def with_search(self, search: SearchParams) -> IndexParams:
        """These parameters with other query-time knobs, where the index has them."""
        return replace(
            self,
            ef_search=search.ef_search if self.hnsw_m is not None else None,
            nprobe=search.nprobe if self.nlist is not None else None,
            k_factor=search.k_factor if self.k_factor is not None else None,
        )

    @property
    def search(self) -> SearchParams:
        """The recorded query-time knobs, defaults where the index has none."""
        return SearchParams(
            nprobe=self.nprobe or DEFAULT_NPROBE,
            ef_search=self.ef_search or DEFAULT_EF_SEARCH,
            k_factor=self.k_factor or DEFAULT_REFINE_K,
        )


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
    params: IndexParams = field(default_factory=IndexParams)  # of the image index
    #: The captions index is built like the images index (for its own count); older manifests: Flat.
    captions_factory: str = "Flat"
    captions_params: IndexParams = field(default_factory=IndexParams)
    #: Precision of the encoder that last synced the index ("" in manifests older than this field).
    #: Embeddings cached from earlier runs keep the precision they were computed in.
    precision: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = _migrate_manifest(json.loads(text))
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["params"] = IndexParams.from_dict(fields.get("params") or {})
        fields["captions_params"] = IndexParams.from_dict(fields.get("captions_params") or {})
        return cls(**fields)


def _migrate_manifest(data: dict[str, Any]) -> dict[str, Any]:
    """Bring an older manifest up to the current schema (a newer one is refused by the store)."""
    if int(data.get("schema_version", 1)) < 2:
        # Schema 1 recorded no parameters: it built HNSW with faiss's default efConstruction and
        # searched every index with the SearchParams defaults of the time (nprobe 32, efSearch 128).
        data = {**data, "schema_version": 2}
        data["params"] = asdict(
            IndexParams.for_factory(
                str(data.get("built_factory", "Flat")),
                ef_construction=FAISS_DEFAULT_EF_CONSTRUCTION,
                search=SearchParams(nprobe=32, ef_search=128),
            )
        )
    if int(data.get("schema_version", 2)) < 3:
        # Schema 2 built no refine steps, so its indexes have no k_factor: nothing else changes.
        data = {**data, "schema_version": 3}
    return data


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
    if name == ondisk.ONDISK:
        if n == 0:
            return "Flat", "an on-disk IVF index needs vectors to train; exact search until there are some"
        return name, ""
    if name == "ivfpq":
        if n < IVFPQ_MIN_VECTORS:
            return "Flat", (
                f"IVF-PQ needs at least {IVFPQ_MIN_VECTORS} vectors to train; the collection has {n}, "
                "so exact search is used until it grows (re-run `clearsight index` then)"
            )
        nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
        nlist = max(16, min(nlist, n // 39, 65536))
        m = max(d for d in range(1, dim + 1) if dim % d == 0 and d <= max(1, dim // 8))
        # "np": no polysemous training. Search never uses polysemous codes, and training them was
        # about 80 % of the build (4.8x slower at 100k vectors, same recall; bench/RESULTS.md).
        # Refine(SQ8): PQ codes alone cap recall@10 at 0.63 at 1M; re-scoring DEFAULT_REFINE_K x the
        # candidates with 8-bit scalar codes (dim bytes per vector, a quarter of Flat) lifts it past 0.95.
        return f"IVF{nlist},PQ{m}np,Refine(SQ8)", ""
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


def same_layout(built: str, wanted: str) -> bool:
    """Whether an index built as `built` can stay when `wanted` is asked for.

    `IVF…,PQ{m}` and `IVF…,PQ{m}np` store the same codes and search the same way (the polysemous
    training only reorders centroids), so an index built before "np" was added is kept, not rebuilt.
    """
    return re.sub(r"(PQ\d+)np\b", r"\1", built) == re.sub(r"(PQ\d+)np\b", r"\1", wanted)


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


def _unwrap(index: Any) -> tuple[Any, list[float]]:
    """The index that holds the data, through IDMap, pre-transform and refine wrappers, and the
    k_factor of each refine wrapper passed, outermost first."""
    index = faiss.downcast_index(index)
    refines: list[float] = []
    for _ in range(8):
        if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
            index = faiss.downcast_index(index.index)
        elif isinstance(index, faiss.IndexRefine):
            refines.append(float(index.k_factor))
            index = faiss.downcast_index(index.base_index)
        else:
            break
    return index, refines


def _ivf(index: Any) -> Any | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index
        return None


class VectorIndex:
    """A FAISS inner-product index whose ids are catalog ids."""

    def __init__(self, index: Any, dim: int, factory: str, params: IndexParams | None = None) -> None:
        self.index = index
        self.dim = dim
        self.factory = factory
        self.params = params or IndexParams.for_factory(factory)
        inner, self._refines = _unwrap(index)
        self._ivf = _ivf(index)  # the IVF or HNSW part found through any wrappers, or None
        self._hnsw = inner.hnsw if hasattr(inner, "hnsw") else None
        self._set_defaults()

    @classmethod
    def build(
        cls,
        ids: Int64Array,
        vectors: Float32Array,
        factory: str,
        dim: int,
        *,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        search: SearchParams | None = None,
    ) -> VectorIndex:
        vectors = check_vectors(vectors, dim)
        index = faiss.index_factory(dim, f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
        params = IndexParams.for_factory(factory, ef_construction, search)
        refine = faiss.downcast_index(_faiss_untyped.downcast_index(index).index)
        if isinstance(refine, faiss.IndexRefine) and params.k_factor is not None:
            refine.k_factor = float(params.k_factor)  # serialized with the index; faiss's default is 1
        out = cls(index, dim, factory, params)
        if not index.is_trained:
            index.train(vectors)
        if len(ids):
            index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
        return out

    def _set_defaults(self) -> None:
        """Store the recorded knobs in the faiss object itself, found through any wrappers.

        Searches pass their knobs per call anyway (see `search`); this keeps the serialized index
        and anyone using `self.index` directly in line with the manifest, and gives later
        additions to an HNSW graph the recorded efConstruction.
        """
        if self._ivf is not None and self.params.nprobe is not None:
            self._ivf.nprobe = self.params.nprobe
        if self._hnsw is not None:
            if self.params.ef_construction is not None:
                self._hnsw.efConstruction = self.params.ef_construction
            if self.params.ef_search is not None:
                self._hnsw.efSearch = self.params.ef_search

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def ids(self) -> Int64Array:
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    @property
    def supports_remove(self) -> bool:
        return self._hnsw is None and not self._refines  # faiss's IndexRefine has no remove_ids

    @property
    def supports_add(self) -> bool:
        return True

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
        """Top-k by inner product; `params` None searches with the knobs the index was built with."""
        queries = check_vectors(queries, self.dim, "queries")
        k = max(0, min(int(k), self.ntotal))
        if k == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        params = params or self.params.search
        threads = params.single_query_threads if len(queries) == 1 else None
        chain = self._faiss_params(params)
        with omp_threads(threads):
            scores, ids = self.index.search(queries, k, params=chain[-1] if chain else None)
        return scores.astype(np.float32), ids.astype(np.int64)

    def _faiss_params(self, params: SearchParams) -> list[Any]:
        """Per-call faiss parameters, outermost last (empty for exact search).

        Unlike attributes set on the shared index, they cannot race with another thread's search.
        faiss hands them through IDMap and pre-transform wrappers by itself; a refine wrapper wants
        them inside its own parameters, which hold only a raw pointer: the caller keeps the whole
        list alive until the search returns.
        """
        if self._ivf is not None:
            chain = [_faiss_untyped.SearchParametersIVF(nprobe=params.nprobe)]
        elif self._hnsw is not None:
            chain = [_faiss_untyped.SearchParametersHNSW(efSearch=params.ef_search)]
        else:
            return []
        for k_factor in reversed(self._refines):
            if self.params.k_factor is not None:  # the recorded default, or this call's override
                k_factor = float(params.k_factor)
            chain.append(
                _faiss_untyped.IndexRefineSearchParameters(k_factor=k_factor, base_index_params=chain[-1])
            )
        return chain

    def reconstruct(self, id_: int) -> Float32Array:
        return np.asarray(self.index.reconstruct(int(id_)), dtype=np.float32)

    def to_bytes(self) -> bytes:
        return bytes(faiss.serialize_index(self.index))

    def write_into(self, directory: Path) -> None:
        """Put this index's file(s) into a version directory being written (layouts of several
        files override this)."""
        _write_file(directory / "images.faiss", self.to_bytes())

    @classmethod
    def from_file(cls, path: Path, dim: int, factory: str, params: IndexParams | None = None) -> VectorIndex:
        try:
            index = faiss.read_index(str(path))
        except Exception as exc:
            raise IndexCorrupt(f"cannot read {path}: {exc}", remedy="rebuild") from exc
        if index.d != dim:
            raise IndexCorrupt(f"{path} holds {index.d}-d vectors but the manifest says {dim}")
        return cls(index, dim, factory, params)


#: Image-index layouts stored as several files, keyed by the manifest's `built_factory`: how to open
#: one from its version directory. Their modules register here (retrieval.ondisk_store), so this
#: module needs not import them; `import retrieval` registers every layout the library has.
FILE_LAYOUTS: dict[str, Callable[[Path, Manifest], VectorIndex]] = {}


class ReadOnlyIndex(VectorIndex):
    """An index whose vectors live elsewhere (files on disk, Ray actors): searched, never edited in
    place; the builder rebuilds it instead. `what` names it in errors."""

    what = "this index"

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
            raise IndexMissing(f"no index in {self.root.parent} yet", remedy="index_first")
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
                + (f" and cannot be searched with {expect_model!r}" if expect_model else ""),
                remedy="use_index_model",
            )
        version = self.current_version()
        assert version is not None
        d = self.root / version
        opener = FILE_LAYOUTS.get(manifest.built_factory)
        images = (
            opener(d, manifest)
            if opener is not None
            else VectorIndex.from_file(
                d / "images.faiss", manifest.dim, manifest.built_factory, manifest.params
            )
        )
        captions = VectorIndex.from_file(
            d / "captions.faiss", manifest.dim, manifest.captions_factory, manifest.captions_params
        )
        return LoadedIndex(manifest, images, captions, version)

    def save(self, manifest: Manifest, images: VectorIndex, captions: VectorIndex) -> str:
        """Write a complete new version and switch CURRENT to it atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        previous = self.current_version()  # what readers may hold open until they reload
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        try:
            images.write_into(tmp)
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
        self._collect_garbage(keep={version} | ({previous} if previous else set()))
        return version

    def _collect_garbage(self, keep: set[str]) -> None:
        """Drop every version but `keep` (the new live one and the one it replaced) and crash debris.

        What to keep is decided by what CURRENT pointed to, never by name order: a writer killed
        between renaming its version into place and switching CURRENT leaves an orphan with the
        highest number, and keeping "the two newest" would keep that orphan and delete the version
        readers are still using.
        """
        live = self.current_version()
        keep = keep | ({live} if live else set())
        for p in self.root.iterdir():
            debris = p.name.startswith((".tmp-", ".build-")) and p.is_dir()
            if (p.name.startswith("v") and p.name not in keep) or debris:
                shutil.rmtree(p, ignore_errors=True)

    def delete(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
