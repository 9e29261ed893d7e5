"""The benches' data (issue 23): a bench whose photos are missing says so and exits non-zero.

The default `../shared/data/coco-mini` does not exist from a clone elsewhere, and the evidence bench then
measured drawn pictures as though they were photos.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, make_folder

BENCH = ROOT / "bench"
# bench/ is a folder of scripts, not a package: its data module is loaded from its file
_spec = importlib.util.spec_from_file_location("bench_data", BENCH / "data.py")
assert _spec is not None and _spec.loader is not None
bench_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_data)


def test_missing_data_exits_2_saying_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(bench_data.DATA_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit) as stop:
        bench_data.coco_mini(None)
    assert stop.value.code == bench_data.MISSING == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere" / "images") in err and "--data DIR" in err
    (tmp_path / "empty" / "images").mkdir(parents=True)
    with pytest.raises(SystemExit):  # a folder without photos is missing data too
        bench_data.coco_mini(tmp_path / "empty")


def test_data_is_found_by_flag_before_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_folder(tmp_path / "mine" / "images" / "val2017", 1)
    monkeypatch.setenv(bench_data.DATA_ENV, str(tmp_path / "nowhere"))
    assert bench_data.coco_mini(tmp_path / "mine") == (tmp_path / "mine").resolve()
    monkeypatch.setenv(bench_data.DATA_ENV, str(tmp_path / "mine"))
    found = bench_data.coco_mini(None)
    assert found == (tmp_path / "mine").resolve()
    assert bench_data.describe(found, 1) == f"1 coco-mini photos from {found}"


def test_the_evidence_bench_refuses_to_measure_without_its_photos(tmp_path: Path) -> None:
    """It used to fall back to drawn pictures silently; now it stops before measuring anything."""
    env = {"PATH": "/usr/bin:/bin", bench_data.DATA_ENV: str(tmp_path / "nowhere"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, str(BENCH / "evidence_bench.py"), "--hits", "2"],
        capture_output=True,
        text=True,
        env={**env, "PYTHONPATH": str(BENCH.parent)},
        timeout=300,
    )
    assert r.returncode == 2, r.stderr[-1000:]
    assert "bench data missing" in r.stderr and "|" not in r.stdout  # no table of figures
