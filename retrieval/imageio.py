"""Decoding images safely: every odd file becomes an RGB image or a `BadImage` with a short reason.

The reasons are stable strings (they are stored in the catalog and counted in summaries).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from retrieval.errors import BadImage

#: File name suffixes that ingest considers (lower case).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

#: Images with more pixels than this are refused as decompression bombs (about 16k x 11k).
DEFAULT_MAX_PIXELS = 178_956_970

# Reasons recorded in the catalog.
EMPTY = "empty file"
NOT_IMAGE = "not an image"
TRUNCATED = "truncated or corrupt"
BOMB = "decompression bomb"
UNREADABLE = "unreadable"
BROKEN_LINK = "broken symlink"
TOO_SMALL = "degenerate size"

ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class Decoded:
    image: Image.Image  # RGB, EXIF orientation applied, possibly reduced by JPEG draft mode
    width: int  # size of the full image as displayed (after EXIF orientation), before any reduction
    height: int


def content_hash(data: bytes) -> str:
    """A content address: identical files share embeddings and captions whatever their paths."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        reason = BROKEN_LINK if path.is_symlink() else UNREADABLE
        raise BadImage(reason, str(exc)) from exc
    except (PermissionError, IsADirectoryError, OSError) as exc:
        raise BadImage(UNREADABLE, str(exc)) from exc
    if not data:
        raise BadImage(EMPTY)
    return data


def to_rgb(im: Image.Image) -> Image.Image:
    """Flatten any Pillow mode to 8-bit RGB: alpha over white, CMYK and palettes converted, 16-bit scaled."""
    if im.mode == "RGB":
        return im
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        lo = 0.0 if im.mode.startswith("I;16") else min(float(arr.min()), 0.0)
        arr = np.clip((arr - lo) / max(hi - lo, 1e-9) * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


def decode(
    data: bytes,
    draft_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Decoded:
    """Decode bytes to RGB. `draft_size` lets JPEGs decode at a reduced scale (never below it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise BadImage(BOMB, f"{w}x{h} pixels exceeds the limit of {max_pixels}")
            if w < 1 or h < 1:
                raise BadImage(TOO_SMALL, f"{w}x{h}")
            if getattr(im, "is_animated", False):
                im.seek(0)  # first frame stands for an animation
            orientation = im.getexif().get(0x0112, 1) if hasattr(im, "getexif") else 1
            if orientation in (5, 6, 7, 8):
                w, h = h, w
            if draft_size and im.format == "JPEG" and im.mode in ("RGB", "L", "CMYK"):
                im.draft(im.mode, (draft_size, draft_size))
            im.load()
            shown: Image.Image = ImageOps.exif_transpose(im) or im
            return Decoded(to_rgb(shown), w, h)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(BOMB, str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise BadImage(NOT_IMAGE, str(exc)) from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct_error()) as exc:
        raise BadImage(TRUNCATED, str(exc)) from exc


def probe_size(data: bytes) -> tuple[int, int]:
    """Displayed (width, height) from the header alone, for content that needs no decoding."""
    try:
        im = Image.open(io.BytesIO(data))
        w, h = im.size
        if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
            w, h = h, w
        return w, h
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(TRUNCATED, str(exc)) from exc


def struct_error() -> type[Exception]:
    import struct

    return struct.error


def open_image(path: Path, draft_size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    return decode(read_bytes(Path(path)), draft_size=draft_size, max_pixels=max_pixels)
