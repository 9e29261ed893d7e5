"""Index tuning: candidates measured against exact search, a recommendation, the plot, and applying it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from retrieval.collection import Collection
from retrieval.encoders import Encoder
from retrieval.errors import ConfigError, NotEnoughData
from retrieval.index.tuning import (
    apply_recommendation,
    candidates,
    save_plot,
    tune,
    tune_collection,
)
from retrieval.ingest import IngestConfig, ingest
from tests.helpers import make_folder


def _clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(32, dim))
    x = centres[rng.integers(0, 32, n)] + 0.3 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_tune_measures_every_kind_and_recommends(tmp_path: Path) -> None:
    x = _clustered(1500, 32)
    ids = np.arange(1500, dtype=np.int64)
    report = tune(ids, x, x[:60], query_source="images")
    kinds = {r.kind for r in report.rows}
    assert kinds == {"flat", "hnsw", "ivfpq", "ivf"}
    flat = next(r for r in report.rows if r.kind == "flat")
    assert flat.recall_at_10 == 1.0 and flat.bytes_per_vector >= 4 * 32
    ivf = [r for r in report.rows if r.kind == "ivf"]
    # more probes never lose recall; one probe of many lists loses some on clustered data
    assert [r.recall_at_10 for r in ivf] == sorted(r.recall_at_10 for r in ivf)
    pq = next(r for r in report.rows if r.kind == "ivfpq")
    assert pq.bytes_per_vector < flat.bytes_per_vector / 2  # codes plus the PQ codebook
    assert report.recommended.recall_at_10 >= report.target_recall
    assert all(r.p50_ms >= 0 and r.p99_ms >= r.p50_ms and r.build_s >= 0 for r in report.rows)
    out = json.loads(json.dumps(report.to_dict()))
    assert set(out["rows"][0]) >= {
        "index",
        "params",
        "recall@10",
        "p50_ms",
        "p99_ms",
        "bytes_per_vector",
        "build_s",
    }
    assert out["recommended"]["index"] == report.recommended.kind
    assert "recommended" in report.table()
    png = save_plot(report, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memory_budget_and_small_collections() -> None:
    cands, skipped = candidates(5000, 64, memory_budget=5000 * 100)
    assert {c.kind for c in cands} == {"ivfpq"}  # only compressed codes fit 100 bytes a vector
    assert any("memory budget" in s for s in skipped)
    cands, skipped = candidates(20, 64)
    assert {c.kind for c in cands} == {"flat", "hnsw"}
    assert any(s.startswith("ivf:") for s in skipped) and any(s.startswith("ivfpq:") for s in skipped)
    x = _clustered(20, 8)
    with pytest.raises(NotEnoughData):
        tune(np.arange(1, dtype=np.int64), x[:1], x[:1])
    with pytest.raises(ConfigError):
        tune(np.arange(20, dtype=np.int64), x, x, target_recall=0.0)


def test_tune_collection_and_apply(tmp_path: Path, encoder: Encoder) -> None:
    root = tmp_path / "imgs"
    make_folder(root, 24)
    col = Collection(tmp_path / "data")
    ingest(root, col, encoder, IngestConfig(progress=False))
    with pytest.raises(ConfigError):
        tune_collection(col, max_queries=0)
    report = tune_collection(col, max_queries=20)
    assert report.vectors == 24 and report.query_source == "images" and len(report.rows) >= 3
    hnsw = next(r for r in report.rows if r.kind == "hnsw" and r.params["ef_search"] == 64)
    apply_recommendation(col, encoder, hnsw)
    m = col.store.read_manifest()
    assert m.built_factory == hnsw.factory
    assert m.params.ef_search == 64 and m.params.hnsw_m == hnsw.params["hnsw_m"]
    col.close()


def test_captions_index_follows_the_images_kind(tmp_path: Path, encoder: Encoder) -> None:
    from retrieval.index.params import SearchParams
    from retrieval.index.sync import sync_indexes
    from retrieval.search import Query, Searcher

    root = tmp_path / "imgs"
    paths = make_folder(root, 6)
    (root / "captions.jsonl").write_text(
        "\n".join(
            json.dumps({"image": p.name, "captions": [f"shape {i}", f"picture {i}"]})
            for i, p in enumerate(paths)
        )
    )
    col = Collection(tmp_path / "data")
    ingest(root, col, encoder, IngestConfig(progress=False))
    sync_indexes(col, encoder, factory="HNSW16", force_rebuild=True, search=SearchParams(ef_search=48))
    m = col.store.read_manifest()
    assert m.built_factory == "HNSW16" and m.captions_factory == "HNSW16"
    assert m.captions_params.ef_search == 48 and m.captions_params.hnsw_m == 16
    s = Searcher.open(tmp_path / "data", encoder=encoder)
    r = s.search_captions(Query(text="shape 3", top_k=2))
    assert r.index_factory == "HNSW16" and len(r.results) == 2
    s.collection.close()  # not s.close(): that would close the session's shared encoder
    col.close()
