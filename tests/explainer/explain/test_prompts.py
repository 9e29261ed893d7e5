"""Prompt files: shipped versions load, and every variable mistake fails at load with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest

from explainer.errors import ConfigError
from explainer.explain.backends import FakeBackend
from explainer.explain.chain import CONTEXT_VARIABLES, Explainer, context_inputs
from explainer.explain.prompts import PromptFile, list_prompts, load_prompt, parse_prompt
from explainer.explain.types import ExplainContext, ExplanationOutput
from retrieval.types import Region

GOOD = """\
name = "demo"
version = {version}
input_variables = ["query_text", "caption"]
system = "Answer in JSON with literal braces {{{{ }}}}."
template = "Query: {{query_text}}. Caption: {{caption}}."
"""


def _write(folder: Path, filename: str, text: str) -> Path:
    path = folder / filename
    path.write_text(text, encoding="utf-8")
    return path


def _ctx() -> ExplainContext:
    return ExplainContext(
        query_text="red bus",
        caption="a red bus on a street",
        dataset_captions=["a bus parked by the road"],
        evidence=[Region(box=(0, 0, 40, 40), score=0.3, rank=1)],
        image_size=(120, 120),
        score=0.29,
        rank=2,
        image_key="img-1",
    )


def test_shipped_prompts_load_and_latest_is_default() -> None:
    ids = [p.id for p in list_prompts()]
    assert "explain_hit@v1" in ids and "explain_hit@v2" in ids
    assert load_prompt("explain_hit").id == "explain_hit@v2"
    assert load_prompt("explain_hit", 1).id == "explain_hit@v1"
    assert load_prompt("explain_hit", "v1").id == "explain_hit@v1"
    assert load_prompt("explain_hit@v1").id == "explain_hit@v1"


@pytest.mark.parametrize("version", [1, 2])
def test_shipped_prompts_fit_the_chain(version: int) -> None:
    prompt = load_prompt("explain_hit", version)
    assert set(prompt.input_variables) == CONTEXT_VARIABLES
    # The reply format is spelled out in the prompt, so it must name every output field.
    for field in ExplanationOutput.model_fields:
        assert field in prompt.system + prompt.template
    text = prompt.render(context_inputs(_ctx()))
    assert "a red bus on a street" in text and "red bus" in text and "0.290" in text


def test_v1_and_v2_are_worded_differently() -> None:
    v1, v2 = load_prompt("explain_hit", 1), load_prompt("explain_hit", 2)
    assert v1.system != v2.system and v1.template != v2.template


def test_literal_braces_and_custom_folder(tmp_path: Path) -> None:
    _write(tmp_path, "demo.v1.toml", GOOD.format(version=1))
    _write(tmp_path, "demo.v3.toml", GOOD.format(version=3))
    prompt = load_prompt("demo", directory=tmp_path)
    assert prompt.id == "demo@v3"
    assert "{ }" in prompt.render({"query_text": "q", "caption": "c"})
    assert [p.id for p in list_prompts(tmp_path)] == ["demo@v1", "demo@v3"]


def test_undeclared_variable_fails_at_load(tmp_path: Path) -> None:
    text = GOOD.format(version=1).replace("Caption: {caption}", "Caption: {caption} {scroe}")
    path = _write(tmp_path, "demo.v1.toml", text)
    with pytest.raises(ConfigError, match=r"uses \['scroe'\] but input_variables does not declare") as err:
        parse_prompt(path)
    assert "demo.v1.toml" in str(err.value)


def test_declared_but_unused_variable_fails_at_load(tmp_path: Path) -> None:
    text = GOOD.format(version=1).replace('["query_text", "caption"]', '["query_text", "caption", "rank"]')
    with pytest.raises(ConfigError, match=r"declares \['rank'\] but the template never uses"):
        parse_prompt(_write(tmp_path, "demo.v1.toml", text))


def test_unbalanced_brace_fails_at_load() -> None:
    with pytest.raises(ConfigError, match="f-string"):
        PromptFile(name="x", version=1, input_variables=("a",), system="s", template="{a} and {oops")


@pytest.mark.parametrize(
    ("filename", "text", "message"),
    [
        ("demo.v2.toml", GOOD.format(version=1), "disagrees with its file name"),
        ("demo.v1.toml", 'name = "demo"\nversion = 1\n', "lacks fields"),
        ("demo.v1.toml", "name = [", "cannot be read"),
        ("demo.v1.toml", GOOD.format(version=1).replace("version = 1", 'version = "1"'), "integer"),
    ],
)
def test_malformed_files_fail_with_clear_message(
    tmp_path: Path, filename: str, text: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_prompt(_write(tmp_path, filename, text))


def test_missing_prompt_names_the_known_ones(tmp_path: Path) -> None:
    _write(tmp_path, "demo.v1.toml", GOOD.format(version=1))
    with pytest.raises(ConfigError, match=r"no prompt named 'nope'.*\['demo'\]"):
        load_prompt("nope", directory=tmp_path)
    with pytest.raises(ConfigError, match="demo@v7 not found"):
        load_prompt("demo", 7, directory=tmp_path)


def test_missing_input_fails_before_any_model_call() -> None:
    prompt = load_prompt("explain_hit", 1)
    inputs = context_inputs(_ctx())
    del inputs["caption"]
    with pytest.raises(ConfigError, match=r"needs \['caption'\]"):
        prompt.validate_inputs(inputs)


def test_prompt_with_a_variable_the_explainer_cannot_fill_is_refused() -> None:
    prompt = PromptFile(
        name="odd",
        version=1,
        input_variables=("query_text", "weather"),
        system="s",
        template="{query_text} {weather}",
    )
    with pytest.raises(ConfigError, match=r"declares \['weather'\], which the explainer cannot fill"):
        Explainer(FakeBackend(), prompt)


def test_a_prompt_may_use_a_subset_of_the_variables() -> None:
    prompt = PromptFile(
        name="short", version=1, input_variables=("caption",), system="JSON only.", template="{caption}"
    )
    with Explainer(FakeBackend(), prompt) as explainer:
        result = explainer.explain(_ctx())
    assert result.backend == "fake" and result.prompt == "short@v1"
