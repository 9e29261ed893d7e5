"""Search a collection four ways: text→image, image→image, text+image (hybrid), image→text."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from retrieval import duplicates, imageio
from retrieval.catalog import CaptionRecord, ImageRecord
from retrieval.collection import Collection
from retrieval.confidence import Calibration, ConfidenceConfig, calibrate, null_text_vectors
from retrieval.encoders import Encoder, l2_normalise
from retrieval.encoders.serving import ServingEncoder
from retrieval.errors import BadQuery, NotEnoughData
from retrieval.filters import Scope, resolve
from retrieval.index.filtered import fetch_among, fetch_valid
from retrieval.index.params import SearchParams
from retrieval.index.result_cache import ResultCache, image_key, vector_key
from retrieval.index.store import LoadedIndex
from retrieval.index.sync import embed_texts_cached
from retrieval.paths import display_path
from retrieval.query import MAX_TOP_K, Query, QuerySpec
from retrieval.types import Float32Array, Int64Array

__all__ = [
    "MAX_TOP_K",
    "CaptionHit",
    "Hit",
    "Query",
    "QuerySpec",
    "SearchResult",
    "Searcher",
    "load_query_image",
]


@dataclass
class Hit:
    id: int
    path: str
    score: float
    rank: int  # 1-based, counted over the whole result list (offset included)
    width: int | None = None
    height: int | None = None
    content_hash: str | None = None
    captions: list[str] = field(default_factory=list)
    confidence: float | None = None  # calibrated per query and collection (retrieval.confidence)
    file_name: str = ""  # the file's own name, so a result names its file without parsing paths
    relative_path: str = ""  # relative to the indexed folder holding it (see Catalog.relative_path)
    taken_at: str | None = None  # local date and time taken (retrieval.photo_meta); None: not read yet
    taken_source: str | None = None  # exif, exif-datetime or mtime
    folder: str | None = None  # relative to its indexed folder ("" at the top of it)
    similar: list[int] = field(default_factory=list)  # near-duplicates folded into this hit (ids, best first)

    def to_dict(self) -> dict[str, object]:
        return asdict(self) | {"path": display_path(self.path)}  # printable: odd bytes escaped

    @classmethod
    def from_record(
        cls,
        rec: ImageRecord,
        score: float,
        rank: int,
        *,
        relative_path: str,
        captions: Sequence[str] = (),
        confidence: float | None = None,
    ) -> Hit:
        """The one way a hit is made from a catalog record, so every hit names its file the same way
        (searches, "more like this", scored ids, the detail view, test stand-ins)."""
        return cls(
            id=rec.id,
            path=rec.path,
            score=round(score, 6),
            rank=rank,
            width=rec.width,
            height=rec.height,
            content_hash=rec.content_hash,
            captions=list(captions),
            confidence=confidence,
            file_name=display_path(Path(rec.path).name),
            relative_path=relative_path,
            taken_at=rec.taken_at,
            taken_source=rec.taken_source,
            folder=display_path(rec.folder) if rec.folder is not None else None,
        )


@dataclass
class CaptionHit:
    id: int  # caption id
    text: str
    source: str
    image_id: int
    path: str
    score: float
    rank: int
    confidence: float | None = None
    file_name: str = ""
    relative_path: str = ""

    def to_dict(self) -> dict[str, object]:
        return asdict(self) | {"path": display_path(self.path)}  # printable: odd bytes escaped


@dataclass
class SearchResult:
    query_kind: str
    model: str
    index_factory: str
    total: int  # vectors in the searched index
    results: list[Hit] | list[CaptionHit]
    target: str = "images"  # or "captions"
    #: True when even the best hit's confidence is below the threshold; None when not calibrated.
    no_confident_match: bool | None = None
    #: True when the whole result came from the result cache (no encoder call, no index search).
    cached: bool = False
    missing_shards: list[int] = field(default_factory=list)  # a sharded index's shards that did not answer
    #: True when more hits follow this page (the search looked one hit further than the page).
    has_more: bool = False

    def to_dict(self) -> dict[str, object]:
        return {
            "query_kind": self.query_kind,
            "target": self.target,
            "model": self.model,
            "index_factory": self.index_factory,
            "total": self.total,
            "no_confident_match": self.no_confident_match,
            "cached": self.cached,
            "results": [r.to_dict() for r in self.results],
        } | ({"partial": True, "missing_shards": self.missing_shards} if self.missing_shards else {})


def load_query_image(
    path: Path | str, max_pixels: int = imageio.DEFAULT_MAX_PIXELS
) -> tuple[Image.Image, str]:
    """Decode a query image, turning every decoding problem into a BadQuery the user can act on."""
    p = Path(path).expanduser()
    if not p.exists():
        raise BadQuery(f"query image {p} does not exist")
    data = imageio.read_bytes(p)
    return imageio.decode(data, max_pixels=max_pixels).image, imageio.content_hash(data)


class Searcher:
    """A loaded index plus its encoder; build once (per process), query many times."""

    def __init__(
        self,
        collection: Collection,
        encoder: Encoder,
        index: LoadedIndex,
        params: SearchParams | None = None,
        *,
        confidence: ConfidenceConfig | None = None,
        cache: ResultCache | None = None,
        collapse: bool = False,
    ) -> None:
        self.collection = collection
        # fold near-duplicate hits into one (retrieval.duplicates): off in the library, so its results are
        # exactly the ranked hits; the server and the CLI turn it on from `collapse_duplicates`, and a
        # query's show_all turns it off again
        self.collapse = collapse
        self._collapse_at: tuple[object, float] | None = None  # (index version, threshold)
        self.encoder = encoder
        self.index = index
        # None: every search uses the knobs recorded in the index's manifest (what it was built with)
        self.params = params
        self.confidence = confidence or ConfidenceConfig()
        self.cache = cache if cache is not None else ResultCache()
        self._calibrations: dict[tuple[str, str], Calibration] = {}
        self._scopes: dict[tuple[str, Scope], Int64Array] = {}  # allowed ids per index version and scope

    @classmethod
    def open(
        cls,
        data_dir: Path | str | None = None,
        model: str | None = None,
        device: str | None = None,
        encoder: Encoder | None = None,
        precision: str | None = None,
    ) -> Searcher:
        """Open a collection with the model recorded at index time, unless another is named."""
        collection = Collection(data_dir, create=False)  # a reader never creates a data directory
        manifest = collection.store.read_manifest()
        if encoder is None:  # the stored text tower answers text queries; the full model loads on demand
            encoder = ServingEncoder(
                model or manifest.model_id,
                collection.data_dir,
                device=device,
                precision=precision,
                expect_fingerprint=manifest.fingerprint if model is None else None,
            )
        index = collection.store.load(expect_fingerprint=encoder.info.fingerprint, expect_model=model)
        return cls(collection, encoder, index)

    def precision_note(self) -> str | None:
        """A note when queries are encoded in another precision than the index was built in.

        Allowed (the embedding space is the same and agreement is tested), but worth saying, since
        scores can differ in the third decimal.
        """
        built = self.index.manifest.precision
        query = getattr(self.encoder.info, "precision", "")
        if built and query and built != query:
            return f"queries are encoded in {query}; the index was built in {built}"
        return None

    def reload(self) -> bool:
        """Pick up a newer index version written by a running ingest; True when it changed."""
        version = self.collection.store.current_version()
        if version is None or version == self.index.version:
            return False
        self.index = self.collection.store.load(expect_fingerprint=self.encoder.info.fingerprint)
        self.cache.clear()
        self._calibrations.clear()
        self._scopes.clear()
        self._collapse_at = None
        return True

    def close(self) -> None:
        self.encoder.close()
        self.collection.close()

    def warm_up(self) -> None:
        """Pay every one-time cost of a first query now (a server calls this as it starts): the text
        encoder's first run (its weights paged in), the confidence calibration of the images, and one
        search of the index and catalog. Nothing is cached under a user's query."""
        vec = self.encoder.encode_texts(["a photo"])
        self.calibration("images")
        if self.index.images.ntotal:
            self._search_images(l2_normalise(vec), Query(text="a photo", top_k=12), "text")

    # -- query embedding ---------------------------------------------------------------------
    def embed_query(self, q: Query) -> Float32Array:
        """Weighted sum of the normalised text and image embeddings, minus the negative, renormalised.

        A query seen before (same text, image content, weights, negative and model) is not encoded again.
        """
        q.validate()
        key = self._embedding_key(q)
        cached = self.cache.vectors.get(key)
        if cached is not None:
            return cached
        vec = self._embed(q)
        self.cache.vectors.put(key, vec)
        return vec

    def _embedding_key(self, q: Query) -> tuple[object, ...]:
        img = None
        if q.image is not None:
            img = q.image_key or image_key(q.image)
        has_text = bool(q.text and q.text.strip())
        return (
            self.encoder.info.fingerprint,
            q.text if has_text else None,
            img,
            q.weight if (has_text and img) else None,
            q.negative if q.negative and q.negative.strip() else None,
            q.negative_weight if q.negative and q.negative.strip() else None,
        )

    def _result_key(self, vec: Float32Array, q: Query, kind: str, target: str) -> tuple[object, ...]:
        # every spec field may decide which hits qualify (filters, the "more like this" image left
        # out), so all of them are in the key; the vector stands for the texts and the image
        return (
            self.index.version,
            self.encoder.info.fingerprint,
            target,
            kind,
            vector_key(vec),
            self.params,
            self.collapse,
            q.top_k,
            q.offset,
            tuple(sorted(q.spec_values().items())),
            self.confidence,
        )

    def _embed(self, q: Query) -> Float32Array:
        has_text = bool(q.text and q.text.strip())
        vec = np.zeros(self.encoder.info.dim, dtype=np.float32)
        if has_text:
            share = q.weight if q.image is not None else 1.0
            vec += share * self.encoder.encode_texts([q.text or ""])[0]
        if q.image is not None:
            share = (1.0 - q.weight) if has_text else 1.0
            vec += share * self.encoder.encode_images([q.image])[0]
        if q.negative and q.negative.strip():
            vec = l2_normalise(vec[None])[0] - q.negative_weight * self.encoder.encode_texts([q.negative])[0]
        if float(np.linalg.norm(vec)) < 1e-6:
            raise BadQuery("the query cancels out (weights and negative text leave nothing to search for)")
        return l2_normalise(vec[None])

    # -- searches ----------------------------------------------------------------------------
    def search(self, q: Query) -> SearchResult:
        vec = self.embed_query(q)
        return self.search_vector(vec, q, kind=q.kind)

    def search_vector(self, vec: Float32Array, q: Query, kind: str = "vector") -> SearchResult:
        """Top hits for a query vector, with calibrated confidence; repeats come from the result cache."""
        key = self._result_key(vec, q, kind, "images")
        hit = self.cache.results.get(key)
        if isinstance(hit, SearchResult):
            hit.cached = True
            return hit
        result = self._search_images(vec, q, kind)
        self._calibrate(result)
        if not result.missing_shards:  # a partial answer is not kept: the next ask may reach every shard
            self.cache.results.put(key, result)
        return result

    def _search_images(self, vec: Float32Array, q: Query, kind: str) -> SearchResult:
        idx = self.index.images
        if idx.ntotal == 0:
            raise NotEnoughData(self._empty_message(), remedy="index_first")
        want = q.offset + q.top_k + 1  # one more than the page says whether another page follows
        catalog = self.collection.catalog
        records: dict[int, ImageRecord] = {}
        scope = self.scope(q)

        def valid(ids: list[int]) -> list[bool]:
            records.update(catalog.get_images([i for i in ids if i not in records]))
            return [(r := records.get(i)) is not None and qualifies(q, r, scope) for i in ids]

        if scope is None:

            def fetch(n: int) -> list[tuple[float, int]]:
                return fetch_valid(idx, vec, n, q.min_score, valid, self.params)

        else:
            allowed = self.allowed_ids(scope)
            if q.like_id is not None:
                allowed = allowed[allowed != q.like_id]

            def fetch(n: int) -> list[tuple[float, int]]:
                got = fetch_among(idx, vec, n, allowed, self._vectors_of, self.params, q.min_score)
                records.update(catalog.get_images([i for _, i in got if i not in records]))
                return [(s, i) for s, i in got if i in records]

        similar: dict[int, list[int]] = {}
        if self.collapse and not q.show_all:
            found, similar = duplicates.fetch_collapsed(
                fetch,
                lambda ids: self._stored_vectors([records[i] for i in ids if i in records]),
                want,
                self.collapse_threshold(),
            )
        else:
            found = fetch(want)
        missing = idx.missing_shards  # empty unless a sharded index lost shards
        caps = catalog.captions_for([i for _, i in found])
        roots = catalog.roots()
        hits = [
            Hit.from_record(
                records[i],
                s,
                rank,
                relative_path=catalog.relative_path(records[i].path, roots),
                captions=[c.text for c in caps.get(i, [])],
            )
            for rank, (s, i) in enumerate(found, start=1)
        ]
        for h in hits:
            h.similar = similar.get(h.id, [])
        page = hits[q.offset : q.offset + q.top_k]
        m = self.index.manifest
        return SearchResult(
            kind,
            m.model_name,
            m.built_factory,
            idx.ntotal,
            page,
            missing_shards=missing,
            has_more=len(hits) > q.offset + q.top_k,
        )

    def scope(self, q: QuerySpec) -> Scope | None:
        """The query's filters resolved against this collection (None: no filter); BadQuery when
        they cannot be answered (a folder outside every indexed folder, a date that is no date)."""
        if not q.filter_values():
            return None  # no catalog read for the common, unfiltered search
        return resolve(q, self.collection.catalog.roots())

    def allowed_ids(self, scope: Scope) -> Int64Array:
        """Sorted ids of the indexed images in `scope`, kept per index version (paging asks again)."""
        key = (self.index.version, scope)
        found = self._scopes.get(key)
        if found is None:
            if len(self._scopes) >= 16:
                self._scopes.pop(next(iter(self._scopes)))
            found = self._scopes[key] = self.collection.catalog.ids_where(*scope.where())
        return found

    def _vectors_of(self, ids: Int64Array) -> tuple[Int64Array, Float32Array]:
        held = self.index.images.stored_vectors(ids)
        if held is not None:
            return ids, held
        info = self.encoder.info
        return self.collection.catalog.vectors_of(ids.tolist(), info.fingerprint, info.dim)

    def collapse_threshold(self) -> float:
        """The cosine above which hits fold into one card, for this index version (computed once)."""
        version = self.index.version
        if self._collapse_at is None or self._collapse_at[0] != version:
            m = self.index.manifest
            at = duplicates.collection_threshold(self.collection.catalog, m.fingerprint, m.dim)
            self._collapse_at = (version, at)
        return self._collapse_at[1]

    def _stored_vectors(self, recs: Sequence[ImageRecord]) -> dict[int, Float32Array]:
        hashes = [r.content_hash for r in recs if r.content_hash]
        stored = self.collection.catalog.get_embeddings(hashes, self.index.manifest.fingerprint)
        return {r.id: stored[r.content_hash] for r in recs if r.content_hash in stored}

    def _empty_message(self) -> str:
        counts = self.collection.catalog.counts()
        why = f" ({counts['failed']} files could not be read; the collection's status lists them)"
        return (
            f"the collection at {self.collection.data_dir} holds no indexed images, so there is nothing "
            f"to search{why if counts['failed'] else ''}"
        )

    def search_captions(self, q: Query) -> SearchResult:
        """Image→text (or text→text): captions nearest the query, each with the image it belongs to."""
        vec = self.embed_query(q)
        key = self._result_key(vec, q, q.kind, "captions")
        hit = self.cache.results.get(key)
        if isinstance(hit, SearchResult):
            hit.cached = True
            return hit
        result = self._search_captions(vec, q)
        self._calibrate(result)
        self.cache.results.put(key, result)
        return result

    def _search_captions(self, vec: Float32Array, q: Query) -> SearchResult:
        idx = self.index.captions
        if idx.ntotal == 0:
            raise BadQuery(
                "this collection has no captions to search: index a folder with a captions.jsonl",
                remedy="add_captions",
            )
        want = q.offset + q.top_k + 1  # one more than the page says whether another page follows
        cat = self.collection.catalog
        caps: dict[int, CaptionRecord] = {}
        images: dict[int, ImageRecord] = {}
        scope = self.scope(q)  # captions are few: filtered by their images as the fetch widens

        def valid(ids: list[int]) -> list[bool]:
            caps.update(cat.get_captions([i for i in ids if i not in caps]))
            owners = {c.image_id for c in caps.values()} - set(images)
            images.update(cat.get_images(sorted(owners)))
            out = []
            for i in ids:
                c = caps.get(i)
                rec = images.get(c.image_id) if c else None
                out.append(rec is not None and qualifies(q, rec, scope))
            return out

        roots = cat.roots()
        hits: list[CaptionHit] = []
        for s, i in fetch_valid(idx, vec, want, q.min_score, valid, self.params):
            c = caps[i]
            rec = images[c.image_id]
            hits.append(
                CaptionHit(
                    c.id,
                    c.text,
                    c.source,
                    rec.id,
                    rec.path,
                    round(s, 6),
                    len(hits) + 1,
                    file_name=display_path(Path(rec.path).name),
                    relative_path=cat.relative_path(rec.path, roots),
                )
            )
        m = self.index.manifest
        return SearchResult(
            q.kind,
            m.model_name,
            m.captions_factory,
            idx.ntotal,
            hits[q.offset : q.offset + q.top_k],
            "captions",
            has_more=len(hits) > q.offset + q.top_k,
        )

    def score_ids(
        self, vec: Float32Array, items: Sequence[tuple[int, int]], kind: str | None = None
    ) -> list[Hit]:
        """Hits for (image id, rank) pairs, scored against the query vector `vec` from stored embeddings.

        What a page needs when it asks about images it showed before (explanations, the detail view,
        the evidence picture) without searching again. Ids that are not indexed images are left out.
        With the query's `kind`, each hit gets the calibrated confidence the search gave its card
        (confidence depends only on the score and the collection's calibration), so a detail view or
        a later explanation never shows another number than the card did.
        """
        catalog = self.collection.catalog
        records = catalog.get_images([i for i, _ in items])
        hashes = [r.content_hash for r in records.values() if r.content_hash]
        stored = catalog.get_embeddings(hashes, self.encoder.info.fingerprint)
        roots = catalog.roots()
        hits: list[Hit] = []
        for image_id, rank in items:
            rec = records.get(image_id)
            if rec is None or rec.state != "indexed" or rec.content_hash not in stored:
                continue
            score = float(np.dot(stored[rec.content_hash], vec[0]))
            hits.append(
                Hit.from_record(rec, score, rank, relative_path=catalog.relative_path(rec.path, roots))
            )
        cal = self.calibration("images") if kind is not None and hits else None
        if cal is not None and kind is not None:
            for h, c in zip(hits, cal.confidences([h.score for h in hits], kind), strict=True):
                h.confidence = c
        return hits

    def locate(self, vec: Float32Array, q: Query, image_id: int) -> Hit | None:
        """`image_id` as the search for `q` ranks it (its rank, score and confidence), or None when it
        is not among that search's first MAX_TOP_K results.

        A page that shows one image of a result (the detail view) asks this rather than trusting a
        rank or score it was handed: the answer is the search's own, and a repeat comes from the cache.
        """
        whole = dataclasses.replace(q, top_k=MAX_TOP_K, offset=0)
        result = self.search_vector(vec, whole, kind=q.kind)
        return next((h for h in result.results if isinstance(h, Hit) and h.id == image_id), None)

    # -- confidence --------------------------------------------------------------------------
    def calibration(self, target: str = "images") -> Calibration | None:
        """The confidence calibration of this index version for `target`; None for an empty collection."""
        key = (self.index.version, target)
        if key not in self._calibrations:
            cal = self._fit_calibration(target)
            if cal is None:
                return None
            self._calibrations[key] = cal
        return self._calibrations[key]

    def _fit_calibration(self, target: str) -> Calibration | None:
        cat, info, cfg = self.collection.catalog, self.encoder.info, self.confidence
        image_ids, image_vecs = cat.sample_indexed_vectors(info.fingerprint, info.dim, cfg.sample_size)
        if target == "images":
            items, owners = image_vecs, image_ids
        else:
            caps = cat.all_captions()
            if len(caps) > cfg.sample_size:
                picks = np.linspace(0, len(caps) - 1, cfg.sample_size).round().astype(np.int64)
                caps = [caps[int(k)] for k in picks]
            items, _ = embed_texts_cached(cat, self.encoder, [c.text for c in caps])
            owners = np.asarray([c.image_id for c in caps], dtype=np.int64)
        if len(items) < 2:
            return None
        null = null_text_vectors(self.encoder, cat)
        return calibrate(target, items, owners, image_vecs, image_ids, null, cfg)

    def _calibrate(self, result: SearchResult) -> None:
        """Give each hit its confidence and the result its `no_confident_match` flag, in place."""
        cal = self.calibration(result.target)
        if cal is None or not result.results:
            result.no_confident_match = True if not result.results else None
            return
        confs = cal.confidences([h.score for h in result.results], result.query_kind)
        hits: list[Hit | CaptionHit] = list(result.results)
        for h, c in zip(hits, confs, strict=True):
            h.confidence = c
        result.no_confident_match = cal.no_confident_match(confs)


def qualifies(q: QuerySpec, rec: ImageRecord, scope: Scope | None = None) -> bool:
    """The searcher's validity check: may `rec` be a hit for `q`?

    The filters (`scope`, the spec's filter fields resolved by `Searcher.scope`) are one predicate,
    `Scope.admits`, with its SQL twin `Scope.where` that selects the allowed ids up front; a new filter
    is one field of `retrieval.query.Filters` and one test in each. Score bounds (`min_score`) are not
    here: hits come best first, so the fetch stops at the first score under the bound.
    """
    return (
        rec.state == "indexed"
        and rec.id != q.like_id  # "more like this" never answers with the image it was asked about
        and (scope is None or scope.admits(rec))
    )
