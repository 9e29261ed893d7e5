"""The standard cross-modal retrieval protocol on a captioned dataset, run through the product's own code.

An evaluation is only worth its numbers if it measures what users get, so images are decoded by
`imageio` and embedded by the encoder exactly as ingest does, and rankings come from `VectorIndex`
searches with the same FAISS factories (exact by default). Embeddings are cached in a catalog-schema
SQLite file keyed by model fingerprint and content hash (images) or text (captions): re-running an
evaluation, or evaluating another split of the same data, costs only the search.

Approximate indexes return their top `approx_k` items; anything they do not return ranks last
(pessimistically, like ties in `metrics`), so mean and median ranks are lower bounds of quality there.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
from tqdm import tqdm

from retrieval import imageio
from retrieval.catalog import Catalog
from retrieval.encoders import Encoder
from retrieval.errors import BadImage, ConfigError, NotEnoughData
from retrieval.index.faiss_index import VectorIndex
from retrieval.index.kinds import resolve_factory
from retrieval.index.sync import embed_texts_cached
from retrieval.training.datasets import DatasetItem, LoadedDataset, format_report
from retrieval.training.metrics import (
    RetrievalMetrics,
    bootstrap_recall_ci,
    image_to_text_metrics,
    retrieval_metrics,
    text_to_image_metrics,
)
from retrieval.training.report import markdown_table as markdown_table  # re-exported for callers
from retrieval.training.report import write_report
from retrieval.training.types import CacheStats, EvalConfig, EvalReport, IndexInfo, WorstQuery
from retrieval.types import Float32Array, Int64Array

#: Cosine similarities live in [-1, 1]; items an approximate search did not return get this score.
NOT_RETURNED = np.float32(-2.0)
CACHE_FILE = "eval-cache.sqlite"
#: The recall@K plot runs from K=1 to this.
CURVE_K = 50


# --------------------------------------------------------------------------- embedding


@dataclass
class _Prepared:
    item: DatasetItem
    content_hash: str | None = None
    cached: Float32Array | None = None  # the cache's vector, when it already holds this content
    pixels: Float32Array | None = None  # set when the content still has to be encoded
    error: str | None = None


T = TypeVar("T")


def _batches(seq: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


@dataclass(frozen=True)
class PreparedImages:
    """A dataset's images read, decoded and preprocessed once (see `prepare_images`)."""

    prepared: list[_Prepared] = field(repr=False)

    @property
    def items(self) -> list[DatasetItem]:
        return [p.item for p in self.prepared]


class _Embedder:
    """Encodes through an optional cache; one instance per evaluation so hit counts are per run."""

    def __init__(self, encoder: Encoder, config: EvalConfig) -> None:
        self.encoder = encoder
        self.config = config
        self.fp = encoder.info.fingerprint
        self.cache: Catalog | None = None
        if config.cache_dir is not None:
            self.cache = Catalog(Path(config.cache_dir) / CACHE_FILE)
        # Vectors this run added to the cache, so a repeated image counts as a hit without a second read.
        self._stored: dict[str, Float32Array] = {}
        self.image_hits = self.images_encoded = self.text_hits = self.texts_encoded = 0

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    def _prepare(self, item: DatasetItem) -> _Prepared:
        out = _Prepared(item)
        try:
            data = imageio.read_bytes(item.path)
            out.content_hash = imageio.content_hash(data)
            if self.cache is not None:
                out.cached = self.cache.get_embeddings([out.content_hash], self.fp).get(out.content_hash)
                if out.cached is not None:
                    return out
            decoded = imageio.decode(data, draft_size=max(self.encoder.info.image_size, 1))
            out.pixels = self.encoder.preprocess([decoded.image])[0]
        except BadImage as exc:
            out.error = exc.reason
        return out

    def prepare_all(self, items: Sequence[DatasetItem]) -> list[_Prepared]:
        """`_prepare` for every item, in order, in the decode threads."""
        bar = tqdm(total=len(items), desc="decoding", unit="img", disable=not self.config.progress)
        with ThreadPoolExecutor(max_workers=self.config.workers, thread_name_prefix="eval-decode") as pool:
            out = []
            for p in pool.map(self._prepare, items):
                out.append(p)
                bar.update(1)
        bar.close()
        return out

    def images(
        self, items: Sequence[DatasetItem], prepared: Sequence[_Prepared] | None = None
    ) -> tuple[list[DatasetItem], Float32Array, list[tuple[str, str]]]:
        """Embeddings of the decodable items (in order), and (path, reason) of the others.

        `prepared`, when given, is `_prepare` of each item done earlier: only the model runs then.
        """
        dim = self.encoder.info.dim
        kept: list[DatasetItem] = []
        vectors: list[Float32Array] = []
        failed: list[tuple[str, str]] = []
        bar = tqdm(total=len(items), desc="images", unit="img", disable=not self.config.progress)
        if prepared is not None:
            for chunk in _batches(prepared, self.config.batch_size):
                vectors.extend(self._encode_batch(list(chunk), kept, failed, dim))
                bar.update(len(chunk))
        else:
            self._decode_and_encode(items, kept, vectors, failed, bar)
        bar.close()
        stacked = (
            np.stack(vectors).astype(np.float32, copy=False) if vectors else np.zeros((0, dim), np.float32)
        )
        return kept, stacked, failed

    def _decode_and_encode(
        self,
        items: Sequence[DatasetItem],
        kept: list[DatasetItem],
        vectors: list[Float32Array],
        failed: list[tuple[str, str]],
        bar: tqdm,
    ) -> None:
        dim = self.encoder.info.dim
        with ThreadPoolExecutor(max_workers=self.config.workers, thread_name_prefix="eval-decode") as pool:
            batches = _batches(items, self.config.batch_size)
            # Decoding of the next batch runs in the threads while the encoder works on this one.
            pending: list[Future[_Prepared]] | None = None
            first = next(batches, None)
            if first is not None:
                pending = [pool.submit(self._prepare, it) for it in first]
            while pending is not None:
                prepared = [f.result() for f in pending]
                following = next(batches, None)
                pending = None if following is None else [pool.submit(self._prepare, it) for it in following]
                vectors.extend(self._encode_batch(prepared, kept, failed, dim))
                bar.update(len(prepared))

    def _encode_batch(
        self,
        prepared: list[_Prepared],
        kept: list[DatasetItem],
        failed: list[tuple[str, str]],
        dim: int,
    ) -> list[Float32Array]:
        good: list[tuple[_Prepared, str]] = []
        known: dict[str, Float32Array] = {}  # what the cache holds: found while decoding, or stored this run
        for p in prepared:
            if p.error is not None or p.content_hash is None:
                failed.append((str(p.item.path), p.error or imageio.UNREADABLE))
                continue
            h = p.content_hash
            good.append((p, h))
            if p.cached is not None:
                known[h] = p.cached
            elif h in self._stored:
                known[h] = self._stored[h]
        unknown = [h for _, h in good if h not in known]
        if self.cache is not None and unknown:  # images prepared earlier were not looked up yet
            known.update(self.cache.get_embeddings(unknown, self.fp))
        todo = {h: p.pixels for p, h in good if h not in known and p.pixels is not None}
        fresh: dict[str, Float32Array] = {}
        if todo:
            encoded = self.encoder.encode_pixels(np.stack(list(todo.values())))
            fresh = dict(zip(todo, encoded, strict=True))
            if self.cache is not None:
                self.cache.commit_indexed(self.fp, [], fresh)
                self._stored.update(fresh)
        out = []
        for p, h in good:
            if h in known:
                self.image_hits += 1
                vec = known[h]
            else:  # `_prepare` left either a cached vector or pixels, so it was encoded just now
                self.images_encoded += 1
                vec = fresh[h]
            if vec.shape != (dim,):
                raise ConfigError(
                    f"cached embedding for {p.item.path} has shape {vec.shape}, expected ({dim},): "
                    f"delete {self.config.cache_dir}/{CACHE_FILE}"
                )
            kept.append(p.item)
            out.append(vec)
        return out

    def texts(self, texts: Sequence[str]) -> Float32Array:
        vectors, encoded = embed_texts_cached(
            self.cache,
            self.encoder,
            texts,
            batch_size=self.config.text_batch_size,
            progress=self.config.progress,
        )
        self.text_hits += len(set(texts)) - encoded
        self.texts_encoded += encoded
        return vectors

    def stats(self) -> CacheStats:
        path = str(Path(self.config.cache_dir) / CACHE_FILE) if self.config.cache_dir is not None else None
        return CacheStats(path, self.image_hits, self.images_encoded, self.text_hits, self.texts_encoded)


# --------------------------------------------------------------------------- search


def _similarities(
    index: VectorIndex, queries: Float32Array, n_items: int, k: int, chunk: int, desc: str, progress: bool
) -> Float32Array:
    """Queries × items scores from index searches; items a search did not return score NOT_RETURNED."""
    sim = np.full((len(queries), n_items), NOT_RETURNED, dtype=np.float32)
    bar = tqdm(total=len(queries), desc=desc, unit="q", disable=not progress)
    for start in range(0, len(queries), chunk):
        scores, ids = index.search(queries[start : start + chunk], k)
        rows = np.repeat(np.arange(start, start + len(ids)), ids.shape[1]).reshape(ids.shape)
        ok = ids >= 0
        sim[rows[ok], ids[ok]] = scores[ok]
        bar.update(len(ids))
    bar.close()
    return sim


def _rank_both(
    image_vecs: Float32Array,
    text_vecs: Float32Array,
    caption_to_image: Int64Array,
    config: EvalConfig,
) -> tuple[RetrievalMetrics, IndexInfo, list[tuple[int, list[tuple[int, float]]]]]:
    """Metrics of both directions, and the worst text→image queries with their top images (by index)."""
    n_images, dim = image_vecs.shape
    n_captions = len(text_vecs)
    factory, note = resolve_factory(config.index, n_images, dim)
    exact = factory == "Flat"
    images = VectorIndex.build(np.arange(n_images, dtype=np.int64), image_vecs, factory, dim)
    k = n_images if exact else min(n_images, config.approx_k)
    t2i = _similarities(images, text_vecs, n_images, k, config.search_chunk, "text→image", config.progress)
    info = IndexInfo(requested=config.index, factory=factory, exact=exact, note=note)
    if exact:
        # Exact scores are symmetric: image→text reads the transpose of the same matrix, without a copy
        # or a second index.
        metrics = retrieval_metrics(t2i, caption_to_image, ks=config.ks)
        return metrics, info, _worst(t2i, metrics.text_to_image.ranks, config.gallery)
    cap_factory, _ = resolve_factory(config.index, n_captions, dim)
    captions = VectorIndex.build(np.arange(n_captions, dtype=np.int64), text_vecs, cap_factory, dim)
    kc = min(n_captions, config.approx_k * max(1, round(n_captions / n_images)))
    i2t = _similarities(
        captions, image_vecs, n_captions, kc, config.search_chunk, "image→text", config.progress
    )
    metrics = RetrievalMetrics(
        text_to_image_metrics(t2i, caption_to_image, ks=config.ks),
        image_to_text_metrics(i2t, caption_to_image, ks=config.ks),
    )
    return metrics, info, _worst(t2i, metrics.text_to_image.ranks, config.gallery)


def _worst(
    sim: Float32Array, ranks: Int64Array, n: int, top: int = 5
) -> list[tuple[int, list[tuple[int, float]]]]:
    """The `n` worst-ranked queries (worst first, ties by query order) with their `top` best items."""
    if n == 0:
        return []
    order = np.lexsort((np.arange(len(ranks)), -ranks))[:n]
    out = []
    for q in order:
        row = sim[q]
        best = np.argsort(-row, kind="stable")[:top]
        out.append((int(q), [(int(i), float(row[i])) for i in best]))
    return out


# --------------------------------------------------------------------------- the protocol


def prepare_images(
    dataset: LoadedDataset, encoder: Encoder, config: EvalConfig | None = None
) -> PreparedImages:
    """Read, decode and preprocess `dataset`'s images once, for evaluating a model whose weights change
    between evaluations while its preprocessing does not (fine-tuning): `evaluate(..., images=...)` then
    only runs the model. No embedding cache is consulted; the pixels are held in memory."""
    config = config or EvalConfig()
    embedder = _Embedder(encoder, replace(config, cache_dir=None))
    try:
        return PreparedImages(embedder.prepare_all(dataset.items))
    finally:
        embedder.close()


def evaluate(
    dataset: LoadedDataset,
    encoder: Encoder,
    config: EvalConfig | None = None,
    images: PreparedImages | None = None,
) -> EvalReport:
    """Text→image and image→text retrieval metrics of `encoder` on `dataset` (see the module docstring).

    `images` is `prepare_images` of this dataset with an encoder that preprocesses like `encoder`; the
    metrics are the same as without it, only the images are not read again.
    """
    config = config or EvalConfig()
    if not dataset.items:
        raise NotEnoughData(
            f"no usable images in the dataset ({format_report(dataset.report)}); "
            "check the images folder and the split"
        )
    if images is not None and [p.item.path for p in images.prepared] != [it.path for it in dataset.items]:
        raise ConfigError("the prepared images are not those of the dataset being evaluated")
    started = time.perf_counter()
    embedder = _Embedder(encoder, config)
    try:
        prepared = images.prepared if images is not None else None
        kept, image_vecs, unreadable = embedder.images(dataset.items, prepared)
        t_images = time.perf_counter()
        if not kept:
            raise NotEnoughData(f"none of the {len(dataset.items)} images could be decoded: {unreadable[:3]}")
        captions = [c for item in kept for c in item.captions]
        caption_to_image = np.repeat(
            np.arange(len(kept), dtype=np.int64), [len(item.captions) for item in kept]
        )
        text_vecs = embedder.texts(captions)
        t_texts = time.perf_counter()
        stats = embedder.stats()
    finally:
        embedder.close()
    metrics, info, worst = _rank_both(image_vecs, text_vecs, caption_to_image, config)
    done = time.perf_counter()
    intervals = {}
    if config.bootstrap:
        for name, direction in (
            ("text_to_image", metrics.text_to_image),
            ("image_to_text", metrics.image_to_text),
        ):
            intervals[name] = bootstrap_recall_ci(direction.ranks, config.ks, samples=config.bootstrap)
    report = EvalReport(
        metrics=metrics,
        model={
            "name": encoder.info.name,
            "model_id": encoder.info.model_id,
            "fingerprint": encoder.info.fingerprint,
            "family": encoder.info.family,
            "dim": encoder.info.dim,
            "revision": _revision(encoder.info.fingerprint),
            "precision": getattr(encoder, "precision", None),
        },
        index=info,
        dataset_format=dataset.format,
        split=dataset.split,
        load_report=dataset.report,
        n_unreadable=len(unreadable),
        cache=stats,
        seconds={
            "images": round(t_images - started, 3),
            "captions": round(t_texts - t_images, 3),
            "search": round(done - t_texts, 3),
            "total": round(done - started, 3),
        },
        image_ids=[item.image_id for item in kept],
        captions=captions,
        caption_to_image=caption_to_image,
        unreadable=unreadable,
        image_paths=[str(item.path) for item in kept],
        worst=[
            WorstQuery(captions[q], int(caption_to_image[q]), int(metrics.text_to_image.ranks[q]), top)
            for q, top in worst
        ],
        provenance=provenance(dataset),
        intervals=intervals,
    )
    if config.out_dir is not None:
        write_report(report, Path(config.out_dir))  # also records the written files in `report.files`
    return report


def _revision(fingerprint: str) -> str:
    """The hub commit a model was loaded at ("hub_id@commit" fingerprints), else the local weights' hash."""
    return fingerprint.rsplit("@", 1)[1] if "@" in fingerprint else f"local:{fingerprint}"


def provenance(dataset: LoadedDataset) -> dict[str, object]:
    """What a reader of report.json needs to trust or reproduce it: version, time, the exact annotations."""
    import datetime
    import hashlib
    from importlib import metadata

    try:
        version = metadata.version("clearsight")
    except metadata.PackageNotFoundError:  # a source tree run without installing
        version = "unknown"
    annotations: dict[str, object] | None = None
    if dataset.annotations is not None and dataset.annotations.is_file():
        h = hashlib.sha256()
        with dataset.annotations.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        annotations = {"path": str(dataset.annotations.resolve()), "sha256": h.hexdigest()}
    return {
        "clearsight_version": version,
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "annotations": annotations,
    }
