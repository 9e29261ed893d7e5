"""`clearsight duplicates`: groups of near-identical images, from the stored embeddings (no model load)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from explainer.cli.options import DataDir, JsonOut, data_dir_or_default
from explainer.cli.status import relative_to_roots
from explainer.cli.tables import console, plural
from retrieval.collection import Collection
from retrieval.duplicates import DEFAULT_THRESHOLD, check_threshold, collection_duplicates


def duplicates_cmd(
    data_dir: DataDir = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold",
            help="Cosine in (0, 1] from which two images count as copies of one picture (higher: stricter). "
            f"Default: {DEFAULT_THRESHOLD:g}, raised for a collection whose model puts different photos "
            "close, so that copies are at least twice as close (in cosine distance) as its 99th-percentile "
            "pair: the threshold search results fold copies at",
        ),
    ] = None,
    json_out: JsonOut = False,
) -> None:
    """List groups of near-duplicate images (resized, recompressed or slightly cropped copies)."""
    if threshold is not None:
        check_threshold(threshold)
    with Collection(data_dir_or_default(data_dir), create=False) as collection:
        groups, threshold = collection_duplicates(collection, threshold)
        roots = collection.catalog.roots()
        images = collection.catalog.counts().get("indexed", 0)
    if json_out:
        payload = {"threshold": threshold, "images": images, "groups": [g.to_dict() for g in groups]}
        typer.echo(json.dumps(payload, indent=2, ensure_ascii=False))
        return
    out = console()
    copies = sum(len(g.ids) - 1 for g in groups)
    out.print(
        f"{plural(len(groups), 'group')} of near-duplicates among {plural(images, 'image')} "
        f"(cosine ≥ {threshold:g}); {plural(copies, 'copy', 'copies')} beside the largest file of each",
        highlight=False,
    )
    for n, group in enumerate(groups, 1):
        out.print(f"{n}. {len(group.ids)} images, weakest link {group.min_cosine:.3f}", highlight=False)
        for i, (image_id, path) in enumerate(zip(group.ids, group.paths, strict=True)):
            mark = "keep" if i == 0 else "copy"
            out.print(f"   {mark} #{image_id} {relative_to_roots(path, roots)}", highlight=False)
