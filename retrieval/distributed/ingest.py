"""`clearsight index --engine ray`: the driver scans and commits, Ray decodes and encodes.

The driver runs `retrieval.ingest.ingest` with two stages swapped in: encoding (Ray Data decode
tasks feeding an actor pool that holds the model) and the index build (on-disk shards filled in
Ray tasks). Everything the catalog promises (incremental runs, dedup by content, failures
recorded with their reason, crash safety) therefore comes from the same code as the local engine.

Encoded batches stream back to the driver, which writes each as a Parquet shard (id, content
hash, size, vector) under `<data-dir>/shards/`, commits it in one catalog transaction, then deletes
it. A driver killed between the write and the commit leaves the shard behind; the next run
commits the rows whose images are still pending under the same id (a changed file gets a new id,
so a stale vector can never be committed) and does not encode them again.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.catalog import ImageRecord
from retrieval.collection import Collection
from retrieval.encoders import Encoder, EncoderConfig
from retrieval.encoders.preprocess import PreprocessConfig
from retrieval.errors import ConfigError
from retrieval.index import ondisk
from retrieval.index.sync import SyncReport
from retrieval.ingest import Committer, Encoded, IngestConfig, IngestSummary, ingest, sync_for
from retrieval.types import Float32Array, Int64Array

SHARD_DIR = "shards"
#: What `address` may be: auto, or a host (name, IPv4, [IPv6]) and port, optionally as a ray:// client URL.
ADDRESS = re.compile(r"auto|(ray://)?([A-Za-z0-9][A-Za-z0-9.-]{0,252}|\[[0-9A-Fa-f:]{2,39}\]):\d{1,5}")
MAX_WORKERS = 1024
MAX_BLOCKS = 10_000
#: CPUs Ray reserves per decode task and per encoder actor. Labels for scheduling, not thread counts
#: (an actor's torch threads are set apart): half a CPU each lets a 2-CPU machine run two actors and a
#: decode task at once.
DECODE_CPUS = 0.5
ACTOR_CPUS = 0.5


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
    decode_batch: int = 16
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
        if self.decode_batch < 1:
            raise ConfigError("the decode batch must hold at least 1 image")


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
    """Refuse a pool the cluster cannot hold: Ray Data would wait for it forever, saying nothing.

    CPU actors: one core each at least (more actors than cores only adds model copies), and room for a
    decode task beside them. GPU actors: one GPU each. The totals are the cluster's; how they split
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
    if workers * ACTOR_CPUS + DECODE_CPUS > cpus:
        raise ConfigError(
            f"the Ray cluster's {cpus:g} CPUs cannot hold {workers} encoder workers and a decode task "
            f"({workers * ACTOR_CPUS + DECODE_CPUS:g} CPUs)"
        )


def _preprocess_config(encoder: Encoder) -> PreprocessConfig:
    pre = getattr(encoder, "pre", None)
    if not isinstance(pre, PreprocessConfig):
        raise ConfigError(f"encoder {encoder.info.name!r} exposes no preprocessing config for Ray workers")
    return pre


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


# -- the two stages ------------------------------------------------------------------------------
def encode_stage(
    encoder: Encoder,
    encoder_config: EncoderConfig,
    ingest_config: IngestConfig,
    cfg: RayConfig,
    shard_dir: Path,
) -> Callable[[list[ImageRecord], Committer], None]:
    from retrieval.distributed.stages import EncodeActor, decode_batch

    pre = _preprocess_config(encoder)
    draft = max(encoder.info.image_size, 1)
    gpu = (cfg.device or "").startswith("cuda")
    actor_cls = cfg.actor_cls or EncodeActor
    workers = max(1, cfg.workers)

    def run(ray: Any, records: list[ImageRecord], committer: Committer, known: Any, threads: int) -> None:
        # one block per decode batch (up to MAX_BLOCKS): results then stream back and commit batch by
        # batch, so a killed driver loses little, instead of arriving in a few large bursts
        ds = ray.data.from_items(
            [{"image_id": r.id, "path": r.path} for r in records],
            override_num_blocks=max(1, min(-(-len(records) // cfg.decode_batch), MAX_BLOCKS)),
        )
        ds = ds.map_batches(
            decode_batch,
            fn_kwargs={
                "pre": pre,
                "draft": draft,
                "max_pixels": ingest_config.max_pixels,
                "max_bytes": ingest_config.max_file_bytes,
                "known": known,
            },
            batch_size=cfg.decode_batch,
            batch_format="numpy",
            num_cpus=DECODE_CPUS,
        )
        ds = ds.map_batches(
            actor_cls,
            fn_constructor_kwargs={
                "config": EncoderConfig(
                    model=encoder_config.model,
                    device=cfg.device or encoder_config.device,
                    precision=cfg.precision or encoder_config.precision,
                ),
                "threads": None if gpu else threads,
                **(cfg.actor_kwargs or {}),
            },
            batch_size=ingest_config.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_gpus=1 if gpu else 0,
            num_cpus=ACTOR_CPUS,
            max_restarts=-1,
            max_task_retries=-1,
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            shard = write_shard(shard_dir, batch)
            commit_batch(batch, committer)
            shard.unlink(missing_ok=True)

    def stage(records: list[ImageRecord], committer: Committer) -> None:
        recovered = recover_shards(shard_dir, records, committer)
        records = [r for r in records if r.id not in recovered]
        if not records:
            return
        ray = connect(cfg)
        ray.data.DataContext.get_current().enable_progress_bars = ingest_config.progress
        resources = ray.cluster_resources()
        check_fits(workers, float(resources.get("CPU", 0)), float(resources.get("GPU", 0)), gpu)
        threads = cfg.threads or max(1, int(resources.get("CPU", 1)) // workers)
        # content this model has embedded (a moved or copied folder) is hashed, not decoded or encoded
        keys = committer.catalog.embedded_hash_keys(committer.fp)
        run(ray, records, committer, ray.put(keys) if len(keys) else None, threads)
        # a 64-bit key that matched content not stored (or stored content since deleted) leaves its
        # images waiting: encode them after all
        if committer.waiting:
            again = {w.image_id for w in committer.waiting}
            committer.waiting = []
            run(ray, [r for r in records if r.id in again], committer, None, threads)

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
    encoder: Encoder,
    encoder_config: EncoderConfig,
    config: IngestConfig | None = None,
    ray_config: RayConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> IngestSummary:
    """Index `root` into `collection` on Ray. `encoder` (the driver's) embeds caption texts and
    names the model; the actors load `encoder_config`, which must name the same model."""
    config = config or IngestConfig()
    cfg = ray_config or (RayConfig(workers=config.workers) if config.workers else RayConfig())
    shard_dir = collection.data_dir / SHARD_DIR

    def sync(col: Collection, enc: Encoder, ic: IngestConfig) -> SyncReport:
        return sync_for(col, enc, ic, shard_runner(cfg))

    return ingest(
        root,
        collection,
        encoder,
        config,
        log=log,
        encode_stage=encode_stage(encoder, encoder_config, config, cfg, shard_dir),
        sync=sync,
    )
