"""The one query spec (`retrieval.query`): its bounds refuse bad queries by name, and the API schema,
the page's echo and its links are all read from it, so a field (a filter) is declared once."""

from __future__ import annotations

import dataclasses

import pytest
from PIL import Image
from pydantic import TypeAdapter, ValidationError

from explainer.cards.model import QueryEcho, echo_of, query_params, url_name
from explainer.server.schemas import SEARCH_REQUEST, ExplainRequest, search_form_schema
from retrieval.errors import BadQuery
from retrieval.query import MAX_TOP_K, Query, QuerySpec


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"top_k": MAX_TOP_K + 1}, f"top-k must be between 1 and {MAX_TOP_K}, got {MAX_TOP_K + 1}"),
        ({"top_k": -3}, f"top-k must be between 1 and {MAX_TOP_K}, got -3"),
        ({"top_k": 0}, f"top-k must be between 1 and {MAX_TOP_K}, got 0"),
        ({"offset": -1}, "offset must be 0 or more, got -1"),
        ({"weight": 1.5}, "weight (the text's share) must be between 0 and 1, got 1.5"),
        ({"negative_weight": -0.1}, "negative weight must be between 0 and 1, got -0.1"),
        ({"min_score": 2.0}, "min score must be between -1 and 1, got 2.0"),
        ({"like_id": 0}, "like id must be between 1 and"),
        ({"image_key": "not-a-hash"}, "image key is malformed"),
        ({"text": "x" * 1001}, "text must be at most 1000 characters long, got 1001"),
    ],
)
def test_bounds_refuse_a_bad_query_naming_the_value_given(fields: dict[str, object], message: str) -> None:
    q = Query(**{"text": "a red square", **fields})  # type: ignore[arg-type]
    with pytest.raises(BadQuery, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        q.validate()


def test_bounds_accept_their_own_limits() -> None:
    Query(text="x", top_k=MAX_TOP_K, offset=0, weight=1.0, min_score=-1.0, like_id=1).validate()
    Query(image=Image.new("RGB", (4, 4)), top_k=1, image_key="0" * 32).validate()
    with pytest.raises(BadQuery, match="give a text query"):
        Query(text="  ").validate()


def _spec_fields() -> list[dataclasses.Field[object]]:
    return list(dataclasses.fields(QuerySpec))


def test_the_api_schema_is_the_spec() -> None:
    """Every spec field is a SearchRequest field, as pydantic reads it off the spec, with its description."""
    props = SEARCH_REQUEST.json_schema()["properties"]
    spec = TypeAdapter(QuerySpec).json_schema()["properties"]
    for f in _spec_fields():
        assert props[f.name]["description"] == f.metadata["doc"]
        assert {k: v for k, v in props[f.name].items() if k != "description"} == spec[f.name], f.name
    assert props["like_id"]["anyOf"][0]["minimum"] == 1 and props["min_score"]["anyOf"][0]["maximum"] == 1
    form = search_form_schema()["properties"]
    assert set(form) == (set(props) - {"image_base64", "filters"}) | {"image"}
    explain = {f.name for f in dataclasses.fields(ExplainRequest)}
    assert {f.name for f in _spec_fields()} <= explain  # the page sends its echo back for explanations


def test_the_api_refuses_what_the_library_refuses() -> None:
    for bad in ({"min_score": 2}, {"like_id": 0}, {"image_key": "x"}, {"weight": -1}, {"text": "x" * 1001}):
        with pytest.raises(ValidationError):
            SEARCH_REQUEST.validate_python({"text": "x", **bad})
    req = SEARCH_REQUEST.validate_python({"text": "x", "min_score": 0.25, "top_k": 5})
    assert req.spec() == QuerySpec(text="x", min_score=0.25) and req.top_k == 5


def test_every_spec_field_travels_in_the_echo_and_in_page_links() -> None:
    values: dict[str, object] = {
        "text": "a red square",
        "image_key": "ab" * 16,
        "like_id": 7,
        "negative": "blue",
        "weight": 0.3,
        "min_score": 0.25,
        "folder": "2019/trip",
        "after": "2019-07-01",
        "before": "2019-07-31",
        "type": "jpeg",
        "min_size": 800,
        "orientation": "landscape",
        "show_all": True,
    }
    assert set(values) == {f.name for f in _spec_fields()}, "a new spec field: give it a test value here"
    echo = echo_of(QuerySpec(**values), "text+image")  # type: ignore[arg-type]
    assert isinstance(echo, QueryEcho) and echo.spec_values() == values
    params = query_params(echo)
    assert {url_name(name) for name in values} == set(params)
    assert params["q"] == "a red square" and params["w"] == "0.3" and params["min_score"] == "0.25"
    # defaults are not written: the links the page has always made stay as they were
    assert query_params(echo_of(QuerySpec(text="cat"), "text")) == {"q": "cat"}
    assert query_params(echo_of(QuerySpec(like_id=3), "image")) == {"like": "3"}
