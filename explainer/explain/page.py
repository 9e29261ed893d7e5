"""One call for a page of hits: the prompt's inputs, the pinned JSON schema, and checking the reply.

Why a page per call: per-hit calls send the instructions and the search again for every card, and a
page of 12 spent Groq's free 6,000 tokens a minute in one search. In one call the instructions are sent
once and each hit adds only its own facts (bench/RESULTS.md has the measured tokens).

Why the schema pins the list (`minItems` = `maxItems` = the number of hits, each item's `hit` an `enum`
of the hits' numbers): a model that drops, repeats or invents a hit is then visibly wrong, and
`parse_page` says which hits are missing, so only those are asked again.

Page size (12, `CLEARSIGHT_EXPLAIN_PAGE_SIZE`): the page's own size, and ~2,700 tokens, under half of
the free tier's 6,000 a minute, so a call always fits beside another; 24 would take ~5,000, one page
a minute, and a failed reply would cost the whole minute.

Hits are numbered by their rank (unique on a page, and what the card shows); when two contexts of one
call share a rank, by their position instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import BaseMessage
from pydantic import ValidationError

from explainer.explain.regions import describe_regions
from explainer.explain.types import (
    MAX_CONCEPT_CHARS,
    MAX_CONCEPTS,
    MAX_EXPLANATION_CHARS,
    ExplainContext,
    ExplanationOutput,
)

#: Function name of the page call's tool.
FUNCTION_NAME = "explain_hits"
#: Per hit: dataset captions and regions kept, and the characters a caption may take. Measured
#: (bench/explain_bench.py --limits, COCO-like captions): each dataset caption adds ~17 tokens a hit
#: and each region ~8; with 2 and 2 a page of 12 counts ~2,700 tokens (1,360 of them the completion
#: ceiling), two pages a free-tier minute; all 5 captions and 3 regions cost 23% more for text that
#: mostly repeats the first captions.
DATASET_CAPTIONS_PER_HIT = 2
REGIONS_PER_HIT = 2
CAPTION_CHARS = 160
#: Completion tokens a hit's answer may take (explanation of at most MAX_EXPLANATION_CHARS plus
#: concepts, in JSON), and the call's fixed overhead.
COMPLETION_TOKENS_PER_HIT = 110
COMPLETION_TOKENS_BASE = 40

_FENCE_RE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)


def hit_numbers(ctxs: Sequence[ExplainContext]) -> list[int]:
    """The number each hit is keyed by in the call: its rank, or its position when ranks repeat."""
    ranks = [c.rank for c in ctxs]
    return ranks if len(set(ranks)) == len(ranks) else list(range(1, len(ctxs) + 1))


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def hit_block(ctx: ExplainContext, number: int) -> str:
    """One hit's facts, trimmed: caption, the first dataset captions, the best regions, score."""
    lines = [f"Hit {number} (score {ctx.score:.3f})"]
    lines.append(f"caption: {_clip(ctx.caption, CAPTION_CHARS) if ctx.caption else '(none)'}")
    captions = [_clip(c, CAPTION_CHARS) for c in ctx.dataset_captions[:DATASET_CAPTIONS_PER_HIT]]
    if captions:
        lines.append("dataset captions: " + " | ".join(captions))
    regions = describe_regions(ctx.evidence, ctx.image_size)[:REGIONS_PER_HIT]
    if regions:
        lines.append("regions: " + "; ".join(regions))
    return "\n".join(lines)


def page_inputs(ctxs: Sequence[ExplainContext]) -> dict[str, str]:
    """The page prompt's variables; every context must be of the same query."""
    first = ctxs[0]
    numbers = hit_numbers(ctxs)
    return {
        "query_text": first.query_text.strip() if first.query_text else "(none: the query is an image)",
        "query_kind": first.query_kind,
        "count": str(len(ctxs)),
        "hits": "\n\n".join(hit_block(c, n) for c, n in zip(ctxs, numbers, strict=True)),
    }


def _item_schema(numbers: Sequence[int]) -> dict[str, Any]:
    concepts = {
        "type": "array",
        "items": {"type": "string", "minLength": 1, "maxLength": MAX_CONCEPT_CHARS},
        "maxItems": MAX_CONCEPTS,
    }
    return {
        "type": "object",
        "properties": {
            "hit": {"type": "integer", "enum": list(numbers), "description": "the hit's number"},
            "explanation": {"type": "string", "minLength": 1, "maxLength": MAX_EXPLANATION_CHARS},
            "matched_concepts": concepts,
            "mismatches": concepts,
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["hit", "explanation", "matched_concepts", "mismatches", "confidence"],
        "additionalProperties": False,
    }


def hit_schema() -> dict[str, Any]:
    """The JSON schema of a one-hit reply: a page item without its hit number, the same bounds.

    Backends that constrain decoding to a schema (the local one) use it, so a one-hit reply is held
    to exactly what a page call's items are.
    """
    schema = _item_schema([1])
    del schema["properties"]["hit"]
    schema["required"] = [k for k in schema["required"] if k != "hit"]
    return schema


def page_schema(numbers: Sequence[int]) -> dict[str, Any]:
    """The JSON schema of a page reply: exactly one item per hit, keyed by an enum of the numbers."""
    return {
        "type": "object",
        "properties": {
            "hits": {
                "type": "array",
                "items": _item_schema(numbers),
                "minItems": len(numbers),
                "maxItems": len(numbers),
            }
        },
        "required": ["hits"],
        "additionalProperties": False,
    }


def page_tool(numbers: Sequence[int]) -> dict[str, Any]:
    """The OpenAI-style `tools[0]` entry carrying the schema."""
    return {
        "type": "function",
        "function": {
            "name": FUNCTION_NAME,
            "description": "Record one explanation per hit of the search.",
            "parameters": page_schema(numbers),
        },
    }


def completion_tokens(n_hits: int) -> int:
    """The completion ceiling (`max_tokens`) of a call explaining `n_hits` hits."""
    return COMPLETION_TOKENS_BASE + COMPLETION_TOKENS_PER_HIT * n_hits


@dataclass(frozen=True)
class PageReply:
    """A checked page reply: the answers by hit number, and the numbers still unanswered."""

    answers: dict[int, ExplanationOutput]
    missing: list[int]
    #: What was wrong, for the log and a fallback reason ("" when nothing).
    problems: str = ""


def reply_arguments(message: BaseMessage) -> object:
    """The JSON the model sent: its first tool call's arguments, else its content (fences allowed)."""
    calls = getattr(message, "tool_calls", None) or []
    if calls:
        return calls[0].get("args")
    content = message.content if isinstance(message.content, str) else ""
    text = content.strip()
    fenced = _FENCE_RE.match(text)
    if fenced:
        text = fenced.group(1)
    try:
        return json.loads(text)
    except ValueError:
        return None


def parse_page(arguments: object, numbers: Sequence[int]) -> PageReply:
    """Keep each valid item of a known, not yet answered hit; say which hits are missing and why."""
    problems: list[str] = []
    answers: dict[int, ExplanationOutput] = {}
    items = arguments.get("hits") if isinstance(arguments, Mapping) else None
    if not isinstance(items, list):
        items = []
        problems.append("no list of hits")
    wanted = set(numbers)
    for item in items:
        if not isinstance(item, Mapping):
            problems.append("an item is not an object")
            continue
        number = item.get("hit")
        if not isinstance(number, int) or number not in wanted:
            problems.append(f"unknown hit {number!r}")
            continue
        if number in answers:
            problems.append(f"hit {number} repeated")
            continue
        try:
            answers[number] = ExplanationOutput.model_validate(item)
        except ValidationError as exc:
            problems.append(f"hit {number}: {exc.error_count()} invalid fields")
    missing = [n for n in numbers if n not in answers]
    if missing and len(items) < len(numbers):
        problems.append(f"{len(items)} items for {len(numbers)} hits")
    return PageReply(answers, missing, "; ".join(problems))
