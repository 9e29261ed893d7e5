from __future__ import annotations

import os
import sqlite3
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval import Collection, IngestConfig
from retrieval.catalog import SCHEMA_VERSION, Catalog
from retrieval.encoders import Encoder
from retrieval.ingest import ingest
from retrieval.photo_meta import (
    DATE_TIME,
    DATE_TIME_ORIGINAL,
    EXIF_IFD,
    folder_under,
    parse_exif_date,
    read_file,
)
from tests.helpers import draw_shape, make_folder

QUIET = IngestConfig(batch_size=4, workers=2, progress=False)
#: 2021-05-06 07:08:09 local time, as a modification time in ns
MTIME = datetime(2021, 5, 6, 7, 8, 9)
MTIME_NS = int(MTIME.timestamp()) * 10**9


def _jpeg(path: Path, original: object = None, written: object = None) -> Path:
    exif = Image.Exif()
    if original is not None:
        exif[EXIF_IFD] = {DATE_TIME_ORIGINAL: original}
    if written is not None:
        exif[DATE_TIME] = written
    Image.new("RGB", (40, 30), "red").save(path, exif=exif.tobytes())
    os.utime(path, ns=(MTIME_NS, MTIME_NS))
    return path


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2019:07:14 10:00:00", "2019-07-14T10:00:00"),
        ("2019-07-14 10:00:00", "2019-07-14T10:00:00"),
        ("2019:07:14 10:00:00\x00", "2019-07-14T10:00:00"),
        ("2019:07:14 10:00:00.123+02:00", "2019-07-14T10:00:00"),
        (b"2019:07:14 10:00:00", "2019-07-14T10:00:00"),
        ("0000:00:00 00:00:00", None),  # a camera whose clock was never set
        ("    :  :     :  :  ", None),
        ("2019:02:31 10:00:00", None),  # 31 February
        ("2019:07:14 25:00:00", None),
        ("1700:01:01 00:00:00", None),
        ("", None),
        ("yesterday", None),
        (12345, None),
        (None, None),
        ((2019, 7, 14), None),
    ],
)
def test_exif_dates_are_parsed_or_refused(value: object, expected: str | None) -> None:
    assert parse_exif_date(value) == expected


def test_date_time_original_wins(tmp_path: Path) -> None:
    p = _jpeg(tmp_path / "a.jpg", "2019:07:14 10:00:00", "2020:01:01 00:00:00")
    meta = read_file(str(p), MTIME_NS)
    assert (meta.taken_at, meta.taken_source, meta.format) == ("2019-07-14T10:00:00", "exif", "jpeg")


def test_falls_back_to_date_time_then_mtime(tmp_path: Path) -> None:
    p = _jpeg(tmp_path / "b.jpg", "0000:00:00 00:00:00", "2020:01:02 03:04:05")
    assert (read_file(str(p), MTIME_NS).taken_at, read_file(str(p), MTIME_NS).taken_source) == (
        "2020-01-02T03:04:05",
        "exif-datetime",
    )
    p = _jpeg(tmp_path / "c.jpg", "garbage", "2020:13:45 99:99:99")
    meta = read_file(str(p), MTIME_NS)
    assert (meta.taken_at, meta.taken_source) == (MTIME.isoformat(), "mtime")


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")
def test_broken_exif_block_does_not_fail(tmp_path: Path) -> None:
    p = tmp_path / "broken.jpg"
    Image.new("RGB", (20, 20), "blue").save(p, exif=b"Exif\x00\x00MM\x00*\x00\x00\xff\xff\xff\xffjunk")
    meta = read_file(str(p), MTIME_NS)
    assert (meta.taken_source, meta.format) == ("mtime", "jpeg")


def test_png_and_unreadable_files(tmp_path: Path) -> None:
    p = draw_shape(tmp_path / "x.png", 1)
    assert (read_file(str(p), MTIME_NS).format, read_file(str(p), MTIME_NS).taken_source) == ("png", "mtime")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    meta = read_file(str(bad), MTIME_NS)
    assert (meta.taken_at, meta.taken_source, meta.format) == (MTIME.isoformat(), "mtime", None)
    assert read_file(str(tmp_path / "gone.jpg"), MTIME_NS).taken_source == "mtime"


def test_folder_under_the_longest_root() -> None:
    roots = ["/p", "/p/trips"]
    assert folder_under("/p/trips/2019/a.jpg", roots) == "2019"
    assert folder_under("/p/b.jpg", roots) == ""
    assert folder_under("/p/x/y/c.jpg", roots) == "x/y"


def test_ingest_records_date_type_and_folder(tmp_path: Path, encoder: Encoder) -> None:
    photos = tmp_path / "photos"
    (photos / "2019").mkdir(parents=True)
    _jpeg(photos / "2019" / "a.jpg", "2019:07:14 10:00:00")
    draw_shape(photos / "b.png", 2)
    col = Collection(tmp_path / "data")
    ingest(photos, col, encoder, QUIET)
    recs = {Path(r.path).name: r for r in col.catalog.iter_images("indexed")}
    assert (recs["a.jpg"].taken_at, recs["a.jpg"].format, recs["a.jpg"].folder) == (
        "2019-07-14T10:00:00",
        "jpeg",
        "2019",
    )
    assert (recs["b.png"].taken_source, recs["b.png"].format, recs["b.png"].folder) == ("mtime", "png", "")


def _downgrade_to_v2(db: Path) -> None:
    """Turn a catalog into what Clearsight wrote before schema 3 (same rows, no photo columns)."""
    con = sqlite3.connect(db)
    con.executescript(
        """DROP INDEX images_taken; DROP INDEX images_folder;
           ALTER TABLE images DROP COLUMN taken_at; ALTER TABLE images DROP COLUMN taken_source;
           ALTER TABLE images DROP COLUMN format; ALTER TABLE images DROP COLUMN folder;
           PRAGMA user_version=2;"""
    )
    con.close()


def test_an_old_catalog_gets_the_fields_on_the_next_index_without_reencoding(
    tmp_path: Path, encoder: Encoder
) -> None:
    photos = tmp_path / "photos"
    make_folder(photos / "trip", 3)
    _jpeg(photos / "dated.jpg", "2018:01:02 03:04:05")
    data = tmp_path / "data"
    col = Collection(data)
    ingest(photos, col, encoder, QUIET)
    fp, dim = encoder.info.fingerprint, encoder.info.dim
    ids_before, vecs_before = col.catalog.indexed_vectors(fp, dim)
    col.close()
    _downgrade_to_v2(data / "catalog.sqlite")

    old = Catalog(data / "catalog.sqlite")  # migrates 2 -> 3
    assert old.schema_version == SCHEMA_VERSION == 3
    assert all(r.taken_source is None for r in old.iter_images())
    assert len(old.missing_photo_meta(str(photos))) == 4
    old.close()

    col = Collection(data)
    summary = ingest(photos, col, encoder, QUIET)
    assert (summary.encoded, summary.unchanged, summary.todo) == (0, 4, 0)
    ids_after, vecs_after = col.catalog.indexed_vectors(fp, dim)
    assert np.array_equal(ids_before, ids_after) and np.array_equal(vecs_before, vecs_after)
    recs = {Path(r.path).name: r for r in col.catalog.iter_images()}
    assert recs["dated.jpg"].taken_at == "2018-01-02T03:04:05"
    assert recs["img_0000.jpg"].folder == "trip" and recs["img_0000.jpg"].format == "jpeg"
    assert col.catalog.missing_photo_meta(str(photos)) == []
