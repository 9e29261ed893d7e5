"""Sharded search on a local Ray cluster: merge exactness against one exact index, and added latency.

The same vectors (search_bench's clustered mixture) are searched by one in-process exact index and
by a ShardedIndex of 2 and 4 exact shards in Ray actors; each query's top-10 must be identical
(ids in the same order), and the single-query latency difference is the cost of the fan-out
(a Ray call per shard, the merge). On 2 cores the shards cannot all run at once, so the latency
here is an upper bound of what a cluster with a core per shard would see.

    flock /work/cpu.lock .venv/bin/python bench/sharded_bench.py --n 200000
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from datetime import UTC, datetime

import numpy as np
from search_bench import make_queries, make_vectors

from retrieval.distributed.sharded import ShardedIndex
from retrieval.index.faiss_index import VectorIndex


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--shards", default="2,4")
    args = p.parse_args(argv)
    print("# sharded search bench")
    print("command: " + shlex.join([sys.executable, *sys.argv]))
    print(f"date: {datetime.now(UTC).isoformat(timespec='seconds')}")
    import ray

    x = make_vectors(args.n, args.dim)
    q = make_queries(x, args.queries)
    ids = np.random.default_rng(0).permutation(10 * args.n)[: args.n].astype(np.int64)
    one = VectorIndex.build(ids, x, "Flat", args.dim)
    base = []
    truth = []
    for i in range(args.queries):
        t0 = time.perf_counter()
        s, found = one.search(q[i : i + 1], 10)
        base.append((time.perf_counter() - t0) * 1000)
        # ties broken by id, as the merge does
        order = np.lexsort((found[0], -s[0]))
        truth.append(found[0][order])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"data: {args.n:,} synthetic vectors of {args.dim}-d (search_bench's clustered mixture)")
    print(f"{args.queries} single queries, top-10")
    print()
    print("| shards | identical top-10 | p50 ms | p99 ms | added p50 ms |")
    print("|---|---|---|---|---|")
    print(f"| 1 (in process) | - | {np.percentile(base, 50):.2f} | {np.percentile(base, 99):.2f} | - |")
    for n in [int(s) for s in args.shards.split(",")]:
        sharded = ShardedIndex(ids, x, args.dim, n, timeout_s=60)
        for i in range(10):
            sharded.search(q[i : i + 1], 10)
        times, same = [], 0
        for i in range(args.queries):
            t0 = time.perf_counter()
            res = sharded.search(q[i : i + 1], 10)
            times.append((time.perf_counter() - t0) * 1000)
            same += int(np.array_equal(res.ids[0], truth[i]) and not res.partial)
        sharded.close()
        added = np.percentile(times, 50) - np.percentile(base, 50)
        print(
            f"| {n} | {same}/{args.queries} | {np.percentile(times, 50):.2f} | "
            f"{np.percentile(times, 99):.2f} | {added:+.2f} |"
        )
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
