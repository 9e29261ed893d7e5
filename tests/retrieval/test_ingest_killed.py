"""Kill a real indexing process (SIGKILL) at several points; the next run must finish the job."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from retrieval import Collection
from tests.helpers import env_offline, make_folder

pytestmark = pytest.mark.slow

# Runs the real CLI with the encoder slowed down, so a kill lands mid-run; optionally SIGKILLs
# itself while the index files are being written (the most delicate moment).
DRIVER = textwrap.dedent(
    """
    import os, signal, sys, time
    from retrieval.encoders import hf, base
    import retrieval.index.base as index_mod
    real = hf.HFDualEncoder.encode_pixels
    def slow(self, pixels):
        time.sleep(float(os.environ.get("SLOW", "0.05")))
        return real(self, pixels)
    hf.HFDualEncoder.encode_pixels = slow
    if os.environ.get("DIE_IN_SAVE"):
        real_write = index_mod.write_file
        def dying_write(path, data):
            real_write(path, data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        index_mod.write_file = dying_write
    if os.environ.get("DIE_AT") == "sync":  # the catalog has its deletions, the live index not yet
        import retrieval.ingest as ingest_mod
        ingest_mod.sync_for = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("DIE_AT") == "switch":  # a new version is renamed into place, CURRENT not yet
        real_replace = os.replace
        def dying_replace(src, dst, **kw):
            if os.path.basename(str(dst)) == "CURRENT":
                os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst, **kw)
        os.replace = dying_replace
    from explainer.cli.app import main
    sys.argv = ["clearsight"] + sys.argv[1:]
    main()
    """
)


def _indexed(db: Path) -> int:
    try:
        con = sqlite3.connect(db, timeout=5)
        n = con.execute("SELECT COUNT(*) FROM images WHERE state='indexed'").fetchone()[0]
        con.close()
        return int(n)
    except sqlite3.Error:
        return 0


def _run(driver: Path, args: list[str], env_extra: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    env = env_offline()
    env.update(env_extra or {})
    return subprocess.Popen(
        [sys.executable, str(driver), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _assert_consistent(data: Path, files: list[Path]) -> None:
    col = Collection(data)
    indexed = col.catalog.iter_images("indexed")
    assert sorted(r.path for r in indexed) == sorted(str(f) for f in files)  # nothing lost, no duplicates
    assert col.catalog.counts()["pending"] == 0
    loaded = col.store.load()
    ids = loaded.images.ids().tolist()
    assert len(ids) == len(set(ids)) == len(files)
    assert set(ids) == {r.id for r in indexed}
    col.close()


def test_kill_at_several_points_then_resume(tmp_path: Path, tiny_clip_dir: Path) -> None:
    images, data = tmp_path / "images", tmp_path / "data"
    files = make_folder(images, 120)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    args = [
        "index",
        str(images),
        "--model",
        str(tiny_clip_dir),
        "--data-dir",
        str(data),
        "--batch-size",
        "8",
        "-q",
    ]
    db = data / "catalog.sqlite"
    kills = 0
    for threshold in (0, 24, 64):  # before the first commit, after a few batches, well into the run
        proc = _run(driver, args)
        deadline = time.monotonic() + 120
        while _indexed(db) < threshold and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
    assert kills >= 2, "the indexer finished before it could be killed; slow it down further"
    # and once more while it writes the index files
    proc = _run(driver, args, {"DIE_IN_SAVE": "1", "SLOW": "0"})
    assert proc.wait(timeout=120) == -signal.SIGKILL
    assert not (data / "index" / "CURRENT").exists() or Collection(data).store.load()  # old version intact
    done = _run(driver, args, {"SLOW": "0"})
    _, err = done.communicate(timeout=180)
    assert done.returncode == 0, err.decode()[-2000:]
    _assert_consistent(data, files)
    # a further run has nothing to do
    again = _run(driver, [*args, "--json"], {"SLOW": "0"})
    again.communicate(timeout=180)
    assert again.returncode == 0
    _assert_consistent(data, files)


def test_killed_before_sync_and_before_the_switch(tmp_path: Path, tiny_clip_dir: Path) -> None:
    """The two windows of issue 11, with a real SIGKILL in each: search between a scan's deletions and
    the index sync, and cleanup after a crash between a version's rename and the CURRENT switch."""
    from retrieval import Query, Searcher
    from retrieval.encoders import EncoderConfig, create_encoder

    images, data = tmp_path / "images", tmp_path / "data"
    files = make_folder(images, 30)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    args = ["index", str(images), "--model", str(tiny_clip_dir), "--data-dir", str(data), "-q"]
    first = _run(driver, args, {"SLOW": "0"})
    assert first.wait(timeout=180) == 0
    live = (data / "index" / "CURRENT").read_text().strip()

    for f in files[:20]:
        f.unlink()
    assert _run(driver, args, {"SLOW": "0", "DIE_AT": "sync"}).wait(timeout=180) == -signal.SIGKILL
    encoder = create_encoder(EncoderConfig(model=str(tiny_clip_dir), device="cpu", precision="fp32"))
    searcher = Searcher.open(data, encoder=encoder)
    try:
        assert searcher.index.images.ntotal == 30  # the live index still holds the 20 deleted ids
        page = searcher.search(Query(text="a red circle", top_k=10)).results
        survivors = {str(f) for f in files[20:]}
        assert len(page) == 10 and {h.path for h in page} <= survivors
        assert [h.rank for h in page] == list(range(1, 11))
    finally:
        searcher.collection.close()
        encoder.close()

    added = make_folder(images, 5, start=100)
    assert _run(driver, args, {"SLOW": "0", "DIE_AT": "switch"}).wait(timeout=180) == -signal.SIGKILL
    index_dir = data / "index"
    assert (index_dir / "CURRENT").read_text().strip() == live  # the switch never happened...
    assert Collection(data).store.load().images.ntotal == 30  # ...and the live version still loads
    orphans = {p.name for p in index_dir.glob("v[0-9]*")} - {live}
    assert orphans, "the killed run should have left its renamed version behind"

    done = _run(driver, args, {"SLOW": "0"})
    _, err = done.communicate(timeout=180)
    assert done.returncode == 0, err.decode()[-2000:]
    _assert_consistent(data, [*files[20:], *added])
    newest = (index_dir / "CURRENT").read_text().strip()
    assert {p.name for p in index_dir.glob("v[0-9]*")} <= {live, newest}  # the orphan is gone, not live


def test_a_first_index_killed_then_resumed_without_model_keeps_its_model(
    tmp_path: Path, tiny_clip_dir: Path
) -> None:
    """Issue 23: resumed without --model, a first index killed mid-run switched to the default model
    ("The encoder 'openai/clip-vit-base-patch32' is not on this machine"): nothing but the catalog
    knows the model before the first index version is written."""
    images, data = tmp_path / "images", tmp_path / "data"
    files = make_folder(images, 60)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    common = [str(images), "--data-dir", str(data), "--batch-size", "8", "-q"]
    proc = _run(driver, ["index", *common, "--model", str(tiny_clip_dir)])
    db = data / "catalog.sqlite"
    deadline = time.monotonic() + 120
    while _indexed(db) < 16 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the indexer finished before it could be killed; slow it down further"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (data / "index" / "CURRENT").exists()  # killed before its first index was written

    done = _run(driver, ["index", *common], {"SLOW": "0"})  # no --model
    _, err = done.communicate(timeout=180)
    assert done.returncode == 0, err.decode()[-2000:]
    _assert_consistent(data, files)
    assert Collection(data).store.read_manifest().model_id == str(tiny_clip_dir)
