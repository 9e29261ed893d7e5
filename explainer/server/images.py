"""Image files, thumbnails and evidence pictures, found by catalog id only.

Thumbnails are cached on disk by content hash and size: the hash changes whenever the file does,
so a cached thumbnail can never be stale, and identical files share one. They are written to a
temporary name and renamed, so concurrent requests for the same thumbnail never see half a file.
"""

from __future__ import annotations

import io
import mimetypes
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw
from starlette.exceptions import HTTPException

from explainer.cards.model import snap_thumb_size
from explainer.errors import BadImage
from explainer.server.originals import OriginalChanged, verified_bytes
from retrieval import imageio
from retrieval.catalog import Catalog, ImageRecord
from retrieval.types import Region

#: Colours of evidence boxes by rank (the page's CSS uses the same ones).
BOX_COLOURS = ("#ff5a36", "#ffb020", "#3ec7ff", "#b58cff", "#4ade80", "#f472b6", "#94a3b8", "#facc15")


def indexed_record(catalog: Catalog, image_id: int) -> ImageRecord:
    """The record of an indexed image, or a 404: ids are the only handle clients ever get."""
    rec = catalog.get_image(image_id)
    if rec is None or rec.state != "indexed":
        raise HTTPException(404, f"no indexed image with id {image_id}")
    return rec


def media_type(path: str) -> str:
    guessed, _ = mimetypes.guess_type(path)
    return guessed or "application/octet-stream"


def _open(rec: ImageRecord, draft: int, max_pixels: int, roots: Sequence[str]) -> Image.Image:
    """The decoded image, only if the file is still the one indexed: a thumbnail of a swapped-in
    file would be cached under the indexed image's hash and shown for it."""
    try:
        data = verified_bytes(rec, roots, imageio.DEFAULT_MAX_FILE_BYTES)
        return imageio.decode(data, draft_size=draft, max_pixels=max_pixels).image
    except OriginalChanged as exc:
        raise ImageChanged(rec.id, exc.reason) from None
    except BadImage as exc:
        raise HTTPException(404, f"image {rec.id} can no longer be read ({exc.reason})") from None


class ImageChanged(HTTPException):
    """A 404 for an indexed image whose file is no longer the one indexed; routes mark it stale."""

    def __init__(self, image_id: int, reason: str) -> None:
        super().__init__(
            404,
            f"image {image_id} changed on disk since it was indexed ({reason}); run `clearsight index` again",
        )
        self.image_id = image_id
        self.reason = reason


class Thumbnails:
    """A disk cache of JPEG thumbnails under `root/<size>/<hash[:2]>/<hash>.jpg`."""

    def __init__(self, root: Path, max_pixels: int, roots: Sequence[str] = ()) -> None:
        self.root = Path(root)
        self.max_pixels = max_pixels
        self.roots = roots

    def path_for(self, rec: ImageRecord, size: int) -> Path:
        """The cached thumbnail of `rec`, rendering it first if needed (EXIF orientation applied)."""
        size = snap_thumb_size(size)
        key = rec.content_hash or f"id{rec.id}"
        out = self.root / str(size) / key[:2] / f"{key}.jpg"
        if out.is_file():
            return out
        thumb = view(rec, size, self.max_pixels, self.roots)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".thumb-", dir=out.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                thumb.save(f, format="JPEG", quality=85, optimize=True)
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return out


def view(rec: ImageRecord, size: int, max_pixels: int, roots: Sequence[str] = ()) -> Image.Image:
    """The image at most `size` pixels on a side, EXIF orientation applied."""
    image = _open(rec, size, max_pixels, roots).copy()
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    return image


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def draw_boxes(rec: ImageRecord, image: Image.Image, boxes: list[Region]) -> bytes:
    """PNG of `image` (a view of `rec`) with numbered boxes: the fallback when no renderer is at hand."""
    image = image.copy()
    sx, sy = image.width / (rec.width or image.width), image.height / (rec.height or image.height)
    draw = ImageDraw.Draw(image)
    line = max(2, round(min(image.size) / 160))
    for b in sorted(boxes, key=lambda b: -b.rank):  # best drawn last, on top
        colour = BOX_COLOURS[(b.rank - 1) % len(BOX_COLOURS)]
        x0, y0, x1, y1 = b.box
        rect = (x0 * sx, y0 * sy, max(x0 * sx + 1, x1 * sx - 1), max(y0 * sy + 1, y1 * sy - 1))
        draw.rectangle(rect, outline=colour, width=line)
        tx, ty = rect[0] + line, rect[1] + line
        left, top, right, bottom = draw.textbbox((tx, ty), str(b.rank))
        draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=colour)
        draw.text((tx, ty), str(b.rank), fill="#111111")
    return png_bytes(image)
