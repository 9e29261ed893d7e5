from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from explainer.cli.index import print_summary
from explainer.errors import cli_message
from retrieval import Collection, IngestConfig, Query, Searcher, load_query_image
from retrieval import imageio as imageio_mod
from retrieval.catalog import ImageRecord
from retrieval.encoders import Encoder, EncoderConfig, create_encoder
from retrieval.errors import BadImage, BadQuery, ConfigError, IndexMismatch
from retrieval.index.sync import SyncReport
from retrieval.ingest import Committer, IngestSummary, _encode_all, ingest
from tests.helpers import draw_shape, make_folder

QUIET = IngestConfig(batch_size=4, workers=2, progress=False)


def _zoo(root: Path) -> tuple[list[Path], dict[str, str]]:
    """Valid but awkward files, and bad files with the reason each must be recorded with."""
    good = make_folder(root / "plain", 6)
    Image.new("RGBA", (40, 30), (255, 0, 0, 100)).save(root / "rgba.png")
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(root / "cmyk.jpg")
    Image.new("I;16", (40, 30), 40000).save(root / "sixteen.png")
    Image.new("P", (40, 30), 5).save(root / "palette.png")
    frames = [Image.new("P", (30, 30), i) for i in (1, 9)]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:])
    im = Image.new("RGB", (50, 30), "blue")
    exif = Image.Exif()
    exif[0x0112] = 8
    im.save(root / "rotated.jpg", exif=exif.tobytes())
    draw_shape(root / "ünïcødé фото.png", 99)
    Image.new("RGB", (30, 30), "green").save(root / "x.webp")
    Image.new("RGB", (30, 30), "green").save(root / "x.bmp")
    Image.new("RGB", (30, 30), "green").save(root / "x.tiff")
    good += [
        root / n
        for n in (
            "rgba.png",
            "cmyk.jpg",
            "sixteen.png",
            "palette.png",
            "anim.gif",
            "rotated.jpg",
            "ünïcødé фото.png",
            "x.webp",
            "x.bmp",
            "x.tiff",
        )
    ]
    (root / "zero.jpg").write_bytes(b"")
    (root / "text.png").write_text("hello, not a picture")
    raw = (root / "plain" / "img_0000.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(raw[: len(raw) // 3])
    (root / "broken.jpg").symlink_to(root / "nowhere.jpg")
    (root / "plain" / "loop").symlink_to(root)  # a directory symlink loop
    Image.new("L", (400, 400)).save(root / "bomb.png")
    (root / "unreadable.jpg").write_bytes(raw)
    (root / "notes.txt").write_text("ignored: not an image suffix")
    bad = {
        "zero.jpg": imageio_mod.EMPTY,
        "text.png": imageio_mod.NOT_IMAGE,
        "truncated.jpg": imageio_mod.TRUNCATED,
        "broken.jpg": imageio_mod.BROKEN_LINK,
        "bomb.png": imageio_mod.BOMB,
        "unreadable.jpg": imageio_mod.UNREADABLE,
    }
    return good, bad


def test_zoo_is_indexed_and_bad_files_recorded(
    tmp_path: Path, encoder, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "photos"
    good, bad = _zoo(root)
    real_read = imageio_mod.read_bytes

    def read(path: Path, *args: int) -> bytes:  # root can read any file, so permission loss is simulated
        if path.name == "unreadable.jpg":
            raise BadImage(imageio_mod.UNREADABLE, "Permission denied")
        return real_read(path, *args)

    monkeypatch.setattr(imageio_mod, "read_bytes", read)
    col = Collection(tmp_path / "data")
    s = ingest(root, col, encoder, IngestConfig(batch_size=4, progress=False, max_pixels=100_000))
    assert s.failed == len(bad)
    assert s.failures == {r: list(bad.values()).count(r) for r in set(bad.values())}
    failures = {Path(p).name: r for p, r in col.catalog.failures()}
    assert failures == bad
    indexed = {Path(r.path).name for r in col.catalog.iter_images("indexed")}
    assert indexed == {p.name for p in good}
    assert s.index is not None and s.index.images == len(good)
    rot = col.catalog.image_by_path(str(root / "rotated.jpg"))
    assert rot is not None and (rot.width, rot.height) == (30, 50)  # EXIF orientation applied to sizes


def test_incremental_added_changed_deleted(tmp_path: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "photos"
    files = make_folder(root, 8)
    col = Collection(tmp_path / "data")
    s1 = ingest(root, col, encoder, QUIET)
    assert (s1.new, s1.encoded) == (8, 8)
    s2 = ingest(root, col, encoder, QUIET)
    assert (s2.unchanged, s2.encoded, s2.index.saved_version if s2.index else "x") == (8, 0, None)
    make_folder(root, 2, start=100)  # added
    draw_shape(files[0], 55, size=(90, 90))  # changed
    os.utime(files[0], ns=(1, 1))
    files[1].unlink()  # deleted
    before = col.catalog.image_by_path(str(files[0]))
    s3 = ingest(root, col, encoder, QUIET)
    assert (s3.new, s3.changed, s3.deleted, s3.encoded) == (2, 1, 1, 3)
    assert s1.accounts() and s2.accounts() and s3.accounts()
    after = col.catalog.image_by_path(str(files[0]))
    assert before and after and before.id != after.id and before.content_hash != after.content_hash
    loaded = col.store.load()
    assert set(loaded.images.ids().tolist()) == col.catalog.indexed_ids()
    assert loaded.images.ntotal == 9
    # the changed file's vector is the new content's
    vec = loaded.images.reconstruct(after.id)
    expect = encoder.encode_images([load_query_image(files[0])[0]])[0]
    np.testing.assert_allclose(vec, expect, atol=1e-4)


def test_identical_content_is_encoded_once(tmp_path: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "photos"
    files = make_folder(root, 3)
    for k in range(4):
        shutil.copy(files[0], root / f"copy_{k}.jpg")
    col = Collection(tmp_path / "data")
    s = ingest(root, col, encoder, QUIET)
    assert s.encoded == 3 and s.reused == 4
    assert col.catalog.counts()["indexed"] == 7
    ids = col.store.load().images.ids()
    assert len(ids) == 7


def test_other_model_is_refused_unless_rebuild(tmp_path: Path, encoder, other_clip_dir: Path) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "photos"
    make_folder(root, 4)
    col = Collection(tmp_path / "data")
    ingest(root, col, encoder, QUIET)
    other = create_encoder(EncoderConfig(model=str(other_clip_dir), device="cpu", precision="fp32"))
    with pytest.raises(IndexMismatch) as refused:
        ingest(root, col, other, QUIET)
    # the library names the remedy; the CLI words it with its flags
    assert refused.value.remedy == "other_data_dir" and "--rebuild" in cli_message(refused.value)
    with pytest.raises(IndexMismatch) as mismatch:
        Searcher.open(col.data_dir, model=str(other_clip_dir))
    assert "without --model" in cli_message(mismatch.value) and "--" not in str(mismatch.value)
    s = ingest(root, col, other, IngestConfig(batch_size=4, progress=False, rebuild=True))
    assert s.encoded == 4
    assert col.store.read_manifest().fingerprint == other.info.fingerprint


def test_counts_add_up_after_a_run_that_stopped_midway(tmp_path: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    """Issue 23: after a crash the summary said "0 new, 0 changed, 0 unchanged; encoded 56"."""
    root = tmp_path / "photos"
    make_folder(root, 10)
    (root / "bad.jpg").write_bytes(b"")
    col = Collection(tmp_path / "data")

    def stops_after_four(recs: list[ImageRecord], com: Committer) -> None:  # as a run killed mid-way
        _encode_all(encoder, recs[:4], QUIET, com)

    first = ingest(root, col, encoder, QUIET, encode_stage=stops_after_four)  # bad.jpg sorts first
    outcome = (first.scanned, first.new, first.encoded, first.failed_now, first.left_pending)
    assert outcome == (11, 11, 3, 1, 7)
    assert first.accounts()
    second = ingest(root, col, encoder, QUIET)
    assert (second.scanned, second.unchanged, second.resumed, second.new) == (11, 4, 7, 0)
    assert (second.todo, second.encoded, second.failed_now, second.left_pending) == (7, 7, 0, 0)
    assert second.accounts() and second.failed == 1  # the bad file, failed in the first run
    lines = _summary_lines(second)
    assert lines[0].startswith(
        "scanned 11 files: 0 new, 0 changed, 4 unchanged, 7 pending from an earlier run"
    )
    assert lines[1].startswith("to do 7: 7 encoded")


def _summary_lines(summary: IngestSummary) -> list[str]:
    """What `clearsight index` prints for a summary."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        print_summary(summary, None, Path("data"), json_out=False)
    return out.getvalue().splitlines()


def test_bad_caption_lines_are_skipped_and_reported(tmp_path: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    """Issue 23: one bad line of captions.jsonl aborted the whole index; now it costs only its captions."""
    root = tmp_path / "photos"
    files = make_folder(root, 4)
    good = [json.dumps({"image": f.name, "captions": [f"shape {i}"]}) for i, f in enumerate(files)]
    lines = [
        good[0],
        "{not json",
        good[1],
        '{"image": "img_0002.jpg"}',
        "",
        good[3],
        '{"image": 5, "captions": []}',
    ]
    (root / "captions.jsonl").write_bytes("\n".join(lines).encode() + b"\n\xff\xfe{}\n")
    col = Collection(tmp_path / "data")
    s = ingest(root, col, encoder, QUIET)
    assert (s.encoded, s.captioned, col.catalog.counts()["indexed"]) == (4, 3, 4)
    where = str(root / "captions.jsonl")
    assert [e.split(": ")[0] for e in s.caption_errors] == [f"{where}:{n}" for n in (2, 4, 7, 8)]
    assert "not JSON" in s.caption_errors[0] and "'captions'" in s.caption_errors[1]
    assert "not UTF-8" in s.caption_errors[3]
    printed = "\n".join(_summary_lines(s))
    assert "captions: 4 lines skipped" in printed and f"{where}:4:" in printed


def test_a_first_run_stopped_before_its_index_keeps_its_model(  # type: ignore[no-untyped-def]
    tmp_path: Path, encoder, other_clip_dir: Path
) -> None:
    """Issue 23: killed before its first index was written, a run left nothing naming its model."""
    root = tmp_path / "photos"
    make_folder(root, 4)
    col = Collection(tmp_path / "data")

    def killed(*_: object) -> SyncReport:
        raise KeyboardInterrupt  # stands for the kill: the vectors are committed, no index is written

    with pytest.raises(KeyboardInterrupt):
        ingest(root, col, encoder, QUIET, sync=killed)
    assert not col.store.exists() and col.catalog.counts()["indexed"] == 4
    assert col.catalog.indexing_model() == (encoder.info.model_id, encoder.info.fingerprint)
    other = create_encoder(EncoderConfig(model=str(other_clip_dir), device="cpu"))
    with pytest.raises(IndexMismatch, match="being indexed with"):
        ingest(root, col, other, QUIET)
    s = ingest(root, col, encoder, QUIET)  # the same model resumes, with nothing left to encode
    assert (s.unchanged, s.encoded) == (4, 0) and col.store.read_manifest().model_id == encoder.info.model_id


def test_a_catalog_from_before_the_model_record_opens_and_knows_no_model(tmp_path: Path) -> None:
    """Catalogs written before runs recorded their model (or holding a damaged record) read as None:
    `clearsight index` then keeps its old behaviour (the index's model, else the default)."""
    col = Collection(tmp_path / "data")
    assert col.catalog.indexing_model() is None
    for junk in ("not json", '["a", "b"]', '{"id": "x"}', '{"id": 1, "fingerprint": "f"}'):
        col.catalog.set_meta("model", junk)
        assert col.catalog.indexing_model() is None
    col.catalog.set_indexing_model("/models/clip", "fp1")
    assert col.catalog.indexing_model() == ("/models/clip", "fp1")


def test_bad_roots(tmp_path: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    col = Collection(tmp_path / "data")
    with pytest.raises(ConfigError, match="does not exist"):
        ingest(tmp_path / "missing", col, encoder, QUIET)
    f = tmp_path / "f.jpg"
    f.write_bytes(b"x")
    with pytest.raises(ConfigError, match="not a directory"):
        ingest(f, col, encoder, QUIET)


def test_search_modes(tmp_path: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "photos"
    files = make_folder(root, 12)
    (root / "captions.jsonl").write_text(
        "\n".join(
            f'{{"image": "{p.name}", "captions": ["picture number {i}", "shape {i}"]}}'
            for i, p in enumerate(files)
        )
    )
    col = Collection(tmp_path / "data")
    s = ingest(root, col, encoder, QUIET)
    assert s.index is not None and s.index.captions == 24
    searcher = Searcher(col, encoder, col.store.load())
    img, _ = load_query_image(files[3])
    r = searcher.search(Query(image=img, top_k=3))
    assert Path(r.results[0].path) == files[3] and r.results[0].score == pytest.approx(1.0, abs=1e-4)
    assert [h.rank for h in r.results] == [1, 2, 3]
    full = searcher.search(Query(text="a red square", top_k=12))
    page = searcher.search(Query(text="a red square", top_k=4, offset=4))
    assert [h.id for h in page.results] == [h.id for h in full.results[4:8]]
    assert [h.rank for h in page.results] == [5, 6, 7, 8]
    cut = full.results[5].score
    assert all(
        h.score >= cut for h in searcher.search(Query(text="a red square", top_k=12, min_score=cut)).results
    )
    # hybrid at weight 1 is the text query, at weight 0 the image query
    t_only = searcher.search(Query(text="a red square", top_k=5))
    h1 = searcher.search(Query(text="a red square", image=img, weight=1.0, top_k=5))
    h0 = searcher.search(Query(text="a red square", image=img, weight=0.0, top_k=5))
    assert [h.id for h in h1.results] == [h.id for h in t_only.results]
    assert Path(h0.results[0].path) == files[3]
    neg = searcher.embed_query(Query(text="a red square", negative="red"))
    pos = searcher.embed_query(Query(text="a red square"))
    red = encoder.encode_texts(["red"])[0]
    assert float(neg[0] @ red) < float(pos[0] @ red)
    caps = searcher.search_captions(Query(image=img, top_k=3))
    assert caps.target == "captions" and all(c.path for c in caps.results)
    assert {c.image_id for c in caps.results} <= col.catalog.indexed_ids()
    with pytest.raises(BadQuery):
        searcher.search(Query())
    with pytest.raises(BadQuery):
        searcher.search(Query(text="x", weight=1.5))
    with pytest.raises(BadQuery):
        searcher.search(Query(text="x", top_k=0))
    assert len(searcher.search(Query(text="x", top_k=500)).results) == 12


def test_copies_of_content_stored_by_an_earlier_batch_are_indexed_in_the_same_run(
    tmp_path: Path, encoder: Encoder
) -> None:
    files = make_folder(tmp_path / "imgs", 10)
    for n in range(3):  # sorted after img_*: they reach the committer after img_0000's batch is stored
        (tmp_path / "imgs" / f"zz_copy{n}.jpg").write_bytes(files[0].read_bytes())
    s = ingest(tmp_path / "imgs", Collection(tmp_path / "d"), encoder, QUIET)
    assert (s.encoded, s.reused, s.failed) == (10, 3, 0)
    assert Collection(tmp_path / "d").catalog.counts().get("pending", 0) == 0
