"""How busy the machine was while a bench measured: the benches run on shared 2-core machines,
where other people's work can halve a figure, so every measurement reports the CPU share that
other processes used meanwhile (Linux /proc/stat; "n/a" elsewhere)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

MIN_WALL = 0.5  # seconds


def busy_ticks() -> int | None:
    """Non-idle clock ticks of the whole machine since boot, None when /proc/stat is missing."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    vals = [int(v) for v in fields]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    guest = sum(vals[8:10]) if len(vals) > 9 else 0  # guest time is already counted in user time
    return sum(vals) - idle - guest


@dataclass
class Span:
    """Wall seconds, CPU seconds of this process and the children it waited for (a command it ran),
    other processes' share of all cores (-1: unknown)."""

    wall: float = 0.0
    own_cpu: float = 0.0
    others: float = -1.0

    def others_text(self) -> str:
        return f"{self.others:.0%}" if self.others >= 0 else "n/a"


@contextmanager
def span() -> Iterator[Span]:
    out = Span()
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    cores = os.cpu_count() or 1
    b0, c0, t0 = busy_ticks(), os.times(), time.perf_counter()
    try:
        yield out
    finally:
        out.wall = time.perf_counter() - t0
        b1, c1 = busy_ticks(), os.times()
        out.own_cpu = sum(
            getattr(c1, k) - getattr(c0, k) for k in ("user", "system", "children_user", "children_system")
        )
        # Below half a second the clock-tick counters (10 ms) are too coarse to say anything.
        if b0 is not None and b1 is not None and out.wall >= MIN_WALL:
            out.others = min(1.0, max(0.0, ((b1 - b0) / hz - out.own_cpu) / (out.wall * cores)))


def load_average() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"
