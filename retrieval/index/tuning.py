"""Measure index kinds and knobs on the user's own collection, recommend one, and apply it.

Published recall/latency curves are for other data; what matters is this collection's vectors and
the queries people send it. Candidates (exact search, HNSW at several efSearch, IVF at several
nprobe, IVF-PQ once there is enough data to train it) are built from the collection's stored
embeddings, searched with queries drawn from the collection (its captions' embeddings when the
catalog holds them, else a sample of its own image vectors), and scored by recall@10 against exact
search, per-query latency (p50/p99, one query at a time as a search box sends them), stored bytes per
vector and build time. Candidates whose estimated size exceeds the memory budget are not built.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.collection import Collection
from retrieval.encoders import Encoder
from retrieval.errors import ConfigError, NotEnoughData
from retrieval.index import kinds
from retrieval.index.faiss_index import VectorIndex
from retrieval.index.params import DEFAULT_EF_CONSTRUCTION, IndexParams, SearchParams
from retrieval.index.sync import SyncReport, sync_indexes
from retrieval.types import Float32Array, Int64Array

#: Recall@10 a recommendation must reach; the fastest candidate that does is recommended.
DEFAULT_TARGET_RECALL = 0.95
DEFAULT_MEMORY_BUDGET = 8 * 1024**3
DEFAULT_QUERIES = 200
K = 10
#: The kinds tune-index measures: those built in memory from a factory string (the on-disk IVF is
#: judged by its own bench, bench/ondisk_bench.py).
TUNED = ("flat", "hnsw", "ivf", "ivfpq")


@dataclass(frozen=True)
class Candidate:
    """One index to measure: a kind, its FAISS factory and its knobs."""

    kind: str  # a row of the table of kinds: "flat", "hnsw", "ivf" or "ivfpq"
    factory: str
    ef_construction: int | None = None
    search: SearchParams = field(default_factory=SearchParams)

    def params(self) -> dict[str, int]:
        """The knobs its kind's row lists, with this candidate's values, where its factory has them."""
        ef_construction = self.ef_construction or DEFAULT_EF_CONSTRUCTION
        have = asdict(IndexParams.for_factory(self.factory, ef_construction, self.search))
        return {k: int(have[k]) for k in kinds.ALIASES[self.kind].knobs if have.get(k) is not None}


@dataclass(frozen=True)
class TuneRow:
    kind: str
    params: dict[str, int]
    factory: str
    recall_at_10: float
    p50_ms: float
    p99_ms: float
    bytes_per_vector: float
    build_s: float

    def to_dict(self) -> dict[str, object]:
        return {
            "index": self.kind,
            "params": self.params,
            "factory": self.factory,
            "recall@10": round(self.recall_at_10, 4),
            "p50_ms": round(self.p50_ms, 4),
            "p99_ms": round(self.p99_ms, 4),
            "bytes_per_vector": round(self.bytes_per_vector, 1),
            "build_s": round(self.build_s, 4),
        }


@dataclass
class TuneReport:
    rows: list[TuneRow]
    recommended: TuneRow
    vectors: int
    queries: int
    query_source: str  # "captions" or "images"
    target_recall: float
    memory_budget: int
    skipped: list[str]  # candidates left out for the memory budget or too little data

    def to_dict(self) -> dict[str, object]:
        return {
            "rows": [r.to_dict() for r in self.rows],
            "recommended": self.recommended.to_dict(),
            "vectors": self.vectors,
            "queries": self.queries,
            "query_source": self.query_source,
            "target_recall": self.target_recall,
            "memory_budget_bytes": self.memory_budget,
            "skipped": self.skipped,
        }

    def table(self) -> str:
        head = f"{'index':7} {'params':40} {'recall@10':>9} {'p50 ms':>8} {'p99 ms':>8}"
        lines = [f"{head} {'B/vec':>8} {'build s':>8}"]
        for r in self.rows:
            mark = "  <- recommended" if r is self.recommended else ""
            params = ",".join(f"{k}={v}" for k, v in r.params.items()) or "-"
            lines.append(
                f"{r.kind:7} {params:40} {r.recall_at_10:9.3f} {r.p50_ms:8.3f} {r.p99_ms:8.3f} "
                f"{r.bytes_per_vector:8.1f} {r.build_s:8.3f}{mark}"
            )
        return "\n".join(lines)


def factory_for(index: str | None, hnsw_m: int | None = None, nlist: int | None = None) -> str | None:
    """The factory string for an index kind and its structural knobs (M of HNSW, lists of IVF).

    `index` None with no knob keeps whatever the collection has. "ivf" is IVF over exact vectors
    and needs `nlist` (IVF-PQ picks its own lists, or takes a factory string). Knobs that the kind does
    not have are refused rather than ignored.
    """
    if index is not None:
        index = kinds.check_name(index)
    kind = (index or "").strip().lower()
    if hnsw_m is not None and not 2 <= hnsw_m <= 256:
        raise ConfigError(f"HNSW M must be in 2..256, got {hnsw_m}")
    if nlist is not None and not 1 <= nlist <= 1 << 20:
        raise ConfigError(f"nlist must be in 1..1048576, got {nlist}")
    if hnsw_m is not None:
        if kind not in ("", "hnsw"):
            raise ConfigError(f"HNSW M applies to an hnsw index, not {index!r}")
        return f"HNSW{hnsw_m}"
    if nlist is not None:
        if kind == "ivf":
            return f"IVF{nlist},Flat"
        raise ConfigError(
            f"nlist applies to an ivf index, not {index or 'the default'!r} (for IVF-PQ with chosen "
            "lists give a FAISS factory string such as IVF1024,PQ64np)"
        )
    if kind == "ivf":
        raise ConfigError("an ivf index needs its number of lists (nlist)")
    return index


def candidates(
    n: int, dim: int, memory_budget: int = DEFAULT_MEMORY_BUDGET
) -> tuple[list[Candidate], list[str]]:
    """The candidates worth measuring for `n` vectors of `dim`, and why others were left out.

    Each kind in TUNED contributes its factory rule over the values its row sweeps; a kind that
    cannot be trained on `n` vectors is skipped, and so is any candidate whose size by the table's
    estimate (the one `auto` uses) exceeds the memory budget.
    """
    out: list[Candidate] = []
    skipped: list[str] = []
    for name in TUNED:
        row = kinds.ALIASES[name]
        if n < row.min_vectors:
            lists = " two lists" if name == "ivf" else ""  # IVF's minimum is two lists' worth
            skipped.append(f"{name}: needs at least {row.min_vectors} vectors to train{lists} ({n} here)")
            continue
        factory = kinds.without_refine(row.factory(n, dim))
        if name == "hnsw":
            for m in row.sweep["hnsw_m"]:
                for ef in row.sweep["ef_search"]:
                    out.append(
                        Candidate(name, f"HNSW{m}", DEFAULT_EF_CONSTRUCTION, SearchParams(ef_search=ef))
                    )
        elif "nprobe" in row.sweep:
            nlist = int(factory.split(",")[0][3:])
            out += [
                Candidate(name, factory, None, SearchParams(nprobe=p))
                for p in row.sweep["nprobe"]
                if p <= nlist
            ]
        else:
            out.append(Candidate(name, factory))
    kept = []
    for c in out:
        if kinds.estimate_bytes(c.factory, n, dim) > memory_budget:
            skipped.append(f"{c.kind} {c.factory}: over the memory budget of {memory_budget} bytes")
        else:
            kept.append(c)
    return kept, sorted(set(skipped))


def _recall(found: Int64Array, truth: Int64Array) -> float:
    hits = sum(
        len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) for f, t in zip(found, truth, strict=True)
    )
    denom = sum(int((t >= 0).sum()) for t in truth)
    return hits / denom if denom else 1.0


def tune(
    ids: Int64Array,
    vectors: Float32Array,
    queries: Float32Array,
    *,
    query_source: str = "images",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    target_recall: float = DEFAULT_TARGET_RECALL,
) -> TuneReport:
    """Build each candidate over `vectors`, search `queries` one at a time, and recommend one."""
    if len(vectors) < 2 or len(queries) < 1:
        raise NotEnoughData("index tuning needs at least two indexed vectors and one query")
    if not 0.0 < target_recall <= 1.0:
        raise ConfigError(f"target recall must be in (0, 1], got {target_recall}")
    if memory_budget < 1:
        raise ConfigError("the memory budget must be at least one byte")
    dim = vectors.shape[1]
    k = min(K, len(vectors))
    cands, skipped = candidates(len(vectors), dim, memory_budget)
    exact = VectorIndex.build(ids, vectors, "Flat", dim)
    _, truth = exact.search(queries, k)
    built: dict[tuple[str, int | None], tuple[VectorIndex, float]] = {}
    rows: list[TuneRow] = []
    for c in cands:
        key = (c.factory, c.ef_construction)
        if key not in built:
            t0 = time.perf_counter()
            index = VectorIndex.build(
                ids, vectors, c.factory, dim, ef_construction=c.ef_construction or DEFAULT_EF_CONSTRUCTION
            )
            built[key] = (index, time.perf_counter() - t0)
        index, build_s = built[key]
        found = np.zeros((len(queries), k), np.int64)
        times = np.zeros(len(queries))
        for i in range(len(queries)):
            t0 = time.perf_counter()
            _, got = index.search(queries[i : i + 1], k, c.search)
            times[i] = time.perf_counter() - t0
            found[i, : got.shape[1]] = got[0]
        rows.append(
            TuneRow(
                c.kind,
                c.params(),
                c.factory,
                _recall(found, truth),
                float(np.percentile(times, 50) * 1000),
                float(np.percentile(times, 99) * 1000),
                len(index.to_bytes()) / len(vectors),
                build_s,
            )
        )
    good = [r for r in rows if r.recall_at_10 >= target_recall]
    best = (
        min(good, key=lambda r: (r.p50_ms, r.bytes_per_vector))
        if good
        else max(rows, key=lambda r: r.recall_at_10)
    )
    return TuneReport(
        rows, best, len(vectors), len(queries), query_source, target_recall, memory_budget, skipped
    )


def collection_queries(
    collection: Collection, fingerprint: str, vectors: Float32Array, limit: int
) -> tuple[Float32Array, str]:
    """Queries drawn from the collection: its captions' stored embeddings, else its own vectors."""
    caps = collection.catalog.all_captions()
    if caps:
        texts = list(dict.fromkeys(c.text for c in caps))
        rows = np.linspace(0, len(texts) - 1, min(limit, len(texts))).round().astype(int)
        chosen = [texts[int(i)] for i in rows]
        have = collection.catalog.get_text_embeddings(chosen, fingerprint)
        if len(have) >= min(len(chosen), 10):
            return np.stack([have[t] for t in chosen if t in have]).astype(np.float32), "captions"
    rows = np.linspace(0, len(vectors) - 1, min(limit, len(vectors))).round().astype(int)
    return np.ascontiguousarray(vectors[rows]), "images"


def tune_collection(
    collection: Collection,
    *,
    max_queries: int = DEFAULT_QUERIES,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    target_recall: float = DEFAULT_TARGET_RECALL,
) -> TuneReport:
    """Tune on a collection's stored embeddings (no model is loaded)."""
    if not 1 <= max_queries <= 100_000:
        raise ConfigError(f"max_queries must be in 1..100000, got {max_queries}")
    manifest = collection.store.read_manifest()
    ids, vectors = collection.catalog.indexed_vectors(manifest.fingerprint, manifest.dim)
    queries, source = collection_queries(collection, manifest.fingerprint, vectors, max_queries)
    return tune(
        ids, vectors, queries, query_source=source, memory_budget=memory_budget, target_recall=target_recall
    )


def apply_recommendation(collection: Collection, encoder: Encoder, row: TuneRow) -> SyncReport:
    """Rebuild the collection's indexes as `row` says, and record its knobs in the manifest."""
    p = row.params
    search = SearchParams(
        nprobe=p.get("nprobe", SearchParams().nprobe), ef_search=p.get("ef_search", SearchParams().ef_search)
    )
    return sync_indexes(
        collection,
        encoder,
        factory=row.factory,
        force_rebuild=True,
        search=search,
        ef_construction=p.get("ef_construction", DEFAULT_EF_CONSTRUCTION),
    )


def save_plot(report: TuneReport, path: Path | str) -> Path:
    """Latency (p50) against recall@10, one series per index kind, the recommendation circled."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax: Any = fig.add_subplot(1, 1, 1)
    series: dict[str, list[TuneRow]] = {}
    for r in report.rows:
        series.setdefault(f"{r.kind} {r.factory}", []).append(r)
    for label, rs in series.items():
        ax.plot([r.recall_at_10 for r in rs], [r.p50_ms for r in rs], marker="o", label=label)
    best = report.recommended
    ax.scatter(
        [best.recall_at_10], [best.p50_ms], s=200, facecolors="none", edgecolors="red", label="recommended"
    )
    ax.set_xlabel("recall@10 against exact search")
    ax.set_ylabel("p50 latency per query (ms)")
    ax.set_title(f"{report.vectors} vectors, {report.queries} queries from {report.query_source}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(out), dpi=100)
    return out
