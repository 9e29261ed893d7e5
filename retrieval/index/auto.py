"""`--index auto`: pick an index kind from the collection's size and a memory budget, and say why.

The rules follow what autofaiss does (estimate each candidate's resident bytes, take the most
exact one that fits), with thresholds from this project's own benches (bench/RESULTS.md):
exact search is fast enough below about 50k vectors (a few ms per query), HNSW answers in well
under a millisecond up to a few million vectors but holds every vector plus its graph, IVF-PQ with
SQ8 re-ranking holds a quarter of that, and the on-disk IVF holds only its centroids and the
pages that queries touch. Every size it quotes is the table of kinds' estimate (retrieval.index.kinds),
the one tune-index skips candidates by.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from retrieval.errors import ConfigError
from retrieval.index import ondisk
from retrieval.index.kinds import estimate_bytes

#: Up to this many vectors exact search is quick enough and needs no training.
FLAT_MAX = 50_000
#: Beyond this many vectors an HNSW graph takes too long to build on one machine (hours at 10M).
HNSW_MAX = 5_000_000
#: Fraction of physical memory assumed available to the index when no budget is given.
DEFAULT_BUDGET_FRACTION = 0.25


@dataclass(frozen=True)
class IndexChoice:
    kind: str  # a row of the table of kinds: flat, hnsw, ivfpq, ivf-ondisk
    reason: str
    estimated_bytes: int


def default_budget() -> int:
    """A quarter of this machine's physical memory."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 * 1024**3
    return int(total * DEFAULT_BUDGET_FRACTION)


def _fmt(b: int) -> str:
    size = float(b)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def choose_index(n: int, dim: int, memory_budget: int | None = None) -> IndexChoice:
    """The most exact layout whose estimated resident size fits `memory_budget` bytes."""
    if n < 0 or dim <= 0:
        raise ConfigError(f"need n >= 0 and dim > 0, got n={n}, dim={dim}")
    budget = memory_budget if memory_budget is not None else default_budget()
    if budget <= 0:
        raise ConfigError(f"memory budget must be positive, got {budget}")
    said = f"{n:,} vectors of {dim}-d, budget {_fmt(budget)}"
    flat = estimate_bytes("flat", n, dim)
    if n <= FLAT_MAX and flat <= budget:
        return IndexChoice("flat", f"{said}: exact search fits ({_fmt(flat)}) and is fast at this size", flat)
    hnsw = estimate_bytes("hnsw", n, dim)
    if n <= HNSW_MAX and hnsw <= budget:
        return IndexChoice("hnsw", f"{said}: HNSW fits ({_fmt(hnsw)}); sub-millisecond queries", hnsw)
    ivf = estimate_bytes("ivfpq", n, dim)
    if ivf <= budget:
        why = "HNSW would not fit" if hnsw > budget else f"HNSW builds too slowly past {HNSW_MAX:,}"
        return IndexChoice(
            "ivfpq",
            f"{said}: {why} ({_fmt(hnsw)}); in-memory IVF-PQ with SQ8 re-ranking fits ({_fmt(ivf)})",
            ivf,
        )
    disk = estimate_bytes(ondisk.ONDISK, n, dim)
    return IndexChoice(
        ondisk.ONDISK,
        f"{said}: even in-memory IVF-PQ needs {_fmt(ivf)}; the on-disk IVF keeps lists and re-ranking "
        f"vectors memory-mapped, about {_fmt(disk)} resident plus the pages queries touch",
        disk,
    )


def parse_bytes(text: str) -> int:
    """'512M', '4G', '1.5GiB', '1000000' -> bytes; refuses anything else."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    units = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
    mult = 1
    if t and t[-1] in units:
        mult, t = units[t[-1]], t[:-1]
    try:
        value = float(t)
    except ValueError:
        raise ConfigError(f"cannot read {text!r} as a size: use e.g. 512M, 4G or a number of bytes") from None
    if not value > 0 or value * mult > 1024**5:
        raise ConfigError(f"memory budget {text!r} must be positive and under 1 PiB")
    return int(value * mult)
