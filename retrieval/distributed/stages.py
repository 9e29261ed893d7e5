"""The code that runs on Ray workers: the encoder actor, and the tasks that fill on-disk shards.

An actor reads, decodes and crops with the local engine's own functions (`decode_pool.decode_uint8`)
and wraps the same `create_encoder` and uint8 feed, so both engines encode the same pixels.
"""

from __future__ import annotations

import tempfile
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from retrieval import imageio
from retrieval.decode_pool import DecodeSpec, decode_uint8
from retrieval.encoders import EncoderConfig, EncoderInfo, create_encoder, texttower
from retrieval.encoders.base import FeedEncoder
from retrieval.encoders.preprocess import PreprocessConfig
from retrieval.errors import BadImage, ConfigError

Batch = dict[str, np.ndarray]


def is_known(keys: np.ndarray | None, digest: str) -> bool:
    """Whether `digest`'s key is among the sorted `keys` (None: nothing is known)."""
    if keys is None or not len(keys):
        return False
    key = np.uint64(imageio.hash_key(digest))
    at = int(np.searchsorted(keys, key))
    return at < len(keys) and keys[at] == key


def decode_batch(
    batch: Batch,
    spec: DecodeSpec,
    max_bytes: int,
    known: np.ndarray | None = None,
    pool: Executor | None = None,
) -> Batch:
    """Read, hash, decode and crop each path as the local engine does; a failure becomes a reason.

    `known` (sorted uint64 hash keys) names content this model has embedded already: such images are
    only measured, not decoded, and flagged `dup` so they are not encoded and the committer reuses the
    stored vector, as the local engine does. Pixels are the local engine's uint8 crops
    (`decode_pool.decode_uint8`), so both engines encode the same pixels. `pool` decodes the paths in
    its threads (a GPU actor, whose forward leaves the cores free), in order; None decodes them here.
    """

    def one(path: object) -> tuple[str, int, int, str, bool, np.ndarray | None]:
        digest = ""
        try:
            data = imageio.read_bytes(Path(str(path)), max_bytes)
            digest = imageio.content_hash(data)
            if is_known(known, digest):
                return (digest, *imageio.probe_size(data), "", True, None)
            dec = decode_uint8(data, spec)
            return digest, dec.width, dec.height, "", False, dec.pixels
        except BadImage as exc:
            return digest, 0, 0, exc.reason, False, None

    h, w = spec.pre.output_hw if spec.pre is not None else (0, 0)
    rows = list(pool.map(one, batch["path"]) if pool is not None else map(one, batch["path"]))
    pixels = np.zeros((len(rows), h, w, 3), dtype=np.uint8)
    for i, row in enumerate(rows):
        if row[5] is not None:
            pixels[i] = row[5]
    return {
        "image_id": np.asarray(batch["image_id"], dtype=np.int64),
        "content_hash": np.asarray([r[0] for r in rows], dtype=object),
        "width": np.asarray([r[1] for r in rows], dtype=np.int64),
        "height": np.asarray([r[2] for r in rows], dtype=np.int64),
        "error": np.asarray([r[3] for r in rows], dtype=object),
        "dup": np.asarray([r[4] for r in rows], dtype=bool),
        "pixels": pixels,
    }


class EncodeActor:
    """Loads the encoder once per actor (one GPU each where GPUs exist); reads, decodes and encodes
    batches of paths in its own process, so a run starts no other processes than its actors.

    `threads` caps torch's intra-op threads: Ray sets one OpenMP thread per worker by default,
    which would leave a CPU actor at a fraction of the local engine's speed. Decoding runs between
    forwards in the same process: beside a forward on every core it would only stall it (see
    `decode_pool.Gate`).
    """

    def __init__(self, config: EncoderConfig, threads: int | None = None, decode_threads: int = 1) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.encoder = create_encoder(config)
        pre = getattr(self.encoder, "pre", None)
        if not isinstance(pre, PreprocessConfig) or not isinstance(self.encoder, FeedEncoder):
            raise ConfigError(f"encoder {self.encoder.info.name!r} has no uint8 pixel path for Ray workers")
        self.spec = DecodeSpec(pre, max(self.encoder.info.image_size, 1), imageio.DEFAULT_MAX_PIXELS)
        # a GPU forward leaves the cores idle: decode in `decode_threads` threads (the codecs release the
        # interpreter lock); on a CPU the forward needs the cores, so each batch is decoded in turn
        self.decoders = ThreadPoolExecutor(decode_threads) if decode_threads > 1 else None

    def info(self) -> EncoderInfo:
        return self.encoder.info

    def ingest_batch_size(self) -> int:
        encoder = self.encoder
        assert isinstance(encoder, FeedEncoder)
        return encoder.ingest_batch_size()

    def text_tower(self) -> dict[str, bytes] | None:
        """The collection's stored text tower (`retrieval.encoders.texttower`), as file name -> bytes,
        so the driver can answer text without loading the model; None for a model without one."""
        model = getattr(self.encoder, "model", None)
        if model is None or not texttower.exportable(model):
            return None
        with tempfile.TemporaryDirectory() as tmp:
            out = texttower.export(
                model, getattr(self.encoder, "tokenizer", None), self.encoder.info, Path(tmp) / "t"
            )
            return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def encode_paths(
        self,
        items: Batch,
        max_pixels: int,
        max_bytes: int,
        known: np.ndarray | None,
        surgery: bool | None = None,
    ) -> Batch:
        """Decode and encode one batch of {image_id, path}; what `__call__` returns (with `surgery` set,
        each image's patch features too, from the same pass)."""
        spec = self.spec if max_pixels == self.spec.max_pixels else replace(self.spec, max_pixels=max_pixels)
        return self(decode_batch(items, spec, max_bytes, known, self.decoders), surgery)

    def __call__(self, batch: Batch, surgery: bool | None = None) -> Batch:
        ok = np.asarray([not e for e in batch["error"]], dtype=bool) & ~np.asarray(batch["dup"], dtype=bool)
        vectors = np.zeros((len(ok), self.encoder.info.dim), dtype=np.float32)
        patches = None
        if ok.any():
            encoder = self.encoder
            assert isinstance(encoder, FeedEncoder)
            staged = encoder.stage(np.ascontiguousarray(batch["pixels"][ok]))
            if surgery is not None and getattr(encoder, "supports_patches", False):
                vectors[ok], feats = encoder.encode_staged_with_patches(staged, surgery)  # type: ignore[attr-defined]
                patches = np.zeros((len(ok), *feats.shape[1:]), dtype=np.float32)
                patches[ok] = feats
            else:
                vectors[ok] = encoder.encode_staged(staged)
        out: dict[str, Any] = {k: v for k, v in batch.items() if k != "pixels"}
        out["vector"] = vectors
        if patches is not None:
            out["patches"] = patches  # rows of failed or duplicate images are zeros, never stored
        return out


def fill_shard_bytes(trained: bytes, ids: np.ndarray, vectors: np.ndarray) -> bytes:
    """An on-disk build's shard, filled on a worker and returned as bytes (no shared disk needed)."""
    import faiss

    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids))
    return bytes(faiss.serialize_index(index))
