"""Original image files, served only while they still are the image that was indexed.

The catalog records a path, but what that path holds can change after indexing: the photo can be
replaced by another file, or by a symlink to anything the server may read (`/etc/passwd`, a key
file). Serving "whatever the path holds now" would turn `/api/images/{id}` into a file reader, so
an original is served only when it resolves inside an indexed folder, is a regular file of the
catalogued size, and hashes to the catalogued content hash (or, for records from before hashes,
has the catalogued size and modification time), and Pillow recognises it as an image. The file is
opened once and served from that descriptor, so a swap after the check serves the checked file.

Photos carry their location in EXIF (GPS IFD) and XMP. Shared beyond loopback, the server strips
it by default (`CLEARSIGHT_STRIP_LOCATION`): JPEGs by rewriting only their metadata segments (the
picture's bytes are passed through untouched), other formats by re-encoding to PNG when, and only
when, they carry a location.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import ExifTags, Image

from retrieval import imageio
from retrieval.catalog import ImageRecord
from retrieval.errors import BadImage

#: Bytes read at a time while hashing and serving.
CHUNK = 1 << 20
#: JPEG metadata (everything before the scan) read at most: APP segments are 64 KiB each.
MAX_JPEG_HEAD = 8 << 20
_GPS = int(ExifTags.IFD.GPSInfo)
_XMP = b"http://ns.adobe.com/xap/1.0/\x00"


class OriginalChanged(Exception):
    """The indexed path no longer holds the indexed image; `reason` says how (no paths in it)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Original:
    """A verified original, open: `head` replaces the file's first `skip` bytes, the rest is streamed."""

    fd: int
    size: int
    media_type: str
    head: bytes = b""
    skip: int = 0

    @property
    def length(self) -> int:
        return len(self.head) + self.size - self.skip

    def chunks(self) -> Iterator[bytes]:
        """The bytes to send; closes the descriptor when done (or when the client goes away)."""
        try:
            if self.head:
                yield self.head
            offset = self.skip
            while offset < self.size:
                chunk = os.pread(self.fd, min(CHUNK, self.size - offset), offset)
                if not chunk:
                    break
                yield chunk
                offset += len(chunk)
        finally:
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _inside(path: str, roots: Sequence[str]) -> bool:
    for root in roots:
        real = os.path.realpath(root)
        if path == real or path.startswith(real.rstrip(os.sep) + os.sep):
            return True
    return False


def open_original(rec: ImageRecord, roots: Sequence[str], *, strip_location: bool) -> Original:
    """Open and verify `rec`'s file; OriginalChanged when it is not the indexed image any more.

    `roots` are the collection's indexed folders; a collection that recorded none (indexed by an
    old version) skips that check, and the content hash still holds.
    """
    real = os.path.realpath(rec.path)
    if roots and not _inside(real, roots):
        raise OriginalChanged("it now points outside the indexed folders")
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except OSError:
        raise OriginalChanged("it is no longer on disk") from None
    try:
        original = _verify(fd, rec)
        if strip_location:
            _strip_location(original)
        return original
    except BaseException:
        os.close(fd)
        raise


def _verify(fd: int, rec: ImageRecord) -> Original:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise OriginalChanged("it is no longer a regular file")
    if rec.byte_size is not None and st.st_size != rec.byte_size:
        raise OriginalChanged("its size changed since it was indexed")
    if rec.content_hash is not None:
        digest = hashlib.blake2b(digest_size=16)  # the hash imageio.content_hash computes, in chunks
        offset = 0
        while offset < st.st_size:
            chunk = os.pread(fd, min(CHUNK, st.st_size - offset), offset)
            if not chunk:
                break
            digest.update(chunk)
            offset += len(chunk)
        if digest.hexdigest() != rec.content_hash:
            raise OriginalChanged("its content changed since it was indexed")
    elif rec.mtime_ns is not None and st.st_mtime_ns != rec.mtime_ns:
        raise OriginalChanged("it was modified since it was indexed")
    imageio.register_plugins()  # HEIC is recognised only once its plugin is registered
    try:
        with Image.open(io.BufferedReader(_FdReader(fd))) as im:
            media_type = Image.MIME.get(im.format or "", "application/octet-stream")
    except Exception:  # Pillow raises many kinds on a file that is not an image
        raise OriginalChanged("it is no longer an image") from None
    return Original(fd=fd, size=st.st_size, media_type=media_type)


class _FdReader(io.RawIOBase):
    """A seekable read-only file over a descriptor, using pread so the descriptor's offset is untouched."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pos = 0
        self._size = os.fstat(fd).st_size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = os.pread(self._fd, len(buffer), self._pos)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


# -- location -----------------------------------------------------------------------------------
def _strip_location(original: Original) -> None:
    if original.media_type == "image/jpeg":
        rewritten = _jpeg_head_without_location(original.fd, original.size)
        if rewritten is not None:
            original.head, original.skip = rewritten
        return
    try:
        with Image.open(io.BufferedReader(_FdReader(original.fd))) as im:
            if _GPS not in im.getexif():
                return
    except Exception:
        return
    png = _reencoded_png(original.fd)
    original.head, original.skip, original.media_type = png, original.size, "image/png"


def _reencoded_png(fd: int) -> bytes:
    """The picture alone as PNG (no metadata), decoded under the decode budget."""
    size = os.fstat(fd).st_size
    data = os.pread(fd, size, 0)
    image = imageio.decode(data).image
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_head_without_location(fd: int, size: int) -> tuple[bytes, int] | None:
    """The JPEG's metadata segments without GPS and XMP location, and where the untouched rest starts.

    None when there is nothing to remove (the file is sent as it is) or the structure is unusual.
    """
    head = os.pread(fd, min(size, MAX_JPEG_HEAD), 0)
    if head[:2] != b"\xff\xd8":
        return None
    out = [b"\xff\xd8"]
    pos, changed = 2, False
    while pos + 4 <= len(head):
        if head[pos] != 0xFF:
            return None
        marker = head[pos + 1]
        if marker == 0xDA:  # start of scan: the picture itself follows, untouched
            return (b"".join(out), pos) if changed else None
        length = int.from_bytes(head[pos + 2 : pos + 4], "big")
        segment = head[pos : pos + 2 + length]
        if len(segment) < 2 + length:
            return None
        payload = segment[4:]
        if marker == 0xE1 and payload.startswith(b"Exif\x00\x00"):
            cleaned = _exif_without_gps(payload)
            if cleaned is not None:
                changed = True
                segment = b"\xff\xe1" + (len(cleaned) + 2).to_bytes(2, "big") + cleaned
        elif marker == 0xE1 and payload.startswith(_XMP) and b"GPS" in payload:
            changed = True
            segment = b""
        out.append(segment)
        pos += 2 + length
    return None


def _exif_without_gps(payload: bytes) -> bytes | None:
    """The EXIF payload without its GPS IFD; None when it has none (or cannot be parsed safely)."""
    exif = Image.Exif()
    try:
        exif.load(payload)
        if _GPS not in exif:
            return None
        del exif[_GPS]
        cleaned = exif.tobytes()
    except Exception:
        return b"Exif\x00\x00"  # unparseable EXIF that may hold a location: drop all of it
    return cleaned if len(cleaned) + 2 <= 0xFFFF else b"Exif\x00\x00"


def location_of(data: bytes) -> dict[int, object]:
    """The GPS IFD of an image's EXIF (empty when none): what tests and callers check for."""
    with Image.open(io.BytesIO(data)) as im:
        return dict(im.getexif().get_ifd(_GPS))


def verified_bytes(rec: ImageRecord, roots: Sequence[str], max_bytes: int) -> bytes:
    """The file's bytes, only if they are the indexed image's (for thumbnails and evidence)."""
    real = os.path.realpath(rec.path)
    if roots and not _inside(real, roots):
        raise OriginalChanged("it now points outside the indexed folders")
    try:
        data = imageio.read_bytes(Path(real), max_bytes)
    except BadImage:
        raise OriginalChanged("it can no longer be read") from None
    if rec.content_hash is not None and imageio.content_hash(data) != rec.content_hash:
        raise OriginalChanged("its content changed since it was indexed")
    return data
