"""Where stored patch features live and which contents have them, without importing the evidence stack.

`clearsight status` and a server's progress read these; `retrieval.evidence.stored` writes and reads
the files themselves.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from retrieval.catalog import Catalog


def store_root(data_dir: Path | str, fingerprint: str, surgery: bool = True) -> Path:
    """Where the features of one model (by fingerprint) live: status finds them without loading it."""
    key = hashlib.blake2b(f"{fingerprint}|surgery={surgery}".encode(), digest_size=6).hexdigest()
    return Path(data_dir).expanduser() / "patches" / key


def stored_keys(root: Path) -> set[str]:
    """Content hashes with a features file under `root`, from directory listings (no file is opened):
    one listing per hash prefix, so a million-image store is counted without a million stat calls."""
    keys: set[str] = set()
    try:
        with os.scandir(root) as entries:
            prefixes = [e for e in entries if e.is_dir(follow_symlinks=False) and len(e.name) == 2]
    except (FileNotFoundError, NotADirectoryError):
        return keys
    for prefix in prefixes:
        with os.scandir(prefix.path) as files:
            keys.update(f.name[:-4] for f in files if f.name.endswith(".npy") and "." not in f.name[:-4])
    return keys


def fill_progress(catalog: Catalog, root: Path) -> tuple[int, int]:
    """(indexed images whose content has stored features, indexed images): how far filling the store got."""
    keys = stored_keys(root)
    records = catalog.iter_images("indexed")
    return sum(1 for r in records if r.content_hash in keys), len(records)
