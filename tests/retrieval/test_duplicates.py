"""Near-duplicate groups: the range search finds every planted pair, union-find joins chains, and the
command reads the stored embeddings only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from explainer.cli.app import app
from retrieval.duplicates import find_groups, group_pairs, similar_pairs
from retrieval.errors import ConfigError
from tests.helpers import index_shapes, textures


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_every_pair_above_the_threshold_is_found_and_no_other() -> None:
    rng = np.random.default_rng(0)
    base = _unit(rng.normal(size=(200, 64)))
    noisy = _unit(base[:20] + 0.05 * rng.normal(size=(20, 64)))  # copies of the first 20
    vectors = np.concatenate([base, noisy])
    sims = vectors @ vectors.T
    want = {(i, j) for i in range(len(vectors)) for j in range(i + 1, len(vectors)) if sims[i, j] >= 0.9}
    got = {(i, j) for i, j, _ in similar_pairs(vectors, 0.9, chunk=37)}  # chunks that split rows oddly
    assert got == want and len(want) >= 20
    assert {(k, 200 + k) for k in range(20)} <= got


def test_union_find_joins_a_chain_and_keeps_the_weakest_link() -> None:
    groups = group_pairs(6, [(0, 1, 0.99), (1, 2, 0.96), (4, 5, 0.98)])
    assert sorted((rows, round(w, 2)) for rows, w in groups) == [([0, 1, 2], 0.96), ([4, 5], 0.98)]


def test_groups_are_image_ids_biggest_first() -> None:
    v = _unit(np.array([[1, 0, 0], [1, 0.01, 0], [0, 1, 0], [0, 1, 0.01], [0, 1.01, 0], [0, 0, 1]], float))
    ids = np.array([10, 11, 20, 21, 22, 30])
    assert [g for g, _ in find_groups(ids, v, 0.99)] == [[20, 21, 22], [10, 11]]


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, float("nan")])
def test_a_threshold_outside_cosines_is_refused(bad: float) -> None:
    with pytest.raises(ConfigError, match="threshold"):
        list(similar_pairs(np.eye(3, dtype=np.float32), bad))


def test_the_command_groups_an_exact_copy(tmp_path: Path, tiny_clip_dir: Path) -> None:
    images, data, files = index_shapes(tmp_path, tiny_clip_dir, 6)
    shutil.copy(files[2], images / "sub-copy.jpg")
    runner = CliRunner()
    r = runner.invoke(app, ["index", str(images), "--data-dir", str(data), "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["duplicates", "--data-dir", str(data), "--threshold", "0.9999", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["images"] == 7 and out["threshold"] == 0.9999
    assert [sorted(Path(p).name for p in g["paths"]) for g in out["groups"]] == [
        ["img_0002.jpg", "sub-copy.jpg"]
    ]
    table = runner.invoke(app, ["duplicates", "--data-dir", str(data), "--threshold", "0.9999"])
    assert "1 group of near-duplicates among 7 images" in table.stdout and "sub-copy.jpg" in table.stdout
    bad = runner.invoke(app, ["duplicates", "--data-dir", str(data), "--threshold", "3"])
    assert bad.exit_code == 2 and "threshold" in bad.output


def test_the_command_on_no_collection_says_so(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["duplicates", "--data-dir", str(tmp_path / "nothing")])
    assert r.exit_code != 0 and "Traceback" not in r.output


def test_the_default_threshold_is_the_one_search_folds_at(tmp_path: Path, tiny_clip_dir: Path) -> None:
    """One default for listing and folding: a pair the command lists is a pair search folds."""
    from retrieval.collection import Collection
    from retrieval.duplicates import DEFAULT_THRESHOLD, collection_threshold
    from retrieval.search import Searcher

    images, data = tmp_path / "photos", tmp_path / "data"
    files = textures(images, 24)  # the tiny CLIP keeps these apart, unlike the shape scenes
    with Image.open(files[4]) as im:
        im.save(images / "copy.jpg", quality=50)
    runner = CliRunner()
    r = runner.invoke(app, ["index", str(images), "-m", str(tiny_clip_dir), "--data-dir", str(data), "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["duplicates", "--data-dir", str(data), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    with Collection(data, create=False) as col:
        m = col.store.read_manifest()
        expected = collection_threshold(col.catalog, m.fingerprint, m.dim)
    searcher = Searcher.open(data)
    try:
        assert searcher.collapse_threshold() == expected
    finally:
        searcher.close()
    # a random tiny CLIP puts different pictures close, so the guard lifts the default
    assert out["threshold"] == expected and expected > DEFAULT_THRESHOLD
    assert [sorted(Path(p).name for p in g["paths"]) for g in out["groups"]] == [["copy.jpg", files[4].name]]
    help_text = runner.invoke(app, ["duplicates", "--help"]).stdout
    assert "99th-percentile" in help_text
