"""The versioned, atomically replaced home of a collection's indexes on disk, and its manifest.

Layout of `<data-dir>/index/`:

    CURRENT            name of the live version directory (replaced with os.replace)
    v000007/           one complete version: manifest.json, images.faiss, captions.faiss

A new version is written into a temporary directory, fsynced, renamed into place, and only then
does CURRENT point to it, so a crash at any instant leaves the previous version intact and no
reader ever sees a half-written index. The manifest records what the vectors mean (model,
dimension, factory) and the knobs the index was built and is searched with (`IndexParams`), so a
loaded index searches as it was configured; loading an index under a different model is refused.
The table of kinds says how each kind's image index opens.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from retrieval.errors import IndexCorrupt, IndexMismatch, IndexMissing
from retrieval.index import base, kinds
from retrieval.index.base import Index
from retrieval.index.faiss_index import VectorIndex
from retrieval.index.params import FAISS_DEFAULT_EF_CONSTRUCTION, IndexParams, SearchParams

#: 2 added `params` (nlist, m, efConstruction, efSearch, nprobe); version 1 manifests are migrated.
#: 3 added `params.k_factor` (re-ranking depth) and the memory-mapped `ivf-ondisk` layout; schema 2
#: manifests load unchanged (their indexes have no re-ranking step).
INDEX_SCHEMA_VERSION = 3
CAPTIONS_FILE = "captions.faiss"
MANIFEST_FILE = "manifest.json"


@dataclass
class Manifest:
    model_name: str
    model_id: str
    fingerprint: str
    dim: int
    factory: str  # what the user asked for (a kind's name, auto, or a factory string)
    built_factory: str  # what was built: differs from `factory` while IVF-PQ waits for data
    count: int
    captions_count: int = 0
    schema_version: int = INDEX_SCHEMA_VERSION
    metric: str = "inner_product"
    created_at: float = field(default_factory=time.time)
    note: str = ""
    params: IndexParams = field(default_factory=IndexParams)  # of the image index
    #: The captions index is built like the images index (for its own count); older manifests: Flat.
    captions_factory: str = "Flat"
    captions_params: IndexParams = field(default_factory=IndexParams)
    #: Precision of the encoder that last synced the index ("" in manifests older than this field).
    #: Embeddings cached from earlier runs keep the precision they were computed in.
    precision: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = _migrate_manifest(json.loads(text))
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["params"] = IndexParams.from_dict(fields.get("params") or {})
        fields["captions_params"] = IndexParams.from_dict(fields.get("captions_params") or {})
        return cls(**fields)


def _migrate_manifest(data: dict[str, Any]) -> dict[str, Any]:
    """Bring an older manifest up to the current schema (a newer one is refused by the store)."""
    if int(data.get("schema_version", 1)) < 2:
        # Schema 1 recorded no parameters: it built HNSW with faiss's default efConstruction and
        # searched every index with the SearchParams defaults of the time (nprobe 32, efSearch 128).
        data = {**data, "schema_version": 2}
        data["params"] = asdict(
            IndexParams.for_factory(
                str(data.get("built_factory", "Flat")),
                ef_construction=FAISS_DEFAULT_EF_CONSTRUCTION,
                search=SearchParams(nprobe=32, ef_search=128),
            )
        )
    if int(data.get("schema_version", 2)) < 3:
        # Schema 2 built no refine steps, so its indexes have no k_factor: nothing else changes.
        data = {**data, "schema_version": 3}
    return data


@dataclass
class LoadedIndex:
    manifest: Manifest
    images: Index
    captions: VectorIndex
    version: str


class IndexStore:
    """The versioned index directory of one collection."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def current_file(self) -> Path:
        return self.root / "CURRENT"

    def current_version(self) -> str | None:
        try:
            name = self.current_file.read_text().strip()
        except FileNotFoundError:
            return None
        return name if (self.root / name / MANIFEST_FILE).exists() else None

    def exists(self) -> bool:
        return self.current_version() is not None

    def read_manifest(self) -> Manifest:
        version = self.current_version()
        if version is None:
            raise IndexMissing(f"no index in {self.root.parent} yet", remedy="index_first")
        try:
            manifest = Manifest.from_json((self.root / version / MANIFEST_FILE).read_text())
        except (OSError, ValueError, TypeError) as exc:
            raise IndexCorrupt(f"index manifest in {self.root / version} is unreadable: {exc}") from exc
        if manifest.schema_version > INDEX_SCHEMA_VERSION:
            raise IndexMismatch(
                f"the index in {self.root.parent} has schema {manifest.schema_version}, newer than this "
                f"Clearsight ({INDEX_SCHEMA_VERSION}): upgrade Clearsight"
            )
        return manifest

    def load(self, expect_fingerprint: str | None = None, expect_model: str | None = None) -> LoadedIndex:
        manifest = self.read_manifest()
        if expect_fingerprint is not None and manifest.fingerprint != expect_fingerprint:
            raise IndexMismatch(
                f"the index in {self.root.parent} was built with model {manifest.model_name!r}"
                + (f" and cannot be searched with {expect_model!r}" if expect_model else ""),
                remedy="use_index_model",
            )
        version = self.current_version()
        assert version is not None
        d = self.root / version
        opener = kinds.opener_for(manifest.built_factory)
        images = opener(d, manifest.dim, manifest.built_factory, manifest.params)
        captions = VectorIndex.from_file(
            d / CAPTIONS_FILE, manifest.dim, manifest.captions_factory, manifest.captions_params
        )
        return LoadedIndex(manifest, images, captions, version)

    def save(self, manifest: Manifest, images: Index, captions: VectorIndex) -> str:
        """Write a complete new version and switch CURRENT to it atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        previous = self.current_version()  # what readers may hold open until they reload
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        try:
            images.write_into(tmp)
            base.write_file(tmp / CAPTIONS_FILE, captions.to_bytes())
            base.write_file(tmp / MANIFEST_FILE, manifest.to_json().encode())
            base.fsync_dir(tmp)
            existing = [int(p.name[1:]) for p in self.root.glob("v[0-9]*") if p.name[1:].isdigit()]
            version = f"v{(max(existing) + 1 if existing else 1):06d}"
            os.rename(tmp, self.root / version)
            pointer = self.root / ".CURRENT.tmp"
            base.write_file(pointer, version.encode())
            os.replace(pointer, self.current_file)
            base.fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._collect_garbage(keep={version} | ({previous} if previous else set()))
        return version

    def _collect_garbage(self, keep: set[str]) -> None:
        """Drop every version but `keep` (the new live one and the one it replaced) and crash debris.

        What to keep is decided by what CURRENT pointed to, never by name order: a writer killed
        between renaming its version into place and switching CURRENT leaves an orphan with the
        highest number, and keeping "the two newest" would keep that orphan and delete the version
        readers are still using.
        """
        live = self.current_version()
        keep = keep | ({live} if live else set())
        for p in self.root.iterdir():
            debris = p.name.startswith((".tmp-", ".build-")) and p.is_dir()
            if (p.name.startswith("v") and p.name not in keep) or debris:
                shutil.rmtree(p, ignore_errors=True)

    def delete(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
