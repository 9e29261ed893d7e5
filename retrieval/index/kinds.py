"""The one table of index kinds: what each is called, what it builds, what it costs, how it opens.

Everything that names or sizes an index reads this table: the aliases `--index` accepts and the
choices its help lists, `auto` (which compares the rows' memory estimates), `tune-index` (which
measures the rows' candidates and skips those over budget by the same estimate), the catalog→index
sync (which asks a row for its factory string) and the store (which asks a row how to open a
version directory). Adding a kind is one row here and the module that implements it.

A row's factory rule turns the collection's size and dimension into what is built: a FAISS factory
string, or the kind's own name for layouts FAISS has no string for (`ivf-ondisk`). Users may also
give a raw FAISS factory string; it is built as given, after the same training-size check.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import faiss

from retrieval.errors import ConfigError
from retrieval.index import ondisk
from retrieval.index.base import IMAGES_FILE, BuildJob, Index
from retrieval.index.faiss_index import VectorIndex
from retrieval.index.ondisk_store import build_version, open_version
from retrieval.index.params import (
    DEFAULT_EF_CONSTRUCTION,
    DEFAULT_EF_SEARCH,
    DEFAULT_HNSW_M,
    DEFAULT_NPROBE,
    DEFAULT_REFINE_K,
    POINTS_PER_CENTROID,
    IndexParams,
    ivf_lists,
    pq_subquantizers,
)

#: The pseudo-kind that picks a row from the collection's size and a memory budget (retrieval.index.auto).
AUTO = "auto"
#: The named IVF-PQ layout needs this many vectors before it can be trained.
IVFPQ_MIN_VECTORS = 1024
#: Bytes of one catalog id, stored once per id map or inverted list that holds the vector.
ID_BYTES = 8
#: Level-0 links of an HNSW node are 2*M int32; the upper levels add about 1/M of that.
HNSW_LINK_OVERHEAD = 1.07

#: How a kind opens the image index of a version directory: (directory, dim, built factory, params).
Opener = Callable[[Path, int, str, IndexParams], Index]
#: How a kind builds its image index from the catalog's vectors.
Builder = Callable[[BuildJob], Index]


def open_faiss_file(directory: Path, dim: int, factory: str, params: IndexParams) -> Index:
    """Kinds that FAISS serializes as one file."""
    return VectorIndex.from_file(directory / IMAGES_FILE, dim, factory, params)


def build_in_memory(job: BuildJob) -> Index:
    """Kinds that FAISS builds in memory from a factory string."""
    return VectorIndex.build(
        job.ids, job.vectors, job.factory, job.dim, ef_construction=job.ef_construction, search=job.search
    )


def _int(pattern: str, factory: str) -> int:
    found = re.search(pattern, factory)
    if found is None:
        raise ConfigError(f"{factory!r} has no {pattern} part")
    return int(found.group(1))


@dataclass(frozen=True)
class IndexKind:
    """One row of the table.

    `factory(n, dim)` is what to build for n vectors of dim; `resident_bytes(factory, n, dim)` the
    memory an index of this kind holds (vectors or codes, ids, structure), for any factory string the
    row `matches`; `min_vectors` how many vectors it needs before it can be trained (fewer: exact
    search, with `waiting` as the note, formatted with `need` and `n`); `knobs` its tunable knobs and
    their defaults (None: derived from the collection's size; tune-index reports them per candidate);
    `sweep` the values tune-index measures;
    `opener` and `builder` how its image index opens and is built; `captions` the kind the captions
    index takes instead of this one (None: the same kind, sized for the captions' own count).
    """

    name: str
    summary: str
    factory: Callable[[int, int], str]
    resident_bytes: Callable[[str, int, int], int]
    matches: str
    min_vectors: int = 0
    waiting: str = ""
    aliases: tuple[str, ...] = ()
    knobs: Mapping[str, int | None] = field(default_factory=dict)
    sweep: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    opener: Opener = open_faiss_file
    builder: Builder = build_in_memory
    captions: str | None = None


def _flat_bytes(factory: str, n: int, dim: int) -> int:
    return n * (4 * dim + ID_BYTES)


def _hnsw_bytes(factory: str, n: int, dim: int) -> int:
    m = _int(r"^HNSW(\d+)", factory)
    return n * (4 * dim + ID_BYTES) + int(n * m * 2 * 4 * HNSW_LINK_OVERHEAD)


def _ivf_bytes(factory: str, n: int, dim: int) -> int:
    return n * (4 * dim + 2 * ID_BYTES)  # the id map and the inverted lists each hold the id


def _ivfpq_bytes(factory: str, n: int, dim: int) -> int:
    refine = dim if "Refine(SQ8)" in factory else 0  # 8-bit scalar codes of the re-ranking step
    return n * (_int(r",PQ(\d+)", factory) + refine + 2 * ID_BYTES)


def _ondisk_bytes(factory: str, n: int, dim: int) -> int:
    # centroids (about 4 sqrt(n) of them) and the PQ tables; lists and vectors stay on disk
    return int(4 * (n**0.5) * dim * 4 + 256 * dim * 4)


KINDS: tuple[IndexKind, ...] = (
    IndexKind(
        name="flat",
        summary="exact, the default",
        aliases=("exact",),
        factory=lambda n, dim: "Flat",
        resident_bytes=_flat_bytes,
        matches=r"^Flat$",
    ),
    IndexKind(
        name="hnsw",
        summary="graph, sub-millisecond queries, holds every vector",
        factory=lambda n, dim: f"HNSW{DEFAULT_HNSW_M}",
        resident_bytes=_hnsw_bytes,
        matches=r"^HNSW\d+",
        knobs={
            "hnsw_m": DEFAULT_HNSW_M,
            "ef_construction": DEFAULT_EF_CONSTRUCTION,
            "ef_search": DEFAULT_EF_SEARCH,
        },
        sweep={"hnsw_m": (16, 32), "ef_search": (16, 32, 64, 128, 256)},
    ),
    IndexKind(
        name="ivf",
        summary="inverted lists over exact vectors, as many as nlist says",
        factory=lambda n, dim: f"IVF{ivf_lists(n)},Flat",
        resident_bytes=_ivf_bytes,
        matches=r"^IVF\d+,Flat$",
        min_vectors=2 * POINTS_PER_CENTROID,
        waiting="IVF needs at least {need} vectors to train two lists ({n} so far): "
        "exact search is used until then",
        knobs={"nlist": None, "nprobe": DEFAULT_NPROBE},
        sweep={"nprobe": (1, 4, 16, 64)},
    ),
    IndexKind(
        name="ivfpq",
        summary="compressed codes re-ranked with 8-bit ones, about a quarter of flat's memory",
        # "np": no polysemous training. Search never uses polysemous codes, and training them was
        # about 80 % of the build (4.8x slower at 100k vectors, same recall; bench/RESULTS.md).
        # Refine(SQ8): PQ codes alone cap recall@10 at 0.63 at 1M; re-scoring DEFAULT_REFINE_K x the
        # candidates with 8-bit scalar codes (dim bytes per vector, a quarter of Flat) lifts it past 0.95.
        factory=lambda n, dim: f"IVF{ivf_lists(n, floor=16)},PQ{pq_subquantizers(dim)}np,Refine(SQ8)",
        resident_bytes=_ivfpq_bytes,
        matches=r"^IVF\d+,PQ\d+",
        min_vectors=IVFPQ_MIN_VECTORS,
        waiting="IVF-PQ needs at least {need} vectors to train; the collection has {n}, so exact search is "
        "used until it grows (re-run `clearsight index` then)",
        knobs={"nlist": None, "nprobe": DEFAULT_NPROBE, "k_factor": DEFAULT_REFINE_K},
        sweep={"nprobe": (1, 4, 16, 64)},
    ),
    IndexKind(
        name=ondisk.ONDISK,
        summary="memory-mapped, for collections past RAM",
        factory=lambda n, dim: ondisk.ONDISK,
        resident_bytes=_ondisk_bytes,
        matches=rf"^{ondisk.ONDISK}$",
        min_vectors=1,
        waiting="an on-disk IVF index needs vectors to train; exact search until there are some",
        knobs={"nlist": None, "nprobe": DEFAULT_NPROBE, "k_factor": ondisk.DEFAULT_K_FACTOR},
        opener=open_version,
        builder=build_version,
        captions="flat",  # captions stay in memory: an on-disk layout is for image collections past RAM
    ),
)

#: Every name `--index` accepts for a row (its name and its aliases), lower case.
ALIASES: dict[str, IndexKind] = {alias: k for k in KINDS for alias in (k.name, *k.aliases)}


def kind(name: str) -> IndexKind | None:
    """The row a name or alias stands for, or None for a FAISS factory string (or `auto`)."""
    return ALIASES.get(name.strip().lower())


def names() -> list[str]:
    """What `--index` offers besides factory strings: every row, then `auto`."""
    return [k.name for k in KINDS] + [AUTO]


def _offer() -> str:
    return f"use one of {', '.join(names())} or a FAISS factory string such as IVF1024,PQ64np"


def check_name(requested: str) -> str:
    """Refuse early a name that is neither a row, `auto` nor a FAISS factory string.

    FAISS factory components start with a capital or a digit (`Flat`, `HNSW32`, `IVF1024,PQ64`), so
    a lower-case word is a kind's name or a typo; factory strings are checked by FAISS itself once
    the dimension is known (`resolve_factory`).
    """
    name = requested.strip()
    if kind(name) is None and name.lower() != AUTO and not re.match(r"^[A-Z0-9]", name):
        raise ConfigError(f"unknown index kind {requested!r}: {_offer()}")
    return name


def kind_of(factory: str) -> IndexKind:
    """The row whose indexes a built factory string describes (`HNSW16` is an hnsw index)."""
    for k in KINDS:
        if re.search(k.matches, factory):
            return k
    raise ConfigError(f"no index kind builds {factory!r}: {_offer()}")


def _row_of_built(built_factory: str) -> IndexKind | None:
    """The row a built factory string belongs to, or None for FAISS strings no row describes."""
    return next((k for k in KINDS if re.search(k.matches, built_factory)), None)


def opener_for(built_factory: str) -> Opener:
    """How to open an image index recorded as `built_factory` (unknown strings: one FAISS file)."""
    row = _row_of_built(built_factory)
    return row.opener if row is not None else open_faiss_file


def builder_for(built_factory: str) -> Builder:
    """How to build an image index as `built_factory` (unknown strings: FAISS, in memory)."""
    row = _row_of_built(built_factory)
    return row.builder if row is not None else build_in_memory


def captions_kind(built_factory: str, requested: str) -> str:
    """What the captions index is built as when the image index is `built_factory`, asked as `requested`."""
    row = _row_of_built(built_factory)
    return row.captions if row is not None and row.captions is not None else requested


def estimate_bytes(what: str, n: int, dim: int) -> int:
    """Resident bytes of an index of a kind (by name) or a factory string, for n vectors of dim."""
    row = kind(what)
    factory = row.factory(n, dim) if row is not None else what
    return (row or kind_of(factory)).resident_bytes(factory, n, dim)


def vectors_to_train(factory: str) -> int:
    """Vectors an IVF factory string needs before it can be trained (0 for other strings)."""
    found = re.match(r"^IVF(\d+)", factory)
    return POINTS_PER_CENTROID * int(found.group(1)) if found else 0


def without_refine(factory: str) -> str:
    """A factory string without its re-ranking step: tune-index measures the codes themselves."""
    return re.sub(r",\s*Refine\([^)]*\)$", "", factory)


def resolve_factory(requested: str, n: int, dim: int) -> tuple[str, str]:
    """Turn a kind's name or a factory string into what to build for `n` vectors, and a note."""
    row = kind(requested)
    if row is not None:
        if n < row.min_vectors:
            return "Flat", row.waiting.format(need=row.min_vectors, n=n)
        name = row.factory(n, dim)
        if row.opener is not open_faiss_file:
            return name, ""
    else:
        name = requested
        need = vectors_to_train(name)
        if n < need:
            return (
                "Flat",
                f"{name} needs at least {need} vectors to train ({n} so far): "
                "exact search is used until then",
            )
    try:  # validate the string before anything is written
        faiss.index_factory(dim, name, faiss.METRIC_INNER_PRODUCT)
    except Exception as exc:
        raise ConfigError(f"FAISS cannot build {requested!r} ({exc}); {_offer()}") from exc
    return name, ""


def same_layout(built: str, wanted: str) -> bool:
    """Whether an index built as `built` can stay when `wanted` is asked for.

    `IVF…,PQ{m}` and `IVF…,PQ{m}np` store the same codes and search the same way (the polysemous
    training only reorders centroids), so an index built before "np" was added is kept, not rebuilt.
    """
    return re.sub(r"(PQ\d+)np\b", r"\1", built) == re.sub(r"(PQ\d+)np\b", r"\1", wanted)
