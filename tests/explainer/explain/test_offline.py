"""The offline explainer never claims what the captions do not say, and regions are put into words."""

from __future__ import annotations

import random
import re

import pytest

from explainer.explain.backends.offline import (
    OFFLINE_LABEL,
    OfflineExplainer,
    content_words,
    forms,
    score_confidence,
)
from explainer.explain.regions import describe_box, describe_regions, strongest_region
from explainer.explain.types import ExplainContext
from retrieval.types import Region

COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "brown", "pink"]
OBJECTS = [
    "dog",
    "cat",
    "bus",
    "car",
    "bicycle",
    "tree",
    "horse",
    "boat",
    "pizza",
    "person",
    "circle",
    "square",
]
VOCAB = set(COLOURS) | set(OBJECTS)
SIZE = (300, 300)


VOCAB_FORMS = {f for v in VOCAB for f in forms(v)}


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def _forms_of(text: str) -> set[str]:
    return {f for t in _tokens(text) for f in forms(t)}


def _ctx(
    query: str | None,
    caption: str | None,
    dataset: list[str] | None = None,
    kind: str = "text",
    score: float = 0.27,
    evidence: list[Region] | None = None,
) -> ExplainContext:
    return ExplainContext(
        query_text=query,
        query_kind=kind,  # type: ignore[arg-type]
        caption=caption,
        dataset_captions=dataset or [],
        evidence=evidence if evidence is not None else [Region(box=(0, 0, 90, 90), score=0.3, rank=1)],
        image_size=SIZE,
        score=score,
        rank=1,
        image_key="k",
    )


CASES = [
    ("red bus", "a red bus parked on a street", []),
    ("purple dog on a bicycle", "a brown dog sitting on the grass", ["a dog lying in a park"]),
    ("two cats", "a cat sleeping on a sofa", []),
    ("green tree near a boat", None, ["a boat on a lake", "green trees by the water"]),
    ("pizza", "a plate with food", []),
    ("yellow circle", None, None),
]


def _check_grounded(ctx: ExplainContext) -> None:
    result = OfflineExplainer().explain(ctx)
    allowed = _forms_of(" ".join([ctx.caption or "", *ctx.dataset_captions]))
    query = _forms_of(ctx.query_text or "")
    missing = {f for m in result.mismatches for f in forms(m)}
    for token in _tokens(result.text):
        if forms(token) & VOCAB_FORMS and not forms(token) & allowed:
            # A colour or object not in any caption may only appear as a query word reported missing.
            assert forms(token) & query and forms(token) & missing, (token, result.text)
    # What it claims as matched is always in a caption and in the query.
    for concept in result.matched_concepts:
        assert forms(concept) & allowed and forms(concept) & query
    assert set(result.matched_concepts).isdisjoint(result.mismatches)
    assert 0.0 <= result.confidence <= 1.0
    assert result.backend == OFFLINE_LABEL and result.fallback_reason is None


@pytest.mark.parametrize(("query", "caption", "dataset"), CASES)
def test_never_names_what_the_captions_do_not_say(
    query: str, caption: str | None, dataset: list[str] | None
) -> None:
    _check_grounded(_ctx(query, caption, dataset))


def test_grounded_on_random_cases() -> None:
    rng = random.Random(1234)
    for _ in range(200):
        cap = f"a {rng.choice(COLOURS)} {rng.choice(OBJECTS)} next to a {rng.choice(OBJECTS)}"
        dataset = [f"{rng.choice(COLOURS)} {rng.choice(OBJECTS)}" for _ in range(rng.randint(0, 3))]
        query = " ".join(rng.sample(COLOURS, 1) + rng.sample(OBJECTS, rng.randint(1, 2)))
        kind = rng.choice(["text", "text+image"])
        caption = cap if rng.random() > 0.2 else None
        _check_grounded(_ctx(query, caption, dataset, kind=kind, score=rng.uniform(0.0, 1.0)))


def test_reports_supported_and_missing_query_words() -> None:
    result = OfflineExplainer().explain(
        _ctx("purple dogs on a bicycle", "a brown dog on the grass", ["a dog in a park"])
    )
    assert result.matched_concepts == ["dog"]
    assert result.mismatches == ["purple", "bicycle"]
    assert '"purple" and "bicycle" are not found' in result.text
    assert 'The caption confirms "dog"' in result.text
    assert 'the caption says "brown" and "grass" instead' in result.text
    assert "a brown dog on the grass" not in result.text  # the card shows the caption; it is not repeated
    assert "1 of 3 query words confirmed" in result.text


def test_dataset_captions_count_as_support() -> None:
    result = OfflineExplainer().explain(_ctx("boat", "a lake at dusk", ["a small boat on a lake"]))
    assert result.matched_concepts == ["boat"] and result.mismatches == []
    assert 'dataset captions confirm "boat"' in result.text


def test_image_query_describes_caption_only() -> None:
    result = OfflineExplainer().explain(_ctx(None, "a cat on a sofa", kind="image", score=0.8))
    assert "visual similarity to the query image" in result.text
    assert result.matched_concepts == [] and result.mismatches == []


def test_no_caption_says_it_cannot_confirm() -> None:
    result = OfflineExplainer().explain(_ctx("red bus", None))
    assert "No caption is available" in result.text
    assert result.mismatches == ["red", "bus"]


def test_deterministic() -> None:
    ctx = _ctx("red bus", "a red bus on a street", ["a double decker bus"])
    a, b = OfflineExplainer().explain(ctx), OfflineExplainer().explain(ctx)
    assert a.model_dump(exclude={"latency_ms"}) == b.model_dump(exclude={"latency_ms"})


def test_mentions_strongest_region() -> None:
    evidence = [
        Region(box=(200, 200, 300, 300), score=0.31, rank=1),
        Region(box=(0, 0, 100, 100), score=0.30, rank=2),
    ]
    result = OfflineExplainer().explain(_ctx("bus", "a bus", evidence=evidence))
    assert (
        "strongest match is in the bottom-right region, then the top-left region (almost as strong)"
        in result.text
    )


def test_confidence_grows_with_score() -> None:
    scores = [0.0, 0.15, 0.2, 0.25, 0.3, 0.35, 0.5]
    values = [score_confidence(s, "text") for s in scores]
    assert values == sorted(values) and values[0] == 0.0 and values[-1] == 1.0
    low = OfflineExplainer().explain(_ctx("bus", "a bus", score=0.1)).confidence
    high = OfflineExplainer().explain(_ctx("bus", "a bus", score=0.34)).confidence
    assert low < high


def test_content_words_drop_filler() -> None:
    assert content_words("A photo of two red buses in the city") == ["red", "buses", "city"]
    assert "bus" in forms("buses") and "house" in forms("houses") and "puppy" in forms("puppies")
    assert forms("glass") == {"glass"} and forms("bus") == {"bus"}
    result = OfflineExplainer().explain(_ctx("buses and dogs", "two dogs next to a bus"))
    assert result.matched_concepts == ["bus", "dogs"] and result.mismatches == []


@pytest.mark.parametrize(
    ("box", "words"),
    [
        ((0, 0, 90, 90), "top-left region"),
        ((110, 110, 190, 190), "centre"),
        ((200, 0, 300, 100), "top-right region"),
        ((0, 110, 90, 190), "centre-left region"),
        ((120, 220, 180, 290), "bottom-centre region"),
        ((0, 210, 300, 300), "bottom band"),
        ((0, 0, 300, 95), "top band"),
        ((0, 0, 100, 300), "left band"),
        ((100, 0, 200, 300), "central vertical band"),
        ((0, 0, 300, 180), "top half"),
        ((150, 0, 300, 300), "right half"),
        ((5, 5, 295, 290), "whole image"),
        ((0, 0, 300, 300), "whole image"),
    ],
)
def test_describe_box(box: tuple[int, int, int, int], words: str) -> None:
    assert describe_box(box, SIZE) == words


def test_describe_box_uses_image_size_not_square() -> None:
    assert describe_box((0, 0, 200, 50), (600, 150)) == "top-left region"
    assert describe_box((0, 0, 600, 50), (600, 150)) == "top band"


def test_region_strength_words() -> None:
    evidence = [
        Region(box=(0, 0, 50, 50), score=0.10, rank=3),
        Region(box=(100, 100, 200, 200), score=0.40, rank=1),
        Region(box=(200, 200, 300, 300), score=0.30, rank=2),
    ]
    assert describe_regions(evidence, SIZE) == [
        "centre (strongest match)",
        "bottom-right region (weaker match)",
        "top-left region (much weaker match)",
    ]
    assert strongest_region(evidence, SIZE) == "centre"
    assert strongest_region([], SIZE) is None


def test_invalid_box_is_refused() -> None:
    with pytest.raises(ValueError, match="box must be"):
        Region(box=(10, 10, 5, 20), score=0.1, rank=1)


def test_calibrated_confidence_replaces_the_fixed_score_ranges() -> None:
    """A high cosine on a collection where every query scores high is not a "strong match"."""
    base = _ctx("purple elephant piano", None, score=0.34)
    fixed = OfflineExplainer().explain(base)
    calibrated = OfflineExplainer().explain(base.model_copy(update={"match_confidence": 0.05}))
    assert "weak match" not in fixed.text and calibrated.confidence < 0.1
    assert "strong match" not in calibrated.text and "weak match" in calibrated.text
