"""`clearsight index --exclude/--no-excludes/--hidden`: validated before any model loads, saved, and every
skipped file counted in the summary (lines and --json) and in `clearsight status`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from explainer.cli.app import app
from tests.helpers import draw_shape

runner = CliRunner()


def _library(root: Path) -> Path:
    draw_shape(root / "2023" / "a.jpg", 1)
    draw_shape(root / "raw" / "b.jpg", 2)
    draw_shape(root / "@eaDir" / "a.jpg" / "SYNOPHOTO_THUMB_XL.jpg", 1)
    draw_shape(root / ".hidden" / "c.jpg", 3)
    (root / "clip.mov").write_bytes(b"\x00" * 8)
    return root


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--exclude", "/abs/path"], "absolute"),
        (["--exclude", "../x"], "climbs out"),
        (["--exclude", ""], "empty"),
        (["--exclude", "raw", "--no-excludes"], "not both"),
    ],
)
def test_bad_excludes_fail_before_a_model_loads(tmp_path: Path, args: list[str], why: str) -> None:
    root = _library(tmp_path / "photos")
    # the default model is not on this machine: reaching it would fail with another message
    r = runner.invoke(app, ["index", str(root), "--data-dir", str(tmp_path / "d"), *args])
    assert r.exit_code == 2, r.output
    assert why in r.stderr and "encoder" not in r.stderr


def test_excludes_are_saved_and_skips_counted(tmp_path: Path, tiny_clip_dir: Path) -> None:
    root = _library(tmp_path / "photos")
    data = str(tmp_path / "data")
    base = ["index", str(root), "--model", str(tiny_clip_dir), "--data-dir", data, "-q"]
    r = runner.invoke(app, [*base, "--exclude", "raw", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["scanned"] == 1 and s["exclude"] == ["raw"]
    assert s["skipped"] == {"unsupported format": 1}
    assert s["skipped_folders"] == {"excluded": 1, "hidden": 1, "thumbnails or system": 1}
    assert s["unsupported_types"] == {".mov": 1}
    r = runner.invoke(app, base)  # no --exclude: the saved one holds
    assert r.exit_code == 0, r.output
    assert "scanned 1 files" in r.stdout and "excluding: raw" in r.stdout
    assert "skipped 3 folders (not walked)" in r.stdout and "unsupported formats: .mov 1" in r.stdout
    st = runner.invoke(app, ["status", "--data-dir", data, "--json"])
    body = json.loads(st.stdout)
    assert body["excludes"] == {str(root): ["raw"]}
    assert body["skipped"]["folders"]["excluded"] == 1
    assert body["skipped"]["files"] == {"unsupported format": 1}
    table = runner.invoke(app, ["status", "--data-dir", data])
    assert "excluding: raw" in table.stdout and "skipped folders:" in table.stdout
    r = runner.invoke(app, [*base, "--no-excludes", "--hidden", "--json"])
    s = json.loads(r.stdout)
    assert s["exclude"] == [] and s["new"] == 2 and s["skipped_folders"] == {"thumbnails or system": 1}
