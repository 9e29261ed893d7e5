"""Keep a collection current while its folders change: watch them, and index what changed in batches.

rclip re-scans its folder on every call; a library that stays open (the server, `index --watch`) can
instead follow the file system's change events (watchfiles: inotify, FSEvents or ReadDirectoryChangesW,
polling where none works). Events are collected for a short quiet period and everything that arrived
meanwhile becomes one incremental `ingest` per touched folder, so a burst of a thousand copied photos
costs one run, not a thousand. Each run is the ordinary incremental ingest, with its crash safety:
unchanged files are skipped by size and modification time, deleted ones dropped, and the index version
switches atomically, which a running server picks up on its next reload check.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from retrieval import imageio
from retrieval.errors import ClearsightError, ConfigError

if TYPE_CHECKING:
    from retrieval.encoders import Encoder
    from retrieval.ingest import IngestConfig, IngestSummary

log = logging.getLogger(__name__)

#: Files whose change is worth a re-index: images, and the captions that ingest attaches.
CAPTION_FILE = "captions.jsonl"


@dataclass(frozen=True)
class WatchConfig:
    #: Quiet period that closes a batch of events (ms): a copy of many files becomes one run.
    debounce_ms: int = 1500
    #: How often the watcher looks at its stop flag and the batch (ms).
    step_ms: int = 200
    #: None: native events where the platform has them; True: poll (network shares, some containers).
    force_polling: bool | None = None
    #: With no new events, a batch whose re-index failed is tried again after this long (ms).
    retry_ms: int = 5000

    def __post_init__(self) -> None:
        if not 50 <= self.debounce_ms <= 600_000 or not 10 <= self.step_ms <= 10_000:
            raise ConfigError("watch debounce must be 50 ms to 10 min and its step 10 ms to 10 s")
        if not 100 <= self.retry_ms <= 3_600_000:
            raise ConfigError("the watch retry delay must be 100 ms to an hour")


def relevant(path: str) -> bool:
    """An image, a captions file, or something without a suffix (a folder moved in or out)."""
    p = Path(path)
    if p.name.startswith("."):
        return False
    suffix = p.suffix.lower()
    return suffix in imageio.IMAGE_SUFFIXES or p.name == CAPTION_FILE or suffix == ""


def touched_roots(paths: Iterable[str], roots: Sequence[Path]) -> list[Path]:
    """The watched folders that hold any of `paths` (the deepest root wins for nested ones)."""
    ordered = sorted(roots, key=lambda r: len(str(r)), reverse=True)
    found: list[Path] = []
    for path in paths:
        for root in ordered:
            if Path(path).is_relative_to(root):
                if root not in found:
                    found.append(root)
                break
    return found


class FolderWatcher:
    """Follows `roots` in a background thread and calls `reindex(touched roots)` once per batch.

    `reindex` runs in the watcher's thread; an error it raises is logged, the watch goes on, and the
    folders are tried again on the next tick, so one bad batch (another writer holding the collection,
    a model not loaded yet) neither ends the watch nor loses the change.
    """

    def __init__(
        self,
        roots: Sequence[Path],
        reindex: Callable[[list[Path]], None],
        config: WatchConfig | None = None,
    ) -> None:
        missing = [str(r) for r in roots if not Path(r).is_dir()]
        if missing:
            raise ConfigError(f"cannot watch folders that do not exist: {', '.join(missing)}")
        if not roots:
            raise ConfigError("nothing to watch: the collection has no indexed folder yet")
        self.roots = [Path(r) for r in roots]  # as catalogued: a resolved symlink would be a new root
        self.reindex = reindex
        self.config = config or WatchConfig()
        self.batches = 0  # batches handed to `reindex`, for status lines and tests
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        """Watch until `stop()`; blocking (the CLI's `index --watch` runs it in the foreground)."""
        import watchfiles

        def keep(_change: object, path: str) -> bool:
            return relevant(path)

        pending: list[Path] = []  # folders whose last re-index failed: tried again on the next tick
        for changes in watchfiles.watch(
            *self.roots,
            watch_filter=keep,
            debounce=self.config.debounce_ms,
            step=self.config.step_ms,
            stop_event=self._stop,
            force_polling=self.config.force_polling,
            raise_interrupt=False,
            rust_timeout=self.config.retry_ms,
            yield_on_timeout=True,  # an empty batch now and then: the moment to retry what failed
        ):
            roots = touched_roots((path for _, path in changes), self.roots)
            roots += [r for r in pending if r not in roots]
            if not roots:
                continue
            self.batches += 1
            try:
                self.reindex(roots)
                pending = []
            except ClearsightError as exc:  # another writer holds the collection, a disk was full...
                pending = roots
                log.warning("re-indexing %s failed (retrying): %s", ", ".join(map(str, roots)), exc)
            except Exception:  # keep watching: the next batch may well succeed
                pending = roots
                log.exception("re-indexing %s failed (retrying)", ", ".join(map(str, roots)))

    def start(self) -> FolderWatcher:
        self._thread = threading.Thread(target=self.run, name="clearsight-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)


def reindex_folders(
    data_dir: Path,
    encoder: Encoder,
    roots: Sequence[Path],
    config: IngestConfig,
    log: Callable[[str], None] | None = None,
) -> list[IngestSummary]:
    """One incremental ingest per folder into the collection at `data_dir` (what a watch batch runs)."""
    from retrieval.collection import Collection
    from retrieval.ingest import ingest

    with Collection(data_dir) as collection:
        return [ingest(root, collection, encoder, config, log=log) for root in roots]
