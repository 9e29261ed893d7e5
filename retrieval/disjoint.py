"""Disjoint sets (union-find) over 0..n-1, where each set's root is its smallest member.

Keeping the smallest member as the root gives callers a stable order for free: duplicate groups are named
by their first row, and connected components of an evidence map are numbered by their first run.
"""

from __future__ import annotations


class DisjointSets:
    """Union-find with path halving; `find` answers a set's smallest member."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)
