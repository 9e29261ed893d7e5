"""Patch features stored at index time, so dense evidence at query time needs no encoder pass.

Each image's patch embeddings (rows x cols x dim) are kept in a sidecar file keyed by content hash:
`<data_dir>/patches/<model key>/<hash[:2]>/<hash>.npy`. The model key digests the encoder's
fingerprint and the surgery setting, so features from other weights are never mixed in. Storage is
int8 by default: evidence only uses cosine similarity, which ignores each row's scale, so rows are
scaled to +-127 and no scale needs to be kept (ViT-B/32: 7 x 7 x 512 = 25 KB per image; float16
doubles that). Identical files share one entry, like embeddings in the catalog.
"""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from retrieval.encoders import Encoder, EncoderInfo, l2_normalise
from retrieval.errors import BadImage, ConfigError, IndexCorrupt
from retrieval.evidence.dense import (
    STORED_DTYPES,
    PatchResult,
    dense_results,
    evidence_from_patches,
    iter_patches,
    stored_form,
)
from retrieval.evidence.types import (
    Evidence,
    EvidenceConfig,
    EvidenceTarget,
    preprocess_config,
    query_row,
    unreadable,
)
from retrieval.patchfiles import store_root, stored_keys
from retrieval.types import Float32Array

FORMAT_VERSION = 1
DTYPES = STORED_DTYPES


@dataclass(frozen=True)
class StoreReport:
    """What `store_patch_features` did; `bytes_per_image` is the mean file size on disk."""

    written: int
    skipped: int  # already stored
    failed: int  # unreadable images
    bytes_written: int

    @property
    def bytes_per_image(self) -> float:
        return self.bytes_written / self.written if self.written else 0.0


class PatchStore:
    """A directory of per-image patch feature files for one encoder."""

    def __init__(
        self, data_dir: Path | str, info: EncoderInfo, dtype: str = "int8", surgery: bool = True
    ) -> None:
        if dtype not in DTYPES:
            raise ConfigError(f"patch feature dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        self.root = store_root(data_dir, info.fingerprint, surgery)
        self.info = info
        self.surgery = surgery

    def path(self, content_hash: str) -> Path:
        if len(content_hash) < 3 or not content_hash.isalnum():
            raise ConfigError(f"not a content hash: {content_hash!r}")
        return self.root / content_hash[:2] / f"{content_hash}.npy"

    def has(self, content_hash: str) -> bool:
        return self.path(content_hash).exists()

    def ensure(self) -> None:
        """Create the store (with its manifest) if it is not there: "auto" evidence then reads from it,
        and computes and stores what is missing, from the first query on."""
        manifest = self.root / "manifest.json"
        if manifest.exists():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        body = {"format": FORMAT_VERSION, "surgery": self.surgery, "encoder": asdict(self.info)}
        manifest.write_text(json.dumps(body, indent=2))

    def _encode(self, patches: Float32Array) -> np.ndarray:
        if patches.ndim != 3 or patches.shape[-1] != self.info.dim:
            raise ConfigError(f"patch features must be (rows, cols, {self.info.dim}), got {patches.shape}")
        return stored_form(patches, self.dtype)

    def as_stored(self, patches: Float32Array) -> Float32Array:
        """What `get` will return once `patches` are stored: evidence drawn from these is the same
        whether an image's features were just computed or read back."""
        return l2_normalise(self._encode(patches).astype(np.float32))

    def put(self, content_hash: str, patches: Float32Array) -> int:
        """Store one image's unit patch embeddings; returns the bytes written. Writes are atomic."""
        data = self._encode(patches)
        self.ensure()
        path = self.path(content_hash)
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.save(buf, data, allow_pickle=False)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)
        return len(buf.getvalue())

    def get(self, content_hash: str) -> Float32Array | None:
        """Unit float32 patch embeddings, or None when this image has none stored."""
        path = self.path(content_hash)
        try:
            data = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise IndexCorrupt(
                f"patch features {path} are unreadable ({exc}); delete the file to redo it"
            ) from exc
        if data.ndim != 3 or data.shape[-1] != self.info.dim:
            raise IndexCorrupt(f"patch features {path} have shape {data.shape}; delete the file to redo it")
        return l2_normalise(data.astype(np.float32))

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*.npy")) if self.root.exists() else 0

    def stored_keys(self) -> set[str]:
        return stored_keys(self.root)


def store_patch_features(
    encoder: Encoder,
    store: PatchStore,
    targets: Sequence[EvidenceTarget],
    config: EvidenceConfig | None = None,
    progress: bool = False,
) -> StoreReport:
    """Compute and store patch features for images not stored yet, each written as its batch is done.

    Meant to run after (or alongside) indexing, where the images are decoded anyway; targets need a
    content hash (`key`). One pool of decoding threads serves the whole run, ahead of the model. The
    model pass uses the store's surgery setting, which its features are filed under, whatever
    `config.surgery` says.
    """
    config = replace(config or EvidenceConfig(), surgery=store.surgery)
    todo = [t for t in targets if t.key and not store.has(t.key)]
    skipped = len(targets) - len(todo)
    written = failed = nbytes = 0
    bar = tqdm(total=len(todo), desc="patch features", unit="img", disable=not progress)
    try:
        for r in iter_patches(encoder, todo, config) if todo else ():
            if isinstance(r, PatchResult) and r.target.key:
                nbytes += store.put(r.target.key, r.patches)
                written += 1
            else:
                failed += 1
            bar.update(1)
    finally:
        bar.close()
    return StoreReport(written, skipped, failed, nbytes)


def stored_evidence(
    encoder: Encoder,
    query_vec: Float32Array,
    targets: Sequence[EvidenceTarget],
    config: EvidenceConfig,
    store: PatchStore,
) -> list[Evidence]:
    """Dense evidence from stored features; hits without them are computed now and stored for next time.

    With everything stored this reads a few KB per hit and does no decoding and no model work: the
    displayed size comes from the target (the catalog records it at index time). Missing features
    are computed with the store's surgery setting, like `store_patch_features`, whatever
    `config.surgery` says: they are filed under the store's key.
    """
    q = query_row(query_vec)
    pre = preprocess_config(encoder)
    out: dict[int, Evidence] = {}
    missing: list[tuple[int, EvidenceTarget]] = []
    for i, t in enumerate(targets):
        feats = store.get(t.key) if t.key else None
        if feats is None:
            missing.append((i, t))
            continue
        try:
            width, height = t.size()
        except BadImage as exc:
            out[i] = unreadable(t, "stored", str(exc))
            continue
        out[i] = evidence_from_patches(t.id, feats, q, width, height, pre, config, method="stored")
    if missing:
        computed = dense_results(
            encoder, q, pre, [t for _, t in missing], replace(config, surgery=store.surgery)
        )
        for (i, t), (ev, r) in zip(missing, computed, strict=True):
            if r is None:
                out[i] = ev  # unreadable: the note says why
                continue
            if r.target.key:
                store.put(r.target.key, r.patches)
            # from the features as stored, so this hit's boxes do not change once they are read back
            feats = store.as_stored(r.patches)
            out[i] = evidence_from_patches(t.id, feats, q, r.width, r.height, pre, config, method="stored")
    return [out[i] for i in range(len(targets))]
