"""Thread pools of a process that answers queries, set before NumPy, FAISS or torch load their libraries.

On a busy machine (another program, or Clearsight's own captioning and indexing) a query's time used to
grow six-fold where rclip's doubles: OpenBLAS (NumPy's matrix products: the stored text tower) and
OpenMP (torch, FAISS) keep their idle threads spinning for the cores, so a pool of two fights two busy
processes and itself. So BLAS runs one thread, and OpenMP threads sleep when idle
(`OMP_WAIT_POLICY=PASSIVE`, which costs a query nothing measurable on a quiet machine). The one product
that gains from a second core, the text tower's, shares its work with a helper thread that the caller
never waits for (`retrieval.encoders.texttower.SharedProducts`). Both libraries read these variables
once, when they load, so this runs before the command's imports; a value the user set is kept.

Measured with bench/peer_bench.py on 2 cores (bench/RESULTS.md).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping, Sequence

#: Commands whose process answers queries (the server's background work shares it).
QUERY_COMMANDS = frozenset({"search", "serve", "run"})
QUERY_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def tune_for_queries(argv: Sequence[str], environ: MutableMapping[str, str] | None = None) -> bool:
    """Set the query process's thread settings when `argv` runs a query command; True when it does."""
    env = os.environ if environ is None else environ
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in QUERY_COMMANDS:
        return False
    for name, value in QUERY_ENV.items():
        env.setdefault(name, value)
    return True
