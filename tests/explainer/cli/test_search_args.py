"""The reference systems' features on the command line: one search argument, index knobs, tune-index."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from explainer.cli.app import app
from retrieval import Collection
from tests.helpers import index_shapes, make_folder, numbered_caption

runner = CliRunner()


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path) -> tuple[Path, Path, list[Path]]:
    return index_shapes(tmp_path_factory.mktemp("cli-search-args"), tiny_clip_dir, 12, numbered_caption)


def _json(*argv: str) -> dict:  # type: ignore[type-arg]
    r = runner.invoke(app, [*argv, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_search_argument_detects_an_image_path(indexed: tuple[Path, Path, list[Path]]) -> None:
    _, data, files = indexed
    out = _json("search", str(files[5]), "--top-k", "1", "--data-dir", str(data))
    assert out["query_kind"] == "image" and Path(out["results"][0]["path"]).name == files[5].name
    assert 0.0 <= out["results"][0]["confidence"] <= 1.0 and isinstance(out["no_confident_match"], bool)
    forced = _json("search", str(files[5]), "--text", "--top-k", "2", "--data-dir", str(data))
    assert forced["query_kind"] == "text"
    words = _json("search", "a red circle", "--top-k", "3", "--data-dir", str(data))
    assert words["query_kind"] == "text" and "no_confident_match" in words
    assert all("confidence" in r for r in words["results"])
    caps = _json("search", str(files[5]), "--captions", "--top-k", "2", "--data-dir", str(data))
    assert caps["target"] == "captions" and all("confidence" in r for r in caps["results"])


def test_search_argument_refusals(indexed: tuple[Path, Path, list[Path]], tmp_path: Path) -> None:
    _, data, files = indexed
    two = runner.invoke(app, ["search", str(files[1]), "--image", str(files[2]), "--data-dir", str(data)])
    assert two.exit_code != 0 and "one query image" in two.output
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    bad = runner.invoke(app, ["search", str(notes), "--data-dir", str(data)])
    assert bad.exit_code != 0 and "not a readable image" in bad.output
    local = runner.invoke(app, ["search", "http://127.0.0.1:9/x.png", "--data-dir", str(data)])
    assert local.exit_code != 0 and "loopback" in local.output


def test_table_prints_confidence_and_the_no_match_line(indexed: tuple[Path, Path, list[Path]]) -> None:
    _, data, _ = indexed
    r = runner.invoke(app, ["search", "a violin concerto", "--top-k", "3", "--data-dir", str(data)])
    assert r.exit_code == 0, r.output
    header = next(line for line in r.output.splitlines() if line.strip().startswith("rank"))
    assert "conf" in header
    out = _json("search", "a violin concerto", "--top-k", "3", "--data-dir", str(data))
    assert ("no confident match" in r.output) == bool(out["no_confident_match"])


def test_index_knobs_are_set_and_recorded(tmp_path: Path, tiny_clip_dir: Path) -> None:
    images, data = tmp_path / "images", tmp_path / "data"
    make_folder(images, 8)
    base = ["index", str(images), "--model", str(tiny_clip_dir), "--data-dir", str(data), "-q"]
    r = runner.invoke(
        app, [*base, "--index", "hnsw", "--hnsw-m", "16", "--ef-construction", "64", "--ef-search", "40"]
    )
    assert r.exit_code == 0, r.output
    with Collection(data) as col:
        m = col.store.read_manifest()
    assert m.built_factory == "HNSW16" and m.params.hnsw_m == 16
    assert m.params.ef_construction == 64 and m.params.ef_search == 40
    r = runner.invoke(app, [*base, "--ef-search", "80"])  # a later run changes the recorded knob only
    assert r.exit_code == 0, r.output
    with Collection(data) as col:
        m = col.store.read_manifest()
    assert m.built_factory == "HNSW16" and m.params.ef_search == 80 and m.params.ef_construction == 64
    for bad in (
        ["--index", "hnsw", "--nlist", "4"],
        ["--index", "flat", "--hnsw-m", "8"],
        ["--index", "ivf"],
    ):
        r = runner.invoke(app, [*base, *bad])
        assert r.exit_code != 0, (bad, r.output)
    r = runner.invoke(app, [*base, "--hnsw-m", "1"])
    assert r.exit_code != 0


def test_tune_index_json_table_and_apply(indexed: tuple[Path, Path, list[Path]], tmp_path: Path) -> None:
    _, data, _ = indexed
    out = _json("tune-index", "--data-dir", str(data), "--queries", "12", "--plot", str(tmp_path / "p.png"))
    assert len(out["rows"]) >= 3 and out["query_source"] == "captions"
    for row in out["rows"]:
        assert set(row) >= {"index", "params", "recall@10", "p50_ms", "p99_ms", "bytes_per_vector", "build_s"}
        assert 0.0 <= row["recall@10"] <= 1.0 and row["p50_ms"] >= 0
    assert out["recommended"]["recall@10"] >= 0.95
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    table = runner.invoke(app, ["tune-index", "--data-dir", str(data), "--queries", "12", "--apply"])
    assert table.exit_code == 0, table.output
    assert "recall@10" in table.output and "recommended:" in table.output and "applied:" in table.output
    bad = runner.invoke(app, ["tune-index", "--data-dir", str(data), "--queries", "0"])
    assert bad.exit_code != 0


def test_paths_prints_one_existing_path_a_line_and_nothing_else(
    indexed: tuple[Path, Path, list[Path]],
) -> None:
    _, data, files = indexed
    r = runner.invoke(app, ["search", "a red circle", "--paths", "-k", "5", "--data-dir", str(data)])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert len(lines) == 5 and all(Path(line).is_file() for line in lines)
    assert set(lines) <= {str(f) for f in files}
    bad = runner.invoke(app, ["search", "a red circle", "--paths", "--json", "--data-dir", str(data)])
    assert bad.exit_code == 2 and "--paths" in bad.output
