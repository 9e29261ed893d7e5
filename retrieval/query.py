"""The one query spec: every field of a query, its bounds and its meaning, declared once.

The library searches with `Query`; the CLI fills it from its flags, the API's request schema and the
page's echo are built on `QuerySpec` (pydantic reads the bounds below, written in the
`annotated-types` vocabulary, from these very annotations), and the page's links name the spec's
fields. So a new filter is one annotated field here plus one predicate in the searcher's validity
check: the bounds, the API schema, the echo and the validation follow from the field.

`QuerySpec` is what a query is *about* (what to look for and which hits qualify): it is what pages
echo and links carry. `Query` adds what only a search call needs: the page (`top_k`, `offset`),
the decoded query image, and library-only knobs.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field, fields
from datetime import date
from functools import cache
from typing import Annotated, Any

from annotated_types import Ge, Le, MaxLen
from PIL import Image

from retrieval.errors import BadQuery

#: The most results one search returns (a page's `offset + top_k` may reach further).
MAX_TOP_K = 1000
#: The longest text query, in characters (the encoder reads far fewer tokens than this).
TEXT_MAX = 1000
#: Catalog ids are SQLite rowids: positive 63-bit integers.
MAX_ID = 2**62
#: A held query image is named by the blake2b-128 of its bytes, in hex.
IMAGE_KEY_PATTERN = r"^[0-9a-f]{32}$"

#: Field metadata key: what a field means (API descriptions and messages read it).
DOC = "doc"
#: Field metadata key: the field's name in messages ("top-k", not "top_k").
LABEL = "label"


def _about(doc: str, label: str | None = None) -> dict[str, str]:
    return {DOC: doc, LABEL: label or ""}


@dataclass(frozen=True)
class Pattern:
    """A string bound: the whole value must match `regex`. `annotated-types` has no such bound, so
    this one also tells pydantic itself (through pydantic's `__get_pydantic_core_schema__` hook,
    without importing pydantic here), and the API validates and documents it as the library does."""

    regex: str

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        schema = handler(source)
        schema["pattern"] = self.regex
        return schema


#: A date bound as the filters take it: an ISO calendar date.
DATE_PATTERN = r"^\d{4}-\d{2}-\d{2}$"
#: File types a `type` filter names, and the format the catalog records for each (retrieval.photo_meta).
FILE_TYPES = {
    "jpeg": "jpeg",
    "jpg": "jpeg",
    "png": "png",
    "webp": "webp",
    "gif": "gif",
    "bmp": "bmp",
    "tiff": "tiff",
    "tif": "tiff",
    "heic": "heif",
    "heif": "heif",
    "avif": "avif",
}
ORIENTATIONS = ("landscape", "portrait", "square")
#: Longest folder a filter names (Linux's PATH_MAX).
FOLDER_MAX = 4096
#: Largest `min_size` (pixels on the shorter side) worth asking for.
MIN_SIZE_MAX = 100_000


@dataclass(frozen=True, kw_only=True)
class Filters:
    """Which photos may be hits, by what a photo library knows of them; each field is one filter.

    Dates are the photo's date taken (EXIF `DateTimeOriginal`, else the file's modification time) in
    its local time; both bounds are inclusive. The search applies them exactly (retrieval.filters).
    """

    folder: Annotated[str, MaxLen(FOLDER_MAX)] | None = field(
        default=None,
        metadata=_about(
            "Only photos in this folder or its subfolders: an absolute path, or one relative to an "
            "indexed folder"
        ),
    )
    after: Annotated[str, Pattern(DATE_PATTERN)] | None = field(
        default=None, metadata=_about("Only photos taken on or after this date (YYYY-MM-DD)")
    )
    before: Annotated[str, Pattern(DATE_PATTERN)] | None = field(
        default=None, metadata=_about("Only photos taken on or before this date (YYYY-MM-DD)")
    )
    type: Annotated[str, MaxLen(8)] | None = field(
        default=None, metadata=_about("Only this file type: " + ", ".join(FILE_TYPES), "type")
    )
    min_size: Annotated[int, Ge(1), Le(MIN_SIZE_MAX)] | None = field(
        default=None,
        metadata=_about("Only photos at least this many pixels on their shorter side", "min size"),
    )
    orientation: Annotated[str, MaxLen(9)] | None = field(
        default=None, metadata=_about("Only " + ", ".join(ORIENTATIONS) + " photos")
    )

    def filter_values(self) -> dict[str, Any]:
        """The filters that are set (an empty dict: every photo qualifies)."""
        return {f.name: v for f in fields(Filters) if (v := getattr(self, f.name)) is not None}

    def filter_problem(self) -> str | None:
        """What is wrong with the filters beyond their bounds (a real date, the order of the dates, a
        known type and orientation), or None; the folder is checked against the collection's folders
        when the search resolves it."""
        days = {}
        for name in ("after", "before"):
            value = getattr(self, name)
            if value is None:
                continue
            if re.fullmatch(DATE_PATTERN, value) is None:
                return f"{name} must be a date as YYYY-MM-DD, got {value!r}"
            try:
                days[name] = date.fromisoformat(value)
            except ValueError:
                return f"{name} is not a real date: {value!r}"
        if "after" in days and "before" in days and days["after"] > days["before"]:
            return f"after ({self.after}) is later than before ({self.before}): no photo can match"
        if self.type is not None and self.type.lower() not in FILE_TYPES:
            return f"type must be one of {', '.join(FILE_TYPES)}, got {self.type!r}"
        if self.orientation is not None and self.orientation.lower() not in ORIENTATIONS:
            return f"orientation must be one of {', '.join(ORIENTATIONS)}, got {self.orientation!r}"
        if self.folder is not None and not self.folder.strip():
            return "folder is empty: name a folder, or leave the filter out"
        if self.folder is not None and "\x00" in self.folder:
            return "folder contains a NUL character, which no path can hold"
        return None


@dataclass(frozen=True, kw_only=True)
class QuerySpec(Filters):
    """What to search for and which hits qualify; what the page echoes and its links carry."""

    text: Annotated[str, MaxLen(TEXT_MAX)] | None = field(default=None, metadata=_about("Text query"))
    image_key: Annotated[str, Pattern(IMAGE_KEY_PATTERN)] | None = field(
        default=None,
        metadata=_about(
            "Handle of a query image held by the server (echoed as query.image_key); avoids re-uploading"
        ),
    )
    like_id: Annotated[int, Ge(1), Le(MAX_ID)] | None = field(
        default=None,
        metadata=_about(
            '"More like this": use this catalog image as the query (it is left out of its own results)',
            "like id",
        ),
    )
    negative: Annotated[str, MaxLen(TEXT_MAX)] | None = field(
        default=None, metadata=_about("Text to steer away from")
    )
    weight: Annotated[float, Ge(0.0), Le(1.0)] = field(
        default=0.5, metadata=_about("Text's share in a text+image query", "weight (the text's share)")
    )
    min_score: Annotated[float, Ge(-1.0), Le(1.0)] | None = field(
        default=None, metadata=_about("Drop results scoring below this (cosine similarity)", "min score")
    )
    show_all: bool = field(
        default=False,
        metadata=_about(
            "Show near-duplicates as cards of their own (by default copies of a hit fold into it: "
            "its `similar` ids, '+N similar' on the page)",
            "show all",
        ),
    )

    def spec(self) -> QuerySpec:
        """Only the spec's fields (a `Query` without its image and page), e.g. for an echo."""
        return QuerySpec(**{f.name: getattr(self, f.name) for f in fields(QuerySpec)})

    def spec_values(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(QuerySpec)}


@dataclass(frozen=True, kw_only=True)
class Query(QuerySpec):
    """A search call: the spec, the page wanted, and the decoded query image (if any)."""

    image: Image.Image | None = None
    negative_weight: Annotated[float, Ge(0.0), Le(1.0)] = field(
        default=0.5, metadata=_about("How strongly the negative text is subtracted", "negative weight")
    )
    top_k: Annotated[int, Ge(1), Le(MAX_TOP_K)] = field(
        default=10, metadata=_about("Results per page", "top-k")
    )
    offset: Annotated[int, Ge(0)] = field(default=0, metadata=_about("Skip this many results (paging)"))

    @property
    def kind(self) -> str:
        if self.text and self.image is not None:
            return "text+image"
        return "image" if self.image is not None else "text"

    def validate(self) -> None:
        """Refuse a query no search can answer, naming the field and its bounds (BadQuery)."""
        if not (self.text and self.text.strip()) and self.image is None:
            raise BadQuery("give a text query, an image, or both")
        for name, label, checks in _bounds():
            value = getattr(self, name)
            if value is not None:
                for check in checks:
                    if (message := _violation(label, value, check, checks)) is not None:
                        raise BadQuery(message)
        if (problem := self.filter_problem()) is not None:
            raise BadQuery(problem)


Bound = Ge | Le | MaxLen | Pattern


@cache
def _bounds() -> list[tuple[str, str, tuple[Bound, ...]]]:
    """(field, label, bounds) of every bounded field of `Query`, read from its annotations."""
    hints = typing.get_type_hints(Query, include_extras=True)
    out = []
    for f in fields(Query):
        hint = hints[f.name]
        # `Annotated[T, ...] | None`: the bounds sit on the non-None member
        members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, type(int | None)) else ()
        extras = [m for h in (hint, *members) for m in getattr(h, "__metadata__", ())]
        checks = tuple(m for m in extras if isinstance(m, Ge | Le | MaxLen | Pattern))
        if checks:
            out.append((f.name, f.metadata.get(LABEL) or f.name.replace("_", " "), checks))
    return out


def bounds_of(name: str) -> dict[str, Any]:
    """A field's bounds as keywords (ge, le, max_length, pattern), for frameworks that take them so
    (FastAPI's URL parameters read keywords, not annotations)."""
    out: dict[str, Any] = {}
    for field_name, _, checks in _bounds():
        if field_name == name:
            for c in checks:
                if isinstance(c, Ge):
                    out["ge"] = c.ge
                elif isinstance(c, Le):
                    out["le"] = c.le
                elif isinstance(c, MaxLen):
                    out["max_length"] = c.max_length
                else:
                    out["pattern"] = c.regex
    return out


def _violation(label: str, value: Any, check: Bound, checks: tuple[Bound, ...]) -> str | None:
    """The message for `value` breaking `check`, or None; a range is named whole ("between a and b")."""
    if isinstance(check, Ge | Le):
        low = next((c.ge for c in checks if isinstance(c, Ge)), None)
        high = next((c.le for c in checks if isinstance(c, Le)), None)
        if (low is None or value >= low) and (high is None or value <= high):
            return None
        if low is not None and high is not None:
            return f"{label} must be between {_num(low)} and {_num(high)}, got {value}"
        if low is not None:
            return f"{label} must be {_num(low)} or more, got {value}"
        return f"{label} must be {_num(high)} or less, got {value}"
    if isinstance(check, MaxLen) and len(value) > check.max_length:
        return f"{label} must be at most {check.max_length} characters long, got {len(value)}"
    if isinstance(check, Pattern) and re.fullmatch(check.regex, value) is None:
        return f"{label} is malformed (it must match {check.regex})"
    return None


def _num(x: Any) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"
