"""Vector search: build time, size, single-query latency and recall of the indexes the product builds.

For each size the bench builds exact (flat), HNSW and IVF-PQ indexes through the product's own path
(`resolve_factory` turns the aliases into the factory strings `clearsight index --factory` would
use, `VectorIndex.build` builds them, `VectorIndex.search` queries them with `SearchParams`), then
measures per index: build seconds, bytes per vector of the serialized index, latency of queries
issued one at a time (p50/p99 after a warm-up) through the product path (which caps faiss at one
OpenMP thread for a single query) and again with faiss's own thread count, batch throughput, and
recall@10 against exact search. `--ef-construction 40,128` builds one HNSW index per value, and
`--also` adds any factory string (e.g. the polysemous `IVF1024,PQ64` the product used to build).

    .venv/bin/python bench/search_bench.py --sizes 100000
    .venv/bin/python bench/search_bench.py                     # 100k and 1M

The data (see `make_vectors`) is a Gaussian mixture on the unit sphere, not uniform noise: on
uniform noise every point is about as far from every other and "nearest neighbours" mean nothing,
so ANN recall would say nothing about real embeddings.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import faiss
import numpy as np
from machine import load_average, span

from retrieval.index.faiss_index import VectorIndex
from retrieval.index.kinds import resolve_factory
from retrieval.index.params import DEFAULT_EF_CONSTRUCTION, SearchParams
from retrieval.types import Float32Array, Int64Array


# -- data -----------------------------------------------------------------------------------------
def make_vectors(
    n: int,
    dim: int = 512,
    centres: int = 1000,
    subspace: int = 32,
    iso_noise: float = 0.25,
    seed: int = 0,
) -> Float32Array:
    """Clustered, L2-normalised vectors shaped loosely like image embeddings.

    - `centres` random unit directions; cluster sizes are uneven (log-normal weights), as real
      collections hold many photos of a few things and few of many;
    - each cluster spreads mostly inside its own random `subspace`-dimensional subspace (image
      embeddings have a low intrinsic dimension), with a spread drawn per cluster from U(0.5, 1.0)
      (norm of the in-subspace offset relative to the unit centre), plus isotropic noise of norm
      about `iso_noise` in all `dim` directions;
    - then every row is L2-normalised. Within a cluster cosines are about 0.6 +- 0.06, across
      clusters about 0 +- 0.04: neighbours are well defined yet not trivially separated.

    Rows are written in a random order so no index sees one cluster after another.
    """
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    weights = rng.lognormal(0.0, 1.0, centres)
    sizes = rng.multinomial(n, weights / weights.sum())
    order = rng.permutation(n)
    out = np.empty((n, dim), dtype=np.float32)
    start = 0
    for k in range(centres):
        m = int(sizes[k])
        if m == 0:
            continue
        basis = rng.standard_normal((subspace, dim)).astype(np.float32) / np.float32(np.sqrt(dim))
        spread = np.float32(rng.uniform(0.5, 1.0))
        z = rng.standard_normal((m, subspace)).astype(np.float32) / np.float32(np.sqrt(subspace))
        block = c[k] + spread * (z @ basis)
        block += rng.standard_normal((m, dim)).astype(np.float32) * np.float32(iso_noise / np.sqrt(dim))
        out[order[start : start + m]] = block
        start += m
    normalise_rows(out)
    return out


def make_queries(data: Float32Array, count: int, noise: float = 0.3, seed: int = 1) -> Float32Array:
    """Queries near data points: a random row plus isotropic noise of norm about `noise`, normalised."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(data), size=count, replace=False)
    dim = data.shape[1]
    q = data[picks] + rng.standard_normal((count, dim)).astype(np.float32) * np.float32(noise / np.sqrt(dim))
    normalise_rows(q)
    return q


def normalise_rows(x: Float32Array, chunk: int = 65536) -> None:
    """In place and in chunks, so a 2 GB array needs no 2 GB temporary."""
    for i in range(0, len(x), chunk):
        part = x[i : i + chunk]
        part /= np.linalg.norm(part, axis=1, keepdims=True)


# -- measurements ---------------------------------------------------------------------------------
@dataclass
class Row:
    n: int
    alias: str
    factory: str
    build_s: float
    bytes_per_vector: float
    params: str
    p50_ms: float
    p99_ms: float
    batch_qps: float
    recall: float
    note: str = ""
    others_build: float = -1.0  # other processes' share of the machine's CPU while building
    others_query: float = -1.0  # ... and while the single queries ran
    p50_omp_ms: float = float("nan")  # single-query latency again with faiss's own OpenMP thread count
    p99_omp_ms: float = float("nan")


def recall_at_k(found: Int64Array, truth: Int64Array) -> float:
    k = truth.shape[1]
    hits = sum(len(np.intersect1d(f, t, assume_unique=False)) for f, t in zip(found, truth, strict=True))
    return hits / (k * len(truth))


def single_query_latency(
    index: VectorIndex, queries: Float32Array, k: int, params: SearchParams, count: int, warmup: int = 20
) -> tuple[Float32Array, Int64Array]:
    """Latency (ms) of each query issued alone, and the ids each returned."""
    for q in queries[:warmup]:
        index.search(q[None, :], k, params)
    times = np.empty(count, dtype=np.float64)
    ids = np.empty((count, k), dtype=np.int64)
    for i in range(count):
        t0 = time.perf_counter()
        _, found = index.search(queries[i : i + 1], k, params)
        times[i] = (time.perf_counter() - t0) * 1000
        ids[i] = found[0]
    return times.astype(np.float32), ids


def knob_check(index: VectorIndex, queries: Float32Array, k: int, params: SearchParams) -> str:
    """Say so when VectorIndex.search did not search with the asked nprobe (e.g. behind an OPQ/PCA
    pre-transform): compare its answers with raw faiss after setting nprobe on the IVF index itself."""
    try:
        ivf = faiss.extract_index_ivf(index.index)
    except RuntimeError:  # not an IVF index
        return ""
    before = ivf.nprobe
    ivf.nprobe = params.nprobe
    try:
        _, raw = index.index.search(queries, k)
    finally:
        ivf.nprobe = before
    _, ours = index.search(queries, k, params)
    if not np.array_equal(raw, ours):
        return f"nprobe {params.nprobe} NOT applied by VectorIndex.search (answers differ from raw faiss)"
    return ""


def batch_qps(
    index: VectorIndex, queries: Float32Array, k: int, params: SearchParams
) -> tuple[float, Int64Array]:
    t0 = time.perf_counter()
    _, ids = index.search(queries, k, params)
    return len(queries) / (time.perf_counter() - t0), ids


def param_grid(factory: str, args: argparse.Namespace) -> list[tuple[str, SearchParams]]:
    """The product's default knobs first, then any the user asked to sweep."""
    default = SearchParams()
    if "HNSW" in factory:
        values = [default.ef_search, *[v for v in args.ef_search if v != default.ef_search]]
        return [(f"efSearch={v}", SearchParams(ef_search=v)) for v in values]
    if "IVF" in factory:
        values = [default.nprobe, *[v for v in args.nprobe if v != default.nprobe]]
        return [(f"nprobe={v}", SearchParams(nprobe=v)) for v in values]
    return [("exact", default)]


def bench_size(n: int, args: argparse.Namespace) -> list[Row]:
    dim, k = args.dim, args.k
    t0 = time.perf_counter()
    data = make_vectors(n, dim, centres=args.centres, seed=args.seed)
    queries = make_queries(data, args.queries, seed=args.seed + 1)
    print(f"\n## n = {n:,}: generated {n:,} x {dim} vectors in {time.perf_counter() - t0:.1f} s", flush=True)
    ids = np.arange(n, dtype=np.int64)
    truth: Int64Array | None = None
    rows: list[Row] = []
    plan: list[tuple[str, str, str, int]] = []
    for alias in [*args.indexes, *args.also]:
        factory, note = resolve_factory(alias, n, dim)
        label = alias if alias in args.indexes else "extra"
        if "HNSW" in factory:
            for ef in args.ef_construction:
                plan.append(
                    (label if ef == DEFAULT_EF_CONSTRUCTION else f"{label} efC={ef}", factory, note, ef)
                )
        else:
            plan.append((label, factory, note, DEFAULT_EF_CONSTRUCTION))
    for alias, factory, note, ef_construction in plan:
        if "HNSW" in factory and n > args.hnsw_max:
            nan = float("nan")
            skipped = f"skipped: n > --hnsw-max {args.hnsw_max:,}"
            rows.append(Row(n, alias, factory, nan, nan, "-", nan, nan, nan, nan, note=skipped))
            print(f"{alias} ({factory}): skipped, n > --hnsw-max {args.hnsw_max:,}", flush=True)
            continue
        print(f"{alias} ({factory}): building...", flush=True)
        with span() as build:
            index = VectorIndex.build(ids, data, factory, dim, ef_construction=ef_construction)
        size = len(index.to_bytes())
        print(
            f"  built in {build.wall:.1f} s, {size / n:.1f} bytes/vector "
            f"(other processes used {build.others_text()} of the machine meanwhile)",
            flush=True,
        )
        for label, params in param_grid(factory, args):
            qps, batch_ids = batch_qps(index, queries, k, params)
            if truth is None:  # the first index is exact flat: its batch answer is the ground truth
                if not factory.startswith("Flat"):
                    raise SystemExit("the first index must be flat: it provides the ground truth")
                truth = batch_ids
            count = min(args.latency_queries, len(queries))
            with span() as query:
                times, found = single_query_latency(index, queries, k, params, count)
            rec = recall_at_k(found, truth[:count])
            p50, p99 = (float(v) for v in np.percentile(times, [50, 99]))
            row = Row(n, alias, factory, build.wall, size / n, label, p50, p99, qps, rec, note)
            row.others_build, row.others_query = build.others, query.others
            row.note = "; ".join(x for x in (note, knob_check(index, queries[:20], k, params)) if x)
            if args.default_threads_latency and faiss.omp_get_max_threads() > 1:
                # the same knobs without the one-thread cap on single queries: how the product searched before
                omp_params = replace(params, single_query_threads=None)
                times_omp, _ = single_query_latency(index, queries, k, omp_params, count)
                row.p50_omp_ms, row.p99_omp_ms = (float(v) for v in np.percentile(times_omp, [50, 99]))
            rows.append(row)
            one = (
                f"  ({faiss.omp_get_max_threads()} omp threads: p50 {row.p50_omp_ms:.3f} "
                f"p99 {row.p99_omp_ms:.3f})"
                if row.p50_omp_ms == row.p50_omp_ms
                else ""
            )
            print(
                f"  {label:<13} p50 {p50:8.3f} ms  p99 {p99:8.3f} ms{one}  batch {qps:9.0f} q/s  "
                f"recall@{k} {rec:.4f}  (other processes {query.others_text()})",
                flush=True,
            )
        del index
        gc.collect()
    del data
    gc.collect()
    return rows


# -- report ---------------------------------------------------------------------------------------
def fmt(v: float, spec: str) -> str:
    return "-" if v != v else format(v, spec)  # NaN marks a skipped measurement


def share(v: float) -> str:
    return f"{v:.0%}" if v >= 0 else "n/a"


def table(rows: list[Row], k: int) -> str:
    lines = [
        f"| n | index | factory | build s | bytes/vector | query params | p50 ms | p99 ms "
        f"| p50 / p99 ms, faiss's threads | batch q/s | recall@{k} | others' CPU build / queries | note |",
        "|---:|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.n:,} | {r.alias} | `{r.factory}` | {fmt(r.build_s, '.1f')} "
            f"| {fmt(r.bytes_per_vector, '.1f')} "
            f"| {r.params} | {fmt(r.p50_ms, '.3f')} | {fmt(r.p99_ms, '.3f')} "
            f"| {fmt(r.p50_omp_ms, '.3f')} / {fmt(r.p99_omp_ms, '.3f')} | {fmt(r.batch_qps, ',.0f')} "
            f"| {fmt(r.recall, '.4f')} | {share(r.others_build)} / {share(r.others_query)} | {r.note} |"
        )
    return "\n".join(lines)


def ints(text: str) -> list[int]:
    return [int(float(v)) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument(
        "--sizes", type=ints, default=[100_000, 1_000_000], help="comma list (default 100000,1000000)"
    )
    p.add_argument("--indexes", type=lambda s: s.split(","), default=["flat", "hnsw", "ivfpq"])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--centres", type=int, default=1000, help="mixture components (default: %(default)s)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--latency-queries", type=int, default=1000, help="how many of them run one at a time")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--hnsw-max", type=int, default=1_000_000, help="skip HNSW above this many vectors")
    p.add_argument(
        "--also",
        type=lambda s: [f for f in s.split(";") if f],
        default=[],
        help="extra FAISS factory strings to measure beside the product's, ';'-separated",
    )
    p.add_argument("--ef-search", type=ints, default=[], help="extra HNSW efSearch values to sweep")
    p.add_argument(
        "--ef-construction",
        type=ints,
        default=[DEFAULT_EF_CONSTRUCTION],
        help="HNSW efConstruction values, one index each (default: the product's, %(default)s)",
    )
    p.add_argument("--nprobe", type=ints, default=[], help="extra IVF nprobe values to sweep")
    p.add_argument(
        "--omp-threads", type=int, default=None, help="faiss.omp_set_num_threads (default: faiss's)"
    )
    p.add_argument(
        "--no-default-threads-latency",
        "--no-one-thread-latency",  # its name before single queries ran on one thread by default
        dest="default_threads_latency",
        action="store_false",
        help="skip the second latency pass with faiss's own OpenMP thread count for single queries",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.indexes[0] != "flat":
        args.indexes = ["flat", *[i for i in args.indexes if i != "flat"]]  # flat gives the ground truth
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.omp_threads:
        faiss.omp_set_num_threads(args.omp_threads)
    load = load_average()
    print("# Clearsight vector search benchmark")
    print("command: " + shlex.join([sys.executable, *sys.argv]))
    print(f"date: {datetime.now(UTC).isoformat(timespec='seconds')}")
    print(
        f"machine: {platform.platform()}, python {platform.python_version()}, "
        f"cores {os.cpu_count()}, load average {load}"
    )
    print(
        f"faiss {faiss.__version__}: omp threads {faiss.omp_get_max_threads()} (builds and batch "
        f"searches use them; the product caps single queries at {SearchParams().single_query_threads}, "
        f"the second latency column does not); numpy {np.__version__}"
    )
    d = SearchParams()
    print(
        f"data: {args.centres} clusters, dim {args.dim}, {args.queries} queries near data points, "
        f"seed {args.seed}; "
        f"product defaults nprobe={d.nprobe}, efSearch={d.ef_search}, "
        f"efConstruction={DEFAULT_EF_CONSTRUCTION}; latency includes VectorIndex.search's "
        "input checks (the product path)"
    )
    rows: list[Row] = []
    for n in args.sizes:
        rows.extend(bench_size(n, args))
        print("\n" + table([r for r in rows if r.n == n], args.k), flush=True)
    print("\n### all sizes\n\n" + table(rows, args.k))
    print(f"\nload average at the end: {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
