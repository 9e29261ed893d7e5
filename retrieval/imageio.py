"""Decoding images safely: every odd file becomes an RGB image or a `BadImage` with a short reason.

The reasons are stable strings (they are stored in the catalog and counted in summaries).

Memory is bounded three ways, because a small file can hold a huge image (a 116 KiB PNG of
6000x6000 pixels): the pixel count is read from the header and checked before any pixel is
decoded; the image is reduced to the size the caller needs as early as its format allows (JPEG
draft mode while decoding, `Image.reduce` right after it for the others); and every decode first
reserves its estimated full-size footprint from a process-wide `DecodeBudget`, so concurrent
decodes wait for each other instead of adding up. Files are read only when they are regular files
(after resolving symlinks) and never past a size cap, so a FIFO cannot hang a reader and a link
to `/dev/zero` cannot exhaust memory.

Phones save HEIC (every iPhone) and, more and more, AVIF. Pillow reads AVIF itself (11.3 and later
ship libavif in their wheels); HEIC comes through the `pillow-heif` plugin. Plugins are registered
on the first decode (`register_plugins`), not at import, so a process that never decodes (search,
status) never loads libheif.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import importlib
import io
import os
import re
import stat
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from retrieval.errors import BadImage

#: File name suffixes that ingest considers (lower case).
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif", ".avif"}
)

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
NOT_REGULAR = "not a regular file"
TOO_LARGE = "file too large"
NO_DECODER = "no decoder for this format"

#: Files larger than this are refused while reading (configurable per call; ingest takes it from its config).
DEFAULT_MAX_FILE_BYTES = 512 * 1024 * 1024

#: Default memory that concurrent decodes may reserve together (the server sets its own from settings).
DEFAULT_DECODE_BUDGET_BYTES = 384 * 1024 * 1024

ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class Decoded:
    image: Image.Image  # RGB, EXIF orientation applied, possibly reduced by JPEG draft mode
    width: int  # size of the full image as displayed (after EXIF orientation), before any reduction
    height: int


def content_hash(data: bytes) -> str:
    """A content address: identical files share embeddings and captions whatever their paths."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def hash_key(digest: str) -> int:
    """A content hash's first 64 bits: a compact key for membership checks (see
    `Catalog.embedded_hash_keys`); equal keys say the content is probably, not surely, the same."""
    return int(digest[:16], 16)


def read_bytes(path: Path, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """The file's bytes, only if it is a regular file (after symlinks) of at most `max_bytes`.

    FIFOs, sockets and devices are refused from `stat` without being opened (opening a FIFO for
    reading blocks until a writer appears). The open itself is non-blocking and re-checked with
    `fstat`, so a file swapped for a FIFO between the two calls is refused too, and the cap is
    enforced while reading, so a file that grows after `stat` cannot push past it.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        reason = BROKEN_LINK if os.path.islink(path) else UNREADABLE
        raise BadImage(reason, str(exc)) from exc
    except OSError as exc:
        raise BadImage(UNREADABLE, str(exc)) from exc
    _check_regular(st.st_mode, st.st_size, max_bytes)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a socket or a FIFO that appeared after stat
            raise BadImage(NOT_REGULAR, str(exc)) from exc
        reason = BROKEN_LINK if exc.errno == errno.ENOENT and os.path.islink(path) else UNREADABLE
        raise BadImage(reason, str(exc)) from exc
    try:
        fst = os.fstat(fd)
        _check_regular(fst.st_mode, fst.st_size, max_bytes)
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise BadImage(TOO_LARGE, f"more than the limit of {max_bytes} bytes")
    except BadImage:
        raise
    except OSError as exc:
        raise BadImage(UNREADABLE, str(exc)) from exc
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if not data:
        raise BadImage(EMPTY)
    return data


def _check_regular(mode: int, size: int, max_bytes: int) -> None:
    if stat.S_ISDIR(mode):
        raise BadImage(UNREADABLE, "is a directory")
    if not stat.S_ISREG(mode):
        raise BadImage(NOT_REGULAR, _file_kind(mode))
    if size > max_bytes:
        raise BadImage(TOO_LARGE, f"{size} bytes exceeds the limit of {max_bytes}")


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "a special file"


class DecodeBudget:
    """Bytes of decoded pixels that concurrent decodes may hold together; the rest wait their turn.

    A decode estimated above the whole budget is still allowed, but only alone, so one legitimate
    large photo is never refused by the budget (the pixel limit is what refuses images).
    """

    def __init__(self, limit_bytes: int) -> None:
        if limit_bytes < 1:
            raise ValueError(f"a decode budget must be positive, got {limit_bytes}")
        self.limit = int(limit_bytes)
        self._used = 0
        self._peak = 0
        self._cond = threading.Condition()

    @property
    def in_use(self) -> int:
        return self._used

    @property
    def peak(self) -> int:
        """The most ever reserved at once (for tests and benches)."""
        return self._peak

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        need = max(0, min(int(nbytes), self.limit))
        with self._cond:
            while self._used + need > self.limit:
                self._cond.wait()
            self._used += need
            self._peak = max(self._peak, self._used)
        try:
            yield
        finally:
            with self._cond:
                self._used -= need
                self._cond.notify_all()


_budget = DecodeBudget(DEFAULT_DECODE_BUDGET_BYTES)


def decode_budget() -> DecodeBudget:
    """The process-wide budget every decode reserves from."""
    return _budget


def set_decode_budget(limit_bytes: int) -> DecodeBudget:
    """Replace the process-wide budget (the server sizes it from its settings at start-up)."""
    global _budget
    _budget = DecodeBudget(limit_bytes)
    return _budget


#: Decodes at least this large hand freed memory back to the system afterwards.
_TRIM_AFTER_BYTES = 32 * 1024 * 1024


def _load_libc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None)
    except OSError:
        return None


_malloc_trim = _load_libc_trim()


def release_memory() -> None:
    """Return freed heap to the OS (glibc keeps it per thread arena otherwise): memory goes back to idle."""
    if _malloc_trim is not None:
        _malloc_trim(0)


_plugins_lock = threading.Lock()
_plugins: dict[str, bool] | None = None


def register_plugins() -> dict[str, bool]:
    """Register the photo-format plugins once per process; which formats can be read ({"HEIF": True, ...}).

    HEIC/HEIF through `pillow-heif`; AVIF through Pillow itself, else through `pillow-avif-plugin`
    when that is installed (for Pillow builds without libavif). A format whose plugin is missing is
    reported as False, and its files fail with the reason `NO_DECODER` instead of "not an image".
    """
    global _plugins
    if _plugins is not None:
        return _plugins
    with _plugins_lock:
        if _plugins is None:
            from PIL import features

            found = {"HEIF": False, "AVIF": bool(features.check("avif"))}
            try:
                from pillow_heif import register_heif_opener

                register_heif_opener()
                found["HEIF"] = True
            except ImportError:
                pass
            if not found["AVIF"]:
                try:  # optional, not a dependency: importing it registers its plugin
                    importlib.import_module("pillow_avif")
                    found["AVIF"] = True
                except ImportError:
                    pass
            _plugins = found
    return _plugins


#: The ISO-BMFF brands (bytes 8-12 of the file) of the formats the plugins read.
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")
_AVIF_BRANDS = (b"avif", b"avis")


def _missing_decoder(data: bytes) -> str | None:
    """The format's name when `data` is HEIF or AVIF and no plugin reads it (else None)."""
    if data[4:8] != b"ftyp":
        return None
    brand = data[8:12]
    plugins = register_plugins()
    if brand in _AVIF_BRANDS and not plugins["AVIF"]:
        return "AVIF (needs Pillow 11.3 or later, or pillow-avif-plugin)"
    if brand in _HEIF_BRANDS and not plugins["HEIF"]:
        return "HEIF/HEIC (needs pillow-heif)"
    return None


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
    budget: DecodeBudget | None = None,
) -> Decoded:
    """Decode bytes to RGB. With `draft_size`, the image is reduced early, never below it on either side.

    The pixel count comes from the header and is checked before decoding; the decode then holds its
    estimated footprint in `budget` (default: the process-wide one) while full-size pixels exist.
    """
    source = "the image data"
    register_plugins()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im: Image.Image = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise BadImage(BOMB, f"{w}x{h} pixels exceeds the limit of {max_pixels}")
            if w < 1 or h < 1:
                raise BadImage(TOO_SMALL, f"{w}x{h}")
            if getattr(im, "is_animated", False):
                im.seek(0)  # first frame stands for an animation
            if draft_size and im.format == "JPEG" and im.mode in ("RGB", "L", "CMYK"):
                im.draft(im.mode, (draft_size, draft_size))
            cost = decode_cost(im.size, im.mode, reduced=bool(draft_size))
            with (budget or _budget).hold(cost):
                im.load()
                # after load: PNG's getexif() decodes the whole image to find a late eXIf chunk
                orientation = im.getexif().get(0x0112, 1) if hasattr(im, "getexif") else 1
                if orientation in (5, 6, 7, 8):
                    w, h = h, w
                if draft_size:
                    im = _reduce(im, draft_size)
                shown: Image.Image = ImageOps.exif_transpose(im) or im
                out = Decoded(to_rgb(shown), w, h)
                del im, shown
            if cost >= _TRIM_AFTER_BYTES:
                release_memory()
            return out
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(BOMB, _plain(exc, source)) from exc
    except UnidentifiedImageError as exc:
        missing = _missing_decoder(data)
        if missing:
            raise BadImage(NO_DECODER, missing) from exc
        raise BadImage(NOT_IMAGE, _plain(exc, source)) from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct_error()) as exc:
        raise BadImage(TRUNCATED, _plain(exc, source)) from exc


def _plain(exc: BaseException, source: str) -> str:
    """Pillow's message without the `<_io.BytesIO object at 0x...>` it names in-memory files by."""
    return re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", source, str(exc))


def decode_cost(size: tuple[int, int], mode: str, reduced: bool) -> int:
    """Bytes a decode of this size and mode holds at its peak, as reserved from the budget.

    Pillow stores multi-band pixels in 4 bytes; a full-size result (no reduction) needs room for
    the orientation and RGB copies too, and palette or 16-bit images are converted at full size
    before they can be reduced.
    """
    pixels = size[0] * size[1]
    per_pixel = 4 if len(mode) > 1 or mode in ("I", "F") else 1
    copies = 1 if reduced else 3
    if mode in _CONVERT_BEFORE_REDUCE:
        copies += 1
        per_pixel = 4
    return pixels * per_pixel * copies


#: Modes `Image.reduce` cannot average meaningfully (palette indices, bits, 16-bit integers).
_CONVERT_BEFORE_REDUCE = {
    "P": "RGBA",
    "PA": "RGBA",
    "1": "L",
    **{m: "I" for m in ("I;16", "I;16B", "I;16L", "I;16N")},
}


def _reduce(im: Image.Image, size: int) -> Image.Image:
    """Shrink by a whole factor as long as both sides stay at least `size` (box filter, cheap)."""
    factor = min(im.width // size, im.height // size)
    if factor < 2:
        return im
    target = _CONVERT_BEFORE_REDUCE.get(im.mode)
    if target == "RGBA" and im.mode == "P" and "transparency" not in im.info:
        target = "RGB"
    if target is None:
        return im.reduce(factor)
    small = im.convert(target).reduce(factor)
    # 16-bit greys go back to 16 bits, so `to_rgb` scales them by the 16-bit range as for any other
    return small.convert("I;16") if im.mode.startswith("I;16") else small


def probe_size(data: bytes) -> tuple[int, int]:
    """Displayed (width, height) from the header alone, for content that needs no decoding."""
    register_plugins()
    try:
        im = Image.open(io.BytesIO(data))
        w, h = im.size
        if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
            w, h = h, w
        return w, h
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(TRUNCATED, _plain(exc, "the image data")) from exc


def struct_error() -> type[Exception]:
    import struct

    return struct.error


def open_image(
    path: Path,
    draft_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> Decoded:
    return decode(read_bytes(Path(path), max_bytes), draft_size=draft_size, max_pixels=max_pixels)
