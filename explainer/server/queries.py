"""Turning what a client sent into a library `Query`: uploads, base64, remembered images, "more like this".

Uploaded query images are decoded under the server's pixel limit and held in a small in-memory
store under a random key while pages use them, so paging, the per-card explanation calls and the
evidence images can refer to the same query without uploading it again. They touch the disk only
when the operator asks for it (`keep_uploads`).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import inspect
import logging
import secrets
import threading
import time
import typing
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends
from fastapi import Query as UrlParam
from PIL import Image
from starlette.exceptions import HTTPException

from explainer.cards.model import QueryEcho, echo_of, url_name
from explainer.errors import BadImage, BadQuery
from explainer.explain.types import QueryKind
from explainer.limit_messages import image_too_large
from retrieval import imageio
from retrieval.query import DOC, Query, QuerySpec, bounds_of
from retrieval.search import Searcher

log = logging.getLogger(__name__)

#: Query images are kept at most this big: the encoder sees 224 pixels, the page a small preview.
_STORED_EDGE = 768


@dataclass(frozen=True)
class QueryInput:
    """The query part of a request, already bounds-checked by the request schema: the spec, an
    uploaded image's bytes, and the page wanted."""

    spec: QuerySpec = field(default_factory=QuerySpec)
    image_bytes: bytes | None = None
    top_k: int = 12
    offset: int = 0

    @property
    def has_query(self) -> bool:
        s = self.spec
        return bool(s.text and s.text.strip()) or any(
            v is not None for v in (self.image_bytes, s.image_key, s.like_id)
        )


def _url_spec() -> Callable[..., QuerySpec]:
    """A route dependency reading the spec from the URL, each field under its page name (`url_name`).

    Its signature is made from the spec's fields, so FastAPI validates each parameter with the
    spec's own bounds and documents it, and a new spec field is read from URLs without a route
    changing.
    """
    hints = typing.get_type_hints(QuerySpec)  # the plain types: FastAPI takes bounds as keywords
    params = [
        inspect.Parameter(
            f.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=UrlParam(
                f.default, alias=url_name(f.name), description=f.metadata.get(DOC), **bounds_of(f.name)
            ),
            annotation=hints[f.name],
        )
        for f in dataclasses.fields(QuerySpec)
    ]

    def from_url(**values: Any) -> QuerySpec:
        return QuerySpec(**values)

    from_url.__signature__ = inspect.Signature(params, return_annotation=QuerySpec)  # type: ignore[attr-defined]
    return from_url


#: A route parameter holding the query spec read from the URL (q, qimg, like, neg, w, min_score...).
UrlSpec = Annotated[QuerySpec, Depends(_url_spec())]


def decode_base64(data: str, max_bytes: int) -> bytes:
    """Base64 (optionally a data: URL) to bytes, refusing anything that would decode past `max_bytes`."""
    if data.startswith("data:"):
        _, _, data = data.partition(",")
    if len(data) > (max_bytes * 4) // 3 + 8:
        raise HTTPException(413, image_too_large(max_bytes))
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadQuery("image_base64 is not valid base64") from None


@dataclass
class _Held:
    image: Image.Image
    content_hash: str
    last_used: float


class QueryImages:
    """Uploaded query images, held while pages need them, under random keys.

    A key is random (128 bits), not the upload's content hash: a hash names the file for anyone who
    has a copy, so they could fetch it back from `/api/query-images/<hash>` and learn that someone
    searched with it. The same content uploaded again while held gets the same key, so paging and
    the explanation cache still see one query. An image unused for `ttl_s` is dropped (paging, the
    per-card explanation calls and the evidence pictures all touch it while the page is in use),
    and at most `capacity` are held. They touch the disk only when the operator asks (`keep_dir`).
    """

    def __init__(self, capacity: int = 64, keep_dir: Path | None = None, ttl_s: float = 3600.0) -> None:
        self._capacity = capacity
        self._keep_dir = keep_dir
        self._ttl_s = ttl_s
        self._images: OrderedDict[str, _Held] = OrderedDict()
        self._by_hash: dict[str, str] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._images)

    def add(self, data: bytes, max_pixels: int, now: float | None = None) -> tuple[Image.Image, str]:
        """Decode (raising BadImage with the reason) and hold an upload; returns (image, key)."""
        decoded = imageio.decode(data, draft_size=_STORED_EDGE, max_pixels=max_pixels)
        image = decoded.image
        if max(image.size) > _STORED_EDGE:
            image = image.copy()
            image.thumbnail((_STORED_EDGE, _STORED_EDGE))
        digest = imageio.content_hash(data)
        now = time.monotonic() if now is None else now
        with self._lock:
            self._expire(now)
            key = self._by_hash.get(digest) or secrets.token_hex(16)
            self._images[key] = _Held(image, digest, now)
            self._by_hash[digest] = key
            self._images.move_to_end(key)
            while len(self._images) > self._capacity:
                self._drop(next(iter(self._images)))
        if self._keep_dir is not None:
            self._keep(key, image)
        return image, key

    def get(self, key: str, now: float | None = None) -> Image.Image | None:
        return held.image if (held := self.entry(key, now)) is not None else None

    def entry(self, key: str, now: float | None = None) -> _Held | None:
        """The held image and its content hash (the caches' key), or None; using it keeps it."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._expire(now)
            held = self._images.get(key)
            if held is not None:
                held.last_used = now
                self._images.move_to_end(key)
                return held
        if self._keep_dir is not None:
            path = self._keep_dir / f"{key}.png"
            if path.is_file():
                data = path.read_bytes()
                return _Held(imageio.decode(data).image, imageio.content_hash(data), now)
        return None

    def _expire(self, now: float) -> None:
        while self._images:
            key, held = next(iter(self._images.items()))
            if now - held.last_used < self._ttl_s:
                break
            self._drop(key)

    def _drop(self, key: str) -> None:
        held = self._images.pop(key)
        if self._by_hash.get(held.content_hash) == key:
            del self._by_hash[held.content_hash]

    def _keep(self, key: str, image: Image.Image) -> None:
        assert self._keep_dir is not None
        try:
            self._keep_dir.mkdir(parents=True, exist_ok=True)
            tmp = self._keep_dir / f".{key}.tmp"
            image.save(tmp, format="PNG")
            tmp.replace(self._keep_dir / f"{key}.png")
        except OSError as exc:
            log.warning("could not keep an uploaded query image: %s", exc)


def echo_for(inp: QueryInput) -> QueryEcho:
    """The public echo of a query: how pages, links and the explanation cache name it.

    An upload (`inp.image_bytes`) is named by the key it is held under: `resolve` sets that key as
    `image_key` before asking. "More like this" is echoed only when no other query image is given.
    """
    s = inp.spec
    text = s.text.strip() if s.text and s.text.strip() else None
    has_image = inp.image_bytes is not None or s.image_key is not None or s.like_id is not None
    kind: QueryKind = "text+image" if text and has_image else ("image" if has_image else "text")
    spec = dataclasses.replace(
        s,
        text=text,
        like_id=s.like_id if inp.image_bytes is None and s.image_key is None else None,
        negative=s.negative.strip() if s.negative and s.negative.strip() else None,
    )
    return echo_of(spec, kind)


def resolve(
    inp: QueryInput,
    searcher: Searcher,
    images: QueryImages,
    max_pixels: int,
    collection_max_pixels: int = imageio.DEFAULT_MAX_PIXELS,
) -> tuple[Query, QueryEcho]:
    """The library query and its public echo; raises BadQuery (422) or HTTPException (404).

    Uploads are held to `max_pixels`; a collection image ("more like this") to the collection's own
    limit, the one ingest accepted it under.
    """
    if not inp.has_query:
        raise BadQuery("give a text query, an image, or both")
    image: Image.Image | None = None
    image_key_for_cache: str | None = None
    spec = inp.spec
    if inp.image_bytes is not None:
        image, key = images.add(inp.image_bytes, max_pixels)
        image_key_for_cache = imageio.content_hash(inp.image_bytes)
        # the upload is echoed by the key it is held under
        inp = dataclasses.replace(inp, spec=dataclasses.replace(spec, image_key=key))
    elif spec.image_key is not None:
        held = images.entry(spec.image_key)
        if held is None:
            # 404, not 422: the key is well formed, the resource it names is gone (or never was)
            raise HTTPException(404, "the query image is no longer held by the server: upload it again")
        image, image_key_for_cache = held.image, held.content_hash
    elif spec.like_id is not None:
        rec = searcher.collection.catalog.get_image(spec.like_id)
        if rec is None or rec.state != "indexed":
            raise HTTPException(404, f"no indexed image with id {spec.like_id}")
        try:
            image = imageio.open_image(
                Path(rec.path), draft_size=_STORED_EDGE, max_pixels=collection_max_pixels
            ).image
        except BadImage as exc:  # the reason only: the OS's words name the file's path
            raise HTTPException(404, f"image {rec.id} can no longer be read ({exc.reason})") from None
        image_key_for_cache = rec.content_hash
    echo = echo_for(inp)
    values = {**echo.spec_values(), "image_key": image_key_for_cache}  # the cache knows images by content
    query = Query(**values, image=image, top_k=inp.top_k, offset=inp.offset)
    query.validate()
    return query, echo
