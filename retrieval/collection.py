"""A collection: one data directory holding the catalog and the versioned index."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from retrieval.catalog import Catalog
from retrieval.errors import ConfigError, IndexMissing
from retrieval.index.store import IndexStore
from retrieval.paths import default_data_dir

CATALOG_FILE = "catalog.sqlite"


def exists(data_dir: Path | str) -> bool:
    """Whether `data_dir` holds a collection (a catalog), without creating anything."""
    return (Path(data_dir).expanduser() / CATALOG_FILE).is_file()


class Collection:
    """Owns the paths of a data directory; cheap to open, nothing is loaded until asked.

    `create=False` is for readers (search, serve, status): a data directory that holds no collection is
    refused with IndexMissing and left exactly as it was, so a mistyped path never leaves an empty
    catalog behind that later reads as "an empty collection".
    """

    def __init__(self, data_dir: Path | str | None = None, *, create: bool = True) -> None:
        self.data_dir = Path(data_dir).expanduser() if data_dir else default_data_dir()
        if not create and not exists(self.data_dir):
            raise IndexMissing(
                f"no collection at {self.data_dir} (nothing has been indexed there)", remedy="index_first"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.catalog = Catalog(self.data_dir / CATALOG_FILE)
        self.store = IndexStore(self.data_dir / "index")

    def close(self) -> None:
        self.catalog.close()

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def writer_lock(self) -> Iterator[None]:
        """One writer per collection: a second `clearsight index` on the same data dir is refused."""
        path = self.data_dir / "writer.lock"
        fd = os.open(str(path), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise ConfigError(
                    f"another Clearsight process is writing to {self.data_dir}; wait for it to finish"
                ) from exc
            yield
        finally:
            os.close(fd)
