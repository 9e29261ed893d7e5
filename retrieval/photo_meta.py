"""What a photo library filters and sorts on: when a photo was taken, its file type, its folder.

The date taken is EXIF `DateTimeOriginal` (the moment the shutter fired, in the Exif IFD), else the
main IFD's `DateTime` (when the file was last written by the camera or an editor), else the file's
modification time. EXIF dates carry no time zone, so every date here is the photo's *local* date and
time as an ISO 8601 string without an offset (`2019-07-14T10:00:00`); the modification time is turned
into the indexing machine's local time to match. Dates compare as strings, which SQLite indexes.

Cameras and editors write odd values (`0000:00:00 00:00:00`, blanks, bytes, 31 February): a value
that is not a real date is ignored and the next source is used; reading metadata never fails an image.

The metadata is read from the file's header only (Pillow opens lazily: for a JPEG it reads the markers
before the pixel data), right after the file was read for encoding, so the bytes come from the page
cache; `fill_missing` does it for every indexed image of a folder that lacks it, which is also how a
catalog written before these fields existed gets them on its next `index`, without re-encoding.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from PIL import ExifTags, Image

if TYPE_CHECKING:
    from retrieval.catalog import Catalog

#: Exif tags (Pillow's names): DateTimeOriginal in the Exif IFD, DateTime in the main IFD.
DATE_TIME_ORIGINAL = ExifTags.Base.DateTimeOriginal  # 0x9003 = 36867
DATE_TIME = ExifTags.Base.DateTime  # 0x0132 = 306
EXIF_IFD = ExifTags.IFD.Exif  # 0x8769

#: Header-reading threads when the caller names none (opening files overlaps well with parsing).
DEFAULT_WORKERS = 4
#: Where a date taken came from, best first.
SOURCES = ("exif", "exif-datetime", "mtime")

#: Pillow format names folded into the name users know the file type by (MPO: a camera JPEG with a
#: second, preview picture appended; Pillow opens many phone JPEGs so).
_FORMAT_ALIASES = {"mpo": "jpeg", "jpeg2000": "jp2"}

#: EXIF writes "YYYY:MM:DD HH:MM:SS"; some tools write dashes or a "T", some add sub-seconds or a zone.
_EXIF_DATE = re.compile(r"^\s*(\d{4})[:\-](\d{2})[:\-](\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
#: Years outside this range are a camera's unset clock or garbage, not a date a photo was taken.
YEAR_RANGE = (1826, 2200)  # the oldest surviving photograph is from 1826 or 1827


@dataclass(frozen=True)
class PhotoMeta:
    taken_at: str  # local date and time, ISO 8601 without an offset: "2019-07-14T10:00:00"
    taken_source: str  # one of SOURCES
    format: str | None  # lower-case file type ("jpeg", "png", "webp"); None when the header is unreadable


def parse_exif_date(value: Any) -> str | None:
    """An EXIF date value as ISO 8601 local time, or None when it is not a real date."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        return None
    found = _EXIF_DATE.match(value.replace("\x00", ""))
    if found is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in found.groups())
    try:
        when = datetime(year, month, day, hour, minute, second)  # raises for month 13, 31 February, hour 25
    except ValueError:
        return None
    if not YEAR_RANGE[0] <= when.year <= YEAR_RANGE[1]:
        return None
    return when.isoformat(timespec="seconds")


def mtime_date(mtime_ns: int) -> str:
    """A modification time as this machine's local date and time, like an EXIF date."""
    try:
        return datetime.fromtimestamp(mtime_ns / 1e9).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):  # a file dated beyond what the platform can represent
        return datetime.fromtimestamp(0).isoformat(timespec="seconds")


def format_name(pillow_format: str | None) -> str | None:
    if not pillow_format:
        return None
    name = pillow_format.lower()
    return _FORMAT_ALIASES.get(name, name)


def from_image(im: Image.Image, mtime_ns: int) -> PhotoMeta:
    """The metadata of an opened image (decoded or only opened), falling back to `mtime_ns`."""
    fmt = format_name(im.format)
    try:
        exif = im.getexif()
        original = exif.get_ifd(EXIF_IFD).get(DATE_TIME_ORIGINAL)
        written = exif.get(DATE_TIME)
    except Exception:  # a malformed EXIF block: Pillow raises many kinds; the photo is fine without it
        original = written = None
    if (taken := parse_exif_date(original)) is not None:
        return PhotoMeta(taken, "exif", fmt)
    if (taken := parse_exif_date(written)) is not None:
        return PhotoMeta(taken, "exif-datetime", fmt)
    return PhotoMeta(mtime_date(mtime_ns), "mtime", fmt)


def read_file(path: str, mtime_ns: int) -> PhotoMeta:
    """The metadata of a file, from its header; the modification time alone when it cannot be opened."""
    try:
        with Image.open(path) as im:
            return from_image(im, mtime_ns)
    except Exception:  # unreadable now (moved, truncated): it was indexed, so its date still counts
        return PhotoMeta(mtime_date(mtime_ns), "mtime", None)


def folder_under(path: str, roots: Sequence[str]) -> str:
    """The folder holding `path`, relative to the longest indexed root holding it ("" at a root's top)."""
    for root in sorted(roots, key=len, reverse=True):
        prefix = root.rstrip("/") + "/"
        if path.startswith(prefix):
            parent = os.path.dirname(path[len(prefix) :])
            return parent
    return os.path.dirname(path)


def fill_missing(catalog: Catalog, root: str, workers: int | None = None) -> int:
    """Read the metadata of every indexed image under `root` that lacks it; how many were filled.

    Headers are read in threads (Pillow's parsing is short, most of the time is the open), and written
    in chunks, each one transaction, so an interrupted run keeps what it filled.
    """
    todo = catalog.missing_photo_meta(root)
    if not todo:
        return 0
    roots = catalog.roots()
    chunk = 2000
    threads = max(1, workers or DEFAULT_WORKERS)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="photo-meta") as pool:
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            metas = list(pool.map(lambda row: read_file(row[1], row[2] or 0), part))
            catalog.set_photo_meta(
                [
                    (image_id, m.taken_at, m.taken_source, m.format, folder_under(path, roots))
                    for (image_id, path, _), m in zip(part, metas, strict=True)
                ]
            )
    return len(todo)
