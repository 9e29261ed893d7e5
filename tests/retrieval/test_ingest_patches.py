"""Indexing stores each new image's patch features from the pass that embeds it
(`IngestConfig.patch_features`), so the first query after `clearsight serve` draws its evidence boxes
from the store instead of running the image tower on every hit (issue 26: the first query within 2x a
warm one)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from retrieval import Collection, IngestConfig
from retrieval.encoders import Encoder
from retrieval.evidence import EvidenceConfig, EvidenceTarget, PatchStore
from retrieval.evidence.dense import PatchResult, iter_patches
from retrieval.ingest import ingest
from tests.helpers import make_folder

CFG = IngestConfig(batch_size=3, workers=2, progress=False, patch_features=True)


def test_each_new_content_gets_its_features_as_a_query_time_pass_makes_them(
    tmp_path: Path, encoder: Encoder
) -> None:
    photos = make_folder(tmp_path / "photos", 5)
    shutil.copy(photos[0], tmp_path / "photos" / "copy.png")  # identical content: one features file
    col = Collection(tmp_path / "data")
    summary = ingest(tmp_path / "photos", col, encoder, CFG)
    assert summary.encoded == 5 and summary.reused == 1 and summary.patches_stored == 5
    store = PatchStore(col.data_dir, encoder.info)
    records = col.catalog.iter_images("indexed")
    assert len(records) == 6
    assert store.stored_keys() == {r.content_hash for r in records}
    targets = [EvidenceTarget.from_row(r) for r in records]
    fresh = {
        r.target.key: r.patches
        for r in iter_patches(encoder, targets, EvidenceConfig())
        if isinstance(r, PatchResult)
    }
    for key, want in fresh.items():
        got = store.get(key)
        assert got is not None and got.shape == want.shape
        # int8 as stored, and the uint8 crop ingest encodes against the float one: the same features
        assert float((got * want).sum(axis=-1).min()) > 0.98


def test_a_rescan_writes_nothing_and_off_stores_nothing(tmp_path: Path, encoder: Encoder) -> None:
    make_folder(tmp_path / "photos", 3)
    col = Collection(tmp_path / "data")
    ingest(tmp_path / "photos", col, encoder, CFG)
    store = PatchStore(col.data_dir, encoder.info)
    stamps = {p: p.stat().st_mtime_ns for p in store.root.rglob("*.npy")}
    assert len(stamps) == 3
    again = ingest(tmp_path / "photos", col, encoder, CFG)
    assert again.encoded == 0
    assert {p: p.stat().st_mtime_ns for p in store.root.rglob("*.npy")} == stamps

    make_folder(tmp_path / "more", 2)
    other = Collection(tmp_path / "data-off")
    ingest(tmp_path / "more", other, encoder, IngestConfig(batch_size=3, workers=2, progress=False))
    assert not (other.data_dir / "patches").exists()


def test_embeddings_are_the_same_with_or_without_features(tmp_path: Path, encoder: Encoder) -> None:
    make_folder(tmp_path / "photos", 4)
    with_f, without = Collection(tmp_path / "a"), Collection(tmp_path / "b")
    ingest(tmp_path / "photos", with_f, encoder, CFG)
    ingest(tmp_path / "photos", without, encoder, IngestConfig(batch_size=3, workers=2, progress=False))
    fp = encoder.info.fingerprint
    hashes = [r.content_hash for r in with_f.catalog.iter_images("indexed")]
    a, b = with_f.catalog.get_embeddings(hashes, fp), without.catalog.get_embeddings(hashes, fp)
    for h in hashes:
        np.testing.assert_allclose(a[h], b[h], atol=1e-5)
