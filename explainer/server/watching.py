"""`serve --watch`: the server follows its collection's folders and indexes what changes.

The watcher borrows the searcher's loaded encoder (no second model in memory) and writes through the
ordinary incremental ingest; the reload loop then switches the server to the new index version, so a
photo copied into an indexed folder becomes searchable within seconds, with no other command run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from explainer.background import yield_to_queries
from explainer.errors import ModelUnavailable
from explainer.server.state import ServerState
from retrieval.collection import Collection
from retrieval.ingest import IngestConfig
from retrieval.watch import FolderWatcher, reindex_folders

log = logging.getLogger(__name__)


def start_watcher(state: ServerState) -> FolderWatcher | None:
    """Start following the collection's indexed folders (None when none of them exists any more)."""
    with Collection(state.data_dir, create=False) as collection:
        roots = [Path(r) for r in collection.catalog.roots()]
    gone = [r for r in roots if not r.is_dir()]
    for root in gone:
        log.warning("not watching %s: the folder no longer exists", root)
    roots = [r for r in roots if r.is_dir()]
    if not roots:
        return None

    def reindex(changed: list[Path]) -> None:
        pipeline = state.pipeline
        if pipeline is None:  # retried on the watcher's next tick
            raise ModelUnavailable("the search model is not loaded yet")
        yield_to_queries()  # the watcher's thread re-indexes: queries come first
        config = IngestConfig(progress=False, patch_features=state.settings.patch_features != "off")
        for s in reindex_folders(state.data_dir, pipeline.searcher.encoder, changed, config):
            log.info(
                "watch: %s: %d new, %d changed, %d removed, %d failed",
                s.root,
                s.new,
                s.changed,
                s.deleted,
                s.failed,
            )

    log.info("watching %d folder(s) for changes", len(roots))
    return FolderWatcher(roots, reindex).start()
