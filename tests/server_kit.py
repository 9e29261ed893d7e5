"""Shared pieces of the server tests: a small indexed collection, settings that read nothing from
the developer's machine, and stand-ins for a failing model and for deterministic search/evidence."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image

from explainer.settings import Settings
from retrieval import Collection, EncoderConfig, IngestConfig, create_encoder
from retrieval.evidence import Evidence
from retrieval.ingest import ingest
from retrieval.search import Hit, Query, Searcher, SearchResult
from retrieval.types import Float32Array, Region
from tests.helpers import make_folder, write_captions

#: Generated captions are attached under this source, as `clearsight caption` does.
GENERATED_SOURCE = "generated:tiny-blip"


def build_collection(root: Path, clip_dir: Path, n: int = 12) -> Path:
    """Index `n` synthetic images with dataset captions; the first third also get a generated caption."""
    images = root / "images"
    paths = make_folder(images, n)
    write_captions(images, paths)
    data = root / "data"
    encoder = create_encoder(EncoderConfig(model=str(clip_dir), device="cpu", precision="fp32"))
    with Collection(data) as collection:
        ingest(images, collection, encoder, IngestConfig(batch_size=8, progress=False))
        for rec in collection.catalog.iter_images("indexed")[: n // 3]:
            caps = collection.catalog.captions_for([rec.id]).get(rec.id, [])
            text = f"a picture of {caps[0].text[2:]}" if caps else "a picture"
            collection.catalog.set_captions(rec.id, GENERATED_SOURCE, [text])
    encoder.close()
    return data


def server_settings(data_dir: Path, tmp: Path, **overrides: Any) -> Settings:
    """Settings for a test server: offline explainer, no reload loop, nothing read from a .env."""
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "thumb_dir": tmp / "thumbs",
        "explain_backend": "offline",
        "reload_interval_s": 0.0,
        "explain_max_retries": 0,
        "explain_timeout_s": 5.0,
        "allowed_hosts": ["testserver"],  # the Host name TestClient sends
        # no background fill: pages and answers stay as they are while a test runs (see test_patch_worker)
        "patch_features": "off",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


class FailingSearcher(Searcher):
    """A searcher whose model breaks at query time, as a crashed or unloadable model would."""

    def embed_query(self, q: Query) -> Float32Array:
        raise RuntimeError("simulated model failure")


class FixedSearcher(Searcher):
    """Returns the indexed images in id order with fixed scores, whatever the query: stable page snapshots."""

    def search_vector(self, vec: Float32Array, q: Query, kind: str = "vector") -> SearchResult:
        catalog = self.collection.catalog
        records = catalog.iter_images("indexed")
        caps = catalog.captions_for([r.id for r in records])
        hits = [
            Hit.from_record(
                r,
                0.9 - 0.05 * i,
                i + 1,
                relative_path=catalog.relative_path(r.path),
                captions=[c.text for c in caps.get(r.id, [])],
            )
            for i, r in enumerate(records)
        ]
        page = hits[q.offset : q.offset + q.top_k]
        more = len(hits) > q.offset + q.top_k
        return SearchResult(kind, "tiny-clip", "Flat", len(records), page, has_more=more)


class FixedEvidence:
    """One box in the top-left quarter and one in the centre of every image."""

    name = "fixed"

    max_regions = 2

    def for_hits(
        self,
        searcher: Searcher,
        query: Query,
        hits: Sequence[Hit],
        query_vec: Float32Array | None = None,
    ) -> list[Evidence | None]:
        out: list[Evidence | None] = []
        for h in hits:
            w, ht = h.width or 4, h.height or 4
            regions = (
                Region(box=(0, 0, w // 2, ht // 2), score=0.5, rank=1, label="top-left"),
                Region(box=(w // 4, ht // 4, 3 * w // 4, 3 * ht // 4), score=0.4, rank=2, label="centre"),
            )
            out.append(Evidence(h.id, regions, "fixed", (w, ht)))
        return out

    def render(
        self,
        searcher: Searcher,
        query: Query,
        hit: Hit,
        image: Image.Image,
        query_vec: Float32Array | None = None,
    ) -> Image.Image | None:
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """`app` on a real uvicorn server on a free loopback port, in a thread, for as long as the block runs:
    its base URL (browser tests need a real socket, not FastAPI's TestClient)."""
    import pytest
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
