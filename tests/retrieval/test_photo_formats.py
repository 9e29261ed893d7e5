"""HEIC and AVIF, the formats phones save: decoded through the kept Pillow plugins, indexed and searchable."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from retrieval import Collection, IngestConfig, Query, Searcher, imageio, load_query_image
from retrieval.errors import BadImage
from retrieval.ingest import ingest
from tests.helpers import draw_shape, make_folder

QUIET = IngestConfig(batch_size=4, workers=2, progress=False)


def _can_encode(fmt: str) -> str | None:
    """None when this machine can write `fmt`, else why not (the test is skipped with that reason)."""
    plugins = imageio.register_plugins()
    if not plugins.get("HEIF" if fmt == "HEIF" else "AVIF"):
        return f"no {fmt} plugin here (pillow-heif / Pillow's AVIF)"
    try:
        Image.new("RGB", (16, 16), "red").save(io.BytesIO(), format=fmt)
    except (OSError, KeyError, ValueError) as exc:
        return f"the {fmt} plugin cannot encode here: {exc}"
    return None


def _photo(path: Path, i: int, fmt: str) -> Path:
    why = _can_encode(fmt)
    if why:
        pytest.skip(why)
    return draw_shape(path, i, fmt=fmt)


@pytest.mark.parametrize(("suffix", "fmt"), [(".heic", "HEIF"), (".heif", "HEIF"), (".avif", "AVIF")])
def test_phone_formats_decode_to_rgb(tmp_path: Path, suffix: str, fmt: str) -> None:
    path = _photo(tmp_path / f"p{suffix}", 3, fmt)
    assert suffix in imageio.IMAGE_SUFFIXES
    dec = imageio.open_image(path)
    assert dec.image.mode == "RGB" and (dec.width, dec.height) == (96, 72)
    assert imageio.probe_size(path.read_bytes()) == (96, 72)


def test_a_missing_plugin_is_named_not_called_not_an_image(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(imageio, "_plugins", {"HEIF": False, "AVIF": False})
    heic = b"\x00\x00\x00\x18ftypheic" + b"\x00" * 40
    avif = b"\x00\x00\x00\x18ftypavif" + b"\x00" * 40
    assert "pillow-heif" in (imageio._missing_decoder(heic) or "")
    assert "AVIF" in (imageio._missing_decoder(avif) or "")
    assert imageio._missing_decoder(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40) is None
    monkeypatch.setattr(imageio, "_plugins", {"HEIF": True, "AVIF": True})
    assert imageio._missing_decoder(heic) is None


def test_a_corrupt_heic_is_a_failure_with_a_reason(tmp_path: Path) -> None:
    good = _photo(tmp_path / "p.heic", 1, "HEIF").read_bytes()
    with pytest.raises(BadImage) as err:
        imageio.decode(good[: len(good) // 2])
    assert err.value.reason in (imageio.TRUNCATED, imageio.NOT_IMAGE)


def test_heic_and_avif_are_indexed_and_found(tmp_path: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "phone"
    make_folder(root, 6)
    heic = _photo(root / "IMG_0001.HEIC", 7, "HEIF")
    avif = _photo(root / "IMG_0002.avif", 9, "AVIF")
    col = Collection(tmp_path / "data")
    s = ingest(root, col, encoder, QUIET)
    assert s.accounts()
    assert (s.scanned, s.encoded, s.failed) == (8, 8, 0), s.to_dict()
    searcher = Searcher(col, encoder, col.store.load())
    for path in (heic, avif):
        img, _ = load_query_image(path)
        top = searcher.search(Query(image=img, top_k=1)).results[0]
        assert Path(top.path) == path and top.score == pytest.approx(1.0, abs=1e-4)
