"""The code that runs on Ray workers: decode tasks and the encoder actor, shared with the local path.

Decoding calls the same `retrieval.imageio` and encoder preprocessing as the local engine, and the
actor wraps the same `create_encoder`, so both engines produce the same pixels and vectors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from retrieval import imageio
from retrieval.encoders import EncoderConfig, create_encoder
from retrieval.encoders.preprocess import PreprocessConfig, preprocess_one
from retrieval.errors import BadImage

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
    pre: PreprocessConfig,
    draft: int,
    max_pixels: int,
    max_bytes: int = imageio.DEFAULT_MAX_FILE_BYTES,
    known: Any = None,
) -> Batch:
    """Read, hash, decode and preprocess each path; a failure becomes a reason, not an exception.

    `known` (sorted uint64 hash keys, or a Ray reference to them) names content this model has
    embedded already: such images are only measured, not decoded, and flagged `dup` so the actors
    skip them and the committer reuses the stored vector, as the local engine does.
    """
    if known is not None and not isinstance(known, np.ndarray):
        import ray

        known = ray.get(known)  # shared memory on the same node: no copy per task
    h, w = pre.output_hw
    n = len(batch["image_id"])
    pixels = np.zeros((n, 3, h, w), dtype=np.float32)
    hashes, widths, heights, errors, dups = [], [], [], [], []
    for i, path in enumerate(batch["path"]):
        digest, width, height, error, dup = "", 0, 0, "", False
        try:
            data = imageio.read_bytes(Path(str(path)), max_bytes)
            digest = imageio.content_hash(data)
            if is_known(known, digest):
                dup = True
                width, height = imageio.probe_size(data)
            else:
                dec = imageio.decode(data, draft_size=draft, max_pixels=max_pixels)
                width, height = dec.width, dec.height
                pixels[i] = preprocess_one(dec.image, pre)
        except BadImage as exc:
            error = exc.reason
        hashes.append(digest)
        widths.append(width)
        heights.append(height)
        errors.append(error)
        dups.append(dup)
    return {
        "image_id": np.asarray(batch["image_id"], dtype=np.int64),
        "content_hash": np.asarray(hashes, dtype=object),
        "width": np.asarray(widths, dtype=np.int64),
        "height": np.asarray(heights, dtype=np.int64),
        "error": np.asarray(errors, dtype=object),
        "dup": np.asarray(dups, dtype=bool),
        "pixels": pixels,
    }


class EncodeActor:
    """Loads the encoder once per actor (one GPU each where GPUs exist) and encodes pixel batches.

    `threads` caps torch's intra-op threads: Ray sets one OpenMP thread per worker by default,
    which would leave a CPU actor at a fraction of the local engine's speed.
    """

    def __init__(self, config: EncoderConfig, threads: int | None = None) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.encoder = create_encoder(config)

    def __call__(self, batch: Batch) -> Batch:
        ok = np.asarray([not e for e in batch["error"]], dtype=bool) & ~np.asarray(batch["dup"], dtype=bool)
        vectors = np.zeros((len(ok), self.encoder.info.dim), dtype=np.float32)
        if ok.any():
            vectors[ok] = self.encoder.encode_pixels(np.ascontiguousarray(batch["pixels"][ok]))
        out: dict[str, Any] = {k: v for k, v in batch.items() if k != "pixels"}
        out["vector"] = vectors
        return out


def fill_shard_bytes(trained: bytes, ids: np.ndarray, vectors: np.ndarray) -> bytes:
    """An on-disk build's shard, filled on a worker and returned as bytes (no shared disk needed)."""
    import faiss

    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids))
    return bytes(faiss.serialize_index(index))
