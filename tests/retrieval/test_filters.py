"""Filters: validated by name, resolved against the indexed folders, one predicate in Python and SQL,
and searched exactly whatever the index kind (never fewer hits than the filter admits)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest

from retrieval import Collection, IngestConfig, Query, Searcher
from retrieval.catalog import Catalog
from retrieval.encoders import Encoder, l2_normalise
from retrieval.errors import BadQuery
from retrieval.filters import Scope, resolve
from retrieval.index.base import Index
from retrieval.index.faiss_index import VectorIndex, id_selector
from retrieval.index.filtered import fetch_among
from retrieval.index.params import IndexParams, SearchParams
from retrieval.ingest import ingest
from retrieval.query import Filters
from retrieval.types import Float32Array, Int64Array
from tests.helpers import make_folder

QUIET = IngestConfig(batch_size=4, workers=2, progress=False)


# -- validation and resolution ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ({"after": "2019-13-01"}, "after is not a real date"),
        ({"before": "2019-02-30"}, "before is not a real date"),
        ({"after": "2020-01-02", "before": "2020-01-01"}, r"after \(2020-01-02\) is later than before"),
        ({"type": "exe"}, "type must be one of jpeg"),
        ({"orientation": "diagonal"}, "orientation must be one of landscape, portrait, square"),
        ({"folder": "  "}, "folder is empty"),
        ({"folder": "a\x00b"}, "NUL character"),
        ({"after": "14/07/2019"}, "after is malformed"),
        ({"min_size": 0}, "min size must be between 1 and"),
    ],
)
def test_bad_filters_are_refused_by_name(filters: dict[str, object], message: str) -> None:
    with pytest.raises(BadQuery, match=message):
        Query(text="x", **filters).validate()  # type: ignore[arg-type]


def test_good_filters_validate() -> None:
    Query(
        text="x", after="2019-01-01", before="2019-01-01", type="JPG", orientation="square", min_size=5
    ).validate()


def test_folders_resolve_under_the_indexed_roots(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "2019" / "trip").mkdir(parents=True)
    (b / "2019").mkdir(parents=True)
    roots = [str(a), str(b)]
    assert resolve(Filters(folder="2019"), roots) == Scope(
        prefixes=(f"{a}/2019/".encode(), f"{b}/2019/".encode())
    )
    assert resolve(Filters(folder=f"{a}/2019/trip/"), roots) == Scope(prefixes=(f"{a}/2019/trip/".encode(),))
    assert resolve(Filters(folder=str(a)), roots) == Scope(prefixes=(f"{a}/".encode(),))
    with pytest.raises(BadQuery, match="outside every indexed folder"):
        resolve(Filters(folder=str(tmp_path)), roots)
    with pytest.raises(BadQuery, match="outside every indexed folder"):
        resolve(Filters(folder=f"{a}-other"), roots)  # a sibling sharing the root's name as a prefix
    with pytest.raises(BadQuery, match="no folder nowhere in any indexed folder"):
        resolve(Filters(folder="nowhere"), roots)
    with pytest.raises(BadQuery, match="leaves the indexed folders"):
        resolve(Filters(folder="../b"), roots)
    with pytest.raises(BadQuery, match="records no indexed folders"):
        resolve(Filters(folder="2019"), [])
    assert resolve(Filters(), roots) is None
    scope = resolve(Filters(before="2019-12-31", type="jpg", orientation="Portrait"), roots)
    assert scope == Scope(before_next="2020-01-01", format="jpeg", orientation="portrait")


def test_the_python_and_sql_predicates_agree(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "c.sqlite")
    rng = np.random.default_rng(0)
    folders = ["", "2019", "2019/trip", "2020", "2019-other"]
    for n in range(300):
        folder = folders[n % len(folders)]
        path = f"/p/{folder}/{n}.jpg" if folder else f"/p/{n}.jpg"
        i = cat.add_pending(path, 1, 1)
        w, h = (int(x) for x in rng.integers(10, 40, 2))
        cat.commit_indexed("m", [(i, f"h{n}", w, h)], {})
        if n % 11:  # some rows keep no metadata, as an old catalog's do until the next index
            day = f"2019-{1 + n % 12:02d}-{1 + n % 28:02d}T{n % 24:02d}:00:00"
            cat.set_photo_meta([(i, day, "exif", ["jpeg", "png"][n % 2], folder)])
    records = cat.iter_images()
    scopes = [
        Scope(),
        Scope(prefixes=(b"/p/2019/",)),
        Scope(prefixes=(b"/p/2019/", b"/p/2020/")),
        Scope(after="2019-06-01"),
        Scope(before_next="2019-03-01"),
        Scope(after="2019-02-01", before_next="2019-02-10"),
        Scope(format="png"),
        Scope(min_size=25),
        Scope(orientation="square"),
        Scope(orientation="landscape", format="jpeg"),
        Scope(orientation="portrait", prefixes=(b"/p/2019/trip/",), after="2019-05-01"),
    ]
    for scope in scopes:
        by_python = {r.id for r in records if scope.admits(r)}
        by_sql = set(cat.ids_where(*scope.where()).tolist())
        assert by_python == by_sql, scope
        assert 0 < len(by_sql) < 300 or scope == Scope()


def test_id_selector_admits_exactly_the_allowed_ids() -> None:
    for allowed in (np.array([1, 2, 3, 8, 9, 16], np.int64), np.array([5, 10**9], np.int64)):
        sel, _keep = id_selector(allowed)
        probe = [*range(40), 10**9, 10**9 + 1]
        assert [i for i in probe if sel.is_member(i)] == [i for i in probe if i in set(allowed.tolist())]


# -- exact filtered search, kind by kind ----------------------------------------------------------


class NoSelector(Index):
    """An index kind without ID selectors (as the on-disk and sharded kinds are)."""

    def __init__(self, inner: VectorIndex) -> None:
        super().__init__(inner.dim, "test", IndexParams())
        self.inner = inner

    @property
    def ntotal(self) -> int:
        return self.inner.ntotal

    def ids(self) -> Int64Array:
        return self.inner.ids()

    def search(
        self, queries: Float32Array, k: int, params: SearchParams | None = None
    ) -> tuple[Float32Array, Int64Array]:
        return self.inner.search(queries, k, params)

    def with_params(self, params: IndexParams) -> Index:
        return self


@pytest.fixture(scope="module")
def data() -> tuple[Int64Array, Float32Array, Float32Array]:
    rng = np.random.default_rng(1)
    vecs = l2_normalise(rng.standard_normal((3000, 32)).astype(np.float32))
    ids = np.arange(1, 3001, dtype=np.int64)
    queries = l2_normalise(rng.standard_normal((5, 32)).astype(np.float32))
    return ids, vecs, queries


KINDS = ["Flat", "HNSW8", "IVF16,Flat", "IVF16,PQ4x4,Refine(Flat)", "no-selector"]


@pytest.mark.parametrize("factory", KINDS)
@pytest.mark.parametrize("keep", [0.003, 0.5])
@pytest.mark.parametrize("scan_max", [0, 20_000])
def test_filtered_search_is_never_short_and_flat_is_exact(
    data: tuple[Int64Array, Float32Array, Float32Array],
    factory: str,
    keep: float,
    scan_max: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("retrieval.index.filtered.EXACT_SCAN_MAX", scan_max)  # 0: every index path is taken
    ids, vecs, queries = data
    built = VectorIndex.build(ids, vecs, "Flat" if factory == "no-selector" else factory, 32)
    # a weak beam, so an approximate index really loses filtered hits unless the search makes up for it
    params = SearchParams(nprobe=1, ef_search=8)
    idx: Index = NoSelector(built) if factory == "no-selector" else built
    rng = np.random.default_rng(2)
    allowed = np.sort(rng.choice(ids, max(1, int(keep * len(ids))), replace=False))
    pos = {int(i): n for n, i in enumerate(ids)}

    def vectors_of(chosen: Int64Array) -> tuple[Int64Array, Float32Array]:
        return chosen, vecs[[pos[int(i)] for i in chosen]]

    for q, want in itertools.product(queries, (5, 40)):
        got = fetch_among(idx, q[None], want, allowed, vectors_of, params)
        assert len(got) == min(want, len(allowed))
        assert set(i for _, i in got) <= set(allowed.tolist())
        assert [s for s, _ in got] == sorted((s for s, _ in got), reverse=True)
        if factory in ("Flat", "no-selector") or len(allowed) <= scan_max:
            truth = np.argsort(-(vecs[[pos[int(i)] for i in allowed]] @ q), kind="stable")[:want]
            assert [i for _, i in got] == [int(allowed[t]) for t in truth]
    assert fetch_among(idx, queries[:1], 10, allowed[:0], vectors_of, params) == []


def test_min_score_cuts_a_filtered_search(data: tuple[Int64Array, Float32Array, Float32Array]) -> None:
    ids, vecs, queries = data
    idx = VectorIndex.build(ids, vecs, "Flat", 32)
    got = fetch_among(idx, queries[:1], 50, ids[::3], lambda c: (c, vecs[c - 1]), None, min_score=0.2)
    assert got and all(s >= 0.2 for s, _ in got)


# -- through the searcher --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, encoder: Encoder) -> Path:
    root = tmp_path_factory.mktemp("library")
    photos = root / "photos"
    make_folder(photos / "2019", 10)
    make_folder(photos / "2023" / "home", 3, start=10)
    old = 1_500_000_000 * 10**9  # 2017-07-14
    for p in (photos / "2019").iterdir():
        os.utime(p, ns=(old, old))
    col = Collection(root / "data")
    ingest(photos, col, encoder, QUIET)
    col.close()
    return root


def test_searcher_filters_by_folder_and_date(library: Path, encoder: Encoder) -> None:
    col = Collection(library / "data")
    s = Searcher(col, encoder, col.store.load())
    res = s.search(Query(text="a red square", top_k=10, folder="2023"))
    assert len(res.results) == 3 and all("/2023/home/" in h.path for h in res.results)
    assert not res.has_more
    res = s.search(Query(text="a red square", top_k=10, folder=str(library / "photos" / "2023" / "home")))
    assert len(res.results) == 3
    res = s.search(Query(text="a red square", top_k=20, before="2018-01-01"))
    assert len(res.results) == 10 and all("/2019/" in h.path for h in res.results)
    res = s.search(Query(text="a red square", top_k=20, after="2018-01-01", type="jpeg"))
    assert {Path(h.path).parent.name for h in res.results} == {"home"}
    assert s.search(Query(text="a red square", type="png")).results == []
    with pytest.raises(BadQuery, match="outside every indexed folder"):
        s.search(Query(text="a red square", folder="/"))
    page2 = s.search(Query(text="a red square", top_k=2, offset=2, folder="2023"))
    assert [h.rank for h in page2.results] == [3]
    like = res.results[0].id if res.results else None
    more = s.search(Query(image=None, text="x", like_id=like, folder="2023"))
    assert like not in [h.id for h in more.results] and len(more.results) == 2


def test_the_ondisk_kind_filters_exactly_from_its_own_rows(
    tmp_path: Path, data: tuple[Int64Array, Float32Array, Float32Array]
) -> None:
    from retrieval.index.ondisk_store import OnDiskVectorIndex

    ids, vecs, queries = data
    idx = OnDiskVectorIndex.build_in(tmp_path / "disk", ids, vecs, 32, shards=2)
    assert idx.search_among(queries[:1], 5, ids[:10]) is None  # no selector: the searcher works around it
    held = idx.stored_vectors(ids[[3, 1, 2000]])
    assert held is not None and np.array_equal(held, vecs[[3, 1, 2000]])
    assert idx.stored_vectors(np.array([1, 99_999], np.int64)) is None  # an id it does not hold
    allowed = ids[5::7]

    def vectors_of(chosen: Int64Array) -> tuple[Int64Array, Float32Array]:
        got = idx.stored_vectors(chosen)
        assert got is not None
        return chosen, got

    for q in queries:
        got = fetch_among(idx, q[None], 12, allowed, vectors_of, None)
        truth = np.argsort(-(vecs[allowed - 1] @ q), kind="stable")[:12]
        assert [i for _, i in got] == [int(allowed[t]) for t in truth]
