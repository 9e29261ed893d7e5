"""`clearsight search` with filters: every filter of the query spec is a flag, validated by name."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from explainer.cli.app import app
from tests.helpers import make_folder

runner = CliRunner()
OLD_NS = 1_500_000_000 * 10**9  # 2017-07-14


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli-filters")
    photos = root / "photos"
    for p in make_folder(photos / "old", 5):
        os.utime(p, ns=(OLD_NS, OLD_NS))
    make_folder(photos / "new" / "deep", 4, start=5)
    r = runner.invoke(
        app, ["index", str(photos), "-m", str(tiny_clip_dir), "--data-dir", str(root / "d"), "-q"]
    )
    assert r.exit_code == 0, r.output
    return photos, root / "d"


def _paths(data: Path, *flags: str) -> list[str]:
    r = runner.invoke(
        app, ["search", "a red square", "--top-k", "50", "--data-dir", str(data), "--json", *flags]
    )
    assert r.exit_code == 0, r.output
    return [h["path"] for h in json.loads(r.stdout)["results"]]


def test_filter_flags(data: tuple[Path, Path]) -> None:
    photos, d = data
    assert len(_paths(d)) == 9
    assert all("/old/" in p for p in _paths(d, "--folder", "old")) and len(_paths(d, "--folder", "old")) == 5
    assert len(_paths(d, "--folder", str(photos / "new"))) == 4  # subfolders included
    assert len(_paths(d, "--before", "2017-07-14")) == 5 and len(_paths(d, "--after", "2017-07-15")) == 4
    assert len(_paths(d, "--after", "2017-07-14", "--before", "2017-07-14")) == 5
    assert len(_paths(d, "--type", "jpg", "--orientation", "landscape", "--min-size", "72")) == 9
    assert _paths(d, "--min-size", "73") == [] and _paths(d, "--type", "png") == []
    r = runner.invoke(app, ["search", "x", "--data-dir", str(d), "--paths", "--folder", "old"])
    assert r.exit_code == 0 and len(r.stdout.split()) == 5


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--after", "2019-02-30"], "after is not a real date"),
        (["--before", "yesterday"], "before is malformed"),
        (["--after", "2020-01-01", "--before", "2019-01-01"], "later than before"),
        (["--folder", "/"], "outside every indexed folder"),
        (["--folder", "missing"], "no folder missing"),
        (["--orientation", "tall"], "orientation must be one of"),
    ],
)
def test_bad_filters_are_one_line_and_exit_2(data: tuple[Path, Path], flags: list[str], message: str) -> None:
    r = runner.invoke(app, ["search", "x", "--data-dir", str(data[1]), *flags])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output
