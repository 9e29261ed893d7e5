"""`clearsight index --engine ray`: the driver scans and commits, Ray decodes and encodes.

The driver runs `retrieval.ingest.ingest` with two stages swapped in: encoding (a pool of encoder
actors that read, decode and encode batches of paths) and the index build (on-disk shards filled in
Ray tasks). Everything the catalog promises (incremental runs, dedup by content, failures
recorded with their reason, crash safety) therefore comes from the same code as the local engine.

Encoded batches stream back to the driver, which writes each as a Parquet shard (id, content
hash, size, vector) under `<data-dir>/shards/`, commits it in one catalog transaction, then deletes
it. A driver killed between the write and the commit leaves the shard behind; the next run
commits the rows whose images are still pending under the same id (a changed file gets a new id,
so a stale vector can never be committed) and does not encode them again.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from tqdm import tqdm

from retrieval.catalog import ImageRecord
from retrieval.collection import Collection
from retrieval.encoders import Encoder, EncoderConfig, EncoderInfo, texttower
from retrieval.errors import ConfigError
from retrieval.index import ondisk
from retrieval.index.sync import SyncReport
from retrieval.ingest import (
    Committer,
    Encoded,
    IngestConfig,
    IngestSummary,
    ingest,
    patch_store_for,
    sync_for,
)
from retrieval.types import Float32Array, Int64Array

SHARD_DIR = "shards"
#: What `address` may be: auto, or a host (name, IPv4, [IPv6]) and port, optionally as a ray:// client URL.
ADDRESS = re.compile(r"auto|(ray://)?([A-Za-z0-9][A-Za-z0-9.-]{0,252}|\[[0-9A-Fa-f:]{2,39}\]):\d{1,5}")
MAX_WORKERS = 1024
#: CPUs Ray reserves per encoder actor: a label for scheduling, not a thread count (an actor's torch
#: threads are set apart). Each actor decodes its own batches, so nothing else needs a share.
ACTOR_CPUS = 1.0


@dataclass(frozen=True)
class RayConfig:
    """Where and how wide the Ray engine runs.

    `address` None starts a private local cluster (ray.init(address="local")); "auto" joins the
    cluster this machine belongs to; "HOST:PORT" a given one. `workers` is the number of encoder
    actors (one GPU each with device "cuda"); `threads` caps torch's threads in each actor (None:
    this machine's cores shared among the actors, which is right for a local cluster).
    """

    address: str | None = None
    workers: int = 2
    device: str | None = None
    precision: str | None = None
    threads: int | None = None
    local_cpus: int | None = None  # CPUs a private local cluster advertises (None: all)
    actor_cls: type | None = None  # the encoder actor; tests pass one that crashes on purpose
    actor_kwargs: dict[str, Any] | None = None  # extra constructor arguments for `actor_cls`

    def __post_init__(self) -> None:
        if self.address is not None and not ADDRESS.fullmatch(self.address):
            raise ConfigError(
                f"Ray address {self.address[:80]!r} is neither 'auto' nor HOST:PORT "
                "(ray://HOST:PORT for a client)"
            )
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigError(f"workers must be between 1 and {MAX_WORKERS}, got {self.workers}")


def connect(cfg: RayConfig) -> Any:
    """Start or join the cluster (once per process) and return the `ray` module."""
    import ray

    if not ray.is_initialized():
        if cfg.address is None:
            ray.init(
                address="local",
                num_cpus=cfg.local_cpus or os.cpu_count() or 1,
                include_dashboard=False,
                log_to_driver=False,
            )
        else:
            try:
                ray.init(address=cfg.address, log_to_driver=False)
            except ConnectionError as exc:  # a traceback would bury the one thing to check: the address
                raise ConfigError(
                    f"cannot reach a Ray cluster at {cfg.address!r} ({exc}); check that it is running "
                    "(`ray status` on its head node) and that the address is the one its head node printed"
                ) from exc
    return ray


def check_fits(workers: int, cpus: float, gpus: float, gpu: bool) -> None:
    """Refuse a pool the cluster cannot hold: Ray would wait for its actors forever, saying nothing.

    CPU actors: one core each at least (more actors than cores only adds model copies); each reads and
    decodes its own batches. GPU actors: one GPU each. The totals are the cluster's; how they split
    across nodes is Ray's to place.
    """
    if gpu and workers > gpus:
        raise ConfigError(
            f"{workers} GPU encoder workers need {workers} GPUs; the Ray cluster has {gpus:g}: "
            f"ask for at most {int(gpus)} workers, or encode on CPU"
        )
    if not gpu and workers > cpus:
        raise ConfigError(
            f"{workers} encoder workers need a CPU each; the Ray cluster has {cpus:g}: "
            f"ask for at most {max(int(cpus), 1)} workers"
        )
    if workers * ACTOR_CPUS > cpus:
        raise ConfigError(
            f"the Ray cluster's {cpus:g} CPUs cannot hold {workers} encoder workers "
            f"({workers * ACTOR_CPUS:g} CPUs, one each to read and decode)"
        )


# -- embedding shards on disk --------------------------------------------------------------------
def dup_flags(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Which rows are content embedded already (no "dup" column: none, as in shards of older runs)."""
    flags = batch.get("dup")
    return np.zeros(len(batch["image_id"]), bool) if flags is None else np.asarray(flags, dtype=bool)


def write_shard(directory: Path, batch: dict[str, np.ndarray]) -> Path:
    """One Parquet file per encoded batch, written atomically (temporary name, then rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    vectors = np.ascontiguousarray(batch["vector"], dtype=np.float32)
    dim = vectors.shape[1]
    table = pa.table(
        {
            "image_id": pa.array(np.asarray(batch["image_id"], dtype=np.int64)),
            "content_hash": pa.array([str(h) for h in batch["content_hash"]]),
            "width": pa.array(np.asarray(batch["width"], dtype=np.int64)),
            "height": pa.array(np.asarray(batch["height"], dtype=np.int64)),
            "error": pa.array([str(e) for e in batch["error"]]),
            "dup": pa.array(dup_flags(batch)),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
        }
    )
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"shard-{uuid.uuid4().hex}.parquet"
    tmp = final.with_suffix(".tmp")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


def read_shard(path: Path) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    col = table.column("vector").combine_chunks()
    dim = col.type.list_size
    batch = {
        "image_id": table.column("image_id").to_numpy(),
        "content_hash": np.asarray(table.column("content_hash").to_pylist(), dtype=object),
        "width": table.column("width").to_numpy(),
        "height": table.column("height").to_numpy(),
        "error": np.asarray(table.column("error").to_pylist(), dtype=object),
        "vector": col.flatten().to_numpy().astype(np.float32).reshape(-1, dim),
    }
    if "dup" in table.column_names:  # shards of older runs have none: `dup_flags` reads that as no dups
        batch["dup"] = table.column("dup").to_numpy()
    return batch


def commit_batch(batch: dict[str, np.ndarray], committer: Committer, keep: set[int] | None = None) -> int:
    """Commit one encoded batch (only the image ids in `keep`, when given); rows committed."""
    rows: list[Encoded] = []
    dups = dup_flags(batch)
    for i, image_id in enumerate(batch["image_id"]):
        image_id = int(image_id)
        if keep is not None and image_id not in keep:
            continue
        digest, error = str(batch["content_hash"][i]), str(batch["error"][i])
        if error:
            committer.fail(image_id, error, digest or None)
            continue
        # a dup's content is embedded already: no vector of its own, the committer reuses the stored one
        vec = None if dups[i] else np.ascontiguousarray(batch["vector"][i], dtype=np.float32)
        rows.append(Encoded(image_id, digest, int(batch["width"][i]), int(batch["height"][i]), vec))
    committer.commit(rows)
    return len(rows)


def recover_shards(directory: Path, records: list[ImageRecord], committer: Committer) -> set[int]:
    """Commit what a killed driver left on disk for images still pending; the ids committed."""
    pending = {r.id for r in records}
    done: set[int] = set()
    for path in sorted(directory.glob("shard-*.parquet")) if directory.exists() else []:
        try:
            batch = read_shard(path)
        except Exception:  # a torn file cannot be: writes are renamed into place; be safe anyway
            path.unlink(missing_ok=True)
            continue
        keep = pending & {int(i) for i in batch["image_id"]}
        if keep:
            commit_batch(batch, committer, keep)
            done |= keep
        path.unlink(missing_ok=True)
    for tmp in directory.glob("*.tmp") if directory.exists() else []:
        tmp.unlink(missing_ok=True)
    return done


# -- the encoder pool ----------------------------------------------------------------------------
class EncoderPool:
    """The encoder actors of one run, started as early as the driver knows it will encode.

    Plain Ray actors, each reading, decoding and encoding whole batches of paths: a run starts no
    processes but these (no decode tasks, no Ray Data planning), which is most of what the Ray engine
    cost over the local one on a small machine. Each actor keeps two batches queued, so it never waits
    for the driver; results are committed in the order they finish. A crashed actor is restarted and
    its batches retried by Ray (unbounded restarts, as a lost worker should not end the run).
    """

    def __init__(self, cfg: RayConfig, encoder_config: EncoderConfig) -> None:
        from retrieval.distributed.stages import EncodeActor

        self.ray = ray = connect(cfg)
        resources = ray.cluster_resources()
        self.gpu = (cfg.device or "").startswith("cuda")
        self.workers = max(1, cfg.workers)
        check_fits(self.workers, float(resources.get("CPU", 0)), float(resources.get("GPU", 0)), self.gpu)
        threads = cfg.threads or max(1, int(resources.get("CPU", 1)) // self.workers)
        remote = ray.remote(cfg.actor_cls or EncodeActor).options(
            num_cpus=ACTOR_CPUS,
            num_gpus=1 if self.gpu else 0,
            max_restarts=-1,
            max_task_retries=-1,
        )
        config = EncoderConfig(
            model=encoder_config.model,
            device=cfg.device or encoder_config.device,
            precision=cfg.precision or encoder_config.precision,
        )
        extra = dict(cfg.actor_kwargs or {})
        if self.gpu:  # the cluster's CPUs shared among the GPU actors, to decode their batches
            extra.setdefault("decode_threads", max(1, int(resources.get("CPU", 1)) // self.workers))
        self.actors = [
            remote.remote(config, None if self.gpu else threads, **extra) for _ in range(self.workers)
        ]

    def info(self) -> EncoderInfo:
        """The model's identity, from the first actor (waits for it to load)."""
        return cast(EncoderInfo, self.ray.get(self.actors[0].info.remote()))

    def batch_size(self) -> int:
        """The batch size `auto` picks for the actors' device (asked of the first actor)."""
        return int(self.ray.get(self.actors[0].ingest_batch_size.remote()))

    def store_text_tower(self, data_dir: Path, fingerprint: str) -> bool:
        """Put the model's text tower in the collection (from an actor) unless it is there; whether it is."""
        folder = texttower.tower_dir(data_dir, fingerprint)
        if texttower.read_meta(folder) is not None:
            return True
        files = self.ray.get(self.actors[0].text_tower.remote())
        if not files:
            return False
        with texttower.written_atomically(folder) as tmp:
            for name, data in files.items():
                (tmp / Path(name).name).write_bytes(data)
        return True

    def encode(
        self,
        records: Sequence[ImageRecord],
        batch_size: int,
        config: IngestConfig,
        known: Any,
        done: Callable[[dict[str, np.ndarray]], None],
        surgery: bool | None = None,
    ) -> None:
        """Encode `records` in batches across the actors; `done` gets each result as it finishes (with
        `surgery` set, with each image's patch features under "patches")."""
        batches = [records[i : i + batch_size] for i in range(0, len(records), batch_size)]
        todo = iter(batches)
        inflight: dict[Any, int] = {}  # object ref -> index of the actor running it

        def submit(actor: int) -> bool:
            chunk = next(todo, None)
            if chunk is None:
                return False
            items = {
                "image_id": np.asarray([r.id for r in chunk], dtype=np.int64),
                "path": np.asarray([r.path for r in chunk], dtype=object),
            }
            ref = self.actors[actor].encode_paths.remote(
                items, config.max_pixels, config.max_file_bytes, known, surgery
            )
            inflight[ref] = actor
            return True

        for _ in range(2):  # two batches queued per actor: one running, one waiting
            for actor in range(len(self.actors)):
                submit(actor)
        with tqdm(total=len(records), desc="indexing (ray)", unit="img", disable=not config.progress) as bar:
            while inflight:
                ready, _ = self.ray.wait(list(inflight), num_returns=1)
                actor = inflight.pop(ready[0])
                batch = self.ray.get(ready[0])
                submit(actor)
                done(batch)
                bar.update(len(batch["image_id"]))

    def close(self) -> None:
        for actor in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(actor)
        self.actors = []


# -- the two stages ------------------------------------------------------------------------------
def encode_stage(
    pool: Callable[[], EncoderPool],
    encoder: Encoder,
    ingest_config: IngestConfig,
    shard_dir: Path,
) -> Callable[[list[ImageRecord], Committer], None]:
    """The encoding stage: recover what a killed driver left, then stream batches through the pool
    (`pool()` starts it, or returns the one started early)."""

    def stage(records: list[ImageRecord], committer: Committer) -> None:
        recovered = recover_shards(shard_dir, records, committer)
        records = [r for r in records if r.id not in recovered]
        if not records:
            return
        actors = pool()
        batch_size = ingest_config.batch_size or actors.batch_size()

        store = patch_store_for(encoder, committer, ingest_config)
        surgery = store.surgery if store is not None else None
        stored: set[str] = set()

        def done(batch: dict[str, np.ndarray]) -> None:
            patches = batch.pop("patches", None)
            if store is not None and patches is not None:
                # written before the vectors are committed, as the local engine does
                dups = dup_flags(batch)
                for i, digest in enumerate(batch["content_hash"]):
                    # identical files in different batches are both encoded: their content is stored once
                    if not batch["error"][i] and not dups[i] and str(digest) not in stored:
                        committer.summary.patches_bytes += store.put(str(digest), patches[i])
                        committer.summary.patches_stored += 1
                        stored.add(str(digest))
            shard = write_shard(shard_dir, batch)
            commit_batch(batch, committer)
            shard.unlink(missing_ok=True)

        try:
            # content this model has embedded (a moved or copied folder) is hashed, not decoded or encoded
            keys = committer.catalog.embedded_hash_keys(committer.fp)
            known = actors.ray.put(keys) if len(keys) else None
            actors.encode(records, batch_size, ingest_config, known, done, surgery)
            # a 64-bit key that matched content not stored (or stored content since deleted) leaves its
            # images waiting: encode them after all
            if committer.waiting:
                again = {w.image_id for w in committer.waiting}
                committer.waiting = []
                actors.encode(
                    [r for r in records if r.id in again], batch_size, ingest_config, None, done, surgery
                )
        finally:
            # the actors hold their CPUs (GPUs) until killed: free them for the index build's shard tasks
            actors.close()

    return stage


def shard_runner(cfg: RayConfig) -> ondisk.ShardRunner:
    """Fill an on-disk index's shards as Ray tasks; each returns its shard's bytes to the driver."""

    def run(trained: bytes, jobs: Sequence[tuple[Int64Array, Float32Array, str]]) -> None:
        from retrieval.distributed.stages import fill_shard_bytes

        ray = connect(cfg)
        fill = ray.remote(fill_shard_bytes)
        trained_ref = ray.put(trained)
        refs = [(fill.remote(trained_ref, ids, vecs), out) for ids, vecs, out in jobs]
        for ref, out in refs:
            data = ray.get(ref)
            tmp = out + ".tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, out)

    return run


def ray_ingest(
    root: Path | str,
    collection: Collection,
    encoder: Encoder | None,
    encoder_config: EncoderConfig,
    config: IngestConfig | None = None,
    ray_config: RayConfig | None = None,
    log: Callable[[str], None] | None = None,
    pool: EncoderPool | None = None,
) -> IngestSummary:
    """Index `root` into `collection` on Ray. The actors load `encoder_config`; `encoder` (the driver's)
    embeds caption texts and names the model, and must be the same model. With `encoder` None the driver
    loads no model: it starts the actors at once and answers text from the text tower an actor stores in
    the collection (`driver_encoder`). `pool`: actors started earlier by the caller (closed here)."""
    config = config or IngestConfig()
    cfg = ray_config or (RayConfig(workers=config.workers) if config.workers else RayConfig())
    shard_dir = collection.data_dir / SHARD_DIR
    started: list[EncoderPool] = [pool] if pool is not None else []

    def get_pool() -> EncoderPool:
        if not started:
            started.append(EncoderPool(cfg, encoder_config))
        return started[0]

    if encoder is None:
        encoder = driver_encoder(get_pool(), collection, encoder_config)

    def sync(col: Collection, enc: Encoder, ic: IngestConfig) -> SyncReport:
        return sync_for(col, enc, ic, shard_runner(cfg))

    try:
        return ingest(
            root,
            collection,
            encoder,
            config,
            log=log,
            encode_stage=encode_stage(get_pool, encoder, config, shard_dir),
            sync=sync,
        )
    finally:
        for p in started:
            p.close()


def driver_encoder(pool: EncoderPool, collection: Collection, encoder_config: EncoderConfig) -> Encoder:
    """The driver's encoder without a model load of its own: the actors' model identity, and the text
    tower one of them stores in the collection (the full model loads here only for a model that has none)."""
    from retrieval.encoders.serving import ServingEncoder

    info = pool.info()
    pool.store_text_tower(collection.data_dir, info.fingerprint)
    return ServingEncoder(
        encoder_config.model,
        collection.data_dir,
        device="cpu",
        precision=encoder_config.precision,
        expect_fingerprint=info.fingerprint,
    )
