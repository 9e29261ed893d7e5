"""The table of index kinds drives the CLI's choices, the sizing rules, auto and tune-index, and every
index kind (FAISS in memory, on-disk IVF, sharded) is one `Index` that answers partial results alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from explainer.cli.app import app
from retrieval.distributed.sharded import ShardedIndex, ShardedVectorIndex
from retrieval.encoders import l2_normalise
from retrieval.errors import ConfigError
from retrieval.index import kinds
from retrieval.index.auto import choose_index
from retrieval.index.base import Index
from retrieval.index.faiss_index import VectorIndex
from retrieval.index.kinds import KINDS, estimate_bytes, kind_of, resolve_factory
from retrieval.index.ondisk import OnDiskLayout
from retrieval.index.ondisk_store import OnDiskVectorIndex, build_version, open_version
from retrieval.index.params import IndexParams, SearchParams, ivf_lists, pq_subquantizers
from retrieval.index.tuning import candidates, factory_for
from tests.helpers import make_folder

runner = CliRunner()


def _vecs(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    return l2_normalise(np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32))


def test_the_cli_offers_every_row_and_refuses_a_typo_with_the_list(tmp_path: Path) -> None:
    r = runner.invoke(app, ["index", "--help"], env={"COLUMNS": "400"})
    help_text = " ".join(r.output.split())
    assert r.exit_code == 0
    for row in KINDS:
        assert f"{row.name} ({row.summary})" in help_text
    assert "auto (" in help_text
    make_folder(tmp_path / "imgs", 1)
    r = runner.invoke(
        app, ["index", str(tmp_path / "imgs"), "--data-dir", str(tmp_path / "d"), "--index", "hsnw"]
    )
    assert r.exit_code == 2, r.output
    # refused before any model loads (the default model is not on this machine), naming every choice
    assert "unknown index kind 'hsnw'" in r.stderr and "encoder" not in r.stderr
    for name in kinds.names():
        assert name in r.stderr
    assert not (tmp_path / "d").exists()


def test_every_name_and_alias_is_accepted_and_resolves_to_its_own_row() -> None:
    dim = 64
    for row in KINDS:
        for name in (row.name, *row.aliases, row.name.upper()):
            assert kinds.check_name(name) == name and kinds.kind(name) is row
            if row.name != "ivf":  # ivf takes its lists from the command line
                assert factory_for(name) == name
        n = max(row.min_vectors, 2000)
        built, note = resolve_factory(row.name, n, dim)
        assert note == "" and built == row.factory(n, dim) and kind_of(built) is row
        if row.min_vectors:  # too few vectors to train: exact search, and the row says why
            built, note = resolve_factory(row.name, row.min_vectors - 1, dim)
            assert built == "Flat" and note
    # how each kind builds and opens, and what its captions index is, come from its row
    disk = kinds.kind("ivf-ondisk")
    assert disk is not None and kinds.builder_for("ivf-ondisk") is disk.builder is build_version
    assert kinds.opener_for("ivf-ondisk") is open_version
    assert kinds.captions_kind("ivf-ondisk", "ivf-ondisk") == "flat"
    for built, asked in (("HNSW16", "HNSW16"), ("IVF64,Flat", "ivf"), ("IVF256,SQ8", "IVF256,SQ8")):
        assert kinds.builder_for(built) is kinds.build_in_memory
        assert kinds.opener_for(built) is kinds.open_faiss_file
        assert kinds.captions_kind(built, asked) == asked
    assert kinds.check_name("IVF256,SQ8") == "IVF256,SQ8"  # FAISS strings pass on to FAISS
    assert kinds.check_name("auto") == "auto"
    with pytest.raises(ConfigError, match="ivf-ondisk"):
        factory_for("hsnw")
    with pytest.raises(ConfigError, match="use one of flat, hnsw, ivf, ivfpq, ivf-ondisk, auto"):
        resolve_factory("Bogus99", 10, dim)


def test_one_sizing_rule_for_ivfpq_the_ondisk_ivf_and_tune_index() -> None:
    # the figures the three copies of the rule gave before they became one
    assert resolve_factory("ivfpq", 100_000, 512)[0] == "IVF1024,PQ64np,Refine(SQ8)"
    assert resolve_factory("ivfpq", 1_500, 32)[0] == "IVF38,PQ4np,Refine(SQ8)"
    assert OnDiskLayout.for_size(100_000, 512) == OnDiskLayout(nlist=1024, pq_m=64)
    assert OnDiskLayout.for_size(1_500, 32) == OnDiskLayout(nlist=38, pq_m=16)  # 16 code bytes at least
    assert OnDiskLayout.for_size(10, 64).nlist == 1
    for n, dim in ((1_500, 32), (100_000, 512), (3_000_000, 768)):
        assert OnDiskLayout.for_size(n, dim) == OnDiskLayout(
            ivf_lists(n), pq_subquantizers(dim, min_bytes=16)
        )
        wanted = f"IVF{ivf_lists(n, floor=16)},PQ{pq_subquantizers(dim)}np"
        assert kinds.kind("ivfpq").factory(n, dim) == wanted + ",Refine(SQ8)"  # type: ignore[union-attr]
        tuned = {c.factory for c in candidates(n, dim, memory_budget=1 << 62)[0] if c.kind == "ivfpq"}
        assert tuned == {wanted}  # tune-index measures the same lists and codes, without the re-ranking
    # tune-index reports each candidate's knobs as its row lists them
    reported = {c.kind: list(c.params()) for c in candidates(5_000, 64)[0]}
    assert reported == {
        "flat": [],
        "hnsw": ["hnsw_m", "ef_construction", "ef_search"],
        "ivf": ["nlist", "nprobe"],
        "ivfpq": ["nlist", "nprobe"],
    }


def test_auto_and_tune_index_size_candidates_with_the_same_estimate() -> None:
    n, dim = 1_000_000, 512
    # auto's figures as they were before the table: flat, HNSW32, IVF-PQ + SQ8, on-disk
    assert estimate_bytes("flat", n, dim) == 2_056_000_000
    assert estimate_bytes("hnsw", n, dim) == 2_329_920_000 == estimate_bytes("HNSW32", n, dim)
    assert estimate_bytes("ivfpq", n, dim) == 592_000_000
    assert estimate_bytes("ivf-ondisk", n, dim) == 8_716_288
    every, _ = candidates(n, dim, memory_budget=1 << 62)
    for budget in (600_000_000, 2_200_000_000, 2_400_000_000):
        kept, skipped = candidates(n, dim, memory_budget=budget)
        assert kept == [c for c in every if estimate_bytes(c.factory, n, dim) <= budget]
        dropped = {f"{c.kind} {c.factory}" for c in every if c not in kept}
        assert {s.split(":")[0] for s in skipped} == dropped
        choice = choose_index(n, dim, budget)
        assert choice.estimated_bytes == estimate_bytes(choice.kind, n, dim) <= budget
    assert [choose_index(n, dim, b).kind for b in (600_000_000, 2_200_000_000, 2_400_000_000)] == [
        "ivfpq",
        "ivfpq",
        "hnsw",
    ]
    with pytest.raises(ConfigError):
        estimate_bytes("LSH", n, dim)


class _Ref:
    def __init__(self, fn: Any) -> None:
        self.fn = fn


class _Handle:
    """A fake actor handle: `handle.method.remote(*args)` gives a ref that runs the method when got."""

    def __init__(self, obj: Any, broken: bool) -> None:
        self.obj, self.broken = obj, broken

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any) -> _Ref:
            def run() -> Any:
                if self.broken and name == "search":
                    raise RuntimeError("actor died")
                return getattr(self.obj, name)(*args)

            return _Ref(run)

        return type("M", (), {"remote": staticmethod(call)})()


class FakeRay:
    """Enough of Ray's API for ShardedIndex, in this process; the shards in `broken` fail to answer."""

    def __init__(self, broken: set[int]) -> None:
        self.broken, self.made = broken, 0

    def remote(self, **_: Any) -> Any:
        def wrap(cls: Any) -> Any:
            def make(*args: Any) -> _Handle:
                self.made += 1
                return _Handle(cls(*args), self.made - 1 in self.broken)

            return type("A", (), {"remote": staticmethod(make)})()

        return wrap

    def get(self, ref: Any) -> Any:
        return [self.get(r) for r in ref] if isinstance(ref, list) else ref.fn()

    def wait(self, refs: list[Any], num_returns: int, timeout: float) -> tuple[list[Any], list[Any]]:
        return refs, []

    def cancel(self, ref: Any, force: bool = False) -> None: ...

    def kill(self, actor: Any) -> None: ...


def test_every_kind_is_one_index_and_partial_answers_are_part_of_it(tmp_path: Path) -> None:
    x, ids = _vecs(300), np.arange(300, dtype=np.int64) * 3
    flat = VectorIndex.build(ids, x, "Flat", 16)
    disk = OnDiskVectorIndex.build_in(tmp_path / "od", ids, x, 16)
    whole = ShardedVectorIndex(ShardedIndex(ids, x, 16, 3, ray_module=FakeRay(set())), "Flat", IndexParams())
    broken = ShardedVectorIndex(ShardedIndex(ids, x, 16, 3, ray_module=FakeRay({1})), "Flat", IndexParams())
    truth = flat.search(x[:2], 5)[1]
    for idx in (flat, disk, whole, broken):
        assert isinstance(idx, Index) and idx.dim == 16 and idx.ntotal == 300
        assert np.array_equal(np.sort(idx.ids()), ids)
        assert idx.missing_shards == []  # before any search, and always for a local index
        found = idx.search(x[:2], 5)[1]
        moved = idx.with_params(idx.params.with_search(SearchParams(nprobe=7)))
        assert type(moved) is type(idx) and moved.ntotal == 300
    assert np.array_equal(disk.search(x[:2], 5)[1], truth) and np.array_equal(
        whole.search(x[:2], 5)[1], truth
    )
    assert whole.missing_shards == [] and flat.missing_shards == []
    found = broken.search(x[:2], 5)[1]
    assert broken.missing_shards == [1]  # shard 1 did not answer: its ids are missing from the result
    assert not np.isin(found, ids[np.argsort(ids)][1::3]).any()
    for read_only in (disk, broken):
        assert not read_only.supports_add and not read_only.supports_remove
        with pytest.raises(ConfigError, match="read-only"):
            read_only.add(ids[:1], x[:1])
    assert flat.supports_add and flat.supports_remove
