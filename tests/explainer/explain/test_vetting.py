"""Junk replies are caught, and real explanations are not: both sides of every rule in vetting.py.

The junk cases are the kinds Gemma 3 270M wrote before the grammar and the rules (docs/EVAL.md): the
query echoed, one sentence repeated, "1", "},", invented links, the same concept matched and missing.
"""

from __future__ import annotations

import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel

from explainer.explain.backends import ChatModelBackend
from explainer.explain.chain import Explainer
from explainer.explain.grounding import check_concepts
from explainer.explain.prompts import load_prompt
from explainer.explain.types import ExplainContext, ExplanationOutput
from explainer.explain.vetting import junk_reason
from retrieval.types import Region

CAPTION = "a brown dog running on the sand near the sea"


def ctx(query: str | None = "a dog on the beach", caption: str | None = CAPTION) -> ExplainContext:
    return ExplainContext(
        query_text=query,
        query_kind="text" if query else "image",
        caption=caption,
        dataset_captions=["A dog runs along a sandy beach."] if caption else [],
        evidence=[Region(box=(0, 0, 40, 40), score=0.3, rank=1)],
        image_size=(120, 120),
        score=0.3,
        rank=1,
        image_key="img",
    )


def verdict(
    text: str,
    matched: list[str] | None = None,
    mismatches: list[str] | None = None,
    c: ExplainContext | None = None,
) -> str | None:
    c = c or ctx()
    output = ExplanationOutput(
        explanation=text, matched_concepts=matched or [], mismatches=mismatches or [], confidence=0.5
    )
    kept = check_concepts(c, output.matched_concepts).matched
    return junk_reason(c, output, kept)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("a dog on the beach", "it only echoes the query"),
        ("The dog is on the beach. A dog, on a beach!", "it only echoes the query"),
        ("1", "it is not prose"),
        ("},", "it is not prose"),
        ("See https://example.com/dog.jpg for the dog", "it is not prose (it names a link)"),
        ("The dog is on the beach. " * 4, "it repeats itself"),
        ("dog dog dog dog dog dog dog", "it repeats itself"),
        ("dogdogdogdogdogdogdog sand and sea", "it repeats itself"),
        ("}}}}}}}}}}}} a dog", "it is not prose"),
        ("Yes, it is.", "it says almost nothing"),
        ("A purple giraffe plays violin in snowy mountains today", "it says nothing the hit's descriptions"),
    ],
)
def test_junk_is_caught(text: str, reason: str) -> None:
    assert (verdict(text) or "").startswith(reason)


def test_a_query_word_the_descriptions_do_not_say_is_caught() -> None:
    kite = ctx(query="a giraffe standing in a field", caption="a little boy standing on a field with a kite")
    text = "A giraffe standing in a field with a kite over its head."
    assert verdict(text, c=kite) == "it says 'giraffe', which the hit's descriptions do not"
    honest = "A boy stands on a field holding a kite; no giraffe is mentioned."
    assert verdict(honest, c=kite) is None
    listed = "A boy stands on a grassy field with a kite above a giraffe"
    assert verdict(listed, [], ["giraffe"], c=kite) is None


def test_a_concept_both_matched_and_missing_is_caught() -> None:
    text = "The caption shows a brown dog running on sand by the sea."
    assert verdict(text, ["dog", "brown"], ["dog", "brown"]) == "it calls 'brown' both matched and missing"


@pytest.mark.parametrize(
    ("text", "matched", "mismatches"),
    [
        ("The caption shows a brown dog running on the sand by the sea, so it fits.", ["dog", "beach"], []),
        ("A dog runs on sand next to the sea; the beach itself is only implied.", ["dog"], []),
        ("The captions describe a brown dog near the sea but say nothing of a beach.", ["dog"], ["beach"]),
        ("Brown dog, sandy shore, sea waves: a close match.", [], []),
    ],
)
def test_real_explanations_are_kept(text: str, matched: list[str], mismatches: list[str]) -> None:
    assert verdict(text, matched, mismatches) is None


def test_an_image_query_is_never_called_an_echo() -> None:
    image_query = ctx(query=None)
    assert verdict("A brown dog running on sand near the sea.", c=image_query) is None


def test_a_hit_with_no_descriptions_supports_nothing() -> None:
    bare = ctx(caption=None)
    assert verdict("A happy golden retriever chasing a frisbee outdoors.", c=bare) == (
        "it says nothing the hit's descriptions support"
    )


class _VettingFake(ChatModelBackend):
    vets_replies = True


def test_a_junk_item_of_a_page_call_falls_back_alone() -> None:
    """Page mode vets each item: the junk one gets the offline text, the good one stays the model's."""
    good = '{"hit": 1, "explanation": "The caption shows a brown dog running by the sea.", '
    good += '"matched_concepts": ["dog"], "mismatches": [], "confidence": 0.8}'
    echo = '{"hit": 2, "explanation": "a dog on the beach", "matched_concepts": [], "mismatches": [], '
    echo += '"confidence": 0.5}'
    model = FakeListChatModel(responses=['{"hits": [' + good + ", " + echo + "]}"])
    backend = _VettingFake(model, "fake-small", pages=True)
    ctxs = [ctx().model_copy(update={"rank": r, "image_key": f"img{r}"}) for r in (1, 2)]
    with Explainer(backend, load_prompt("explain_hit"), page_prompt=load_prompt("explain_page")) as ex:
        first, second = ex.explain_many(ctxs)
    assert first.backend == "fake-small" and first.fallback_reason is None
    assert second.backend == "offline"
    assert second.fallback_reason == "rejected_reply: fake-small: reply not shown: it only echoes the query"


def test_backends_that_do_not_vet_show_terse_replies() -> None:
    reply = '{"explanation": "a dog on the beach", "matched_concepts": [], "mismatches": [], "confidence": 0}'
    model = FakeListChatModel(responses=[reply])
    with Explainer(ChatModelBackend(model, "fake"), load_prompt("explain_hit")) as ex:
        out = ex.explain(ctx())
    assert out.backend == "fake" and out.text == "a dog on the beach"
