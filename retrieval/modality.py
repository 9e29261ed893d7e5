"""One search argument, three meanings: an image file, an image URL, or words to search for.

Users type `clearsight search photo.jpg` expecting an image search and `clearsight search "a dog"`
expecting a text search; this decides which, the same way everywhere. A string is an image query
when it names an existing file (allowed only where paths are local, i.e. not in a server) or is an
http(s) URL (fetched only where URLs are allowed); anything else, or everything when text is forced,
is text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from retrieval import imageio
from retrieval.errors import BadQuery
from retrieval.fetch import FetchConfig, fetch_image, is_url

#: Longest query string considered at all (a longer one is refused, not truncated silently).
MAX_QUERY_CHARS = 4096


@dataclass(frozen=True)
class DetectedQuery:
    """What an argument turned out to be; `source` says where an image came from (path or URL)."""

    kind: str  # "text" or "image"
    text: str | None = None
    image: Image.Image | None = None
    image_key: str | None = None
    source: str | None = None


def _existing_file(arg: str) -> Path | None:
    try:
        p = Path(arg).expanduser()
        return p if p.is_file() else None
    except (OSError, ValueError):  # a name too long for the file system, or with a NUL byte
        return None


def detect_query(
    arg: str,
    *,
    force_text: bool = False,
    allow_paths: bool = True,
    allow_urls: bool = True,
    fetch: FetchConfig | None = None,
) -> DetectedQuery:
    """Decide what `arg` is and load the image when it is one.

    A URL when URLs are not allowed is refused rather than searched as text: the user meant an image.
    """
    if len(arg) > MAX_QUERY_CHARS:
        raise BadQuery(f"the query is longer than {MAX_QUERY_CHARS} characters")
    text = arg.strip()
    if not text:
        raise BadQuery("the query is empty")
    if force_text:
        return DetectedQuery("text", text=text)
    if is_url(text):
        if not allow_urls:
            raise BadQuery("image URLs are not fetched here; upload the image instead")
        decoded, key = fetch_image(text, fetch)
        return DetectedQuery("image", image=decoded.image, image_key=key, source=text)
    if allow_paths and "\x00" not in arg:
        path = _existing_file(arg) or _existing_file(text)
        if path is not None:
            data = imageio.read_bytes(path)
            try:
                decoded = imageio.decode(data, max_pixels=(fetch or FetchConfig()).max_pixels)
            except BadQuery as exc:
                raise BadQuery(f"{path} is a file but not a readable image ({exc})") from exc
            return DetectedQuery(
                "image", image=decoded.image, image_key=imageio.content_hash(data), source=str(path)
            )
    return DetectedQuery("text", text=text)
