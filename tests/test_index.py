from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from retrieval import index as index_mod
from retrieval.catalog import _MIGRATIONS, SCHEMA_VERSION, Catalog
from retrieval.encoders import l2_normalise
from retrieval.errors import ConfigError, IndexCorrupt, IndexMismatch, IndexMissing, ShapeError
from retrieval.index import (
    IVFPQ_MIN_VECTORS,
    IndexStore,
    Manifest,
    VectorIndex,
    check_vectors,
    resolve_factory,
)


def _vecs(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    return l2_normalise(np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32))


def _manifest(n: int, fp: str = "fp-a", factory: str = "flat") -> Manifest:
    return Manifest("m", "/m", fp, 16, factory, "Flat", n)


def test_check_vectors_explains_what_is_wrong() -> None:
    v = _vecs(3)
    with pytest.raises(ShapeError, match=r"shape \(n, 16\)"):
        check_vectors(v[:, :8], 16)
    with pytest.raises(ShapeError, match="float32"):
        check_vectors(v.astype(np.float64), 16)
    with pytest.raises(ShapeError, match="L2-normalised"):
        check_vectors(v * 2, 16)
    bad = v.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ShapeError, match="NaN"):
        check_vectors(bad, 16)


@pytest.mark.parametrize("factory", ["flat", "hnsw", "ivfpq"])
def test_each_factory_finds_exact_neighbours_of_stored_vectors(factory: str) -> None:
    n = 3000
    v = _vecs(n, 32)
    built, note = resolve_factory(factory, n, 32)
    idx = VectorIndex.build(np.arange(1000, 1000 + n), v, built, 32)
    scores, ids = idx.search(v[:50], 5)
    # the query vector itself comes first (PQ is lossy: allow a small miss rate)
    hit = (ids[:, 0] == np.arange(1000, 1050)).mean()
    assert hit >= (0.9 if factory == "ivfpq" else 1.0)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    assert note == ""


def test_ivfpq_waits_for_enough_vectors_with_a_message() -> None:
    built, note = resolve_factory("ivfpq", IVFPQ_MIN_VECTORS - 1, 64)
    assert built == "Flat" and "at least" in note and "IVF-PQ" in note
    built, _ = resolve_factory("ivfpq", 50_000, 64)
    assert built.startswith("IVF") and ",PQ" in built
    built, note = resolve_factory("IVF256,Flat", 100, 64)
    assert built == "Flat" and "9984" in note
    with pytest.raises(ConfigError, match="FAISS cannot build"):
        resolve_factory("NotAFactory", 10, 64)


def test_remove_and_add_keep_ids() -> None:
    v = _vecs(10)
    idx = VectorIndex.build(np.arange(10), v, "Flat", 16)
    idx.remove(np.array([3, 4]))
    idx.add(np.array([42]), v[3:4])
    assert sorted(idx.ids().tolist()) == [0, 1, 2, 5, 6, 7, 8, 9, 42]
    _, ids = idx.search(v[3:4], 1)
    assert ids[0, 0] == 42


def test_top_k_larger_than_the_index() -> None:
    idx = VectorIndex.build(np.arange(3), _vecs(3), "Flat", 16)
    _, ids = idx.search(_vecs(1, seed=5), 100)
    assert ids.shape == (1, 3)


def test_store_saves_versions_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = IndexStore(tmp_path / "index")
    with pytest.raises(IndexMissing, match="clearsight index"):
        store.load()
    v = _vecs(5)
    first = store.save(
        _manifest(5),
        VectorIndex.build(np.arange(5), v, "Flat", 16),
        VectorIndex.build(np.arange(0), v[:0], "Flat", 16),
    )

    # a crash between writing the new version and switching CURRENT leaves the old one live
    def boom(*a: object, **k: object) -> None:
        raise OSError("disk vanished")

    monkeypatch.setattr(index_mod.os, "replace", boom)
    with pytest.raises(OSError):
        store.save(
            _manifest(3),
            VectorIndex.build(np.arange(3), v[:3], "Flat", 16),
            VectorIndex.build(np.arange(0), v[:0], "Flat", 16),
        )
    monkeypatch.undo()
    loaded = store.load()
    assert loaded.version == first and loaded.images.ntotal == 5
    assert not list((tmp_path / "index").glob(".tmp-*"))


def test_store_refuses_another_model_and_future_schema(tmp_path: Path) -> None:
    store = IndexStore(tmp_path / "index")
    v = _vecs(2)
    store.save(
        _manifest(2),
        VectorIndex.build(np.arange(2), v, "Flat", 16),
        VectorIndex.build(np.arange(0), v[:0], "Flat", 16),
    )
    with pytest.raises(IndexMismatch, match="built with model"):
        store.load(expect_fingerprint="fp-b", expect_model="other")
    version = store.current_version()
    mf = tmp_path / "index" / str(version) / "manifest.json"
    mf.write_text(mf.read_text().replace('"schema_version": 1', '"schema_version": 99'))
    with pytest.raises(IndexMismatch, match="upgrade"):
        store.load()
    mf.write_text("{not json")
    with pytest.raises(IndexCorrupt):
        store.load()


def test_catalog_migrates_an_old_schema(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    db = sqlite3.connect(path)
    db.executescript(_MIGRATIONS[0] + "PRAGMA user_version=1;")
    db.execute("INSERT INTO images(path, state, updated_at) VALUES ('/a.jpg', 'pending', 0)")
    db.commit()
    db.close()
    cat = Catalog(path)
    assert cat.schema_version == SCHEMA_VERSION
    assert cat.image_by_path("/a.jpg") is not None  # data survives the migration
    cat.put_generated_captions("blip", {"h": "a cat"})
    assert cat.get_generated_captions(["h"], "blip") == {"h": "a cat"}


def test_catalog_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(IndexCorrupt, match="upgrade"):
        Catalog(path)


def test_catalog_uses_wal(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "c.sqlite")
    with cat.transaction() as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
