"""Issue 23: `/api/images/{id}` served whatever the indexed path held now, through symlinks, with
the photo's GPS location intact. Each test swaps a file the way an attacker or a user would."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from explainer.server import create_app
from explainer.server.originals import location_of
from retrieval import Collection, EncoderConfig, IngestConfig, create_encoder
from retrieval.ingest import ingest
from tests.server_kit import build_collection, server_settings

GPS = {1: "N", 2: (48.0, 51.0, 29.0), 3: "E", 4: (2.0, 17.0, 40.0)}


def _gps_jpeg(path: Path) -> None:
    exif = Image.Exif()
    exif[0x010F] = "TestCam"  # Make: kept
    exif[0x8769] = {0x9003: "2021:05:01 10:00:00"}  # DateTimeOriginal: kept
    exif[0x8825] = GPS
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path, quality=90, exif=exif.tobytes())


def _gps_png(path: Path) -> None:
    exif = Image.Exif()
    exif[0x8825] = GPS
    Image.new("RGB", (40, 30), (20, 30, 200)).save(path, exif=exif.tobytes())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("originals")
    data = build_collection(root, tiny_clip_dir, n=8)
    geo = root / "geo"
    geo.mkdir()
    _gps_jpeg(geo / "located.jpg")
    _gps_png(geo / "located.png")
    encoder = create_encoder(EncoderConfig(model=str(tiny_clip_dir), device="cpu"))
    with Collection(data) as collection:
        ingest(geo, collection, encoder, IngestConfig(batch_size=2, progress=False))
    encoder.close()
    return data


def _records(data_dir: Path) -> dict[str, tuple[int, Path]]:
    with Collection(data_dir) as col:
        return {Path(r.path).name: (r.id, Path(r.path)) for r in col.catalog.iter_images("indexed")}


@pytest.fixture(scope="module")
def client(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = server_settings(data_dir, tmp_path_factory.mktemp("orig-state"), explain_burst=1000)
    with TestClient(create_app(settings)) as c:
        yield c


def test_an_unchanged_original_is_served_as_it_is(client: TestClient, data_dir: Path) -> None:
    image_id, path = _records(data_dir)["img_0000.jpg"]
    resp = client.get(f"/api/images/{image_id}")
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/jpeg"
    assert resp.content == path.read_bytes()
    assert "private" in resp.headers["cache-control"]


@pytest.mark.parametrize("target", ["/etc/passwd", "secret"])
def test_a_symlink_swapped_in_is_not_followed(
    client: TestClient, data_dir: Path, tmp_path: Path, target: str
) -> None:
    """`rm pic.jpg; ln -s /etc/passwd pic.jpg`, or a link to a text file beside the photos."""
    name = "img_0001.jpg" if target == "secret" else "img_0002.jpg"
    image_id, path = _records(data_dir)[name]
    secret = tmp_path / "secret.txt"
    secret.write_text("API_KEY=not-an-image\n")
    path.unlink()
    path.symlink_to(secret if target == "secret" else Path(target))
    resp = client.get(f"/api/images/{image_id}")
    assert resp.status_code == 404, resp.text
    assert b"API_KEY" not in resp.content and b"root:" not in resp.content
    assert "changed on disk" in resp.json()["error"]["message"]
    assert str(tmp_path) not in resp.text and "/etc" not in resp.text
    state = client.app.state.clearsight  # type: ignore[attr-defined]
    assert image_id in state.stale_images  # marked stale
    for route in (f"/api/images/{image_id}/thumb", f"/api/images/{image_id}/evidence.png?q=red"):
        assert client.get(route).status_code == 404


def test_another_photo_or_a_text_file_swapped_in_is_not_served(client: TestClient, data_dir: Path) -> None:
    recs = _records(data_dir)
    photo_id, photo = recs["img_0003.jpg"]
    shutil.copyfile(recs["img_0005.jpg"][1], photo)  # a real, decodable image, just not this one
    assert client.get(f"/api/images/{photo_id}").status_code == 404
    assert client.get(f"/api/images/{photo_id}/thumb?size=96").status_code == 404  # no poisoned thumbnail
    text_id, text = recs["img_0004.jpg"]
    size = text.stat().st_size
    text.write_bytes(b"x" * size)  # same size, same name: the content hash tells
    os.utime(text, ns=(0, 0))
    assert client.get(f"/api/images/{text_id}").status_code == 404


def test_a_symlink_to_a_file_outside_the_indexed_folders_is_refused(
    client: TestClient, data_dir: Path, tmp_path: Path
) -> None:
    """Even a byte-identical copy outside every indexed folder: the server reads only inside them."""
    image_id, path = _records(data_dir)["img_0006.jpg"]
    outside = tmp_path / "copy.jpg"
    shutil.copyfile(path, outside)
    path.unlink()
    path.symlink_to(outside)
    resp = client.get(f"/api/images/{image_id}")
    assert resp.status_code == 404 and "outside the indexed folders" in resp.json()["error"]["message"]


def test_location_is_kept_on_loopback_by_default(client: TestClient, data_dir: Path) -> None:
    image_id, path = _records(data_dir)["located.jpg"]
    resp = client.get(f"/api/images/{image_id}")
    assert resp.status_code == 200 and resp.content == path.read_bytes()
    assert location_of(resp.content)


def test_location_is_stripped_when_asked_and_the_picture_is_untouched(data_dir: Path, tmp_path: Path) -> None:
    recs = _records(data_dir)
    settings = server_settings(data_dir, tmp_path, strip_location=True)
    with TestClient(create_app(settings)) as c:
        jpeg_id, jpeg = recs["located.jpg"]
        resp = c.get(f"/api/images/{jpeg_id}")
        assert resp.status_code == 200 and resp.headers["content-type"] == "image/jpeg"
        assert int(resp.headers["content-length"]) == len(resp.content)
        assert not location_of(resp.content)
        with Image.open(io.BytesIO(resp.content)) as im:
            exif = im.getexif()
            assert exif[0x010F] == "TestCam"  # the rest of the metadata stays
            assert exif.get_ifd(0x8769)[0x9003] == "2021:05:01 10:00:00"
        scan = jpeg.read_bytes().index(b"\xff\xda")
        assert resp.content.endswith(jpeg.read_bytes()[scan:])  # the picture's bytes pass through
        png_id, _ = recs["located.png"]
        resp = c.get(f"/api/images/{png_id}")
        assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
        assert not location_of(resp.content)
        plain_id, plain = recs["img_0007.jpg"]
        assert c.get(f"/api/images/{plain_id}").content == plain.read_bytes()  # nothing to strip


def test_location_is_stripped_by_default_beyond_loopback(data_dir: Path, tmp_path: Path) -> None:
    token = "a-token-for-the-public-bind-0123456789"
    settings = server_settings(data_dir, tmp_path, host="0.0.0.0", api_token=token)
    with TestClient(create_app(settings)) as c:
        image_id, _ = _records(data_dir)["located.jpg"]
        resp = c.get(f"/api/images/{image_id}", headers={"Authorization": f"Bearer {token}"})
        assert resp.status_code == 200 and not location_of(resp.content)
    keep = server_settings(data_dir, tmp_path, host="0.0.0.0", api_token=token, strip_location=False)
    with TestClient(create_app(keep)) as c:
        resp = c.get(f"/api/images/{image_id}", headers={"Authorization": f"Bearer {token}"})
        assert resp.status_code == 200 and location_of(resp.content)
