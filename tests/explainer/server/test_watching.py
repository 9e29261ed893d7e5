"""`serve --watch`: a photo copied into an indexed folder becomes searchable with no other command run."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from fastapi.testclient import TestClient

from explainer.server import create_app
from tests.helpers import draw_shape
from tests.server_kit import build_collection, server_settings


def test_a_new_photo_in_a_watched_folder_becomes_searchable(tmp_path: Path, tiny_clip_dir: Path) -> None:
    data = build_collection(tmp_path, tiny_clip_dir, n=6)
    settings = server_settings(data, tmp_path, watch=True, reload_interval_s=0.2)
    with TestClient(create_app(settings)) as client:
        before = client.post("/api/search", json={"text": "a shape", "top_k": 50}).json()
        assert len(before["results"]) == 6
        time.sleep(0.5)  # the watcher starts with the app; give it a moment to follow the folder
        draw_shape(tmp_path / "images" / "added-later.jpg", 40)
        deadline, names = time.monotonic() + 60, set()
        while "added-later.jpg" not in names and time.monotonic() < deadline:
            time.sleep(0.3)
            body = client.post("/api/search", json={"text": "a shape", "top_k": 50}).json()
            names = {r["file_name"] for r in body["results"]}
        assert "added-later.jpg" in names and len(names) == 7
        shutil.rmtree(tmp_path / "images")  # the folder goes away: the server keeps serving
        assert client.get("/api/health").status_code == 200


def test_watching_is_off_by_default(tmp_path: Path, tiny_clip_dir: Path) -> None:
    data = build_collection(tmp_path, tiny_clip_dir, n=3)
    with TestClient(create_app(server_settings(data, tmp_path, reload_interval_s=0.2))) as client:
        draw_shape(tmp_path / "images" / "unwatched.jpg", 41)
        time.sleep(2.5)  # longer than a watch batch and a reload would take
        body = client.post("/api/search", json={"text": "a shape", "top_k": 50}).json()
        assert "unwatched.jpg" not in {r["file_name"] for r in body["results"]}
