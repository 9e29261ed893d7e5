"""Issue 23: a running server kept serving the old index after `index --rebuild --model other`, with
`/api/health` "ok" and only a log warning per reload check. It now switches to the new index, or,
when the new one cannot be loaded here, says on the page and in health that it is stale and why."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from explainer.errors import IndexMismatch
from explainer.server import create_app
from retrieval import Collection, EncoderConfig, IngestConfig, create_encoder
from retrieval.ingest import ingest
from tests.server_kit import build_collection, server_settings


def _rebuild(data: Path, images: Path, model: Path) -> None:
    """What `clearsight index IMAGES --rebuild --model MODEL` does to the collection."""
    encoder = create_encoder(EncoderConfig(model=str(model), device="cpu"))
    with Collection(data) as collection:
        ingest(images, collection, encoder, IngestConfig(batch_size=8, progress=False, rebuild=True))
    encoder.close()


def test_a_rebuild_with_another_model_is_switched_to(
    tmp_path: Path, tiny_clip_dir: Path, other_clip_dir: Path
) -> None:
    data = build_collection(tmp_path / "c", tiny_clip_dir, n=4)
    settings = server_settings(data, tmp_path, reload_interval_s=0.1)
    with TestClient(create_app(settings)) as c:
        state = c.app.state.clearsight  # type: ignore[attr-defined]
        before = c.get("/api/health").json()["index"]["version"]
        old_fingerprint = state.pipeline.searcher.encoder.info.fingerprint
        _rebuild(data, tmp_path / "c" / "images", other_clip_dir)
        deadline = time.monotonic() + 120  # a bound on waiting, not an assertion on speed
        while time.monotonic() < deadline:
            health = c.get("/api/health").json()
            if health["index"]["version"] != before:
                break
            time.sleep(0.1)
        assert health["status"] == "ok" and health["index"]["version"] != before, health
        assert state.pipeline.searcher.encoder.info.fingerprint != old_fingerprint
        resp = c.post("/api/search", json={"text": "a red square", "top_k": 2})
        assert resp.status_code == 200 and len(resp.json()["results"]) == 2


def test_a_rebuild_that_cannot_be_loaded_is_said_to_be_stale(
    tmp_path: Path, tiny_clip_dir: Path, other_clip_dir: Path
) -> None:
    data = build_collection(tmp_path / "c", tiny_clip_dir, n=4)
    gone = tmp_path / "model-since-removed"
    shutil.copytree(other_clip_dir, gone)
    with TestClient(create_app(server_settings(data, tmp_path))) as c:
        state = c.app.state.clearsight  # type: ignore[attr-defined]
        assert c.get("/api/health").json()["status"] == "ok"
        _rebuild(data, tmp_path / "c" / "images", gone)
        shutil.rmtree(gone)  # the new index's model is not on this machine any more
        with pytest.raises(IndexMismatch) as caught:
            state.pipeline.reload()  # what the reload loop runs, and then:
        state.switch_index(str(caught.value))
        health = c.get("/api/health").json()
        assert health["status"] == "stale" and "restart" in health["reason"], health
        assert str(tmp_path) not in health["reason"]
        page = c.get("/?q=red")
        assert page.status_code == 200 and "Serving an older index" in page.text
        assert c.post("/api/search", json={"text": "red", "top_k": 2}).status_code == 200  # still answers
