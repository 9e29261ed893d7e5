"""Where the file is: a loopback server's detail view offers the file's absolute path to copy; a server
shared beyond loopback names files only relative to the indexed folder, as it did before."""

from __future__ import annotations

import html
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from explainer.server import create_app
from retrieval import Collection
from tests.server_kit import build_collection, server_settings

TOKEN = "copy-path-token-0123456789"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path) -> Path:
    return build_collection(tmp_path_factory.mktemp("copy-path"), tiny_clip_dir, n=3)


def _first(data_dir: Path) -> tuple[int, str]:
    with Collection(data_dir, create=False) as col:
        rec = col.catalog.iter_images("indexed")[0]
    return rec.id, rec.path


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_a_loopback_server_offers_the_path_to_copy(data_dir: Path, tmp_path: Path, host: str) -> None:
    image_id, path = _first(data_dir)
    with TestClient(create_app(server_settings(data_dir, tmp_path, host=host))) as c:
        page = c.get(f"/images/{image_id}")
    assert page.status_code == 200
    text = html.unescape(page.text)
    assert f'id="file-path" type="text" value="{path}" readonly' in text  # the fallback: a visible field
    assert 'id="copy-path" hidden>Copy path</button>' in text  # shown by app.js where the Clipboard API is
    assert Path(path).is_file()


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::"])
def test_a_shared_server_shows_no_path(data_dir: Path, tmp_path: Path, host: str) -> None:
    image_id, path = _first(data_dir)
    settings = server_settings(data_dir, tmp_path, host=host, api_token=TOKEN)
    with TestClient(create_app(settings)) as c:
        page = c.get(f"/images/{image_id}", headers={"Authorization": f"Bearer {TOKEN}"})
    assert page.status_code == 200
    assert "file-path" not in page.text and "copy-path" not in page.text
    assert path not in html.unescape(page.text) and str(data_dir.parent) not in page.text
    assert Path(path).name in page.text  # still named, relative to the indexed folder
