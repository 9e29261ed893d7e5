"""Watching folders: which changes count, bursts batched into one re-index, failures retried, and a
real collection kept current by the library's own ingest."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from retrieval import Collection, IngestConfig
from retrieval.encoders import Encoder
from retrieval.errors import ConfigError, IndexError_
from retrieval.ingest import ingest
from retrieval.watch import FolderWatcher, WatchConfig, reindex_folders, relevant, touched_roots
from tests.helpers import draw_shape, make_folder

FAST = WatchConfig(debounce_ms=300, step_ms=50, retry_ms=400)


def wait_for(check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Wait for the watcher's thread (bounded: a hung watcher fails the test, it never hangs it)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the watcher")
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("path", "counts"),
    [
        ("/p/a.jpg", True),
        ("/p/A.JPEG", True),
        ("/p/captions.jsonl", True),
        ("/p/moved-folder", True),
        ("/p/notes.txt", False),
        ("/p/.a.jpg.swp", False),
        ("/p/.hidden.jpg", False),
    ],
)
def test_which_changes_count(path: str, counts: bool) -> None:
    assert relevant(path) is counts


def test_changes_are_attributed_to_the_deepest_watched_root() -> None:
    roots = [Path("/photos"), Path("/photos/2019"), Path("/other")]
    got = touched_roots(["/photos/2019/a.jpg", "/photos/b.jpg", "/elsewhere/c.jpg"], roots)
    assert got == [Path("/photos/2019"), Path("/photos")]


def test_a_missing_folder_or_a_bad_setting_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="do not exist"):
        FolderWatcher([tmp_path / "nope"], lambda roots: None)
    with pytest.raises(ConfigError, match="nothing to watch"):
        FolderWatcher([], lambda roots: None)
    with pytest.raises(ConfigError):
        WatchConfig(debounce_ms=0)


def test_a_burst_of_files_is_batched_not_one_run_per_file(tmp_path: Path) -> None:
    calls: list[list[Path]] = []
    watcher = FolderWatcher([tmp_path], calls.append, FAST).start()
    try:
        time.sleep(0.3)  # let the watch start before the burst
        make_folder(tmp_path / "sub", 60)
        (tmp_path / "notes.txt").write_text("not an image")
        wait_for(lambda: bool(calls))
        time.sleep(1.0)  # any straggling batch of the same burst
    finally:
        watcher.stop()
    assert 1 <= len(calls) <= 5, len(calls)  # 60 files, a handful of runs at most
    assert all(roots == [tmp_path] for roots in calls)


def test_a_failed_reindex_is_tried_again_without_a_new_event(tmp_path: Path) -> None:
    calls: list[list[Path]] = []

    def flaky(roots: list[Path]) -> None:
        calls.append(roots)
        if len(calls) == 1:
            raise IndexError_("another writer holds the collection")

    watcher = FolderWatcher([tmp_path], flaky, FAST).start()
    try:
        time.sleep(0.3)
        draw_shape(tmp_path / "one.jpg", 1)
        wait_for(lambda: len(calls) >= 2)
    finally:
        watcher.stop()
    assert calls[0] == calls[1] == [tmp_path]


def test_a_watched_collection_indexes_added_and_removed_photos(tmp_path: Path, encoder: Encoder) -> None:
    photos, data = tmp_path / "photos", tmp_path / "data"
    files = make_folder(photos, 4)
    with Collection(data) as collection:
        ingest(photos, collection, encoder, IngestConfig(batch_size=4, progress=False))
    config = IngestConfig(batch_size=4, progress=False)

    def reindex(roots: list[Path]) -> None:
        reindex_folders(data, encoder, roots, config)

    def indexed() -> set[str]:
        with Collection(data) as collection:
            return {Path(r.path).name for r in collection.catalog.iter_images("indexed")}

    watcher = FolderWatcher([photos], reindex, FAST).start()
    try:
        time.sleep(0.3)
        shutil.copy(files[0], photos / "added.jpg")
        files[1].unlink()
        wait_for(lambda: "added.jpg" in indexed() and files[1].name not in indexed())
    finally:
        watcher.stop()
    assert indexed() == {files[0].name, files[2].name, files[3].name, "added.jpg"}
