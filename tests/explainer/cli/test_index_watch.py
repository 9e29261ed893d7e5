"""`clearsight index DIR --watch`: the first run, then each change indexed, until Ctrl-C."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import draw_shape, env_offline, make_folder


def _indexed_names(db: Path) -> set[str]:
    try:
        con = sqlite3.connect(db, timeout=5)
        rows = con.execute("SELECT path FROM images WHERE state='indexed'").fetchall()
        con.close()
    except sqlite3.Error:
        return set()
    return {Path(str(r[0])).name for r in rows}


def test_index_watch_follows_the_folder_until_interrupted(tmp_path: Path, tiny_clip_dir: Path) -> None:
    photos, data = tmp_path / "photos", tmp_path / "data"
    make_folder(photos, 3)
    cmd = [sys.executable, "-m", "explainer.cli", "index", str(photos), "-m", str(tiny_clip_dir)]
    proc = subprocess.Popen(
        [*cmd, "--data-dir", str(data), "-q", "--watch"],
        env=env_offline(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while len(_indexed_names(data / "catalog.sqlite")) < 3 and time.monotonic() < deadline:
            time.sleep(0.3)
        time.sleep(1.0)  # the first run is done; the watch starts right after it
        draw_shape(photos / "later.jpg", 9)
        while "later.jpg" not in _indexed_names(data / "catalog.sqlite") and time.monotonic() < deadline:
            time.sleep(0.3)
        assert "later.jpg" in _indexed_names(data / "catalog.sqlite")
        time.sleep(3.0)  # the batch commits its rows before its index sync and summary: let it finish
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert "watching" in err and "Traceback" not in err, err
    assert "scanned" in out  # the first run's summary (the watch batch's may be cut by the interrupt)
