"""Cases for prompt tuning: the facts an explainer gets for one hit, built by hand or from a real search.

A case from a search goes through the same card pipeline as the server, so a notebook tunes prompts
on exactly the inputs the product would give the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from explainer.cards.captions import CaptionProvider, CatalogCaptions
from explainer.cards.context import query_echo
from explainer.cards.evidence import EvidenceProvider, make_evidence_provider
from explainer.cards.pipeline import CardPipeline
from explainer.errors import ConfigError
from explainer.explain.types import ExplainContext, QueryKind
from explainer.settings import get_settings
from retrieval.search import Query, Searcher
from retrieval.types import Box, Region


@dataclass(frozen=True)
class Case:
    """One hit to explain, named so that a comparison table can say which row is which."""

    name: str
    context: ExplainContext

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], name: str | None = None) -> Case:
        """A case from plain data: `query` (or `query_text`), `caption`, `dataset_captions`, `evidence`
        (boxes `[x0, y0, x1, y1]` best first, or `{box, score, rank}` objects), `image_size`, `score`,
        `rank`, `query_kind`, `image_key`, and optionally `name`."""
        known = {
            "name",
            "query",
            "query_text",
            "query_kind",
            "query_image_key",
            "caption",
            "dataset_captions",
            "evidence",
            "image_size",
            "score",
            "rank",
            "image_key",
        }
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"case fields {unknown} are not known; use {sorted(known)}")
        return make_case(
            str(name or data.get("name") or "case"),
            data.get("query", data.get("query_text")),
            data.get("caption"),
            dataset_captions=data.get("dataset_captions", ()),
            evidence=data.get("evidence", ()),
            image_size=tuple(data.get("image_size", (640, 480))),
            score=float(data.get("score", 0.3)),
            rank=int(data.get("rank", 1)),
            query_kind=data.get("query_kind"),
            image_key=data.get("image_key"),
            query_image_key=data.get("query_image_key"),
        )


def _box(value: Sequence[int]) -> Box:
    x0, y0, x1, y1 = (int(v) for v in value)
    return (x0, y0, x1, y1)


def make_case(
    name: str,
    query: str | None,
    caption: str | None = None,
    *,
    dataset_captions: Sequence[str] = (),
    evidence: Sequence[Sequence[int] | Mapping[str, Any] | Region] = (),
    image_size: tuple[int, int] = (640, 480),
    score: float = 0.3,
    rank: int = 1,
    query_kind: QueryKind | None = None,
    image_key: str | None = None,
    query_image_key: str | None = None,
) -> Case:
    """A case built by hand: the facts an explainer would get for one hit."""
    regions: list[Region] = []
    for i, item in enumerate(evidence, 1):
        if isinstance(item, Region):
            regions.append(item)
        elif isinstance(item, Mapping):
            fields = {"rank": i, "score": 1.0 / i, **item}
            box = fields.pop("box")
            regions.append(Region(box=_box(box), **fields))
        else:
            regions.append(Region(box=_box(item), score=1.0 / i, rank=i))
    kind: QueryKind = query_kind or ("text" if query else "image")
    context = ExplainContext(
        query_text=query,
        query_kind=kind,
        query_image_key=query_image_key or (None if kind == "text" else f"notebook:{name}"),
        caption=caption,
        dataset_captions=list(dataset_captions),
        evidence=regions,
        image_size=image_size,
        score=score,
        rank=rank,
        image_key=image_key or f"notebook:{name}",
    )
    return Case(name, context)


def as_cases(items: Iterable[Case | ExplainContext | Mapping[str, Any]]) -> list[Case]:
    """Cases from a mix of `Case`s, bare contexts and dicts; unnamed ones are numbered."""
    out: list[Case] = []
    for i, item in enumerate(items, 1):
        if isinstance(item, Case):
            out.append(item)
        elif isinstance(item, ExplainContext):
            out.append(Case(f"case{i}", item))
        else:
            out.append(Case.from_dict(item, name=item.get("name") or f"case{i}"))
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"case names must be unique, got {names}")
    return out


def cases_from_search(
    searcher: Searcher,
    query: str | Query,
    top_k: int = 5,
    *,
    evidence: EvidenceProvider | None = None,
    captions: CaptionProvider | None = None,
) -> list[Case]:
    """The top hits of a real search as cases, with the evidence and captions their cards would get.

    `evidence` defaults to the library's region evidence (`settings.evidence_regions`, as the server shows);
    `captions` to what the catalog holds (a generated caption, else the dataset's first).
    """
    q = Query(text=query, top_k=top_k) if isinstance(query, str) else query
    pipeline = CardPipeline(
        searcher,
        None,
        evidence or make_evidence_provider(get_settings().evidence_regions),
        captions or CatalogCaptions(searcher),
    )
    page = pipeline.search(q, query_echo(q))
    paths = {h.id: h.path for h in page.hits}
    label = q.text or "image query"
    return [
        Case(f"{label} #{card.rank} {Path(paths[card.id]).name}", ctx)
        for card, ctx in pipeline.page_contexts(page)
    ]
