"""The prompt-tuning API (`explainer.explain.tuning`) and the notebook in prompts/, executed top to bottom."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel, GenericFakeChatModel
from langchain_core.messages import AIMessage

from explainer.errors import ConfigError
from explainer.explain.prompts import prompts_dir
from explainer.explain.tuning import (
    COLUMNS,
    Case,
    Table,
    as_cases,
    cases_from_search,
    compare_prompts,
    explain_one,
    is_valid_json,
    make_case,
    summarise,
    ungrounded_concepts,
)
from explainer.explain.types import Explanation
from retrieval import Searcher
from retrieval.types import Region
from tests.helpers import ROOT, index_shapes, numbered_caption

NOTEBOOK = ROOT / "prompts" / "tune_prompts.ipynb"
HAS_PANDAS = importlib.util.find_spec("pandas") is not None


def reply(text: str, matched: list[str], missing: list[str] | None = None, confidence: float = 0.7) -> str:
    return json.dumps(
        {
            "explanation": text,
            "matched_concepts": matched,
            "mismatches": missing or [],
            "confidence": confidence,
        }
    )


def explanation(text: str, matched: list[str], missing: list[str] | None = None) -> Explanation:
    return Explanation(
        text=text,
        backend="test",
        matched_concepts=matched,
        mismatches=missing or [],
        confidence=0.5,
        prompt="t@v1",
    )


BUS = make_case("bus", "a red bus", caption="two red buses on a street", evidence=[(0, 0, 200, 150)])
DOG = make_case("dog", "a dog on a beach", caption="a dog on grass", dataset_captions=["a brown puppy"])


# -- checks --------------------------------------------------------------------------------------


def test_grounding_accepts_facts_and_flags_claims_nothing_supports() -> None:
    ctx = BUS.context  # evidence box (0, 0, 200, 150) in 640x480: the top-left region
    assert (
        ungrounded_concepts(explanation("Red buses, top left.", ["red bus", "buses", "top-left"]), ctx) == []
    )
    assert ungrounded_concepts(explanation("A red bus.", ["red", "double-decker"]), ctx) == ["double-decker"]
    # the query is not evidence for itself: "beach" is asked for but nowhere in the facts
    dog = DOG.context
    assert ungrounded_concepts(explanation("A dog.", ["dog", "beach"]), dog) == ["beach"]
    # the text may name an unsupported query word only as a mismatch
    assert ungrounded_concepts(explanation("A dog on a beach.", ["dog"]), dog) == ["beach"]
    assert ungrounded_concepts(explanation("A dog, but no beach.", ["dog"], ["beach"]), dog) == []


def test_valid_json_is_strict() -> None:
    good = reply("ok", ["x"])
    assert is_valid_json(good) and is_valid_json(f"  {good}\n")
    assert not is_valid_json(f"```json\n{good}\n```")  # the parser would accept it; the check does not
    assert not is_valid_json("Sure! " + good)
    assert not is_valid_json(json.dumps({"explanation": "x", "confidence": 3}))
    assert not is_valid_json("[1, 2]")


# -- cases ---------------------------------------------------------------------------------------


def test_cases_from_dicts_and_contexts() -> None:
    cases = as_cases(
        [
            {
                "name": "a",
                "query": "a cat",
                "caption": "a cat",
                "evidence": [[10, 10, 50, 50], [0, 0, 20, 20]],
            },
            {"query": "a dog", "evidence": [{"box": [0, 0, 64, 48], "score": 0.4}], "image_size": [64, 48]},
            BUS.context,
            DOG,
        ]
    )
    assert [c.name for c in cases] == ["a", "case2", "case3", "dog"]
    first = cases[0].context
    assert [r.rank for r in first.evidence] == [1, 2] and first.evidence[0].box == (10, 10, 50, 50)
    assert cases[1].context.evidence == (Region(box=(0, 0, 64, 48), score=0.4, rank=1),)
    assert cases[1].context.image_size == (64, 48)
    with pytest.raises(ConfigError, match="not known"):
        Case.from_dict({"query": "x", "captoin": "typo"})
    with pytest.raises(ConfigError, match="unique"):
        as_cases([BUS, BUS])


def test_cases_from_a_real_search(tmp_path: Path, tiny_clip_dir: Path) -> None:
    _, data, _ = index_shapes(tmp_path, tiny_clip_dir, 6, numbered_caption)
    searcher = Searcher.open(data, device="cpu")
    try:
        cases = cases_from_search(searcher, "a red square", top_k=3)
    finally:
        searcher.close()
    assert len(cases) == 3 and [c.context.rank for c in cases] == [1, 2, 3]
    for case in cases:
        ctx = case.context
        assert case.name.startswith("a red square #") and ctx.query_text == "a red square"
        assert ctx.caption and ctx.caption.startswith("shape number")
        assert ctx.evidence  # the library's region evidence, as on a card
        assert explain_one(case).grounded


# -- running -------------------------------------------------------------------------------------


def test_explain_one_with_a_prompt_file_and_a_fake_model(tmp_path: Path) -> None:
    draft = tmp_path / "explain_hit.v7.toml"
    draft.write_text(
        (prompts_dir() / "explain_hit.v1.toml").read_text().replace("version = 1", "version = 7")
    )
    model = FakeListChatModel(responses=[reply("Red buses.", ["red", "bus"])])
    run = explain_one(BUS, prompt=draft, backend=model)
    row = run.row()
    assert list(row) == list(COLUMNS)
    assert row["prompt"] == "explain_hit@v7" and row["prompt_used"] == "explain_hit@v7"
    assert row["backend"] == "fake-list-chat-model" and row["output"] == "Red buses."
    assert row["grounded"] is True and row["valid_json"] is True and row["tokens"] is None
    assert row["latency_ms"] >= 0
    assert explain_one(BUS, "explain_hit@v1", "fake").row()["backend"] == "fake"  # a backend by name
    with pytest.raises(ConfigError, match="does not exist"):
        explain_one(BUS, prompt=tmp_path / "missing.v1.toml")
    with pytest.raises(ConfigError, match="not found"):
        explain_one(BUS, prompt="explain_hit@v99")


def test_compare_prompts_rows_checks_and_usage() -> None:
    usage = {"input_tokens": 100, "output_tokens": 20, "total_tokens": 120}
    v1 = FakeListChatModel(
        responses=[reply("Red buses on a street.", ["red", "bus"]), "Sure! It is a dog, probably."]
    )
    v2 = GenericFakeChatModel(
        messages=iter(
            [
                AIMessage(
                    content=f"```json\n{reply('Red buses.', ['red', 'bus'])}\n```", usage_metadata=usage
                ),
                AIMessage(content=reply("A dog on a sunny beach.", ["dog", "beach"]), usage_metadata=usage),
            ]
        )
    )
    table = compare_prompts(
        ["explain_hit@v1", "explain_hit@v2"],
        [BUS, DOG],
        backend={"explain_hit@v1": v1, "explain_hit@v2": v2},
        as_frame=False,
    )
    assert isinstance(table, Table) and table.columns == list(COLUMNS)
    by = {(r["prompt"], r["case"]): r for r in table}
    assert set(by) == {(p, c) for p in ("explain_hit@v1", "explain_hit@v2") for c in ("bus", "dog")}

    ok = by["explain_hit@v1", "bus"]
    assert (ok["backend"], ok["grounded"], ok["valid_json"], ok["tokens"]) == (
        "fake-list-chat-model",
        True,
        True,
        None,
    )
    broken = by["explain_hit@v1", "dog"]  # prose instead of JSON: the card fell back to offline
    assert broken["backend"] == "offline" and broken["valid_json"] is False
    assert broken["fallback_reason"].startswith("malformed_output") and broken["grounded"] is True
    fenced = by["explain_hit@v2", "bus"]
    assert fenced["backend"] == "generic-fake-chat-model" and fenced["valid_json"] is False
    assert fenced["tokens"] == 120 and fenced["grounded"] is True
    invented = by["explain_hit@v2", "dog"]
    assert invented["grounded"] is False and invented["ungrounded"] == ["beach"]

    summary = {r["prompt"]: r for r in summarise(table)}
    assert summary["explain_hit@v1"] == {
        "prompt": "explain_hit@v1",
        "rows": 2,
        "grounded": 1.0,
        "valid_json": 0.5,
        "fallbacks": 1,
        "mean_latency_ms": summary["explain_hit@v1"]["mean_latency_ms"],
        "tokens": None,
    }
    assert summary["explain_hit@v2"]["grounded"] == 0.5 and summary["explain_hit@v2"]["tokens"] == 240

    markdown = table.to_markdown(max_width=20)
    lines = markdown.splitlines()
    assert lines[0] == "| prompt | case | output | backend | latency_ms | tokens | grounded | valid_json |"
    assert len(lines) == 2 + 4 and all(
        len(cell.strip()) <= 20 for ln in lines[2:] for cell in ln.split(" | ")
    )


def test_offline_comparison_and_backend_errors() -> None:
    rows = compare_prompts(["explain_hit@v1", "explain_hit@v2"], [BUS, DOG], as_frame=False)
    assert len(rows) == 4 and all(
        r["backend"] == "offline" and r["prompt_used"] == "offline@v3" for r in rows
    )
    assert all(r["grounded"] and r["valid_json"] is None for r in rows)
    with pytest.raises(ConfigError, match="no backend given"):
        compare_prompts(["explain_hit@v1"], [BUS], backend={"explain_hit@v2": "offline"})
    with pytest.raises(ConfigError, match="API key"):
        explain_one(BUS, backend="groq")  # no key in the test environment: refused, not silently offline
    with pytest.raises(ConfigError, match="unknown explainer backend"):
        explain_one(BUS, backend="nope")


@pytest.mark.skipif(HAS_PANDAS, reason="pandas is installed: compare_prompts returns a DataFrame")
def test_without_pandas_the_table_is_a_list_of_rows() -> None:
    assert isinstance(compare_prompts(["explain_hit@v1"], [BUS]), Table)
    with pytest.raises(ConfigError, match="pandas"):
        compare_prompts(["explain_hit@v1"], [BUS], as_frame=True)


# -- the notebook --------------------------------------------------------------------------------


def _outputs(cell: Any) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_offline(tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook clean"
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, if any cell fails
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors

    (summary_cell,) = [c for c in nb.cells if "summary" in c.metadata.get("tags", [])]
    text = _outputs(summary_cell)
    result = json.loads(text.strip().splitlines()[-1])
    by_prompt = {row["prompt"]: row for row in result["summary"]}
    assert set(by_prompt) == {"explain_hit@v1", "explain_hit@v2"}
    assert all(row["rows"] == 5 for row in by_prompt.values()) and result["rows"] == 10
    assert by_prompt["explain_hit@v1"]["grounded"] == 1.0 and by_prompt["explain_hit@v1"]["valid_json"] == 1.0
    assert by_prompt["explain_hit@v2"]["grounded"] < 1.0 and by_prompt["explain_hit@v2"]["valid_json"] < 1.0
    assert by_prompt["explain_hit@v2"]["tokens"] and by_prompt["explain_hit@v1"]["tokens"] is None
    assert result["offline_grounded"] is True
    # the comparison table was printed with rows for both prompts
    all_text = "".join(_outputs(c) for c in nb.cells if c.cell_type == "code")
    assert "| explain_hit@v1 | dog-no-beach |" in all_text and "| explain_hit@v2 | dog-no-beach |" in all_text
