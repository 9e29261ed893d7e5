"""Filtered search: p50 latency and recall@10 of what the searcher does, per index kind and filter.

A filter (folder, dates, type, size...) becomes a set of allowed catalog ids; the search must return
the best hits among them and never fewer than exist. `retrieval.index.filtered.fetch_among` picks
per kind: a FAISS ID selector on a flat index (exact), exact scoring of the allowed vectors when there
are at most EXACT_SCAN_MAX of them, a selector search on an approximate index otherwise (scored
exactly after all when its beam found too few). This bench measures it on clustered vectors (the
same generator as bench/search_bench.py) with two random filters, one keeping 1% and one 50%, and
compares against exact filtered search (brute force over the allowed vectors). It also shows the
alternatives the product does not take: the approximate index with a selector alone, and search-
then-filter with a fixed over-fetch (how many hits it loses).

The allowed ids come from SQLite in the product (`Catalog.ids_where`); `--catalog` also times that
on a catalog of n rows, and reading the allowed vectors from the catalog (what an IVF index needs for
the exact scan, since it keeps no float copy the searcher can read).

    flock /work/cpu.lock .venv/bin/python bench/filter_bench.py                 # 1M vectors, flat + ivf
    .venv/bin/python bench/filter_bench.py --n 100000 --queries 50 --kinds flat,hnsw,ivf
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np
from machine import span
from search_bench import make_queries, make_vectors

from retrieval.catalog import Catalog
from retrieval.filters import Scope
from retrieval.index.base import Index
from retrieval.index.faiss_index import VectorIndex
from retrieval.index.filtered import EXACT_SCAN_MAX, fetch_among
from retrieval.index.params import DEFAULT_EF_SEARCH, DEFAULT_HNSW_M, DEFAULT_NPROBE, SearchParams
from retrieval.types import Float32Array, Int64Array

K = 10


def build(kind: str, ids: Int64Array, data: Float32Array, nlist: int, seed: int) -> tuple[Index, float]:
    """The index through the product's VectorIndex; an IVF trains on a sample (39 points a list)."""
    dim = data.shape[1]
    t0 = time.perf_counter()
    if kind == "flat":
        idx = VectorIndex.build(ids, data, "Flat", dim)
    elif kind == "hnsw":
        idx = VectorIndex.build(ids, data, f"HNSW{DEFAULT_HNSW_M}", dim)
    elif kind == "ivf":
        factory = f"IVF{nlist},Flat"
        raw = faiss.index_factory(dim, f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(seed).choice(len(data), min(len(data), 39 * nlist), replace=False)
        raw.train(data[np.sort(sample)])
        for start in range(0, len(data), 200_000):
            raw.add_with_ids(data[start : start + 200_000], ids[start : start + 200_000])
        idx = VectorIndex(raw, dim, factory)
    else:
        raise SystemExit(f"unknown kind {kind!r}: flat, hnsw or ivf")
    return idx, time.perf_counter() - t0


def exact_truth(data: Float32Array, allowed: Int64Array, queries: Float32Array) -> list[list[int]]:
    rows = allowed - 1  # ids are row + 1
    sub = data[rows]
    out = []
    for q in queries:
        s = sub @ q
        top = np.argpartition(-s, K)[:K]
        out.append([int(allowed[t]) for t in top[np.argsort(-s[top], kind="stable")]])
    return out


def measure(
    queries: Float32Array, truth: list[list[int]], fn: Callable[[Float32Array], list[int]]
) -> tuple[float, float, float, float]:
    """(p50 ms, p99 ms, recall@10, share of queries answered short)."""
    fn(queries[0])  # warm-up
    times, recalls, short = [], [], 0
    for q, t in zip(queries, truth, strict=True):
        t0 = time.perf_counter()
        got = fn(q)
        times.append((time.perf_counter() - t0) * 1000)
        recalls.append(len(set(got) & set(t)) / K)
        short += len(got) < K
    return (
        float(np.percentile(times, 50)),
        float(np.percentile(times, 99)),
        float(np.mean(recalls)),
        short / len(queries),
    )


def catalog_times(n: int, dim: int, allowed: dict[str, Int64Array], data: Float32Array) -> list[str]:
    """Seconds for Catalog.ids_where (a folder prefix for 1%, a date bound for 50%) on n rows, and for
    reading 1%'s vectors from the catalog."""
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        cat = Catalog(Path(tmp) / "c.sqlite")
        one = set(allowed["1%"].tolist())
        half = set(allowed["50%"].tolist())
        with cat.transaction() as db:
            db.executemany(
                "INSERT INTO images(id, path, content_hash, width, height, state, updated_at, taken_at, "
                "taken_source, format, folder) "
                "VALUES (?, ?, ?, 640, 480, 'indexed', 0, ?, 'exif', 'jpeg', ?)",
                (
                    (
                        i,
                        f"/photos/{'keep' if i in one else 'other'}/{i}.jpg",
                        f"h{i}",
                        "2024-01-01T00:00:00" if i in half else "2018-01-01T00:00:00",
                        "keep" if i in one else "other",
                    )
                    for i in range(1, n + 1)
                ),
            )
            db.executemany(
                "INSERT INTO embeddings(content_hash, model, vector) VALUES (?, 'm', ?)",
                ((f"h{i}", data[i - 1].tobytes()) for i in allowed["1%"].tolist()),
            )
        for name, scope in (("1%", Scope(prefixes=(b"/photos/keep/",))), ("50%", Scope(after="2020-01-01"))):
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                got = cat.ids_where(*scope.where())
                times.append(time.perf_counter() - t0)
            assert len(got) == len(allowed[name]), (name, len(got))
            lines.append(
                f"| allowed ids from SQLite ({name}: {len(got):,} ids) | {min(times) * 1000:.0f} ms |"
            )
        t0 = time.perf_counter()
        got_ids, _ = cat.vectors_of(allowed["1%"].tolist(), "m", dim)
        ms = (time.perf_counter() - t0) * 1000
        lines.append(f"| 1%'s vectors from the catalog ({len(got_ids):,} x {dim}) | {ms:.0f} ms |")
        cat.close()
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--kinds", default="flat,ivf", help="comma-separated: flat, hnsw, ivf")
    ap.add_argument("--nlist", type=int, default=1024, help="IVF lists (trained on 39 points a list)")
    ap.add_argument("--nprobe", type=int, default=DEFAULT_NPROBE)
    ap.add_argument("--ef-search", type=int, default=DEFAULT_EF_SEARCH)
    ap.add_argument("--overfetch", type=int, default=10, help="search-then-filter asks for this many times k")
    ap.add_argument("--catalog", action="store_true", help="also time the SQLite side on n rows")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    print(f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, faiss {faiss.__version__}")
    print("# " + shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]))
    t0 = time.perf_counter()
    data = make_vectors(args.n, args.dim, seed=args.seed)
    queries = make_queries(data, args.queries, seed=args.seed + 1)
    ids = np.arange(1, args.n + 1, dtype=np.int64)
    rng = np.random.default_rng(args.seed + 2)
    allowed = {
        name: np.sort(rng.choice(ids, max(K, int(share * args.n)), replace=False))
        for name, share in (("1%", 0.01), ("50%", 0.5))
    }
    truth = {name: exact_truth(data, a, queries) for name, a in allowed.items()}
    print(f"# data, queries and exact filtered truth: {time.perf_counter() - t0:.0f} s")
    params = SearchParams(nprobe=args.nprobe, ef_search=args.ef_search)

    def from_memory(chosen: Int64Array) -> tuple[Int64Array, Float32Array]:
        return chosen, data[chosen - 1]

    rows = []
    for kind in args.kinds.split(","):
        idx, build_s = build(kind, ids, data, args.nlist, args.seed)
        print(f"# {kind}: built in {build_s:.0f} s ({idx.factory})", flush=True)

        def unfiltered(q: Float32Array, idx: Index = idx) -> list[int]:
            return [int(i) for i in idx.search(q[None], K, params)[1][0] if i >= 0]

        with span() as sp:
            p50, p99, _, _ = measure(queries, truth["50%"], unfiltered)
        rows.append(f"| {kind} | none | search | {p50:.2f} | {p99:.2f} | n/a | 0% | {sp.others_text()} |")
        for name, a in allowed.items():
            held = idx.stored_vectors(a[:1]) is not None

            def product(q: Float32Array, idx: Index = idx, a: Int64Array = a, held: bool = held) -> list[int]:
                def vectors_of(chosen: Int64Array) -> tuple[Int64Array, Float32Array]:
                    vecs = idx.stored_vectors(chosen) if held else None
                    return (chosen, vecs) if vecs is not None else from_memory(chosen)

                return [i for _, i in fetch_among(idx, q[None], K, a, vectors_of, params)]

            def selector(q: Float32Array, idx: Index = idx, a: Int64Array = a) -> list[int]:
                found = idx.search_among(q[None], K, a, params)
                assert found is not None
                return [int(i) for i in found[1][0] if i >= 0]

            member = np.zeros(args.n + 1, dtype=bool)
            member[a] = True

            def post_filter(q: Float32Array, idx: Index = idx, member: np.ndarray = member) -> list[int]:
                found = idx.search(q[None], K * args.overfetch, params)[1][0]
                return [int(i) for i in found if i >= 0 and member[i]][:K]

            how = "scan" if len(a) <= EXACT_SCAN_MAX and not idx.exact else "selector"
            if how == "scan":
                how += " (index's vectors)" if held else " (vectors from memory)"
            for label, fn in (
                (f"product: {how}", product),
                ("selector alone", selector),
                (f"search {args.overfetch}k, then filter", post_filter),
            ):
                with span() as sp:
                    p50, p99, recall, short = measure(queries, truth[name], fn)
                rows.append(
                    f"| {kind} | {name} | {label} | {p50:.2f} | {p99:.2f} | {recall:.3f} | {short:.0%} | "
                    f"{sp.others_text()} |"
                )
            print(rows[-1], flush=True)
        del idx
    print(
        f"\n{args.n:,} vectors of {args.dim}, {args.queries} queries one at a time, k={K}, one thread a query"
    )
    print(f"nprobe {args.nprobe}, efSearch {args.ef_search}, EXACT_SCAN_MAX {EXACT_SCAN_MAX:,}\n")
    print("| index | filter | method | p50 ms | p99 ms | recall@10 | short answers | others' CPU |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    if args.catalog:
        print("\n| catalog side (SQLite, n rows) | time |\n|---|---:|")
        print("\n".join(catalog_times(args.n, args.dim, allowed, data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
