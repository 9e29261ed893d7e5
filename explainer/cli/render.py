"""How `clearsight search` shows a page: the card model as JSON (plus local paths), or a table."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.text import Text

from explainer.cards.model import public_model_name
from explainer.cards.pipeline import ResultPage
from explainer.cli.tables import article, console, plural, table
from retrieval.paths import display_path

if TYPE_CHECKING:
    from explainer.explain.chain import Explainer  # LangChain: imported only where explaining runs

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
        row: dict[str, Any] = {"id": hit.id, "path": display_path(hit.path), "content_hash": hit.content_hash}
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


def headline(result: dict[str, Any]) -> str:
    """'3 images for a text query (120 indexed, model ..., Flat)', in words that agree with the numbers."""
    rows, target = result["results"], result["target"]
    noun = "caption" if target == "captions" else "image"
    return (
        f"{plural(len(rows), noun)} for {article(str(result['query_kind']))} query "
        f"({result['total']} indexed, model {public_model_name(str(result['model']))}, "
        f"{result['index_factory']})"
    )


def print_table(result: dict[str, Any], details: bool = False, width: int | None = None) -> None:
    """One row per result (rank, score, id, file or caption), fitted to the terminal by rich; `details`
    adds each card's caption and explanation under it."""
    rows = result["results"]
    out = console(width)
    out.print(headline(result), highlight=False)
    if result.get("no_confident_match"):
        out.print(
            "no confident match: the closest results follow"
            if rows
            else "no confident match: nothing was found",
            highlight=False,
        )
    if not rows:
        return
    captions = result["target"] == "captions"
    t = table(
        ("rank", {"justify": "right", "no_wrap": True}),
        ("score", {"justify": "right", "no_wrap": True}),
        ("conf", {"justify": "right", "no_wrap": True}),
        ("id", {"justify": "right", "no_wrap": True}),
        ("caption" if captions else "file", {"overflow": "fold", "ratio": 1}),
    )
    for r in rows:
        name = r.get("relative_path") or r.get("file_name") or Path(r["path"]).name
        label = f"{r['text']}  [{name}]" if captions else name
        # Text, not markup: "[offline]" or a file named "[1].jpg" must print as written
        conf = f"{r['confidence']:.2f}" if r.get("confidence") is not None else "-"
        t.add_row(str(r["rank"]), f"{r['score']:.4f}", conf, str(r["id"]), Text(label))
        for line in detail_lines(r, max(20, out.width - 8)) if details else []:
            t.add_row("", "", "", "", Text(line.strip()))
    out.print(t)


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
        if explanation.get("unsupported_concepts"):
            claimed = ", ".join(explanation["unsupported_concepts"])
            text = f"claimed, but not in the captions or regions: {claimed}"
            lines += textwrap.wrap(text, width, initial_indent=pad, subsequent_indent=pad + "  ")
    return lines
