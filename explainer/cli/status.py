"""`clearsight status`: what a collection holds, and every file that failed with its reason."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.text import Text

from explainer.cards.model import public_model_name
from explainer.cli.options import DataDir, JsonOut, data_dir_or_default
from explainer.cli.tables import console, plural, table
from retrieval.paths import display_path
from retrieval.status import DEFAULT_FAILED_LIMIT, collection_status


def relative_to_roots(path: str, roots: list[str]) -> str:
    """`path` relative to the deepest indexed folder holding it, else as it is."""
    for root in sorted(roots, key=len, reverse=True):
        prefix = root.rstrip("/") + "/"
        if path.startswith(prefix):
            return path[len(prefix) :]
    return path


def status_cmd(
    data_dir: DataDir = None,
    limit: Annotated[
        int,
        typer.Option("--limit", min=0, max=1_000_000, help="Failed files listed at most (all are counted)"),
    ] = DEFAULT_FAILED_LIMIT,
    json_out: JsonOut = False,
) -> None:
    """The collection's model, index and its parameters, images by state, and each failed file's reason."""
    st = collection_status(data_dir_or_default(data_dir), failed_limit=limit)
    if json_out:
        typer.echo(json.dumps(st.to_dict(), indent=2, ensure_ascii=False))
        return
    out = console()
    c = st.counts
    out.print(f"collection at {display_path(st.data_dir)}", highlight=False)
    if st.model and st.index:
        raw = st.index["params"]
        params = ", ".join(f"{k} {v}" for k, v in raw.items()) if isinstance(raw, dict) else ""
        name = public_model_name(str(st.model["name"]))
        out.print(f"model: {name} ({st.model['dim']} dimensions; --json gives its full id)", highlight=False)
        out.print(
            f"index: {st.index['kind']}, built as {st.index['built']} ({params or 'no parameters'})",
            highlight=False,
        )
    else:
        out.print("index: none yet", highlight=False)
    out.print(
        f"images: {plural(c['indexed'], 'indexed image')}, {c['pending']} pending, {c['failed']} failed; "
        f"{plural(st.captions['indexed'], 'caption')}",
        highlight=False,
    )
    if st.captions["total"]:
        done, total = st.captions["done"], st.captions["total"]
        out.print(f"generated captions: {done} of {plural(total, 'indexed image')}", highlight=False)
    if st.patches.get("total"):
        done, total = st.patches["done"], st.patches["total"]
        out.print(
            f"patch features stored (evidence without a model pass): {done} of {plural(total, 'image')}",
            highlight=False,
        )
    for root in st.roots:
        out.print(f"indexed folder: {display_path(root)}", highlight=False)
        if root in st.excludes:
            out.print(f"  excluding: {' '.join(st.excludes[root])}", highlight=False)
    for what in ("files", "folders"):
        counts = st.skipped.get(what)
        if isinstance(counts, dict) and counts:
            reasons = ", ".join(f"{n} {r}" for r, n in sorted(counts.items(), key=lambda kv: -kv[1]))
            out.print(f"skipped {what}: {reasons}", highlight=False)
    if st.failed:
        t = table(("file", {"overflow": "fold", "ratio": 3}), ("reason", {"overflow": "fold", "ratio": 2}))
        for f in st.failed:  # relative to the indexed folder, as search results are; --json is absolute
            t.add_row(Text(display_path(relative_to_roots(f.path, st.roots))), Text(f.reason))
        out.print(t)
    if st.failed_truncated:
        out.print(f"(only the first {len(st.failed)} failed files are listed)", highlight=False)
