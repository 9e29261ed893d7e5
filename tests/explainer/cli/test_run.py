"""`clearsight run`: the README's main command (index, then serve; the offline demo without weights).

The demo build and the server are replaced by recorders here: both are tested for real elsewhere
(tests/explainer/cli/test_demo.py builds the demo, the server tests serve), and this file checks the
control flow
between them, which is what `run` adds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import explainer.cli.run as cli_run
from explainer.cli.app import app
from tests.helpers import make_folder

runner = CliRunner()


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append({"args": args, **kwargs})


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> tuple[_Recorder, _Recorder]:
    demo, server = _Recorder(), _Recorder()
    monkeypatch.setattr(cli_run, "build_demo", demo)
    monkeypatch.setattr(cli_run, "report_demo", _Recorder())
    monkeypatch.setattr(cli_run, "run_server", server)
    return demo, server


def test_run_indexes_then_serves_the_collection(
    tiny_clip_dir: Path, tmp_path: Path, recorded: tuple[_Recorder, _Recorder]
) -> None:
    demo, server = recorded
    make_folder(tmp_path / "imgs", 4)
    data = tmp_path / "data"
    argv = ["run", str(tmp_path / "imgs"), "--model", str(tiny_clip_dir), "--data-dir", str(data)]
    r = runner.invoke(app, [*argv, "--port", "8123"])
    assert r.exit_code == 0, r.output
    assert "4 new" in r.stdout
    assert not demo.calls
    assert server.calls == [{"args": (data, None, 8123), "captions": True}]  # a user's folder gets captions
    assert (data / "catalog.sqlite").exists() or any(data.iterdir())
    server.calls.clear()
    r = runner.invoke(app, [*argv, "--no-captions"])
    assert r.exit_code == 0, r.output
    assert server.calls == [{"args": (data, None, None), "captions": False}]


def test_run_without_default_weights_falls_back_to_the_demo(
    tmp_path: Path, recorded: tuple[_Recorder, _Recorder]
) -> None:
    demo, server = recorded
    make_folder(tmp_path / "imgs", 2)
    data = tmp_path / "data"
    r = runner.invoke(app, ["run", str(tmp_path / "imgs"), "--data-dir", str(data)])
    assert r.exit_code == 0, r.output
    assert "not on this machine" in r.stderr and "DEMO" in r.stderr
    assert len(demo.calls) == 1 and demo.calls[0]["args"][0] == data / "demo"
    assert server.calls == [{"args": (data / "demo", None, None), "captions": None}]  # captioned already


def test_run_with_a_named_model_that_is_missing_fails_instead_of_hiding_it(
    tmp_path: Path, recorded: tuple[_Recorder, _Recorder]
) -> None:
    demo, server = recorded
    make_folder(tmp_path / "imgs", 2)
    r = runner.invoke(
        app, ["run", str(tmp_path / "imgs"), "--model", "no-such/model", "--data-dir", str(tmp_path / "d")]
    )
    assert r.exit_code == 3, r.output
    assert not demo.calls and not server.calls


def test_run_without_a_folder_is_the_demo_and_no_serve_only_builds(
    tmp_path: Path, recorded: tuple[_Recorder, _Recorder]
) -> None:
    demo, server = recorded
    r = runner.invoke(app, ["run", "--data-dir", str(tmp_path / "d"), "--no-serve"])
    assert r.exit_code == 0, r.output
    assert len(demo.calls) == 1 and not server.calls
