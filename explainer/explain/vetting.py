"""Replies that parse but say nothing, caught before they are shown as a language model's explanation.

Grammar-constrained decoding makes every reply of the local model parse; it does not make it say
anything. Measured with Gemma 3 270M (docs/EVAL.md), parsed replies echoed the query, repeated one
sentence until the length limit, or read "1", "}," or an invented link. Such a reply is not shown: the
card gets the offline text, labelled with the reason (`LLMRejectedReply`). The rules, in order:

- not prose: a link, or fewer than 60% of its visible characters letters;
- repeats itself: a run of the same short chunk ("}}}}}}", "abababab"), a three-word sequence said
  three times, or fewer than 40% distinct words in 12 or more;
- echoes the query: it uses the query's words (in any word form) and fewer than 2 others beyond
  the generic words of an explanation ("image", "caption", "region"...);
- almost nothing: fewer than 3 distinct content words (stopwords dropped);
- contradicts itself: a concept listed both as matched and as missing;
- nothing supported: no claimed match survives the grounding check (`grounding.py`) and the text names
  no word of the hit's descriptions (caption, dataset captions, region labels) beyond generic ones;
- asserts the query: the text uses a query word that the hit's descriptions do not support (by the
  grounding check's rule), without listing it as missing or saying "no", "not", "without"...: "a
  giraffe standing in a field" for a hit whose captions speak of a boy with a kite.

A backend opts in (`Backend.vets_replies`): Groq's models do not write such replies, and scripted fakes
in tests write deliberately terse ones.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from explainer.explain.backends.offline import content_words
from explainer.explain.grounding import evidence_words, supported, word_forms
from explainer.explain.types import ExplainContext, ExplanationOutput

#: Words any explanation may use that say nothing of the image's content.
_GENERIC_TEXT = """image images region regions area part parts top bottom left right centre center
    middle upper lower
    corner side query caption captions dataset match matches matched matching result results score rank
    hit describes described description mentions mentioned says said fits fit relevant related
    returned search searched user concept concepts"""
GENERIC_WORDS = frozenset(_GENERIC_TEXT.split())
_WORD_RE = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")
_LINK_RE = re.compile(r"(?:https?://|www\.|\.(?:com|org|net|html?)\b)", re.I)
_RUN_RE = re.compile(r"(\S{1,8}?)\1{5,}")
#: Words that turn a sentence into "the query's thing is not there".
_NEGATION_TEXT = "no not without missing absent lacks lack nothing none neither nor isn't doesn't"
_NEGATIONS = frozenset(_NEGATION_TEXT.split())
MIN_CONTENT_WORDS = 3
MIN_NEW_WORDS = 2
MIN_LETTER_SHARE = 0.6


def _forms(words: Sequence[str]) -> set[str]:
    out: set[str] = set()
    for w in words:
        out.update(word_forms(w))
    return out


def _repeats(text: str) -> bool:
    if _RUN_RE.search(text.replace(" ", "")):
        return True
    words = _WORD_RE.findall(text.lower())
    trigrams = Counter(zip(words, words[1:], words[2:], strict=False))
    if trigrams and max(trigrams.values()) >= 3:
        return True
    return len(words) >= 12 and len(set(words)) / len(words) < 0.4


def junk_reason(ctx: ExplainContext, output: ExplanationOutput, matched: Sequence[str]) -> str | None:
    """Why this parsed reply must not be shown (one phrase), or None when it may be.

    `matched` are the claimed matches that survived the grounding check.
    """
    text = output.explanation
    visible = [c for c in text if not c.isspace()]
    if _LINK_RE.search(text):
        return "it is not prose (it names a link)"
    if not visible or sum(c.isalpha() for c in visible) / len(visible) < MIN_LETTER_SHARE:
        return "it is not prose (mostly digits or punctuation)"
    if _repeats(text):
        return "it repeats itself"
    words = content_words(text)
    informative = [w for w in words if w not in GENERIC_WORDS]
    if ctx.query_text:
        query = _forms(content_words(ctx.query_text))
        new = [w for w in informative if not (word_forms(w) & query)]
        if len(new) < MIN_NEW_WORDS and len(new) < len(informative):
            return "it only echoes the query"
    if len(words) < MIN_CONTENT_WORDS:
        return "it says almost nothing"
    said = {c.strip().lower() for c in output.matched_concepts} & {
        c.strip().lower() for c in output.mismatches
    }
    if said:
        return f"it calls {sorted(said)[0]!r} both matched and missing"
    evidence = evidence_words(ctx)
    if not matched and not any(word_forms(w) & evidence for w in informative):
        return "it says nothing the hit's descriptions support"
    if ctx.query_text and not (_NEGATIONS & set(_WORD_RE.findall(text.lower()))):
        missing = {m.strip().lower() for m in output.mismatches}
        said = _forms(informative)
        for w in content_words(ctx.query_text):
            if w in GENERIC_WORDS or w in missing or not (word_forms(w) & said):
                continue
            if not supported(w, evidence):
                return f"it says {w!r}, which the hit's descriptions do not"
    return None
