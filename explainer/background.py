"""Background work (captioning, re-indexing a watched folder) yields the cores to queries.

On Linux the nice value is per thread: a worker thread lowers its own priority before it runs any model,
and the OpenMP threads torch starts for it inherit that priority. A query's threads keep the normal one,
so the scheduler runs them first when both want the cores. Elsewhere the nice value belongs to the whole
process, so nothing is changed there.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

log = logging.getLogger(__name__)

#: How much less a background thread counts than a query's (nice 0 -> 10: ~10x fewer CPU shares).
BACKGROUND_NICE = 10


def yield_to_queries(nice: int = BACKGROUND_NICE) -> bool:
    """Give the calling thread at least `nice` (Linux only; calling again changes nothing); True when
    its nice value is now at least that."""
    if not sys.platform.startswith("linux") or nice <= 0:
        return False
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < nice:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, nice))
    except OSError as exc:  # a sandbox without the permission: the work still runs, at normal priority
        log.debug("could not lower the priority of thread %s: %s", tid, exc)
        return False
    return True
