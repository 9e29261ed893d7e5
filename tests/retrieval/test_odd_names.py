"""File names that are not UTF-8 (issue 23): stored losslessly, indexed, searchable, served, shown escaped.

On Linux a name is any bytes; Python hands `caf\\xe9_\\xff.jpg` over as a str with lone surrogates,
which SQLite, JSON and a UTF-8 terminal all refuse. One such file used to stop every index run.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from explainer.cli.app import app
from explainer.server import create_app
from retrieval import Collection, IngestConfig, Query, Searcher
from retrieval.catalog import Catalog
from retrieval.ingest import ingest
from retrieval.paths import display_path
from tests.helpers import draw_shape, make_folder
from tests.server_kit import server_settings

QUIET = IngestConfig(batch_size=4, workers=2, progress=False)
runner = CliRunner()


def _odd(folder: Path, raw_name: bytes) -> Path:
    """A path in `folder` whose name is the given bytes, as Python names it (surrogate-escaped)."""
    return Path(os.fsdecode(os.path.join(os.fsencode(folder), raw_name)))


@pytest.fixture
def photos(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Four ordinary photos, one distinct photo under a non-UTF-8 name, and a broken one under another."""
    root = tmp_path / "photos"
    make_folder(root, 4)
    odd = draw_shape(_odd(root / "weird", b"caf\xe9_\xff.jpg"), 9)
    bad = _odd(root, b"\xfe_broken.jpg")
    bad.write_bytes(b"not a picture")
    return root, odd, bad


def test_display_path_escapes_only_what_cannot_be_shown() -> None:
    assert display_path("/x/ünï фото.jpg") == "/x/ünï фото.jpg"
    assert display_path(os.fsdecode(b"/x/caf\xe9_\xff.jpg")) == "/x/caf\\xe9_\\xff.jpg"


def test_catalog_stores_odd_paths_losslessly(tmp_path: Path) -> None:
    odd = os.fsdecode(b"/p/caf\xe9.jpg")
    cat = Catalog(tmp_path / "c.sqlite")
    try:
        plain_id = cat.add_pending("/p/plain.jpg", 1, 1)
        odd_id = cat.add_pending(odd, 2, 2)
        assert cat.add_pending(odd, 3, 3) != odd_id  # replaced by path: found again, not duplicated
        cat.mark_failed(cat.add_pending(os.fsdecode(b"/p/\xff.jpg"), 0, 0), "not an image")
        rec = cat.image_by_path(odd)
        assert rec is not None and rec.path == odd and os.fsencode(rec.path) == b"/p/caf\xe9.jpg"
        assert set(cat.images_under("/p")) == {"/p/plain.jpg", odd, os.fsdecode(b"/p/\xff.jpg")}
        assert cat.images_under(os.fsdecode(b"/p/caf\xe9.jpg")) == {}  # a prefix is a folder, not a name
        assert cat.failures() == [(os.fsdecode(b"/p/\xff.jpg"), "not an image")]
        assert cat.get_image(plain_id) is not None
    finally:
        cat.close()
    # an ordinary path is stored as TEXT, exactly as before; only the odd one is a BLOB of its bytes
    con = sqlite3.connect(tmp_path / "c.sqlite")
    kinds = dict(con.execute("SELECT CAST(path AS BLOB), typeof(path) FROM images").fetchall())
    con.close()
    assert kinds[b"/p/plain.jpg"] == "text" and kinds[b"/p/caf\xe9.jpg"] == "blob"


def test_an_odd_name_is_indexed_searched_and_named(tmp_path: Path, encoder, photos) -> None:  # type: ignore[no-untyped-def]
    root, odd, bad = photos
    data = tmp_path / "data"
    with Collection(data) as col:
        s = ingest(root, col, encoder, QUIET)
        assert (s.scanned, s.new, s.encoded, s.failed_now, s.failed) == (6, 6, 5, 1, 1)
        assert s.accounts()
        assert sorted(s.odd_names) == sorted(display_path(str(p)) for p in (odd, bad))
        assert col.catalog.failures() == [(str(bad), "not an image")]
        again = ingest(root, col, encoder, QUIET)  # a later run finds the same files unchanged
        assert (again.unchanged, again.new, again.changed, again.encoded) == (6, 0, 0, 0) and again.accounts()
    searcher = Searcher.open(data, encoder=encoder)
    try:
        hits = searcher.search(Query(text="a photo", top_k=10)).results
        found = {h.path: h for h in hits}
        assert str(odd) in found and len(hits) == 5
        hit = found[str(odd)]
        assert hit.file_name == "caf\\xe9_\\xff.jpg" and hit.relative_path == "weird/caf\\xe9_\\xff.jpg"
        assert hit.to_dict()["path"] == display_path(str(odd))
        assert Path(hit.path).read_bytes() == odd.read_bytes()  # the real bytes path still opens the file
    finally:
        searcher.collection.close()


def test_cli_output_names_odd_files_in_valid_utf8(tmp_path: Path, tiny_clip_dir: Path, photos) -> None:  # type: ignore[no-untyped-def]
    root, odd, bad = photos
    data = str(tmp_path / "data")
    r = runner.invoke(app, ["index", str(root), "--model", str(tiny_clip_dir), "--data-dir", data, "-q"])
    assert r.exit_code == 0, r.output
    out = r.stdout_bytes.decode("utf-8")  # strict: no raw undecodable bytes reach the terminal
    assert "2 file names are not UTF-8" in out and display_path(str(odd)) in out
    assert "to do 6: 5 encoded" in out and "1 failed" in out

    r = runner.invoke(app, ["search", "a photo", "--data-dir", data, "--top-k", "10", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout_bytes.decode("utf-8"))["results"]
    assert {row["path"] for row in rows} >= {display_path(str(odd))}
    assert "caf\\xe9_\\xff.jpg" in {row["file_name"] for row in rows}

    r = runner.invoke(app, ["status", "--data-dir", data, "--json"])
    st = json.loads(r.stdout_bytes.decode("utf-8"))
    assert st["failed"] == [{"path": display_path(str(bad)), "reason": "not an image"}]
    r = runner.invoke(app, ["status", "--data-dir", data])
    assert r.exit_code == 0 and "\\xfe_broken.jpg" in r.stdout_bytes.decode("utf-8")


def test_the_server_serves_and_shows_an_odd_file(tmp_path: Path, encoder, photos) -> None:  # type: ignore[no-untyped-def]
    root, odd, _bad = photos
    data = tmp_path / "data"
    with Collection(data) as col:
        ingest(root, col, encoder, QUIET)
        rec = col.catalog.image_by_path(str(odd))
        assert rec is not None
    with TestClient(create_app(server_settings(data, tmp_path))) as client:
        got = client.get(f"/api/images/{rec.id}")
        assert got.status_code == 200 and got.content == odd.read_bytes()
        assert client.get(f"/api/images/{rec.id}/thumb").status_code == 200
        body = client.post("/api/search", json={"text": "a photo", "top_k": 10}).json()
        assert "weird/caf\\xe9_\\xff.jpg" in {c["relative_path"] for c in body["results"]}
        page = client.get("/", params={"q": "a photo", "k": 12})
        assert page.status_code == 200 and "caf\\xe9_\\xff.jpg" in page.text
