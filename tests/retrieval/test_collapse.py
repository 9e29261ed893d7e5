"""Search results fold near-duplicates into the best of them: cheap (the hits' own vectors), page-stable,
pages kept full, guarded against a model that puts every photo near every other, and `show_all` undoes it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval import Collection, IngestConfig, Query, Searcher, duplicates
from retrieval.ingest import ingest
from tests.helpers import textures

QUIET = IngestConfig(batch_size=8, workers=2, progress=False)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _planted(n: int = 40, seed: int = 0) -> tuple[np.ndarray, dict[int, int]]:
    """Random unit vectors, some rows replaced by near-copies of earlier rows: {copy row: original row}."""
    rng = np.random.default_rng(seed)
    v = _unit(rng.normal(size=(n, 32)))
    copies = {3: 0, 7: 0, 9: 4, 20: 15}
    for c, o in copies.items():
        v[c] = _unit(v[o] + 0.02 * rng.normal(size=32))
    return v, copies


def test_rows_fold_into_the_first_kept_row_they_copy() -> None:
    v, copies = _planted()
    groups = duplicates.collapse_rows(v, 0.95)
    by_leader = {g[0]: g[1:] for g in groups}
    assert by_leader[0] == [3, 7] and by_leader[4] == [9] and by_leader[15] == [20]
    assert not set(copies) & set(by_leader)
    assert sorted(r for g in groups for r in g) == list(range(len(v)))  # every row exactly once


def test_a_longer_list_never_regroups_an_earlier_page() -> None:
    v, _ = _planted(60, seed=1)
    short = duplicates.collapse_rows(v[:25], 0.95)
    long = duplicates.collapse_rows(v, 0.95)
    assert [g[0] for g in long][: len(short)] == [g[0] for g in short]


def test_pages_stay_full_and_copies_are_listed_on_the_kept_hit() -> None:
    v, copies = _planted()
    ranked = [(1.0 - k / 100, k) for k in range(len(v))]  # (score, id): the row number is the id
    asked: list[int] = []

    def fetch(n: int) -> list[tuple[float, int]]:
        asked.append(n)
        return ranked[:n]

    found, similar = duplicates.fetch_collapsed(fetch, lambda ids: {i: v[i] for i in ids}, 20, 0.95)
    ids = [i for _, i in found]
    assert len(ids) == 20 and not set(copies) & set(ids)
    assert ids == sorted(ids)  # rank order kept
    assert similar[0] == [3, 7] and similar[4] == [9] and similar[15] == [20]
    # everything: only 36 groups exist, and the fetch stops when the hits run out
    found, _ = duplicates.fetch_collapsed(fetch, lambda ids: {i: v[i] for i in ids}, 100, 0.95)
    assert len(found) == len(v) - len(copies)


def test_hits_without_a_stored_vector_are_never_folded() -> None:
    v, _ = _planted()
    ranked = [(1.0, k) for k in range(10)]
    found, similar = duplicates.fetch_collapsed(
        lambda n: ranked[:n], lambda ids: {i: v[i] for i in ids if i != 3}, 10, 0.95
    )
    assert 3 in [i for _, i in found] and 3 not in similar.get(0, [])


def test_a_model_that_puts_every_photo_close_raises_the_threshold() -> None:
    rng = np.random.default_rng(2)
    spread = _unit(rng.normal(size=(200, 64)))  # unrelated photos far apart, as under a real CLIP
    assert duplicates.collapse_threshold(spread) == duplicates.DEFAULT_THRESHOLD
    crowded = _unit(np.ones(64) + 0.05 * rng.normal(size=(200, 64)))  # all within ~0.99 of each other
    raised = duplicates.collapse_threshold(crowded)
    pairs = (crowded @ crowded.T)[np.triu_indices(200, 1)]
    assert raised > 0.97 and (pairs > raised).mean() <= 0.01
    assert duplicates.collapse_threshold(spread[:1]) == duplicates.DEFAULT_THRESHOLD


def _copy(src: Path, dst: Path, quality: int) -> Path:
    with Image.open(src) as im:
        im.save(dst, quality=quality)
    return dst


@pytest.fixture()
def with_copies(tmp_path: Path, encoder):  # type: ignore[no-untyped-def]
    root = tmp_path / "photos"
    files = textures(root, 30)
    _copy(files[3], root / "copy_a.jpg", 60)
    _copy(files[3], root / "copy_b.jpg", 40)
    col = Collection(tmp_path / "data")
    ingest(root, col, encoder, QUIET)
    searcher = Searcher(col, encoder, col.store.load(), collapse=True)  # as the server opens it
    yield searcher, files
    col.close()


def test_search_folds_copies_into_one_hit_and_show_all_shows_them(with_copies) -> None:  # type: ignore[no-untyped-def]
    searcher, files = with_copies
    from retrieval import load_query_image

    img, _ = load_query_image(files[3])
    every = searcher.search(Query(image=img, top_k=40, show_all=True)).results
    names = {h.id: Path(h.path).name for h in every}
    folded = searcher.search(Query(image=img, top_k=40))
    top = folded.results[0]
    assert Path(top.path) == files[3]
    assert sorted(names[i] for i in top.similar) == ["copy_a.jpg", "copy_b.jpg"]
    shown = [Path(h.path).name for h in folded.results]
    assert "copy_a.jpg" not in shown and "copy_b.jpg" not in shown
    everything = searcher.search(Query(image=img, top_k=40, show_all=True))
    assert len(everything.results) == 32 and all(not h.similar for h in everything.results)
    assert len(folded.results) == 32 - sum(len(h.similar) for h in folded.results)
    assert top.to_dict()["similar"] == top.similar
    # pages stay full and consistent: page 2 continues page 1 without repeating a hit
    p1 = searcher.search(Query(image=img, top_k=5))
    p2 = searcher.search(Query(image=img, top_k=5, offset=5))
    assert [h.id for h in p1.results + p2.results] == [h.id for h in folded.results[:10]]
    searcher.collapse = False  # the setting off: every copy is a hit again
    assert len(searcher.search(Query(image=img, top_k=40)).results) == 32
