"""A query's filters resolved against one collection: the one predicate, in Python and in SQL.

`resolve` turns the filter fields of a spec (retrieval.query.Filters) into a `Scope`: the folder made
absolute under the collection's indexed folders (a folder outside all of them is refused), the dates
made bounds on the catalog's `taken_at`, the type folded into the format the catalog records. A scope
answers the same question two ways: `admits(record)` for one record (the searcher's validity check),
and `where()` as an SQL condition on the catalog's `images` table, which selects every admitted id at
once for an ID-selector search or a browse. They must agree; a test holds them to it.

A photo whose metadata was never read (a catalog from before these fields, until its next `index`)
has no date, type or folder: a date or type filter leaves it out rather than guessing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta

from retrieval.catalog import Catalog, ImageRecord
from retrieval.errors import BadQuery
from retrieval.paths import display_path, path_bytes
from retrieval.query import FILE_TYPES, Filters


@dataclass(frozen=True)
class Scope:
    """Resolved filters; a field left None does not restrict."""

    prefixes: tuple[bytes, ...] = ()  # absolute folder prefixes ending in "/"; empty: any folder
    after: str | None = None  # taken_at >= this ("YYYY-MM-DD" sorts before any time of that day)
    before_next: str | None = None  # taken_at < this: the day after the inclusive `before`
    format: str | None = None
    min_size: int | None = None
    orientation: str | None = None

    def admits(self, rec: ImageRecord) -> bool:
        """Whether `rec` passes every filter (its state is the searcher's business)."""
        if self.prefixes and not path_bytes(rec.path).startswith(self.prefixes):
            return False
        if self.after is not None and (rec.taken_at is None or rec.taken_at < self.after):
            return False
        if self.before_next is not None and (rec.taken_at is None or rec.taken_at >= self.before_next):
            return False
        if self.format is not None and rec.format != self.format:
            return False
        w, h = rec.width, rec.height
        if self.min_size is not None and (w is None or h is None or min(w, h) < self.min_size):
            return False
        if self.orientation is not None:
            if w is None or h is None:
                return False
            shape = "landscape" if w > h else "portrait" if h > w else "square"
            if shape != self.orientation:
                return False
        return True

    def where(self) -> tuple[str, list[object]]:
        """The same test as an SQL condition on `images` (and its parameters)."""
        parts: list[str] = []
        params: list[object] = []
        if self.prefixes:
            ors = []
            for prefix in self.prefixes:
                ors.append("substr(CAST(path AS BLOB), 1, ?) = ?")
                params += [len(prefix), prefix]
            parts.append("(" + " OR ".join(ors) + ")")
        if self.after is not None:
            parts.append("taken_at >= ?")
            params.append(self.after)
        if self.before_next is not None:
            parts.append("taken_at < ?")
            params.append(self.before_next)
        if self.format is not None:
            parts.append("format = ?")
            params.append(self.format)
        if self.min_size is not None:
            parts.append("min(width, height) >= ?")
            params.append(self.min_size)
        if self.orientation is not None:
            op = {"landscape": ">", "portrait": "<", "square": "="}[self.orientation]
            parts.append(f"width {op} height")
        return (" AND ".join(parts) or "1"), params


def resolve(filters: Filters, roots: Sequence[str]) -> Scope | None:
    """The scope of `filters` in a collection indexed from `roots`; None when nothing is filtered.

    Raises BadQuery for filters no collection could answer (see `Filters.filter_problem`) and for a
    folder outside every indexed folder.
    """
    if not filters.filter_values():
        return None
    if (problem := filters.filter_problem()) is not None:
        raise BadQuery(problem)
    before_next = None
    if filters.before is not None:
        before_next = (date.fromisoformat(filters.before) + timedelta(days=1)).isoformat()
    return Scope(
        prefixes=folder_prefixes(filters.folder, roots) if filters.folder is not None else (),
        after=filters.after,
        before_next=before_next,
        format=FILE_TYPES[filters.type.lower()] if filters.type is not None else None,
        min_size=filters.min_size,
        orientation=filters.orientation.lower() if filters.orientation is not None else None,
    )


def folder_prefixes(folder: str, roots: Sequence[str]) -> tuple[bytes, ...]:
    """The absolute path prefixes a folder filter names: the folder itself when absolute (it must lie
    in an indexed folder), else the folder under each indexed folder that holds it."""
    if not roots:
        raise BadQuery("this collection records no indexed folders, so it cannot filter by folder")
    named = os.path.expanduser(folder.strip())
    shown = ", ".join(display_path(r) for r in roots)
    if os.path.isabs(named):
        wanted = _norm(named)
        real = _norm(os.path.realpath(named))
        for root in roots:
            for candidate in dict.fromkeys((wanted, real)):
                if _inside(candidate, _norm(root)):
                    return (path_bytes(candidate.rstrip("/") + "/"),)
        raise BadQuery(
            f"folder {display_path(named)} is outside every indexed folder ({shown}): "
            f"index it with `clearsight index` first"
        )
    rel = os.path.normpath(named)
    if rel == ".":
        return tuple(path_bytes(_norm(r).rstrip("/") + "/") for r in roots)
    if rel.startswith(".."):
        raise BadQuery(f"folder {display_path(named)} leaves the indexed folders ({shown})")
    found = [os.path.join(_norm(r), rel) for r in roots if os.path.isdir(os.path.join(r, rel))]
    if not found:
        raise BadQuery(f"no folder {display_path(named)} in any indexed folder ({shown})")
    return tuple(path_bytes(p.rstrip("/") + "/") for p in found)


def _norm(path: str) -> str:
    return os.path.normpath(os.path.abspath(path))


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


#: How `browse` can order a collection: newest first by date taken, or by folder then file name.
SORTS = ("date", "folder")


def browse(
    catalog: Catalog, filters: Filters, sort: str, offset: int, limit: int
) -> tuple[list[ImageRecord], int]:
    """One page of the collection without a query (records in `sort` order), and how many images the
    filters admit: what a photo library shows before anyone types."""
    if sort not in SORTS:
        raise BadQuery(f"sort must be one of {', '.join(SORTS)}, got {sort!r}")
    if offset < 0 or limit < 1:
        raise BadQuery(f"a page needs offset >= 0 and limit >= 1, got {offset} and {limit}")
    scope = resolve(filters, catalog.roots()) or Scope()
    condition, params = scope.where()
    return catalog.browse(condition, params, sort, limit, offset)
