"""A newcomer's first hour at the command line: one-line errors that say what to do, tables that fit 80
columns, status that names failed files. Error lines and tables are checked against snapshots in
tests/snapshots/cli_*.txt (temporary paths and scores normalised)."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from explainer.cli.app import app, command
from explainer.version import version
from tests.helpers import SNAPSHOTS, make_folder

UPDATE = os.environ.get("CLEARSIGHT_UPDATE_SNAPSHOTS") == "1"
runner = CliRunner()


def check_snapshot(name: str, text: str, *paths: Path) -> None:
    for p in paths:
        text = text.replace(str(p), "<TMP>")
    text = re.sub(r"-?\d+\.\d{4}", "<SCORE>", text)
    text = "\n".join(line.rstrip() for line in text.splitlines()) + "\n"
    path = SNAPSHOTS / f"cli_{name}.txt"
    if UPDATE or not path.exists():
        if not UPDATE and os.environ.get("CI"):
            pytest.fail(f"snapshot {path.name} is missing; create it with CLEARSIGHT_UPDATE_SNAPSHOTS=1")
        path.write_text(text)
        return
    assert text == path.read_text(), (
        f"{path.name} differs; if intended, rerun with CLEARSIGHT_UPDATE_SNAPSHOTS=1"
    )


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("clearsight: error: ") and "Traceback" not in output
    return lines[0]


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli-newcomer")
    photos = root / "photos"
    make_folder(photos / "holiday" / "a-rather-long-folder-name-that-will-not-fit-in-a-column", 2)
    make_folder(photos, 2, start=3)
    raw = (photos / "img_0003.jpg").read_bytes()
    (photos / "truncated.jpg").write_bytes(raw[: len(raw) // 3])
    data = root / "data"
    env = {"HF_HUB_OFFLINE": "1"}
    result = runner.invoke(
        app, ["index", str(photos), "--model", str(tiny_clip_dir), "--data-dir", str(data), "-q"], env=env
    )
    assert result.exit_code == 0, result.output
    return photos, data


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"clearsight {version()}"
    assert re.search(r"\d+\.\d+", version())


def test_a_mistyped_model_is_one_line_naming_the_closest(tmp_path: Path) -> None:
    make_folder(tmp_path / "imgs", 1)
    result = runner.invoke(
        app, ["index", str(tmp_path / "imgs"), "--model", "clip-vit-b-99", "--data-dir", str(tmp_path / "d")]
    )
    assert result.exit_code == 2
    line = one_error_line(result.output)
    assert "did you mean clip-vit-b-32" in line and "`clearsight models` lists them" in line
    assert "download" not in line
    check_snapshot("mistyped_model", line, tmp_path)


def test_search_and_status_on_a_missing_data_dir_create_nothing(tmp_path: Path) -> None:
    ghost = tmp_path / "no" / "such"
    for argv in (["search", "a cat"], ["status"]):
        result = runner.invoke(app, [*argv, "--data-dir", str(ghost)])
        assert result.exit_code == 4
        line = one_error_line(result.output)
        assert "no collection at" in line and "clearsight index" in line
        check_snapshot("no_collection", line, ghost)
    assert not (tmp_path / "no").exists()


def test_a_bad_setting_is_one_line_naming_the_variable(tmp_path: Path) -> None:
    from explainer.settings import get_settings

    get_settings.cache_clear()
    try:
        result = runner.invoke(
            app, ["search", "a cat", "--data-dir", str(tmp_path)], env={"CLEARSIGHT_TOP_K_MAX": "abc"}
        )
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2
    line = one_error_line(result.output)
    assert "CLEARSIGHT_TOP_K_MAX" in line and "'abc'" in line
    check_snapshot("bad_setting", line)


def test_a_secret_setting_is_never_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import SecretStr, ValidationError

    from explainer.settings import Settings, settings_problem

    with pytest.raises(ValidationError) as exc:
        Settings(groq_api_key=SecretStr("sk-secret"), port="not-a-port")  # type: ignore[arg-type]
    assert "CLEARSIGHT_PORT" in settings_problem(exc.value) and "sk-secret" not in settings_problem(exc.value)


def test_results_table_fits_80_columns_and_names_files(collection: tuple[Path, Path]) -> None:
    photos, data = collection
    result = runner.invoke(app, ["search", "a red square", "--data-dir", str(data), "-k", "3"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, result.stdout
    assert lines[0].startswith("3 images for a text query")
    assert str(photos) not in result.stdout  # paths relative to the indexed folder
    check_snapshot("search_table", result.stdout, photos, data)
    one = runner.invoke(app, ["search", "a red square", "--data-dir", str(data), "-k", "1"])
    assert one.stdout.startswith("1 image for a text query")


def test_image_query_grammar_and_json_names_files(collection: tuple[Path, Path]) -> None:
    photos, data = collection
    result = runner.invoke(
        app, ["search", "--image", str(photos / "img_0003.jpg"), "--data-dir", str(data), "--json"]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["query_kind"] == "image"
    rel = {r["relative_path"] for r in payload["results"]}
    assert "img_0003.jpg" in rel and any(p.startswith("holiday/") for p in rel)
    assert all(r["file_name"] == Path(r["path"]).name for r in payload["results"])
    table = runner.invoke(app, ["search", "--image", str(photos / "img_0003.jpg"), "--data-dir", str(data)])
    assert "for an image query" in table.stdout


def test_status_lists_failed_files_with_reasons(collection: tuple[Path, Path]) -> None:
    photos, data = collection
    result = runner.invoke(app, ["status", "--data-dir", str(data), "--json"])
    assert result.exit_code == 0, result.output
    st = json.loads(result.stdout)
    assert {"model", "index", "counts", "failed"} <= set(st)
    assert st["failed"] == [{"path": str(photos / "truncated.jpg"), "reason": "truncated or corrupt"}]
    assert st["counts"] == {"pending": 0, "indexed": 4, "failed": 1}
    table = runner.invoke(app, ["status", "--data-dir", str(data)])
    assert max(len(line) for line in table.stdout.splitlines()) <= 80
    assert "truncated or corrupt" in table.stdout
    check_snapshot("status", table.stdout, photos, data)


def test_models_table_fits_and_says_where_weights_are() -> None:
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    assert "not here" in result.stdout and "hf download" in result.stdout
    check_snapshot("models", result.stdout)
    payload = json.loads(runner.invoke(app, ["models", "--json"]).stdout)
    assert all(e["cached"] is False for e in payload["encoders"])


def test_help_has_no_bool_noise_and_offers_completion() -> None:
    from click.testing import CliRunner as ClickRunner

    root = command()
    for argv in (["--help"], ["search", "--help"], ["index", "--help"]):
        out = ClickRunner().invoke(root, argv, prog_name="clearsight").output
        assert "<bool>" not in out, argv
    assert "--install-completion" in ClickRunner().invoke(root, ["--help"]).output


def test_serve_refuses_a_missing_collection_and_a_busy_port(
    collection: tuple[Path, Path], tmp_path: Path
) -> None:
    result = runner.invoke(app, ["serve", "--data-dir", str(tmp_path / "none"), "--port", "0"])
    assert result.exit_code == 4 and "no collection at" in one_error_line(result.output)
    assert not (tmp_path / "none").exists()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = runner.invoke(app, ["serve", "--data-dir", str(collection[1]), "--port", str(port)])
    assert result.exit_code == 2
    line = one_error_line(result.output)
    assert f"port {port} on 127.0.0.1 is already in use" in line and "serving on" not in result.output
