"""The offline explainer: a deterministic explanation built only from what the hit already has.

It is what a user without an API key sees, and what any card falls back to when the LLM fails,
so it must be trustworthy rather than eloquent: every concept it states as present comes from the
caption or the dataset captions (query words are named only as "found" when a caption contains
them, or as "not found"); it never adds an object or a colour of its own. The only fixed words
are the template's own ("caption", "region", "score"...).

The card already shows the caption, so the explanation does not repeat it: it says what of the query
the captions confirm, what they do not (and what the caption says instead), where in the image the
match is strongest, and how confident the match is and why (query words confirmed, score, rank).

When the search calibrated the hit's confidence on its collection, that value is the one the text
quotes and the explanation carries, unchanged: the card's badge shows it too, and a card that said
81 % on its badge and "confidence 49%" in its explanation would leave the user to guess which one
to believe. Query words confirmed by the captions are stated as words, not folded into the number.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence

from explainer.explain.backends.base import Backend
from explainer.explain.regions import describe_regions, strongest_region
from explainer.explain.types import ExplainContext, Explanation, QueryKind

OFFLINE_LABEL = "offline"
#: Version of the offline template; bump it when the wording changes so cached texts are told apart.
OFFLINE_PROMPT = "offline@v3"

_WORD_RE = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")
#: Function words and search filler: never reported as concepts, found or missing.
_STOPWORD_TEXT = """a an the and or but of in on at to for from with without by into onto over under near
    is are was were be been being has have had do does did this that these those it its it's
    there here some any all each every no not very more most less few many much one two
    as up down out off than then so such can could will would should may might must
    i me my we our you your he she they them his her their who what which where when how
    photo photos picture pictures image images pic pics photograph showing shows show shown
    containing contains find search looking look like"""
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())
#: (score at which confidence starts rising, score at which it saturates), per query kind. CLIP-family
#: cosine similarities sit near 0.15-0.35 for text queries and 0.5-0.95 for image queries.
_SCORE_RANGE: dict[QueryKind, tuple[float, float]] = {
    "text": (0.15, 0.35),
    "image": (0.5, 0.95),
    "text+image": (0.3, 0.7),
}


def content_words(text: str | None) -> list[str]:
    """Lower-case words of `text` minus stopwords, in order, without repeats."""
    if not text:
        return []
    seen: dict[str, None] = {}
    for word in _WORD_RE.findall(text.lower()):
        if word not in _STOPWORDS and word not in seen:
            seen[word] = None
    return list(seen)


def forms(word: str) -> frozenset[str]:
    """The word and its plausible singulars, so "dogs", "buses" or "puppies" match "dog", "bus", "puppy".

    Several candidates instead of one stem because English plurals are ambiguous ("buses" → "bus",
    "houses" → "house"); two words match when their forms intersect.
    """
    w = word.lower().removesuffix("'s")
    out = {w}
    if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        out.add(w[:-1])
        if w.endswith("es"):
            out.add(w[:-2])
        if len(w) > 4 and w.endswith("ies"):
            out.add(w[:-3] + "y")
    return frozenset(out)


def _index(words: Iterable[str]) -> dict[str, str]:
    """Map every form → first surface form, so matched concepts are quoted as the caption spells them."""
    out: dict[str, str] = {}
    for w in words:
        for f in forms(w):
            out.setdefault(f, w)
    return out


def _lookup(index: dict[str, str], word: str) -> str | None:
    for f in sorted(forms(word), key=len, reverse=True):
        if f in index:
            return index[f]
    return None


def _quote_list(words: Sequence[str]) -> str:
    quoted = [f'"{w}"' for w in words]
    if len(quoted) <= 1:
        return "".join(quoted)
    return ", ".join(quoted[:-1]) + " and " + quoted[-1]


def _place(region: str) -> str:
    return "spans the whole image" if region == "whole image" else f"is in the {region}"


def _instead(caption: str | None, query_words: Sequence[str]) -> list[str]:
    """The caption's own content words that the query does not use: what the caption says in their place."""
    asked = {f for w in query_words for f in forms(w)}
    return [w for w in content_words(caption) if not forms(w) & asked][:3]


def score_confidence(score: float, kind: QueryKind) -> float:
    """Map a similarity score to 0..1 on a scale that suits the query kind (a heuristic, documented)."""
    lo, hi = _SCORE_RANGE[kind]
    return min(1.0, max(0.0, (score - lo) / (hi - lo)))


def _strength(confidence: float, calibrated: bool) -> str:
    """The word for a confidence. A calibrated one uses the card badge's bands (strong from the
    "no confident match" threshold of retrieval.confidence, weak under 0.5), so the text never calls
    "strong" what the page flags as no confident match; the fixed score ranges keep their own bands."""
    strong, weak = (0.9, 0.5) if calibrated else (0.7, 0.35)
    if confidence >= strong:
        return "strong"
    if confidence >= weak:
        return "moderate"
    return "weak"


def percent(confidence: float) -> str:
    """A confidence as the page shows it (whole percent), so the text and the badge read the same."""
    return f"{round(confidence * 100)}%"


class OfflineExplainer(Backend):
    """Explainer backend that needs no model; also the fallback of every LLM backend."""

    label = OFFLINE_LABEL
    prompt_id = OFFLINE_PROMPT

    def explain(self, ctx: ExplainContext, fallback_reason: str | None = None) -> Explanation:
        """Explain one hit; `fallback_reason` records why an LLM explanation was replaced."""
        start = time.perf_counter()
        caption_index = _index(content_words(ctx.caption))
        dataset_index = _index(w for c in ctx.dataset_captions for w in content_words(c))
        has_text = ctx.query_kind in ("text", "text+image") and bool(ctx.query_text)
        query_words = content_words(ctx.query_text) if has_text else []

        in_caption: list[str] = []
        in_dataset: list[str] = []
        missing: list[str] = []
        for word in query_words:
            if (found := _lookup(caption_index, word)) is not None:
                if found not in in_caption:
                    in_caption.append(found)
            elif (found := _lookup(dataset_index, word)) is not None:
                if found not in in_dataset:
                    in_dataset.append(found)
            else:
                missing.append(word)

        sentences: list[str] = []
        if ctx.query_kind in ("image", "text+image"):
            sentences.append("Found by visual similarity to the query image.")
        has_descriptions = bool(ctx.caption or ctx.dataset_captions)
        if has_text:
            if in_caption:
                sentences.append(f"The caption confirms {_quote_list(in_caption)}.")
            if in_dataset:
                sentences.append(f"The dataset captions confirm {_quote_list(in_dataset)}.")
            if missing and has_descriptions:
                verb = "is" if len(missing) == 1 else "are"
                sentence = f"{_quote_list(missing)} {verb} not found in the caption or the dataset captions"
                instead = _instead(ctx.caption, query_words)
                if instead:
                    sentence += f"; the caption says {_quote_list(instead)} instead"
                sentences.append(sentence + ".")
            elif missing:
                sentences.append(f"No caption is available to confirm {_quote_list(missing)}.")
            if query_words and not in_caption and not in_dataset and has_descriptions:
                sentences.append("The match rests on visual similarity alone.")
        regions = describe_regions(ctx.evidence, ctx.image_size)
        best = strongest_region(ctx.evidence, ctx.image_size)
        if best is not None:
            sentence = f"The strongest match {_place(best)}"
            if len(regions) > 1:
                sentence += f", then the {regions[1]}"
            sentences.append(sentence + ".")

        # The collection-calibrated confidence when the search gave one, as is (the card shows it); the
        # fixed score ranges otherwise (they say "strong match" for any high cosine, even where every
        # query scores high), blended with the share of query words the captions confirm.
        why = f"similarity {ctx.score:.3f}, rank {ctx.rank}"
        confirmed = len(in_caption) + len(in_dataset)
        if query_words:
            why = f"{confirmed} of {len(query_words)} query words confirmed, {why}"
        calibrated = ctx.match_confidence is not None
        if ctx.match_confidence is not None:
            confidence = ctx.match_confidence
        else:
            confidence = score_confidence(ctx.score, ctx.query_kind)
            if query_words:
                confidence = round(0.6 * confidence + 0.4 * confirmed / len(query_words), 2)
        strength = _strength(confidence, calibrated)
        sentences.append(f"Confidence {percent(confidence)}, a {strength} match: {why}.")
        return Explanation(
            text=" ".join(sentences),
            backend=OFFLINE_LABEL,
            matched_concepts=in_caption + in_dataset,
            mismatches=missing,
            confidence=confidence,
            prompt=OFFLINE_PROMPT,
            fallback_reason=fallback_reason,
            cached=False,
            latency_ms=round((time.perf_counter() - start) * 1000.0, 3),
        )
