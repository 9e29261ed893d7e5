from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval import imageio
from retrieval.errors import BadImage


def _bytes(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    "im,fmt",
    [
        (Image.new("RGBA", (20, 10), (255, 0, 0, 0)), "PNG"),
        (Image.new("CMYK", (20, 10), (0, 255, 255, 0)), "JPEG"),
        (Image.new("I;16", (20, 10), 40000), "PNG"),
        (Image.new("P", (20, 10), 3), "GIF"),
        (Image.new("L", (20, 10), 128), "PNG"),
        (Image.new("1", (20, 10), 1), "BMP"),
        (Image.new("RGB", (20, 10), "blue"), "WEBP"),
        (Image.new("RGB", (20, 10), "blue"), "TIFF"),
    ],
)
def test_every_mode_becomes_rgb(im: Image.Image, fmt: str) -> None:
    dec = imageio.decode(_bytes(im, fmt))
    assert dec.image.mode == "RGB" and (dec.width, dec.height) == (20, 10)


def test_transparent_pixels_are_composited_on_white() -> None:
    dec = imageio.decode(_bytes(Image.new("RGBA", (4, 4), (255, 0, 0, 0)), "PNG"))
    assert dec.image.getpixel((1, 1)) == (255, 255, 255)


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    dec = imageio.decode(_bytes(Image.new("I;16", (4, 4), 32768), "PNG"))
    assert 120 <= dec.image.getpixel((0, 0))[0] <= 135


def test_animated_gif_uses_the_first_frame() -> None:
    frames = [Image.new("P", (8, 8), i) for i in (1, 2, 3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    dec = imageio.decode(buf.getvalue())
    assert dec.image.size == (8, 8)


def test_exif_orientation_is_applied() -> None:
    im = Image.new("RGB", (40, 20), "white")
    im.paste((255, 0, 0), (0, 0, 10, 20))  # red strip on the stored image's left
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    dec = imageio.decode(_bytes(im, "JPEG", exif=exif.tobytes(), quality=95))
    assert (dec.width, dec.height) == (20, 40)
    assert dec.image.size == (20, 40)
    r, g, _ = dec.image.getpixel((10, 2))  # the strip is now along the top
    assert r > 200 and g < 80


def test_large_jpeg_decodes_in_draft_mode_but_reports_full_size() -> None:
    data = _bytes(Image.new("RGB", (2000, 1500), "green"), "JPEG")
    dec = imageio.decode(data, draft_size=224)
    assert (dec.width, dec.height) == (2000, 1500)
    assert 224 <= min(dec.image.size) < 1500


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", imageio.EMPTY),
        (b"not an image at all", imageio.NOT_IMAGE),
    ],
)
def test_bad_bytes_have_reasons(tmp_path: Path, data: bytes, reason: str) -> None:
    p = tmp_path / "x.jpg"
    p.write_bytes(data)
    with pytest.raises(BadImage) as exc:
        imageio.open_image(p)
    assert exc.value.reason == reason


def test_truncated_and_bomb(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    full = _bytes(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(BadImage) as exc:
        imageio.decode(full[: len(full) // 3])
    assert exc.value.reason == imageio.TRUNCATED
    with pytest.raises(BadImage) as exc:
        imageio.decode(_bytes(Image.new("L", (300, 300)), "PNG"), max_pixels=10_000)
    assert exc.value.reason == imageio.BOMB


def test_broken_symlink(tmp_path: Path) -> None:
    link = tmp_path / "l.jpg"
    link.symlink_to(tmp_path / "missing.jpg")
    with pytest.raises(BadImage) as exc:
        imageio.read_bytes(link)
    assert exc.value.reason == imageio.BROKEN_LINK
