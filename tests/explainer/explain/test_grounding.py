"""Grounding, checked: claimed matches the hit's own descriptions do not say are flagged, the rest kept.

A fake model plants concepts absent from each hit's context beside concepts its context supports
(in other word forms: plurals, verb forms, synonyms); the real explainer parses and checks them.
"""

from __future__ import annotations

import json
import random

import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel

from explainer.explain.backends import ChatModelBackend
from explainer.explain.chain import Explainer
from explainer.explain.grounding import check_concepts, evidence_words, supported
from explainer.explain.prompts import load_prompt
from explainer.explain.types import ExplainContext
from retrieval.types import Region

#: Captions as a captioner or a dataset writes them, with concepts they support in other words.
CASES: list[tuple[str, list[str], list[str]]] = [
    ("a dog running on the beach", ["dogs", "run", "puppy", "shore"], ["a dog on the beach"]),
    ("two cats sleeping on a sofa", ["cat", "kitten", "couch", "sleep"], ["cats on a couch"]),
    ("a red bus parked on a street", ["red bus", "buses", "road", "park"], ["a bus in the city"]),
    ("a man riding a bicycle", ["person", "bike", "ride", "men"], ["a cyclist on a road"]),
    ("a plane flying over mountains", ["airplane", "mountain", "flying", "hills"], ["a jet in the sky"]),
    ("a grey cat on a wooden table", ["gray cat", "table", "wooden"], ["a kitten indoors"]),
    ("a red circle in the top left", ["red circle", "circles", "upper left"], ["a red circle on white"]),
    ("a blue square near the centre", ["blue square", "squares", "middle"], ["a blue square"]),
    ("people walking along the shore", ["person", "walk", "beach", "seaside"], ["a crowd near the sea"]),
    ("a boat on a calm lake", ["boats", "lake", "ship"], ["a small boat on a lake"]),
    ("puppies playing in the grass", ["dog", "puppy", "grass", "play"], ["young dogs outside"]),
    ("a woman holding a phone", ["person", "cellphone", "holding"], ["a lady with a smartphone"]),
]
PLANTED = [
    "zebra",
    "giraffe",
    "umbrella",
    "pizza",
    "snow",
    "train",
    "violin",
    "elephant",
    "purple hat",
    "tennis racket",
    "skateboard",
    "lighthouse",
    "green triangle",
    "bottom-right yellow star",
]


def ctx(caption: str, dataset: list[str], query: str = "something", rank: int = 1) -> ExplainContext:
    return ExplainContext(
        query_text=query,
        caption=caption,
        dataset_captions=dataset,
        evidence=[Region(box=(0, 0, 40, 40), score=0.3, rank=1)],
        image_size=(120, 120),
        score=0.3,
        rank=rank,
        image_key=f"img-{rank}-{caption}",
    )


def test_planted_concepts_are_flagged_and_supported_ones_kept() -> None:
    """The measured figures the README quotes: share of planted flagged, share of supported flagged."""
    rng = random.Random(7)
    ctxs, replies, planted_of = [], [], []
    for i, (caption, good, dataset) in enumerate(CASES * 3):
        planted = rng.sample(PLANTED, 2)
        ctxs.append(ctx(caption, dataset, query=good[0], rank=i + 1))
        planted_of.append((good, planted))
        reply = {"explanation": "x", "matched_concepts": good + planted, "mismatches": [], "confidence": 0.5}
        replies.append(json.dumps(reply))
    backend = ChatModelBackend(FakeListChatModel(responses=replies), "fake-planted")
    with Explainer(backend, load_prompt("explain_hit"), max_concurrency=1) as ex:
        outs = [ex.explain(c) for c in ctxs]  # one at a time: replies are consumed in order
    planted_total = planted_flagged = good_total = good_flagged = 0
    for out, (good, planted) in zip(outs, planted_of, strict=True):
        assert out.backend == "fake-planted"
        planted_total += len(planted)
        planted_flagged += sum(p in out.unsupported_concepts for p in planted)
        good_total += len(good)
        good_flagged += sum(g in out.unsupported_concepts for g in good)
        assert not set(planted) & set(out.matched_concepts)
    assert planted_flagged / planted_total >= 0.9, (planted_flagged, planted_total)
    assert good_flagged / good_total <= 0.05, (good_flagged, good_total)
    claims, unsupported = ex.grounding.shares()["fake-planted"]
    assert claims == planted_total + good_total and unsupported == planted_flagged + good_flagged


@pytest.mark.parametrize(
    ("concept", "caption", "ok"),
    [
        ("dogs", "a dog", True),
        ("buses", "a red bus", True),
        ("puppies", "a puppy", True),
        ("running", "a dog runs", True),
        ("gray", "a grey cat", True),
        ("automobile", "a car", True),
        ("top-left region", "a cat", True),  # the regions in words are evidence too
        ("cat", "a dog", False),
        ("red cat", "a red dog", False),  # every word of a concept must be said
        ("the", "the cat", False),  # no content word: supports nothing
        ("", "a cat", False),
    ],
)
def test_rule(concept: str, caption: str, ok: bool) -> None:
    assert supported(concept, evidence_words(ctx(caption, []))) is ok


def test_the_query_is_not_evidence() -> None:
    c = ctx("a dog on grass", [], query="a dog on the beach")
    result = check_concepts(c, ["dog", "beach"])
    assert result.matched == ["dog"] and result.unsupported == ["beach"]


def test_dataset_captions_are_evidence() -> None:
    c = ctx("a photo", ["a zebra grazing"])
    assert check_concepts(c, ["zebras"]).matched == ["zebras"]
