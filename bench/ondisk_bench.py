"""`ivf-ondisk` against in-memory flat and HNSW (and the refined in-memory IVF-PQ) on the same vectors.

Per index: build seconds (per stage for the on-disk index: train on a sample, fill shards as Ray
tasks, on-disk merge, re-ranking vectors), bytes per vector (files on disk / in memory), resident
memory of a fresh process serving single queries, recall@10 against exact search, and p50/p99
single-query latency. The data is search_bench's clustered 512-d mixture (see its `make_vectors`).
The serving process for the on-disk index only memory-maps its files, so its resident set is
reported split into anonymous memory (what it holds) and file pages (the page cache it touched,
which the kernel can drop).

    flock /work/cpu.lock .venv/bin/python bench/ondisk_bench.py --n 1000000
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np
from search_bench import make_queries, make_vectors, recall_at_k

from retrieval.index.faiss_index import VectorIndex
from retrieval.index.kinds import resolve_factory
from retrieval.index.params import SearchParams

SERVE = textwrap.dedent(
    """
    import json, sys, time, numpy as np
    from pathlib import Path
    def mem():
        out = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) / 1024
        return out
    d, qpath, k, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    import faiss
    faiss.omp_set_num_threads(1)
    from retrieval.index import ondisk
    q = np.load(qpath)
    before = mem()
    idx = ondisk.OnDiskIndex.load(d, q.shape[1], ondisk.ONDISK)
    loaded = mem()
    for i in range(20):
        idx.search(q[i : i + 1], k)
    times, found = [], []
    for i in range(count):
        t0 = time.perf_counter()
        _, ids = idx.search(q[i : i + 1], k)
        times.append((time.perf_counter() - t0) * 1000)
        found.append(ids[0].tolist())
    print(json.dumps({"before": before, "loaded": loaded, "served": mem(), "times": times, "found": found}))
    """
)


def single(
    index: VectorIndex, q: np.ndarray, k: int, count: int, params: SearchParams | None = None
) -> tuple[np.ndarray, np.ndarray]:
    params = params or SearchParams()
    for i in range(20):
        index.search(q[i : i + 1], k, params)
    times, found = [], []
    for i in range(count):
        t0 = time.perf_counter()
        _, ids = index.search(q[i : i + 1], k, params)
        times.append((time.perf_counter() - t0) * 1000)
        found.append(ids[0])
    return np.asarray(times), np.stack(found)


def row(name: str, build: str, bpv: float, mem: str, recall: float, times: np.ndarray) -> None:
    print(
        f"| {name} | {build} | {bpv:,.0f} | {mem} | {recall:.4f} | "
        f"{np.percentile(times, 50):.3f} | {np.percentile(times, 99):.3f} |"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--indexes", default="flat,hnsw,ondisk", help="comma list of flat, hnsw, ivfpq, ondisk")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument(
        "--refine-k",
        default="",
        help="comma list of re-ranking depths to search the in-memory ivfpq with (default: its recorded one)",
    )
    p.add_argument("--workdir", type=Path, default=None, help="where the on-disk index goes (default: /tmp)")
    args = p.parse_args(argv)
    kinds = args.indexes.split(",")
    print("# ivf-ondisk bench")
    print("command: " + shlex.join([sys.executable, *sys.argv]))
    print(f"date: {datetime.now(UTC).isoformat(timespec='seconds')}")
    t0 = time.perf_counter()
    x = make_vectors(args.n, args.dim)
    q = make_queries(x, args.queries)
    ids = np.arange(args.n, dtype=np.int64)
    print(
        f"data: {args.n:,} synthetic vectors of {args.dim}-d (search_bench's clustered mixture) made in "
        f"{time.perf_counter() - t0:.0f} s; {args.queries} queries"
    )
    flat_bytes = args.n * args.dim * 4
    print()
    print("| index | build s | bytes/vector | resident memory serving | recall@10 | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|")
    t0 = time.perf_counter()
    flat = VectorIndex.build(ids, x, "Flat", args.dim)
    flat_s = time.perf_counter() - t0
    _, truth = flat.search(q, 10)
    if "flat" in kinds:
        times, _ = single(flat, q, 10, min(args.queries, 200))
        row(
            "flat",
            f"{flat_s:.1f}",
            len(flat.to_bytes()) / args.n,
            f"{flat_bytes / 2**20:,.0f} MiB (the vectors)",
            1.0,
            times,
        )
    del flat
    for kind in ("hnsw", "ivfpq"):
        if kind not in kinds:
            continue
        factory, _ = resolve_factory(kind, args.n, args.dim)
        t0 = time.perf_counter()
        idx = VectorIndex.build(ids, x, factory, args.dim)
        build_s = time.perf_counter() - t0
        size = len(idx.to_bytes())
        depths: list[int | None] = [int(d) for d in args.refine_k.split(",") if d] if kind == "ivfpq" else []
        for depth in depths or [None]:
            params = SearchParams(k_factor=depth) if depth else None
            times, found = single(idx, q, 10, args.queries, params)
            row(
                f"{kind} `{factory}`" + (f" re-ranking x{depth}" if depth else ""),
                f"{build_s:.1f}",
                size / args.n,
                f"{size / 2**20:,.0f} MiB (serialized size)",
                recall_at_k(found, truth),
                times,
            )
        del idx
    if "ondisk" in kinds:
        import ray

        from retrieval.distributed.ingest import RayConfig, shard_runner
        from retrieval.index import ondisk

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        with tempfile.TemporaryDirectory(prefix="ondisk-bench-", dir=args.workdir) as t:
            d = Path(t) / "idx"
            timings: dict[str, float] = {}
            t0 = time.perf_counter()
            built = ondisk.build(
                ids,
                x,
                args.dim,
                d,
                shards=args.shards,
                runner=shard_runner(RayConfig(workers=2)),
                timings=timings,
            )
            build_s = time.perf_counter() - t0
            ray.shutdown()
            files = sum(f.stat().st_size for f in d.iterdir())
            qpath = Path(t) / "q.npy"
            np.save(qpath, q)
            out = subprocess.run(
                [sys.executable, "-c", SERVE, str(d), str(qpath), "10", str(args.queries)],
                capture_output=True,
                text=True,
                check=True,
            )
            res = json.loads(out.stdout.strip().splitlines()[-1])
            served = res["served"]
            found = np.asarray(res["found"])
            stages = ", ".join(f"{k[:-2]} {v:.1f}" for k, v in timings.items())
            added = served["VmRSS"] - res["before"]["VmRSS"]
            mem = (
                f"+{added:,.0f} MiB over the bare process ({added / (flat_bytes / 2**20):.1%} of flat); "
                f"{served['RssAnon']:,.0f} anon + {served['RssFile']:,.0f} file in all"
            )
            row(
                f"ivf-ondisk `{built.factory}` + exact re-rank",
                f"{build_s:.1f} ({stages})",
                files / args.n,
                mem,
                recall_at_k(found, truth),
                np.asarray(res["times"]),
            )
            print()
            print(
                "on-disk files: "
                + ", ".join(f"{f.name} {f.stat().st_size / 2**20:,.1f} MiB" for f in sorted(d.iterdir()))
            )
            print(f"serving process before load {res['before']}, after load {res['loaded']}")
    print(f"threads: faiss {faiss.omp_get_max_threads()} for builds; single queries run with 1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
