from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from explainer.cli.app import app
from retrieval import Query, Searcher, load_query_image
from tests.helpers import env_offline, make_folder, numbered_caption, write_captions

runner = CliRunner()


@pytest.fixture()
def indexed(tmp_path: Path, tiny_clip_dir: Path) -> tuple[Path, Path, list[Path]]:
    images, data = tmp_path / "images", tmp_path / "data"
    files = make_folder(images, 10)
    write_captions(images, files, numbered_caption)
    (images / "bad.jpg").write_bytes(b"")
    r = runner.invoke(
        app, ["index", str(images), "--model", str(tiny_clip_dir), "--data-dir", str(data), "-q"]
    )
    assert r.exit_code == 0, r.output
    assert "11 new" in r.output and "1 failed" in r.output and "empty file" in r.output
    return images, data, files


def _search(data: Path, *args: str) -> dict:  # type: ignore[type-arg]
    r = runner.invoke(app, ["search", *args, "--data-dir", str(data), "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_cli_and_python_api_agree(indexed: tuple[Path, Path, list[Path]]) -> None:
    _, data, files = indexed
    searcher = Searcher.open(data)
    img, _ = load_query_image(files[2])
    cases = [
        (["a red square", "--top-k", "4"], Query(text="a red square", top_k=4)),
        (["--image", str(files[2]), "--top-k", "3", "--offset", "1"], Query(image=img, top_k=3, offset=1)),
        (["blue", "--image", str(files[2]), "--weight", "0.3"], Query(text="blue", image=img, weight=0.3)),
    ]
    for argv, q in cases:
        out = _search(data, *argv)
        api = json.loads(json.dumps(searcher.search(q).to_dict()))
        # the CLI prints cards: the library's result fields, every hit field (its dataset captions
        # as the card's `dataset_captions`), plus what cards add (caption, evidence, explanation)
        assert {k: out[k] for k in api if k != "results"} == {k: v for k, v in api.items() if k != "results"}
        assert len(out["results"]) == len(api["results"])
        for row, hit in zip(out["results"], api["results"], strict=True):
            assert row["dataset_captions"] == hit.pop("captions")
            assert {k: row[k] for k in hit} == hit
        assert all({"id", "path", "score", "rank"} <= set(r) for r in out["results"])
    caps = _search(data, "--image", str(files[2]), "--captions", "-k", "2")
    assert caps == json.loads(json.dumps(searcher.search_captions(Query(image=img, top_k=2)).to_dict()))
    assert caps["results"][0]["text"].startswith("shape number")


def test_table_output(indexed: tuple[Path, Path, list[Path]]) -> None:
    _, data, _ = indexed
    r = runner.invoke(app, ["search", "a red square", "-k", "3", "--data-dir", str(data)])
    assert r.exit_code == 0
    lines = r.stdout.strip().splitlines()
    # a random tiny model matches nothing confidently: the table says so under its first line
    lines = [line for line in lines if not line.startswith("no confident match:")]
    assert lines[0].startswith("3 images for a text query") and "rank" in lines[1]
    assert len(lines) == 5


def test_errors_are_one_line_with_exit_codes(indexed: tuple[Path, Path, list[Path]], tmp_path: Path) -> None:
    _, data, _ = indexed
    r = runner.invoke(app, ["search", "--data-dir", str(data)])
    assert r.exit_code == 2 and "give a text query" in r.stderr and "Traceback" not in r.output
    r = runner.invoke(app, ["search", "x", "--weight", "3", "--data-dir", str(data)])
    assert r.exit_code == 2 and "weight" in r.stderr
    r = runner.invoke(app, ["search", "--image", str(tmp_path / "none.jpg"), "--data-dir", str(data)])
    assert r.exit_code == 2 and "does not exist" in r.stderr
    r = runner.invoke(app, ["search", "x", "--data-dir", str(tmp_path / "empty")])
    assert r.exit_code == 4 and "clearsight index" in r.stderr


@pytest.mark.parametrize(("top_k", "words"), [("1001", "got 1001"), ("-3", "got -3"), ("0", "got 0")])
def test_top_k_out_of_bounds_is_refused_with_the_number_given(
    indexed: tuple[Path, Path, list[Path]], top_k: str, words: str
) -> None:
    _, data, _ = indexed
    for extra in ([], ["--captions"], ["--json"]):
        r = runner.invoke(app, ["search", "a red square", "--top-k", top_k, *extra, "--data-dir", str(data)])
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        assert f"top-k must be between 1 and 1000, {words}" in r.stderr and "images" not in r.stdout


def test_the_largest_top_k_is_allowed(indexed: tuple[Path, Path, list[Path]]) -> None:
    _, data, _ = indexed
    out = _search(data, "a red square", "--top-k", "1000")
    assert len(out["results"]) == 10  # every indexed image: the page asked for more than there are
    assert all(r["file_name"] for r in out["results"])


def test_missing_weights_message_without_traceback(tmp_path: Path) -> None:
    make_folder(tmp_path / "imgs", 1)
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "explainer.cli",
            "index",
            str(tmp_path / "imgs"),
            "--data-dir",
            str(tmp_path / "d"),
        ],
        capture_output=True,
        text=True,
        env=env_offline(),
        timeout=120,
    )
    assert p.returncode == 3
    assert "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "openai/clip-vit-base-patch32" in lines[0] and "download" in lines[0]


def test_models_listing() -> None:
    r = runner.invoke(app, ["models", "--json"])
    assert r.exit_code == 0
    assert any(m["hub_id"] == "openai/clip-vit-base-patch32" for m in json.loads(r.stdout)["encoders"])


def test_index_of_a_missing_or_non_folder_path_fails_before_loading_a_model(tmp_path: Path) -> None:
    file = make_folder(tmp_path / "imgs", 1)[0]
    for path, what in ((tmp_path / "nope", "does not exist"), (file, "is not a folder")):
        # the default model is not on this machine: reaching it would fail with another message
        r = runner.invoke(app, ["index", str(path), "--data-dir", str(tmp_path / "d")])
        assert r.exit_code == 2, r.output
        assert what in r.stderr and "encoder" not in r.stderr


def test_search_knobs_reach_the_index_for_that_search_only(
    tiny_clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from retrieval.index.faiss_index import VectorIndex
    from retrieval.index.params import SearchParams

    make_folder(tmp_path / "imgs", 6)
    data = tmp_path / "d"
    argv = ["index", str(tmp_path / "imgs"), "--model", str(tiny_clip_dir), "--data-dir", str(data)]
    assert runner.invoke(app, [*argv, "--index", "hnsw", "-q"]).exit_code == 0
    seen: list[SearchParams | None] = []
    original = VectorIndex.search

    def spy(self: VectorIndex, queries: Any, k: int, params: SearchParams | None = None) -> Any:
        seen.append(params)
        return original(self, queries, k, params)

    monkeypatch.setattr(VectorIndex, "search", spy)
    base = ["search", "a red circle", "--data-dir", str(data), "--json"]
    plain = runner.invoke(app, base)
    tuned = runner.invoke(app, [*base, "--ef-search", "7", "--nprobe", "3"])
    assert plain.exit_code == 0 and tuned.exit_code == 0, tuned.output
    assert seen[0] is None  # default: the knobs the index records
    assert seen[1] is not None and (seen[1].ef_search, seen[1].nprobe) == (7, 3)
    # six images: any breadth finds them all, in the same order
    assert json.loads(plain.stdout)["results"] == json.loads(tuned.stdout)["results"]
    assert runner.invoke(app, [*base, "--nprobe", "0"]).exit_code == 2


def test_filters_of_the_query_spec_are_flags(indexed: tuple[Path, Path, list[Path]]) -> None:
    """--min-score is made from the spec's field (no hand-written option): it filters, and its bounds hold."""
    _, data, _ = indexed
    every = _search(data, "a red square", "--top-k", "10")["results"]
    cut = round((every[1]["score"] + every[2]["score"]) / 2, 4)
    kept = _search(data, "a red square", "--top-k", "10", "--min-score", str(cut))["results"]
    assert [r["id"] for r in kept] == [r["id"] for r in every[:2]]
    r = runner.invoke(app, ["search", "x", "--min-score", "2", "--data-dir", str(data)])
    assert r.exit_code == 2 and "min score must be between -1 and 1, got 2.0" in r.stderr
