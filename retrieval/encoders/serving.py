"""An encoder for a collection that loads its model only when something needs it.

`clearsight search "a dog"` needs one sentence encoded; `clearsight index` with nothing new needs no
encoder at all. Both used to import transformers and load (and cast) both towers first. A
`ServingEncoder` knows the encoder's identity (`info`) from the text tower the collection stores
(`retrieval.encoders.texttower`, written the first time the full model is loaded for this collection),
encodes texts with that tower, and loads the full transformers encoder only for what needs it: images,
patches, indexing, or a model whose tower is not stored (any non-CLIP family). Where a tower is stored,
every text of the collection (queries, captions, the confidence's null sentences) takes it, loaded model
or not, so a query's text and image halves, or two processes, never see two text paths.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image

from retrieval import hub
from retrieval.encoders import texttower
from retrieval.encoders.base import Encoder, EncoderInfo
from retrieval.registry import default_encoder, find_encoder, list_encoders
from retrieval.types import Float32Array

log = logging.getLogger(__name__)


class ServingEncoder:
    """The `Encoder` of a collection in `data_dir`: the stored text tower first, transformers on demand.

    `expect_fingerprint` (the index manifest's) lets a hub model's stored tower be found without asking
    transformers which commit the name resolves to; a local model directory is fingerprinted directly.
    """

    def __init__(
        self,
        model: str | None,
        data_dir: Path | str,
        *,
        device: str | None = None,
        precision: str | None = None,
        expect_fingerprint: str | None = None,
    ) -> None:
        self.name = model or default_encoder().name
        self.data_dir = Path(data_dir)
        self._device, self._precision = device, precision
        self._full: Encoder | None = None
        self._lock = threading.Lock()
        self.tower = self._find_tower(expect_fingerprint)
        if self.tower is None or (
            self._precision in (None, "auto") and self._device not in (None, "auto", "cpu")
        ):
            # nothing stored (the model's own config is the only source of `info`), or a device whose
            # `auto` precision only the full encoder can say
            self._load()

    # -- identity -------------------------------------------------------------------------
    def _find_tower(self, expect_fingerprint: str | None) -> texttower.TextTower | None:
        spec = find_encoder(self.name)
        src = hub.resolve(
            self.name,
            spec.hub_id if spec else None,
            spec.revision if spec else None,
            known=[s.name for s in list_encoders()],
            what="encoder",
        )
        fingerprint = hub.local_fingerprint(Path(src.target)) if src.is_local else expect_fingerprint
        if fingerprint is None:
            return None
        tower = texttower.TextTower.open(texttower.tower_dir(self.data_dir, fingerprint))
        if tower is None or tower.info.model_id != src.target or tower.info.fingerprint != fingerprint:
            return None
        if self._precision not in (None, "auto"):  # the stored precision is what the exporting run used
            tower.info = replace(tower.info, precision=self._precision)
        return tower

    @property
    def info(self) -> EncoderInfo:
        if self._full is not None:
            return self._full.info
        if self.tower is not None:
            return self.tower.info
        return self._closed_info

    @property
    def device(self) -> str:
        return self._full.device if self._full is not None else "cpu"

    @property
    def supports_patches(self) -> bool:
        return self.info.family == "clip"

    @property
    def loaded(self) -> bool:
        """Whether the full transformers encoder has been loaded in this process."""
        return self._full is not None

    # -- the full encoder, on demand ---------------------------------------------------------
    def full(self) -> Encoder:
        """The transformers encoder, loaded once; the collection's text tower is stored as it loads."""
        if self._full is None:
            self._load()
        assert self._full is not None
        return self._full

    def _load(self) -> None:
        from retrieval.encoders import EncoderConfig, create_encoder

        with self._lock:
            if self._full is not None:
                return
            full = create_encoder(
                EncoderConfig(model=self.name, device=self._device, precision=self._precision)
            )
            self._full = full
        self.store_tower(full)

    def store_tower(self, full: Encoder) -> None:
        """Write the text tower into the collection when it is not there (CLIP only; best effort)."""
        model = getattr(full, "model", None)
        if model is None or not texttower.exportable(model) or not self.data_dir.is_dir():
            return
        folder = texttower.tower_dir(self.data_dir, full.info.fingerprint)
        if texttower.read_meta(folder) is None:
            try:
                texttower.export(model, getattr(full, "tokenizer", None), full.info, folder)
            except Exception as exc:  # a cache: a failure costs speed, never the command
                log.warning("could not store the text tower in %s: %s", folder, exc)
                return
        if self.tower is None:
            self.tower = texttower.TextTower.open(folder)

    # -- the Encoder interface ---------------------------------------------------------------
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> Float32Array:
        if self.tower is not None:  # whenever stored, texts take this one path (queries, captions, nulls)
            return self.tower.encode_texts(texts)
        return self.full().encode_texts(texts, batch_size)

    def preprocess(self, images: Sequence[Image.Image]) -> Float32Array:
        return self.full().preprocess(images)

    def encode_pixels(self, pixels: Float32Array) -> Float32Array:
        return self.full().encode_pixels(pixels)

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> Float32Array:
        return self.full().encode_images(images, batch_size)

    def patch_embeddings(self, pixels: Float32Array, surgery: bool = True) -> Float32Array:
        return self.full().patch_embeddings(pixels, surgery)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        # anything else the transformers encoder offers (pre, tokenize, model...) loads it
        if name.startswith("_") or name in ("tower", "name", "data_dir"):  # not set yet: not the model's
            raise AttributeError(name)
        return getattr(self.full(), name)

    def close(self) -> None:
        """Release the full model (the memory-mapped tower costs no memory to keep)."""
        if self._full is not None:
            self._closed_info = self._full.info
            self._full.close()
            self._full = None
