"""The Ray engine on a local 2-CPU cluster: parity with the local engine, workers and driver killed,
on-disk shards filled as Ray tasks, and sharded search with a shard down."""

from __future__ import annotations

import dataclasses
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retrieval import Collection, IngestConfig, Query, Searcher, imageio
from retrieval.catalog import Catalog
from retrieval.distributed.ingest import RayConfig, check_fits, ray_ingest, read_shard, write_shard
from retrieval.distributed.sharded import ShardedIndex, ShardedVectorIndex
from retrieval.encoders import Encoder, EncoderConfig
from retrieval.errors import ConfigError
from retrieval.evidence import PatchStore
from retrieval.index.params import IndexParams
from retrieval.ingest import Committer, IngestSummary, ingest
from retrieval.testing.faults import CountingEncodeActor, FaultyEncodeActor, crashed, encoded_count
from tests.helpers import draw_shape, env_offline, make_folder

pytestmark = pytest.mark.slow
QUIET = IngestConfig(batch_size=8, progress=False)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    # address="local": a private cluster even when this machine runs one (ray.init alone would join it)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _cfg(**kw: Any) -> RayConfig:
    return RayConfig(workers=2, threads=1, **kw)


@pytest.fixture
def ray_run(encoder: Encoder, tiny_clip_dir: Path, ray_cluster: Any) -> Callable[..., IngestSummary]:
    """`ray_ingest` of a folder with the tiny CLIP on the test cluster: (source, data dir or collection,
    RayConfig (default `_cfg()`), IngestConfig (default QUIET))."""

    def run(
        src: Path, data: Path | Collection, ray_config: RayConfig | None = None, config: IngestConfig = QUIET
    ) -> IngestSummary:
        collection = data if isinstance(data, Collection) else Collection(data)
        return ray_ingest(
            src,
            collection,
            encoder,
            EncoderConfig(str(tiny_clip_dir), "cpu", precision="fp32"),
            config,
            ray_config or _cfg(),
        )

    return run


def _indexed_so_far(data: Path) -> int:
    """Images the running driver has committed; 0 until its catalog exists with its tables (the file
    appears a moment before its schema does)."""
    if not (data / "catalog.sqlite").exists():
        return 0
    try:
        return _state(data)[0]
    except sqlite3.OperationalError:  # "no such table" while the schema is being created
        return 0


def _state(data: Path) -> tuple[int, int, int, int]:
    """(indexed images, pending, distinct paths, stored embeddings) straight from SQLite."""
    con = sqlite3.connect(data / "catalog.sqlite")
    try:
        indexed = con.execute("SELECT COUNT(*) FROM images WHERE state='indexed'").fetchone()[0]
        pending = con.execute("SELECT COUNT(*) FROM images WHERE state='pending'").fetchone()[0]
        paths = con.execute("SELECT COUNT(DISTINCT path) FROM images").fetchone()[0]
        vectors = con.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]
    finally:
        con.close()
    return int(indexed), int(pending), int(paths), int(vectors)


def test_ray_engine_matches_local_engine(
    tmp_path: Path, encoder: Encoder, ray_run: Callable[..., IngestSummary]
) -> None:
    files = make_folder(tmp_path / "imgs", 24)
    (tmp_path / "imgs" / "copy.jpg").write_bytes(files[3].read_bytes())  # identical content: dedup
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with_patches = dataclasses.replace(QUIET, patch_features=True)
    local = ingest(tmp_path / "imgs", Collection(tmp_path / "local"), encoder, with_patches)
    dist = ray_run(tmp_path / "imgs", tmp_path / "ray", config=with_patches)
    assert (
        (dist.scanned, dist.encoded, dist.reused, dist.failed)
        == (
            local.scanned,
            local.encoded,
            local.reused,
            local.failed,
        )
        == (26, 24, 1, 1)
    )
    assert dist.failures == local.failures
    a, b = Collection(tmp_path / "local").catalog, Collection(tmp_path / "ray").catalog
    fp, dim = encoder.info.fingerprint, encoder.info.dim
    ids_a, vec_a = a.indexed_vectors(fp, dim)
    ids_b, vec_b = b.indexed_vectors(fp, dim)
    assert np.array_equal(ids_a, ids_b)  # same ids: the driver assigns them in the same scan
    assert [r.path for r in a.iter_images()] == [r.path for r in b.iter_images()]
    # both engines decode to the same uint8 crops and normalise them the same way (retrieval/encoders/feed.py)
    assert float(np.abs(vec_a - vec_b).max()) < 1e-6
    for text in ["red", "a blue circle", "yellow square"]:
        ra = Searcher.open(tmp_path / "local", encoder=encoder).search(Query(text=text, top_k=10))
        rb = Searcher.open(tmp_path / "ray", encoder=encoder).search(Query(text=text, top_k=10))
        assert [h.path for h in ra.results] == [h.path for h in rb.results]  # type: ignore[union-attr]
    assert not list((tmp_path / "ray" / "shards").glob("*"))  # every shard committed and removed
    # both engines store each content's patch features from the pass that embeds it, alike
    assert dist.patches_stored == local.patches_stored == 24
    store_a, store_b = (
        PatchStore(tmp_path / "local", encoder.info),
        PatchStore(tmp_path / "ray", encoder.info),
    )
    assert store_a.stored_keys() == store_b.stored_keys() and len(store_a.stored_keys()) == 24
    for key in store_a.stored_keys():
        fa, fb = store_a.get(key), store_b.get(key)
        assert fa is not None and fb is not None and float(np.abs(fa - fb).max()) < 1e-2
    # incremental: a second run finds nothing to do, like the local engine
    again = ray_run(tmp_path / "imgs", tmp_path / "ray")
    assert (again.encoded, again.unchanged) == (0, 26)  # the broken file is unchanged too


def test_a_worker_killed_mid_run_is_retried(tmp_path: Path, ray_run: Callable[..., IngestSummary]) -> None:
    make_folder(tmp_path / "imgs", 20)
    marker = tmp_path / "crashed"
    summary = ray_run(
        tmp_path / "imgs",
        tmp_path / "d",
        _cfg(actor_cls=FaultyEncodeActor, actor_kwargs={"crash_marker": str(marker)}),
    )
    assert crashed(marker)  # one actor really died (os._exit) on its first batch
    assert (summary.encoded, summary.failed) == (20, 0)
    assert _state(tmp_path / "d") == (20, 0, 20, 20)


def test_a_moved_folder_is_not_encoded_again(tmp_path: Path, ray_run: Callable[..., IngestSummary]) -> None:
    make_folder(tmp_path / "imgs", 12)
    data = Collection(tmp_path / "d")
    first = ray_run(tmp_path / "imgs", data)
    assert first.encoded == 12
    (tmp_path / "imgs").rename(tmp_path / "moved")  # every path new, every content known
    counts = tmp_path / "counts"
    counting = _cfg(actor_cls=CountingEncodeActor, actor_kwargs={"count_file": str(counts)})
    moved = ray_run(tmp_path / "moved", data, counting)
    assert (moved.new, moved.encoded, moved.reused) == (12, 0, 12)
    assert counts.exists() and encoded_count(counts) == 0  # batches went through, none was encoded
    # the old root stays in the catalog until it is scanned again: 24 paths, 12 vectors
    assert _state(tmp_path / "d") == (24, 0, 24, 12)
    make_folder(tmp_path / "moved" / "more", 1, start=12)  # new content
    counts.unlink()
    more = ray_run(tmp_path / "moved", data, counting)
    assert (more.new, more.encoded) == (1, 1) and encoded_count(counts) == 1
    assert _state(tmp_path / "d") == (25, 0, 25, 13)


def test_a_key_that_matched_unstored_content_is_encoded_after_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ray_run: Callable[..., IngestSummary]
) -> None:
    files = make_folder(tmp_path / "imgs", 6)
    # keys for every file while nothing is stored: what a 64-bit collision would look like, six times
    keys = np.sort(
        np.array([imageio.hash_key(imageio.content_hash(f.read_bytes())) for f in files], np.uint64)
    )
    monkeypatch.setattr(Catalog, "embedded_hash_keys", lambda self, model: keys)
    counts = tmp_path / "counts"
    summary = ray_run(
        tmp_path / "imgs",
        tmp_path / "d",
        _cfg(actor_cls=CountingEncodeActor, actor_kwargs={"count_file": str(counts)}),
    )
    assert (summary.encoded, summary.reused, summary.failed) == (6, 0, 0)
    assert encoded_count(counts) == 6  # skipped on the first pass, encoded on the second
    assert _state(tmp_path / "d") == (6, 0, 6, 6)


def test_the_file_size_limit_holds_on_ray_as_locally(
    tmp_path: Path, encoder: Encoder, ray_run: Callable[..., IngestSummary]
) -> None:
    make_folder(tmp_path / "imgs", 3)
    small = IngestConfig(batch_size=8, progress=False, max_file_bytes=100)  # every JPEG here is larger
    local = ingest(tmp_path / "imgs", Collection(tmp_path / "local"), encoder, small)
    dist = ray_run(tmp_path / "imgs", tmp_path / "ray", _cfg(), small)
    assert (dist.encoded, dist.failed) == (local.encoded, local.failed) == (0, 3)
    assert dist.failures == local.failures


DRIVER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from retrieval import Collection, IngestConfig
    from retrieval.distributed.ingest import RayConfig, ray_ingest
    from retrieval.encoders import EncoderConfig, create_encoder
    from retrieval.testing.faults import FaultyEncodeActor
    imgs, data, model = sys.argv[1:4]
    cfg = EncoderConfig(model, "cpu", precision="fp32")
    ray_ingest(Path(imgs), Collection(Path(data)), create_encoder(cfg), cfg,
               IngestConfig(batch_size=4, progress=False),
               RayConfig(workers=1, threads=1, local_cpus=2, actor_cls=FaultyEncodeActor,
                         actor_kwargs={"delay_s": 1.0}))
    """
)


def test_driver_killed_then_resumed_loses_and_duplicates_nothing(
    tmp_path: Path, encoder: Encoder, tiny_clip_dir: Path, ray_run: Callable[..., IngestSummary]
) -> None:
    files = make_folder(tmp_path / "imgs", 40)
    (tmp_path / "imgs" / "dup.jpg").write_bytes(files[0].read_bytes())
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    data = tmp_path / "d"
    # its own session, so kill -9 takes the driver and the private cluster it started, as a lost machine would
    proc = subprocess.Popen(
        [sys.executable, str(driver), str(tmp_path / "imgs"), str(data), str(tiny_clip_dir)],
        env=env_offline(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if _indexed_so_far(data) >= 4:
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"driver ended early: {proc.stderr.read()[-800:] if proc.stderr else ''}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = _state(data)
    assert 4 <= before[0] < 41 and before[1] > 0  # killed mid-run: some committed, some still pending
    summary = ray_run(tmp_path / "imgs", data)
    indexed, pending, paths, vectors = _state(data)
    assert (indexed, pending, paths) == (41, 0, 41)
    assert vectors == 40  # one vector per distinct content: nothing stored twice
    assert summary.encoded + summary.reused <= 41 - before[0] + 1
    ids, _ = Collection(data).catalog.indexed_vectors(encoder.info.fingerprint, encoder.info.dim)
    assert Collection(data).store.load().images.ntotal == len(ids) == 41


def test_shards_left_by_a_killed_driver_are_committed_not_re_encoded(
    tmp_path: Path, encoder: Encoder, ray_run: Callable[..., IngestSummary]
) -> None:
    make_folder(tmp_path / "imgs", 6)
    data = tmp_path / "d"
    col = Collection(data)
    ingest(tmp_path / "imgs", col, encoder, QUIET)
    pending = sorted(col.catalog.iter_images(), key=lambda r: r.id)
    vectors = col.catalog.get_embeddings([r.content_hash or "" for r in pending], encoder.info.fingerprint)
    # pretend the last run was killed between writing a shard and committing it
    with col.catalog.transaction() as db:
        db.execute("UPDATE images SET state='pending'")
        db.execute("DELETE FROM embeddings")
    batch = {
        "image_id": np.asarray([r.id for r in pending]),
        "content_hash": np.asarray([r.content_hash for r in pending], dtype=object),
        "width": np.asarray([r.width for r in pending]),
        "height": np.asarray([r.height for r in pending]),
        "error": np.asarray([""] * len(pending), dtype=object),
        "vector": np.stack([vectors[r.content_hash or ""] for r in pending]),
    }
    shard = write_shard(data / "shards", batch)
    assert np.array_equal(read_shard(shard)["vector"], batch["vector"])
    summary = ray_run(tmp_path / "imgs", data)
    assert summary.encoded == 6 and not shard.exists()
    assert _state(data) == (6, 0, 6, 6)
    stray = Committer(Collection(data), encoder.info.fingerprint, IngestSummary(root=""))
    assert stray.waiting == []


def test_ondisk_index_filled_by_ray_tasks(
    tmp_path: Path, encoder: Encoder, ray_run: Callable[..., IngestSummary]
) -> None:
    make_folder(tmp_path / "imgs", 30)
    ingest(tmp_path / "imgs", Collection(tmp_path / "flat"), encoder, QUIET)
    s = ray_run(
        tmp_path / "imgs",
        tmp_path / "disk",
        _cfg(),
        IngestConfig(batch_size=8, progress=False, factory="ivf-ondisk"),
    )
    assert s.index is not None and s.index.built_factory == "ivf-ondisk"
    for text in ["red", "green circle"]:
        a = Searcher.open(tmp_path / "flat", encoder=encoder).search(Query(text=text, top_k=10))
        b = Searcher.open(tmp_path / "disk", encoder=encoder).search(Query(text=text, top_k=10))
        assert [h.path for h in a.results] == [h.path for h in b.results]  # type: ignore[union-attr]


@pytest.mark.parametrize("shards", [2, 4])
def test_sharded_search_is_exact_and_flags_a_dead_shard(shards: int, ray_cluster: Any) -> None:
    rng = np.random.default_rng(shards)
    x = rng.standard_normal((3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = rng.permutation(100_000)[:3000].astype(np.int64)
    q = x[:20] + 0.1 * rng.standard_normal((20, 32)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    s = q @ x.T
    truth = ids[np.array([np.lexsort((ids, -row))[:10] for row in s])]
    index = ShardedIndex(ids, x, 32, shards, timeout_s=30)
    try:
        res = index.search(q, 10)
        assert not res.partial and res.failed_shards == []
        assert np.array_equal(res.ids, truth)
        ray_cluster.kill(index.actors[0])
        deadline = time.monotonic() + 30  # ray.kill is asynchronous: a search may still reach the dying actor
        res = index.search(q, 10)
        while not res.partial and time.monotonic() < deadline:
            time.sleep(0.2)
            res = index.search(q, 10)
        assert res.partial and res.failed_shards == [0]
        assert res.ids.shape == (20, 10) and np.isin(res.ids, ids).all()  # the other shards still answer
    finally:
        index.close()


def test_a_sharded_index_refuses_edits_in_place(ray_cluster: Any) -> None:
    x = np.eye(4, dtype=np.float32)
    sharded = ShardedIndex(np.arange(4, dtype=np.int64), x, 4, 1, timeout_s=30)
    try:
        view = ShardedVectorIndex(sharded, "Flat", IndexParams.for_factory("Flat"))
        assert not view.supports_add and not view.supports_remove  # so the builder rebuilds instead
        with pytest.raises(ConfigError, match="a sharded index is read-only"):
            view.add(np.array([9], dtype=np.int64), x[:1])
        with pytest.raises(ConfigError, match="a sharded index is read-only"):
            view.remove(np.array([0], dtype=np.int64))
        assert view.search(x[2:3], 1)[1].tolist() == [[2]]  # and still answers
    finally:
        sharded.close()


@pytest.mark.parametrize("address", ["http://evil/", "host", "a b:1", "x" * 300 + ":1", "auto; rm -rf /"])
def test_ray_addresses_are_validated(address: str) -> None:
    with pytest.raises(ConfigError, match="Ray address"):
        RayConfig(address=address)
    with pytest.raises(ConfigError, match="workers"):
        RayConfig(workers=0)
    assert RayConfig(address="auto").address == "auto" and RayConfig(address="10.0.0.5:6379").workers == 2


@pytest.mark.parametrize(
    ("workers", "cpus", "gpus", "gpu", "refused"),
    [
        (2, 2, 0, False, None),
        (1, 1, 0, False, None),
        (3, 2, 0, False, "need a CPU each"),  # more actors than cores: model copies, no speed
        (4, 2, 0, False, "need a CPU each"),  # the case Ray Data used to wait on forever
        (2, 8, 1, True, "need 2 GPUs"),
        (4, 2, 4, True, "cannot hold 4 encoder workers"),  # GPUs enough, CPUs not
        (4, 4, 4, True, None),
    ],
)
def test_a_pool_the_cluster_cannot_hold_is_refused(
    workers: int, cpus: float, gpus: float, gpu: bool, refused: str | None
) -> None:
    if refused is None:
        check_fits(workers, cpus, gpus, gpu)
    else:
        with pytest.raises(ConfigError, match=refused):
            check_fits(workers, cpus, gpus, gpu)


def test_too_many_workers_fail_at_once_on_a_real_cluster(
    tmp_path: Path, ray_run: Callable[..., IngestSummary]
) -> None:
    make_folder(tmp_path / "imgs", 4)
    started = time.monotonic()
    with pytest.raises(ConfigError, match="the Ray cluster has 2"):
        ray_run(tmp_path / "imgs", tmp_path / "d", RayConfig(workers=4, threads=1))
    assert time.monotonic() - started < 120  # refused, not left waiting for CPUs that never come
    # nothing was lost: the scanned images wait as pending for a run with a pool that fits
    assert _state(tmp_path / "d")[:2] == (0, 4)


def test_the_embedded_default_never_imports_ray(tmp_path: Path, tiny_clip_dir: Path) -> None:
    make_folder(tmp_path / "imgs", 3)
    code = textwrap.dedent(
        """
        import sys
        from explainer.cli.app import main
        folder, model, data = sys.argv[1:4]
        sys.argv = ["clearsight", "index", folder, "--model", model, "--data-dir", data, "-q"]
        try:
            main()
        except SystemExit as exc:
            assert not exc.code, exc.code
        print("RAY_LOADED" if "ray" in sys.modules else "RAY_NOT_LOADED")
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "imgs"), str(tiny_clip_dir), str(tmp_path / "d")],
        env=env_offline(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-800:]
    assert r.stdout.strip().endswith("RAY_NOT_LOADED")


@pytest.mark.scale
def test_scale_ondisk_shards_on_ray_keep_recall(tmp_path: Path, ray_cluster: Any) -> None:
    """200k clustered 128-d vectors, shards filled as Ray tasks: defaults reach recall@10 >= 0.95."""
    from retrieval.distributed.ingest import shard_runner
    from retrieval.index import ondisk

    rng = np.random.default_rng(0)
    n, dim = 200_000, 128
    centres = rng.standard_normal((2000, dim)).astype(np.float32)
    x = centres[rng.integers(0, 2000, n)] + 0.35 * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.choice(n, 200, replace=False)] + 0.05 * rng.standard_normal((200, dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    truth = np.argsort(-(q @ x.T), axis=1)[:, :10]
    idx = ondisk.build(np.arange(n), x, dim, tmp_path / "idx", shards=4, runner=shard_runner(_cfg()))
    _, found = idx.search(q, 10)
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)])
    assert recall >= 0.95


@pytest.mark.scale
def test_scale_ray_engine_parity_on_500_images(
    tmp_path: Path, encoder: Encoder, ray_run: Callable[..., IngestSummary]
) -> None:
    make_folder(tmp_path / "imgs", 500)
    ingest(tmp_path / "imgs", Collection(tmp_path / "local"), encoder, QUIET)
    ray_run(tmp_path / "imgs", tmp_path / "ray", _cfg(), IngestConfig(batch_size=32, progress=False))
    fp, dim = encoder.info.fingerprint, encoder.info.dim
    ids_a, vec_a = Collection(tmp_path / "local").catalog.indexed_vectors(fp, dim)
    ids_b, vec_b = Collection(tmp_path / "ray").catalog.indexed_vectors(fp, dim)
    assert np.array_equal(ids_a, ids_b) and np.allclose(vec_a, vec_b, atol=1e-5)


def test_serve_with_ray_engine_answers_like_local_and_flags_a_dead_shard(
    tmp_path: Path, tiny_clip_dir: Path, ray_cluster: Any
) -> None:
    from fastapi.testclient import TestClient

    from explainer.server import create_app
    from retrieval.distributed.sharded import ShardedVectorIndex
    from tests.server_kit import build_collection, server_settings

    data = build_collection(tmp_path, tiny_clip_dir, n=12)
    body = {"text": "a red circle", "top_k": 6, "explain": False}
    with TestClient(create_app(server_settings(data, tmp_path / "l"))) as local:
        want = local.post("/api/search", json=body).json()
    settings = server_settings(data, tmp_path / "r", engine="ray", shards=3)
    with TestClient(create_app(settings)) as client:
        got = client.post("/api/search", json=body).json()
        assert [c["id"] for c in got["results"]] == [c["id"] for c in want["results"]]
        assert got["partial"] is False and got["missing_shards"] == []
        images = client.app.state.clearsight.pipeline.searcher.index.images  # type: ignore[attr-defined]
        assert isinstance(images, ShardedVectorIndex) and len(images.sharded.actors) == 3
        ray_cluster.kill(images.sharded.actors[1])
        # another query: the one above is answered from the result cache, without asking the shards
        r = client.post("/api/search", json={**body, "text": "a blue square"})
        assert r.status_code == 200
        assert r.json()["partial"] is True and r.json()["missing_shards"] == [1]
        page = client.get("/", params={"q": "a green circle"})
        assert page.status_code == 200 and "Partial results" in page.text


def test_an_unreachable_cluster_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from retrieval.distributed.ingest import connect

    def refuse(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Failed to connect to Ray cluster at 10.9.9.9:6379")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(ConfigError, match=r"cannot reach a Ray cluster at '10.9.9.9:6379'.*ray status"):
        connect(RayConfig(address="10.9.9.9:6379"))


def test_a_file_name_that_is_not_utf8_is_indexed_on_ray(
    tmp_path: Path, ray_run: Callable[..., IngestSummary]
) -> None:
    """Issue 23: a surrogate-escaped path (what Python makes of such a name) reaches the decode tasks
    intact, and the file is indexed as with the local engine."""
    src = tmp_path / "imgs"
    make_folder(src, 3)
    odd = Path(os.fsdecode(os.path.join(os.fsencode(src), b"caf\xe9_\xff.jpg")))
    draw_shape(odd, 7)
    summary = ray_run(src, tmp_path / "d")
    assert (summary.encoded, summary.failed, len(summary.odd_names)) == (4, 0, 1) and summary.accounts()
    rec = Collection(tmp_path / "d").catalog.image_by_path(str(odd))
    assert rec is not None and rec.state == "indexed"


def test_a_driver_without_a_model_takes_the_text_tower_from_an_actor(
    tmp_path: Path, encoder: Encoder, tiny_clip_dir: Path, ray_cluster: Any
) -> None:
    """`ray_ingest` with no driver encoder (a first `index --engine ray`): an actor stores the text tower
    in the collection, the driver answers text from it, and the index equals the local engine's."""
    from retrieval.encoders import texttower

    make_folder(tmp_path / "imgs", 6)
    local = ingest(tmp_path / "imgs", Collection(tmp_path / "local"), encoder, QUIET)
    data = tmp_path / "ray"
    dist = ray_ingest(
        tmp_path / "imgs",
        Collection(data),
        None,
        EncoderConfig(str(tiny_clip_dir), "cpu", precision="fp32"),
        QUIET,
        _cfg(),
    )
    assert (dist.encoded, dist.failed) == (local.encoded, local.failed) == (6, 0)
    assert texttower.read_meta(texttower.tower_dir(data, encoder.info.fingerprint)) is not None
    texts = ["red", "a blue circle"]
    tower = texttower.TextTower.open(texttower.tower_dir(data, encoder.info.fingerprint))
    assert tower is not None
    assert np.allclose(tower.encode_texts(texts), encoder.encode_texts(texts), atol=1e-4)
    for text in texts:
        ra = Searcher.open(tmp_path / "local", encoder=encoder).search(Query(text=text, top_k=6))
        rb = Searcher.open(data).search(Query(text=text, top_k=6))  # the stored tower answers
        assert [h.path for h in ra.results] == [h.path for h in rb.results]  # type: ignore[union-attr]
