"""`clearsight index PATH`: walk a folder, encode what is new or changed, and update the indexes.

Files are read and hashed in worker threads, decoded at the encoder's size to 8-bit crops (in those
threads, or in processes on many cores: `retrieval.decode_pool`), and fed to the encoder in batches
normalised on its device, the next batch in flight (`retrieval.encoders.feed`). Each encoded batch
commits to the catalog in one transaction; the FAISS indexes are brought in line at the end. A run
killed at any point loses at most the batch in flight, and the next run finishes the job.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from retrieval import decode_pool, folders, imageio, photo_meta
from retrieval.catalog import Catalog, ImageRecord
from retrieval.collection import Collection
from retrieval.decode_pool import DecodedPixels, DecodeSpec, decode_uint8
from retrieval.encoders import Encoder
from retrieval.encoders.base import FeedEncoder
from retrieval.encoders.feed import RateMeter, prefetch_depth, prefetched, usable_cores
from retrieval.errors import BadImage, ConfigError, IndexMismatch
from retrieval.folders import UNREADABLE_DIR as UNREADABLE_DIR  # re-exported: older callers import these here
from retrieval.folders import FoundFile as FoundFile
from retrieval.folders import walk as walk
from retrieval.index import ondisk
from retrieval.index.params import DEFAULT_EF_CONSTRUCTION, SearchParams
from retrieval.index.sync import SyncReport, sync_indexes
from retrieval.paths import display_path, is_utf8
from retrieval.types import Float32Array, UInt8Array

if TYPE_CHECKING:
    from retrieval.evidence.stored import PatchStore

#: The batch size of encoders that cannot say what suits their device.
DEFAULT_BATCH = 32


@dataclass(frozen=True)
class IngestConfig:
    batch_size: int | None = None  # None: from the device (`FeedEncoder.ingest_batch_size`)
    #: parallel workers: decoders here (None: from the cores and the measured rates), encoder actors on Ray
    workers: int | None = None
    decoder: str = "auto"  # decode in "threads", "processes", or "auto" (processes on many cores)
    memory_budget: int | None = None  # bytes, for factory "auto"; None: a quarter of physical memory
    factory: str | None = None  # None: keep the index's factory (flat for a new index)
    captions_file: Path | None = None  # generic JSONL {"image", "captions"}; default: PATH/captions.jsonl
    max_pixels: int = imageio.DEFAULT_MAX_PIXELS
    max_file_bytes: int = imageio.DEFAULT_MAX_FILE_BYTES  # larger files are refused while reading
    rebuild: bool = False  # re-encode everything with this model, replacing an index of another model
    progress: bool = True
    search: SearchParams | None = None  # query-time knobs to record (None: keep the index's)
    ef_construction: int = DEFAULT_EF_CONSTRUCTION  # HNSW build beam, when an HNSW index is (re)built
    # What the walk skips (see retrieval.folders); None: what the collection saved for the folder
    exclude: tuple[str, ...] | None = None
    include_hidden: bool | None = None
    #: store each new image's patch features (`retrieval.evidence.stored`) from the pass that embeds it, so
    #: evidence boxes need no model pass at query time (both engines; CLIP models only)
    patch_features: bool = False

    def __post_init__(self) -> None:
        if self.exclude is not None:  # a bad glob fails here, before any model loads
            object.__setattr__(self, "exclude", folders.check_excludes(self.exclude))


@dataclass
class IngestSummary:
    """What one run did, in counts that add up (`accounts`), even after a crash or a resume.

    Every scanned file is exactly one of new, changed, unchanged or pending from an earlier run
    (found as the catalog left it when a run stopped). Every file the run had to do (`todo`: the
    new, changed and resumed ones, plus images that lacked this model's embedding) ends exactly one
    of encoded, reused (identical content already embedded), failed this run, or left pending.
    """

    root: str
    scanned: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    resumed: int = 0  # pending since an earlier run that stopped before encoding them
    deleted: int = 0
    reembedded: int = 0  # unchanged images that lacked this model's embedding (after --rebuild)
    encoded: int = 0
    reused: int = 0  # identical content found already encoded
    failed_now: int = 0  # of this run's to-do: failed while scanning or decoding
    left_pending: int = 0  # of this run's to-do: still pending, for the next run
    failed: int = 0  # every failed file under the root, this run's and earlier ones
    failures: dict[str, int] = field(default_factory=dict)
    unreadable_dirs: int = 0  # directories that could not be listed (also in failures, by reason)
    # left out by the walk (retrieval.folders): files by reason, folders (not walked) by reason,
    # unsupported files by suffix; never part of `scanned`
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_folders: dict[str, int] = field(default_factory=dict)
    unsupported_types: dict[str, int] = field(default_factory=dict)
    exclude: list[str] = field(default_factory=list)  # the exclude globs this run walked with
    captioned: int = 0
    caption_errors: list[str] = field(default_factory=list)  # "FILE:LINE: why" per line skipped
    odd_names: list[str] = field(default_factory=list)  # not UTF-8 (escaped), indexed all the same
    patches_stored: int = 0  # patch features written from this run's passes (`IngestConfig.patch_features`)
    patches_bytes: int = 0
    seconds: float = 0.0
    index: SyncReport | None = None

    @property
    def rate(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    @property
    def todo(self) -> int:
        return self.new + self.changed + self.resumed + self.reembedded

    def accounts(self) -> bool:
        """Whether the counts add up: scanned files by kind, and the to-do by outcome."""
        return (
            self.scanned == self.new + self.changed + self.unchanged + self.resumed
            and self.todo == self.encoded + self.reused + self.failed_now + self.left_pending
        )

    def to_dict(self) -> dict[str, object]:
        d = {k: v for k, v in self.__dict__.items() if k != "index"}
        d["root"] = display_path(self.root)
        d["todo"] = self.todo
        d["images_per_second"] = round(self.rate, 2)
        if self.index:
            d["index"] = dict(self.index.__dict__)
        return d


# -- dataset captions ----------------------------------------------------------------------------
def read_caption_file(path: Path, root: Path) -> tuple[dict[str, list[str]], list[str]]:
    """Generic JSONL captions keyed by absolute image path, and one "FILE:LINE: why" per line skipped.

    A bad line (not JSON, not UTF-8, no 'image' or 'captions') costs only its own captions: one
    hand-edited line must not keep a whole collection from being indexed.
    """
    out: dict[str, list[str]] = {}
    bad: list[str] = []
    where = display_path(str(path))
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
                image, caps = obj["image"], obj["captions"]
                if not isinstance(image, str) or not image:
                    raise TypeError("'image' must be a file path")
            except UnicodeDecodeError:
                bad.append(f"{where}:{n}: not UTF-8 text")
                continue
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                why = "not JSON" if isinstance(exc, json.JSONDecodeError) else f"{type(exc).__name__}: {exc}"
                bad.append(f"{where}:{n}: expected a JSON object with 'image' and 'captions' ({why})")
                continue
            p = Path(image)
            key = str(p if p.is_absolute() else root / p)
            out[key] = [str(c) for c in (caps if isinstance(caps, list) else [caps])]
    return out, bad


# -- work items ----------------------------------------------------------------------------------
@dataclass
class Prepared:
    image_id: int
    path: str
    content_hash: str | None = None
    width: int = 0
    height: int = 0
    pixels: UInt8Array | Float32Array | None = None  # None: no decode needed, encoded elsewhere
    error: BadImage | None = None


@dataclass(frozen=True)
class Ready:
    image_id: int
    content_hash: str
    width: int
    height: int
    pixels: UInt8Array | Float32Array | None  # uint8 (H, W, 3) for a FeedEncoder, else its float input


@dataclass(frozen=True)
class Encoded:
    """One image's outcome, as an encode stage hands it to the `Committer`.

    `vector` None: the content is identical to another image's, whose vector is (or will be) stored.
    """

    image_id: int
    content_hash: str
    width: int
    height: int
    vector: Float32Array | None


class Committer:
    """Turns encode results into catalog commits, one transaction per call: the unit of crash safety.

    Shared by every engine so incremental runs, content dedup and failure recording behave the same
    whether the vectors came from this process's encoder or from Ray actors.
    """

    def __init__(self, collection: Collection, fingerprint: str, summary: IngestSummary) -> None:
        self.catalog = collection.catalog
        self.data_dir = collection.data_dir
        self.fp = fingerprint
        self.summary = summary
        self.waiting: list[Encoded] = []  # identical content whose vector another item will produce
        self.failed_hash: dict[str, str] = {}  # content hash -> reason, so identical copies fail alike

    def fail(self, image_id: int, reason: str, content_hash: str | None = None) -> None:
        self.catalog.mark_failed(image_id, reason, content_hash)
        self.summary.failed_now += 1
        if content_hash:
            self.failed_hash[content_hash] = reason

    def commit(self, rows: list[Encoded]) -> None:
        """Store new vectors and mark their images indexed; resolve items waiting on their content.

        A row with a vector whose content is stored already (or arrives twice in one call) is
        committed as reused, and its vector dropped, so each content hash is stored once.
        """
        fresh = [r for r in rows if r.vector is not None]
        stored = self.catalog.get_embeddings(
            list({r.content_hash for r in rows} | {w.content_hash for w in self.waiting}), self.fp
        )
        new_vectors: dict[str, Float32Array] = {}
        done: list[tuple[int, str, int, int]] = []
        for r in fresh:
            assert r.vector is not None
            if r.content_hash in stored or r.content_hash in new_vectors:
                self.summary.reused += 1
            else:
                new_vectors[r.content_hash] = r.vector
                self.summary.encoded += 1
            done.append((r.image_id, r.content_hash, r.width, r.height))
        still: list[Encoded] = []
        for w in self.waiting + [r for r in rows if r.vector is None]:
            if w.content_hash in new_vectors or w.content_hash in stored:
                done.append((w.image_id, w.content_hash, w.width, w.height))
                self.summary.reused += 1
            elif w.content_hash in self.failed_hash:
                self.catalog.mark_failed(w.image_id, self.failed_hash[w.content_hash], w.content_hash)
                self.summary.failed_now += 1
            else:
                still.append(w)
        self.catalog.commit_indexed(self.fp, done, new_vectors)
        self.waiting = still


#: An engine's encode step: given the pending records in order, encode them and hand every
#: outcome to the committer (failures through `fail`, vectors through `commit`).
EncodeStage = Callable[[list[ImageRecord], Committer], None]


def ingest(
    root: Path | str,
    collection: Collection,
    encoder: Encoder,
    config: IngestConfig | None = None,
    log: Callable[[str], None] | None = None,
    encode_stage: EncodeStage | None = None,
    sync: Callable[[Collection, Encoder, IngestConfig], SyncReport] | None = None,
) -> IngestSummary:
    """Index every image under `root` into `collection`; see the module docstring.

    `encode_stage` replaces the in-process decode threads and encoder (the Ray engine passes its
    own); `sync` replaces the final index build (the Ray engine fills on-disk shards on the
    cluster). Scanning, dedup, failure recording and commits stay here, shared by both.
    """
    config = config or IngestConfig()
    root = Path(os.path.abspath(Path(root).expanduser()))  # normalised, symlinks kept as the user named them
    if not root.exists():
        raise ConfigError(f"{root} does not exist")
    if not root.is_dir():
        raise ConfigError(f"{root} is not a directory: pass the folder that holds the images")
    started = time.perf_counter()
    summary = IngestSummary(root=str(root))
    cat = collection.catalog
    fp = encoder.info.fingerprint
    with collection.writer_lock():
        _check_model(collection, encoder, config.rebuild)
        cat.set_indexing_model(encoder.info.model_id, fp)

        # 1. scan and reconcile with the catalog
        cat.add_root(str(root))
        known = cat.images_under(str(root))
        seen: set[str] = set()
        todo: list[int] = []
        rules = folders.rules_for(cat, str(root), config.exclude, config.include_hidden)
        skips = folders.Skips()
        for f in walk(root, rules, skips):
            summary.scanned += 1
            seen.add(f.path)
            if not is_utf8(f.path):
                summary.odd_names.append(display_path(f.path))
            rec = known.get(f.path)
            if f.error:
                if rec is not None and rec.state == "failed" and rec.reason == f.error:
                    summary.unchanged += 1
                    continue
                _count_found(summary, rec)
                summary.failed_now += 1
                cat.mark_failed(rec.id if rec else cat.add_pending(f.path, 0, 0), f.error)
                continue
            same_file = rec is not None and rec.byte_size == f.size and rec.mtime_ns == f.mtime_ns
            if rec is not None and same_file:
                if rec.state == "pending":  # left over by an interrupted run
                    summary.resumed += 1
                    todo.append(rec.id)
                else:
                    summary.unchanged += 1
                continue
            _count_found(summary, rec)
            todo.append(cat.add_pending(f.path, f.size, f.mtime_ns))
        _count_skips(summary, cat, str(root), rules, skips)
        gone = [r.id for p, r in known.items() if p not in seen]
        summary.deleted = cat.delete_images(gone)
        # images indexed under another model (after --rebuild) need this model's embedding too
        missing = _missing_embeddings(collection, fp, exclude=set(todo))
        summary.reembedded = len(missing)
        todo.extend(missing)

        # 2. dataset captions
        cap_file = config.captions_file or (root / "captions.jsonl")
        if config.captions_file and not cap_file.exists():
            raise ConfigError(f"captions file {cap_file} does not exist")
        if cap_file.exists():
            try:
                captions, summary.caption_errors = read_caption_file(cap_file, root)
            except OSError as exc:  # reported like a bad line: the photos are indexed all the same
                captions = {}
                summary.caption_errors = [f"{display_path(str(cap_file))}: cannot be read ({exc.strerror})"]
            for path, texts in captions.items():
                rec = cat.image_by_path(path)
                if rec and cat.set_captions(rec.id, "dataset", texts):
                    summary.captioned += 1

        # 3. decode and encode (threads here, or the engine's stage), commit each batch
        if todo:
            records = cat.get_images(todo)
            ordered = [records[i] for i in todo if i in records]
            committer = Committer(collection, fp, summary)
            stage = encode_stage or (lambda recs, com: _encode_all(encoder, recs, config, com, log))
            stage(ordered, committer)
            # Whatever still waits keeps its 'pending' state and is picked up by the next run.
            summary.left_pending = sum(1 for r in cat.get_images(todo).values() if r.state == "pending")

        # 3b. date taken, file type and folder where missing (also a catalog from before they existed)
        photo_meta.fill_missing(cat, str(root), config.workers)

        # 4. derive the indexes from the catalog
        summary.index = (sync or sync_for)(collection, encoder, config)
    prefix = str(root).rstrip("/") + "/"
    reasons = [r for p, r in cat.failures(limit=10**9) if p.startswith(prefix) or p == str(root)]
    summary.failed, summary.failures = len(reasons), dict(Counter(reasons))
    summary.unreadable_dirs = summary.failures.get(UNREADABLE_DIR, 0)
    summary.seconds = time.perf_counter() - started
    if log and summary.index and summary.index.note:
        log(summary.index.note)
    if log and summary.scanned == 0:
        log(empty_folder_note(root))
    return summary


def _check_model(collection: Collection, encoder: Encoder, rebuild: bool) -> None:
    """Refuse to mix models in one collection unless rebuilding: its index's, or, before a first index
    was written (a first run that was killed), the one its catalog says indexing started with."""
    if rebuild:
        return
    fp = encoder.info.fingerprint
    if collection.store.exists():
        manifest = collection.store.read_manifest()
        if manifest.fingerprint != fp:
            raise IndexMismatch(
                f"{collection.data_dir} holds an index built with {manifest.model_name!r}, "
                f"not {encoder.info.name!r}",
                remedy="other_data_dir",
            )
        return
    started = collection.catalog.indexing_model()
    if started is not None and started[1] != fp and collection.catalog.counts()["indexed"]:
        raise IndexMismatch(
            f"{collection.data_dir} holds images being indexed with {started[0]!r} (a run that stopped "
            f"before its first index was written), not {encoder.info.name!r}",
            remedy="other_data_dir",
        )


def _count_skips(
    summary: IngestSummary, cat: Catalog, root: str, rules: folders.WalkRules, skips: folders.Skips
) -> None:
    """Put what the walk left out in the summary, and save it for `clearsight status`."""
    summary.skipped = dict(sorted(skips.files.items()))
    summary.skipped_folders = dict(sorted(skips.folders.items()))
    summary.unsupported_types = dict(skips.unsupported_types.most_common())
    summary.exclude = list(rules.exclude)
    folders.save_skips(cat, root, skips)


def _count_found(summary: IngestSummary, rec: ImageRecord | None) -> None:
    """Count a scanned file that needs work as new, changed, or pending from an earlier run."""
    if rec is None:
        summary.new += 1
    elif rec.state == "pending":
        summary.resumed += 1
    else:
        summary.changed += 1


def empty_folder_note(root: Path) -> str:
    """What to say when a folder holds no image files at all: which suffixes were looked for."""
    suffixes = " ".join(sorted(s.lstrip(".") for s in imageio.IMAGE_SUFFIXES))
    return f"no image files under {root} (looked for {suffixes}, in subfolders too): nothing to index"


def sync_for(
    collection: Collection,
    encoder: Encoder,
    config: IngestConfig,
    shard_runner: ondisk.ShardRunner = ondisk.run_shards_here,
) -> SyncReport:
    """The index sync an ingest run ends with, with every index option of `config`; each engine passes
    only where on-disk shards are filled."""
    return sync_indexes(
        collection,
        encoder,
        factory=config.factory,
        force_rebuild=config.rebuild,
        progress=config.progress,
        memory_budget=config.memory_budget,
        search=config.search,
        ef_construction=config.ef_construction,
        shard_runner=shard_runner,
    )


def _missing_embeddings(collection: Collection, fp: str, exclude: set[int]) -> list[int]:
    indexed = [r for r in collection.catalog.iter_images("indexed") if r.id not in exclude]
    hashes = [r.content_hash for r in indexed if r.content_hash]
    have = collection.catalog.get_embeddings(hashes, fp) if hashes else {}
    return [r.id for r in indexed if r.content_hash not in have]


def patch_store_for(encoder: Encoder, committer: Committer, config: IngestConfig) -> PatchStore | None:
    """Where an engine stores the patch features its passes give (`IngestConfig.patch_features`), or None
    (off, or a model without a patch head: CLIP only). The family comes from the model's info, so the Ray
    driver, which loads no model, can tell too."""
    if not config.patch_features or encoder.info.family != "clip":
        return None
    from retrieval.evidence import EvidenceConfig, PatchStore

    return PatchStore(committer.data_dir, encoder.info, surgery=EvidenceConfig().surgery)


def _encode_all(
    encoder: Encoder,
    ordered: list[ImageRecord],
    config: IngestConfig,
    committer: Committer,
    log: Callable[[str], None] | None = None,
) -> None:
    """The local engine: read and hash in threads, decode at the encoder's size (in those threads, or
    in processes on many cores) as fast as the encoder consumes, and feed it uint8 batches with the
    next batch in flight (see `retrieval.decode_pool` and `retrieval.encoders.feed`)."""
    cat = committer.catalog
    fp = committer.fp
    fast = isinstance(encoder, FeedEncoder)
    one_pass = fast and hasattr(encoder, "encode_staged_with_patches")
    store = patch_store_for(encoder, committer, config) if one_pass else None
    spec = DecodeSpec(getattr(encoder, "pre", None), max(encoder.info.image_size, 1), config.max_pixels)
    batch_size = config.batch_size or (
        encoder.ingest_batch_size() if isinstance(encoder, FeedEncoder) else DEFAULT_BATCH
    )
    device = str(getattr(encoder, "device", "cpu"))
    cap = decode_pool.max_workers(config.workers, usable_cores(), device)
    procs = fast and decode_pool.use_processes(config.decoder, cap)
    pool = decode_pool.DecodePool(cap, spec, log) if procs else None
    # On a GPU, as many decodes run as keep up with the measured forward rate. On a CPU the encoder's
    # threads need every core: decoders run at the lowest priority on spare cycles (a decoder that
    # preempts one of torch's threads stalls all of them at the next barrier).
    on_cpu = not device.startswith("cuda")
    limiter = decode_pool.Limiter(cap)
    gate = decode_pool.Gate(on_cpu and decode_pool.forward_fills_cores(device, usable_cores()))

    decode_rate, encode_rate = RateMeter(), RateMeter()
    claimed: dict[str, int] = {}  # content hash -> image id whose decode will produce it this run

    def prepare(rec: ImageRecord) -> Prepared:
        item = Prepared(rec.id, rec.path)
        try:
            data = imageio.read_bytes(Path(rec.path), config.max_file_bytes)
            item.content_hash = h = imageio.content_hash(data)
            if cat.get_embeddings([h], fp) or claimed.setdefault(h, rec.id) != rec.id:
                # identical content: encoded already, or being encoded by another item of this run
                item.width, item.height = imageio.probe_size(data)
                return item
            gate.wait()
            with limiter:
                t0 = time.perf_counter()
                if pool is not None:
                    dec = pool.decode(data)
                elif fast:
                    dec = decode_uint8(data, spec)
                else:
                    im = imageio.decode(data, draft_size=spec.draft, max_pixels=config.max_pixels)
                    dec = DecodedPixels(im.width, im.height, encoder.preprocess([im.image])[0])
                decode_rate.add(time.perf_counter() - t0)
            item.width, item.height, item.pixels = dec.width, dec.height, dec.pixels
        except BadImage as exc:
            item.error = exc
        return item

    bar = tqdm(total=len(ordered), desc="indexing", unit="img", disable=not config.progress, smoothing=0.1)
    Group = tuple[list[Ready], list[Encoded]]  # a batch to encode, and the identical-content items beside it

    def groups(pool_threads: ThreadPoolExecutor) -> Iterator[Group]:
        window = batch_size * 2 + cap
        inflight: deque[Future[Prepared]] = deque(pool_threads.submit(prepare, r) for r in ordered[:window])
        rest = iter(ordered[window:])
        ready: list[Ready] = []
        dups: list[Encoded] = []
        while inflight:
            item = inflight.popleft().result()
            nxt = next(rest, None)
            if nxt is not None:
                inflight.append(pool_threads.submit(prepare, nxt))
            bar.update(1)
            if item.error is not None or item.content_hash is None:
                reason = item.error.reason if item.error else imageio.UNREADABLE
                committer.fail(item.image_id, reason, item.content_hash)
                continue
            if item.pixels is None:
                dups.append(Encoded(item.image_id, item.content_hash, item.width, item.height, None))
            else:
                ready.append(Ready(item.image_id, item.content_hash, item.width, item.height, item.pixels))
            if len(ready) >= batch_size:
                yield ready, dups
                ready, dups = [], []
                if not on_cpu:
                    limiter.set_limit(decode_pool.needed_workers(decode_rate.value, encode_rate.value, cap))
        if ready or dups:
            yield ready, dups

    def stage(group: Group) -> object:
        if not group[0]:
            return None
        pixels = np.stack([r.pixels for r in group[0] if r.pixels is not None])
        return encoder.stage(pixels) if fast else pixels  # type: ignore[attr-defined]

    def encode(staged: object) -> tuple[Float32Array, Float32Array | None] | None:
        if staged is None:
            return None
        t0 = time.perf_counter()
        patches = None
        with gate.shut():
            if store is not None:
                out, patches = encoder.encode_staged_with_patches(staged, store.surgery)  # type: ignore
            else:
                out = encoder.encode_staged(staged) if fast else encoder.encode_pixels(staged)  # type: ignore
        encode_rate.add(time.perf_counter() - t0, len(out))
        return out, patches

    try:
        with ThreadPoolExecutor(
            max_workers=cap,
            thread_name_prefix="decode",
            initializer=decode_pool.yield_to_encoder if on_cpu else None,
        ) as threads:
            for (ready, dups), encoded in prefetched(groups(threads), stage, encode, prefetch_depth(device)):
                rows = list(dups)
                if encoded is not None:
                    vecs, patches = encoded
                    if store is not None and patches is not None:
                        # written before the vectors are committed: an image marked indexed has its
                        # features, and a crash in between leaves only files a re-run overwrites
                        for b, p in zip(ready, patches, strict=True):
                            committer.summary.patches_bytes += store.put(b.content_hash, p)
                            committer.summary.patches_stored += 1
                    rows += [
                        Encoded(b.image_id, b.content_hash, b.width, b.height, v)
                        for b, v in zip(ready, vecs, strict=True)
                    ]
                committer.commit(rows)
    finally:
        if pool is not None:
            pool.close()
        bar.close()
