"""What a collection holds, read from its catalog and manifest: the answer to "what state is my index in?".

Failures were counted by ingest but never named; a user with 3 failed files out of 40,000 needs their
paths and reasons to act on them. Reading status never creates or changes anything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from retrieval import folders
from retrieval.catalog import Catalog
from retrieval.collection import Collection
from retrieval.patchfiles import fill_progress, store_root
from retrieval.paths import display_path

#: Failed files listed by default; the counts always cover all of them.
DEFAULT_FAILED_LIMIT = 10_000
#: The source label of captions a captioner wrote ("generated:<model>"), as opposed to a dataset's.
GENERATED_PREFIX = "generated:"


@dataclass(frozen=True)
class FailedFile:
    path: str
    reason: str


@dataclass(frozen=True)
class CollectionStatus:
    """The collection's model, index kind and parameters, image counts by state, and every failed file."""

    data_dir: str
    model: dict[str, object] | None  # None: nothing indexed yet (no index version written)
    index: dict[str, object] | None
    counts: dict[str, int]
    #: indexed: captions in the captions index; done/total: indexed images with a generated caption / all
    captions: dict[str, int]
    roots: list[str]
    failed: list[FailedFile] = field(default_factory=list)
    failed_truncated: bool = False  # more failures than listed (see counts["failed"])
    #: what the last walk of each indexed folder left out, added up: {"files": {reason: n}, "folders":
    #: {reason: n}, "unsupported_types": {suffix: n}, "linked_targets": [...]} (retrieval.folders)
    skipped: dict[str, object] = field(default_factory=dict)
    #: the exclude globs saved for each indexed folder that has any
    excludes: dict[str, list[str]] = field(default_factory=dict)
    #: done/total: indexed images whose patch features are stored (evidence without a model pass) / all
    patches: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        """As JSON shows it: a path that is not UTF-8 cannot be encoded there, so its odd bytes are
        escaped."""
        d = asdict(self)
        d["data_dir"] = display_path(self.data_dir)
        d["roots"] = [display_path(r) for r in self.roots]
        d["failed"] = [{"path": display_path(f.path), "reason": f.reason} for f in self.failed]
        d["excludes"] = {display_path(r): globs for r, globs in self.excludes.items()}
        linked = self.skipped.get("linked_targets")
        if isinstance(linked, list):
            d["skipped"] = {**self.skipped, "linked_targets": [display_path(str(t)) for t in linked]}
        return d


def collection_status(
    data_dir: Path | str | None, failed_limit: int = DEFAULT_FAILED_LIMIT
) -> CollectionStatus:
    """Read the status of the collection in `data_dir`; IndexMissing when there is none (creates nothing)."""
    if failed_limit < 0:
        raise ValueError("failed_limit must be 0 or more")
    with Collection(data_dir, create=False) as collection:
        cat = collection.catalog
        counts = cat.counts()
        model = index = None
        captions = 0
        patches = {"done": 0, "total": counts["indexed"]}
        if collection.store.exists():
            m = collection.store.read_manifest()
            model = {"name": m.model_name, "id": m.model_id, "fingerprint": m.fingerprint, "dim": m.dim}
            index = {
                "kind": m.factory,
                "built": m.built_factory,
                "params": {k: v for k, v in asdict(m.params).items() if v is not None},
                "vectors": m.count,
                "version": collection.store.current_version(),
                "note": m.note,
            }
            captions = m.captions_count
            done, total = fill_progress(cat, store_root(collection.data_dir, m.fingerprint))
            patches = {"done": done, "total": total}
        failures = cat.failures(limit=failed_limit + 1)
        done, total = caption_progress(cat)
        return CollectionStatus(
            data_dir=str(collection.data_dir),
            model=model,
            index=index,
            counts=counts,
            captions={"indexed": captions, "done": done, "total": total},
            roots=sorted(cat.roots()),
            failed=[FailedFile(p, r) for p, r in failures[:failed_limit]],
            failed_truncated=len(failures) > failed_limit,
            skipped=folders.collection_skips(cat).to_dict(),
            excludes={r: list(w.exclude) for r, w in folders.collection_rules(cat).items() if w.exclude},
            patches=patches,
        )


def caption_progress(catalog: Catalog) -> tuple[int, int]:
    """(indexed images with a generated caption, indexed images): how far captioning the collection got.

    Read from the catalog alone, so `clearsight status` shows a running server's background progress.
    """
    generated = {c.image_id for c in catalog.all_captions() if c.source.startswith(GENERATED_PREFIX)}
    return len(generated), catalog.counts()["indexed"]
