"""How `clearsight search` shows a page: the card model as JSON (plus local paths), or a table."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import typer

from explainer.cards.pipeline import ResultPage
from explainer.explain.chain import Explainer

#: Card fields that only make sense against a running server.
_URL_FIELDS = {"image_url", "thumb_url", "detail_url", "like_url"}


def page_payload(
    page: ResultPage, explainer: Explainer | None, pngs: list[Path | None] | None = None
) -> dict[str, Any]:
    """The page as one JSON object: each card's fields (as the API sends them) plus the file's path.

    A CLI user is on the machine that holds the images, so results name files; the URLs of the
    card are left out, as nothing serves them.
    """
    result = page.result
    rows: list[dict[str, Any]] = []
    for i, (card, hit) in enumerate(zip(page.cards, page.hits, strict=True)):
        row: dict[str, Any] = {"id": hit.id, "path": hit.path, "content_hash": hit.content_hash}
        row.update(card.model_dump(mode="json", exclude=_URL_FIELDS))
        ev = page.evidence[i] if i < len(page.evidence) else None
        if ev is not None:
            row["evidence_method"] = ev.method
            if ev.note:
                row["evidence_note"] = ev.note
        if pngs is not None:
            png = pngs[i] if i < len(pngs) else None
            row["evidence_png"] = str(png) if png else None
        rows.append(row)
    payload: dict[str, Any] = {
        "query_kind": result.query_kind if result else page.query.kind,
        "target": "images",
        "model": result.model if result else page.model,
        "index_factory": result.index_factory if result else "",
        "total": page.total,
        "has_more": page.has_more,
        "no_confident_match": page.no_confident_match,
        "cached": page.cached,
        "results": rows,
    }
    if explainer is not None:
        payload["explainer"] = {"backend": explainer.label, "prompt": explainer.prompt_id}
    return payload


def print_table(result: dict[str, Any], details: bool = False) -> None:
    """One line per result (rank, score, id, path or caption); `details` adds caption and explanation."""
    rows = result["results"]
    target = result["target"]
    typer.echo(
        f"{len(rows)} {target} for a {result['query_kind']} query "
        f"({result['total']} indexed, model {result['model']}, {result['index_factory']})"
    )
    if result.get("no_confident_match"):
        typer.echo(
            "no confident match: nothing here stands out from what unrelated queries reach; "
            "the closest results follow"
            if rows
            else "no confident match: nothing was found"
        )
    if not rows:
        return
    width = max(
        40, min(100, os.get_terminal_size(sys.stdout.fileno()).columns - 20) if sys.stdout.isatty() else 100
    )
    typer.echo(
        f"{'rank':>4}  {'score':>7}  {'conf':>5}  {'id':>6}  {'caption' if target == 'captions' else 'path'}"
    )
    for r in rows:
        label = f"{r['text']}  [{Path(r['path']).name}]" if target == "captions" else r["path"]
        if len(label) > width:
            label = "…" + label[-(width - 1) :]
        conf = f"{r['confidence']:.2f}" if r.get("confidence") is not None else "-"
        typer.echo(f"{r['rank']:>4}  {r['score']:>7.4f}  {conf:>5}  {r['id']:>6}  {label}")
        for line in detail_lines(r, width + 20) if details else []:
            typer.echo(line)


def detail_lines(row: dict[str, Any], width: int, indent: int = 6) -> list[str]:
    """The caption and explanation of one table row, wrapped under it."""
    pad = " " * indent
    lines: list[str] = []
    if row.get("caption"):
        source = f" ({row['caption_source']})" if row.get("caption_source") else ""
        lines += textwrap.wrap(
            f"caption: {row['caption']}{source}", width, initial_indent=pad, subsequent_indent=pad + "  "
        )
    explanation = row.get("explanation")
    if explanation:
        text = f"why: {explanation['text']} [{explanation['backend']}]"
        lines += textwrap.wrap(text, width, initial_indent=pad, subsequent_indent=pad + "  ")
    return lines
