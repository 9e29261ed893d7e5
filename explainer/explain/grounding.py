"""Grounding, checked: a claimed match must be said by the hit's own descriptions, not only by the model.

The prompt asks the model to name only what the caption, the dataset captions or the regions say, but
nothing made it so: a model that lists "a giraffe" for a caption about a dog was shown as a match. Each
concept in `matched_concepts` is therefore checked after parsing, and the ones not supported move to
`unsupported_concepts`, which the card shows as such.

The rule (measured in tests/explainer/explain/test_grounding.py: planted concepts flagged, supported ones
kept):
- the evidence is the generated caption, the dataset captions and the evidence regions put into words
  ("top-left region", region labels). The query is not evidence: a concept found only in the query is
  what the user asked for, not what the image was seen to hold;
- a concept is supported when every content word of it (stopwords dropped) matches a word of the
  evidence: the same word, a plural or singular ("dogs"/"dog", "buses"/"bus", "puppies"/"puppy"), a
  verb form ("running"/"run", "parked"/"park"), or a synonym from the small table below
  ("puppy"/"dog", "grey"/"gray", "man"/"person");
- a concept with no content word at all ("the", "1") supports nothing and is flagged.
A text encoder would catch more paraphrases, but it costs a model call per concept and its threshold
would flag differently per collection; words and a table are predictable and cheap.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from explainer.explain.backends.offline import content_words, forms
from explainer.explain.regions import describe_regions
from explainer.explain.types import ExplainContext

log = logging.getLogger(__name__)

#: Groups of words that name the same thing in captions (COCO-style vocabulary); small on purpose.
SYNONYM_GROUPS: tuple[frozenset[str], ...] = tuple(
    frozenset(g.split())
    for g in (
        "dog puppy pup hound doggy",
        "cat kitten kitty",
        "person people man woman men women guy lady boy girl child kid human persons",
        "car automobile vehicle",
        "bike bicycle cycle",
        "motorbike motorcycle",
        "plane airplane aeroplane aircraft jet",
        "boat ship vessel",
        "sofa couch",
        "tv television",
        "refrigerator fridge icebox",
        "grey gray",
        "picture photo image",
        "ocean sea",
        "beach shore seaside",
        "road street",
        "phone cellphone smartphone",
        "hill mountain",
        "circle round",
        "square box",
        "top upper",
        "bottom lower",
        "center centre middle central",
    )
)
_SYNONYMS: dict[str, frozenset[str]] = {}
for _group in SYNONYM_GROUPS:
    for _word in _group:
        _SYNONYMS[_word] = _SYNONYMS.get(_word, frozenset()) | _group


def word_forms(word: str) -> frozenset[str]:
    """Plural and verb forms of a word, so that "running", "parked", "dogs" meet "run", "park", "dog"."""
    out = set(forms(word))
    w = word.lower()
    for suffix in ("ing", "ed"):
        if len(w) > len(suffix) + 2 and w.endswith(suffix):
            stem = w[: -len(suffix)]
            out.update({stem, stem + "e"})
            if len(stem) > 2 and stem[-1] == stem[-2]:  # running → run, sitting → sit
                out.add(stem[:-1])
    return frozenset(out)


def _expanded(word: str) -> frozenset[str]:
    out = set(word_forms(word))
    for f in list(out):
        for syn in _SYNONYMS.get(f, ()):
            out.update(word_forms(syn))
    return frozenset(out)


def evidence_words(ctx: ExplainContext) -> frozenset[str]:
    """Every form of every word of the hit's descriptions: caption, dataset captions, regions in words."""
    texts: list[str] = [ctx.caption or "", *ctx.dataset_captions]
    texts.extend(describe_regions(ctx.evidence, ctx.image_size))
    texts.extend(r.label for r in ctx.evidence if r.label)
    words: set[str] = set()
    for text in texts:
        for w in content_words(text):
            words.update(_expanded(w))
            words.update(part for part in w.split("-") if part)
    return frozenset(words)


def supported(concept: str, evidence: frozenset[str]) -> bool:
    """True when every content word of `concept` is said (in some form) by the evidence."""
    words = [p for w in content_words(concept) for p in ([w] if w in evidence else w.split("-")) if p]
    if not words:
        return False
    return all(_expanded(w) & evidence for w in words)


@dataclass(frozen=True)
class GroundingResult:
    matched: list[str]
    unsupported: list[str]


def check_concepts(ctx: ExplainContext, claimed: Sequence[str]) -> GroundingResult:
    """Split claimed matches into those the hit's descriptions support and those they do not."""
    evidence = evidence_words(ctx)
    matched: list[str] = []
    unsupported: list[str] = []
    for concept in claimed:
        (matched if supported(concept, evidence) else unsupported).append(concept)
    return GroundingResult(matched, unsupported)


class GroundingStats:
    """Running share of unsupported claims per backend, logged so a prompt or model change shows."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, list[int]] = {}

    def record(self, backend: str, claimed: int, unsupported: int) -> None:
        if claimed == 0:
            return
        with self._lock:
            counts = self._counts.setdefault(backend, [0, 0])
            counts[0] += claimed
            counts[1] += unsupported
            share = counts[1] / counts[0]
        log.info(
            "grounding %s: %d of %d claims unsupported here; %.1f%% of %d so far",
            backend,
            unsupported,
            claimed,
            100.0 * share,
            counts[0],
        )

    def shares(self) -> dict[str, tuple[int, int]]:
        """backend → (claims checked, unsupported)."""
        with self._lock:
            return {k: (v[0], v[1]) for k, v in self._counts.items()}


def concepts_of(values: Iterable[str]) -> list[str]:
    """Claims without blanks or repeats, in order."""
    return list(dict.fromkeys(v.strip() for v in values if v and v.strip()))
