"""Prompt tuning from a notebook: explain one hit with a given prompt file, compare prompt versions
(cases to explain come from `explainer.explain.tuning_cases`, re-exported here for the notebook).

Everything runs through the product's own `Explainer` (`prompt | llm | parser`, offline fallback),
so what a notebook measures is what the server would show. Two checks replace reading by eye:

- `valid_json`: the model's raw reply, as it came back, is the JSON object the prompt asks for
  (the chain's parser is more lenient and accepts a fenced block; a prompt that needs that
  leniency is worse, so this check is strict); None when no model replied (offline, or a failed call);
- `grounded`: every concept the explanation claims as matched appears in the hit's caption,
  dataset captions or evidence-region words, and the text names no query concept the inputs lack
  unless it lists it as a mismatch; `ungrounded` lists the offenders.

    from explainer.explain.tuning import compare_prompts, make_case
    cases = [make_case("bus", "a red bus", caption="a red bus on a street")]
    table = compare_prompts(["explain_hit@v1", "explain_hit@v2"], cases, backend="groq")
    print(table.to_markdown())

Nothing is cached here: a tuning session wants every call made afresh.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import BaseMessage
from langchain_core.runnables import Runnable, RunnableLambda
from pydantic import ValidationError

from explainer.errors import ConfigError
from explainer.explain.backends import (
    Backend,
    ChatBackend,
    ChatModelBackend,
    LLMConfig,
    create_backend,
)
from explainer.explain.backends.offline import content_words, forms
from explainer.explain.chain import Explainer
from explainer.explain.factory import llm_config_from_settings
from explainer.explain.prompts import PromptFile, load_prompt, parse_prompt
from explainer.explain.regions import describe_regions
from explainer.explain.tuning_cases import Case, as_cases, cases_from_search, make_case
from explainer.explain.types import ExplainContext, Explanation, ExplanationOutput
from explainer.settings import get_settings

if TYPE_CHECKING:
    from pandas import DataFrame

__all__ = [
    "BackendLike",
    "Case",
    "PromptLike",
    "PromptRun",
    "Table",
    "as_cases",
    "cases_from_search",
    "compare_prompts",
    "explain_one",
    "is_valid_json",
    "make_case",
    "resolve_backend",
    "resolve_prompt",
    "summarise",
    "ungrounded_concepts",
]

#: A backend by name ("offline", "fake", "groq", "auto"...), as a config, as a built backend, or
#: as any LangChain chat model (a fake one, or a model built in the notebook).
BackendLike = str | LLMConfig | Backend | Runnable[LanguageModelInput, BaseMessage]
#: A prompt as "name" (latest version), "name@v2", a path to a `<name>.v<N>.toml` file, or loaded.
PromptLike = str | Path | PromptFile

#: The columns of `compare_prompts`, in order.
COLUMNS = (
    "prompt",
    "case",
    "output",
    "backend",
    "latency_ms",
    "tokens",
    "grounded",
    "valid_json",
    "ungrounded",
    "matched_concepts",
    "mismatches",
    "confidence",
    "fallback_reason",
    "prompt_used",
)


# -- prompts and backends ------------------------------------------------------------------------


def resolve_prompt(prompt: PromptLike) -> PromptFile:
    """A loaded prompt from a name ("explain_hit", "explain_hit@v1"), a file path, or as is."""
    if isinstance(prompt, PromptFile):
        return prompt
    path = Path(prompt)
    if isinstance(prompt, Path) or str(prompt).endswith(".toml"):
        if not path.is_file():
            raise ConfigError(f"prompt file {path} does not exist")
        return parse_prompt(path)
    return load_prompt(str(prompt))


def resolve_backend(backend: BackendLike) -> Backend:
    """A backend from any `BackendLike`; names are read with the settings (the Groq key included)."""
    if isinstance(backend, Backend):
        return backend
    if isinstance(backend, str):
        return create_backend(llm_config_from_settings(get_settings(), backend), environ={})
    if isinstance(backend, LLMConfig):
        return create_backend(backend)
    if isinstance(backend, Runnable):
        label = str(getattr(backend, "_llm_type", "") or type(backend).__name__)
        return ChatModelBackend(backend, label)
    raise ConfigError(f"cannot make an explainer backend from {type(backend).__name__}")


class _Tap:
    """Remembers the model's raw replies, between the model and the parser."""

    def __init__(self) -> None:
        self.messages: list[BaseMessage] = []
        self._lock = threading.Lock()

    def __call__(self, message: BaseMessage) -> BaseMessage:
        with self._lock:
            self.messages.append(message)
        return message

    async def acall(self, message: BaseMessage) -> BaseMessage:
        return self(message)

    def take(self) -> list[BaseMessage]:
        with self._lock:
            out, self.messages = self.messages, []
        return out


class _TappedBackend(ChatBackend):
    """A chat backend whose replies are also recorded; closing is left to whoever owns `inner`."""

    def __init__(self, inner: ChatBackend) -> None:
        self.label = inner.label
        self.inner = inner
        self.tap = _Tap()
        self._runnable: Runnable[LanguageModelInput, BaseMessage] = inner.runnable | RunnableLambda(
            self.tap, afunc=self.tap.acall, name="tap"
        )

    @property
    def runnable(self) -> Runnable[LanguageModelInput, BaseMessage]:
        return self._runnable

    def secrets(self) -> tuple[str, ...]:
        return self.inner.secrets()

    async def aclose(self) -> None:
        await self.inner.aclose()  # resources bound to the closing explainer's own loop


# -- checks --------------------------------------------------------------------------------------


def _word_forms(text: str | None) -> set[str]:
    """Forms of the content words of `text`, hyphenated words also by their parts ("top-left")."""
    out: set[str] = set()
    for word in content_words(text):
        for part in {word, *word.split("-")}:
            if part:
                out |= forms(part)
    return out


def ungrounded_concepts(explanation: Explanation, context: ExplainContext) -> list[str]:
    """What the explanation claims that the hit's caption, dataset captions and evidence do not support.

    A claimed concept is supported when every content word of it (plurals folded, as the offline
    explainer folds them) occurs in those inputs. The query is not an input here: a concept is not
    evidence for itself. A query word the inputs lack may appear in the text only as a mismatch.
    """
    facts = [
        context.caption,
        *context.dataset_captions,
        *describe_regions(context.evidence, context.image_size),
    ]
    known: set[str] = set().union(*(_word_forms(t) for t in facts))
    out: list[str] = []
    for concept in explanation.matched_concepts:
        words = content_words(concept)
        if any(not (_word_forms(w) & known) for w in words) and concept not in out:
            out.append(concept)
    admitted = set().union(*(_word_forms(m) for m in explanation.mismatches))
    in_text = _word_forms(explanation.text)
    for word in content_words(context.query_text):
        word_forms = _word_forms(word)
        if word_forms & in_text and not word_forms & known and not word_forms & admitted and word not in out:
            out.append(word)
    return out


def is_valid_json(reply: str) -> bool:
    """The reply is exactly the JSON object the prompts ask for (no prose, no code fence)."""
    try:
        data = json.loads(reply.strip())
    except ValueError:
        return False
    if not isinstance(data, dict):
        return False
    try:
        ExplanationOutput.model_validate(data)
    except ValidationError:
        return False
    return True


def _text_of(message: BaseMessage) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    return "".join(p if isinstance(p, str) else str(p.get("text", "")) for p in content)


def _tokens(message: BaseMessage) -> int | None:
    """Total tokens when the backend reports usage (LangChain's usage_metadata, or OpenAI-style)."""
    usage = getattr(message, "usage_metadata", None)
    if usage and usage.get("total_tokens") is not None:
        return int(usage["total_tokens"])
    raw = message.response_metadata.get("token_usage") or message.response_metadata.get("usage") or {}
    total = raw.get("total_tokens") if isinstance(raw, Mapping) else None
    return int(total) if total is not None else None


# -- running -------------------------------------------------------------------------------------


@dataclass
class PromptRun:
    """One explanation of one case with one prompt, with its checks."""

    prompt: str
    case: str
    explanation: Explanation
    latency_ms: float
    reply: str | None = None  # the model's raw reply; None for offline (or when the call failed)
    tokens: int | None = None
    ungrounded: list[str] = field(default_factory=list)

    @property
    def grounded(self) -> bool:
        return not self.ungrounded

    @property
    def valid_json(self) -> bool | None:
        return None if self.reply is None else is_valid_json(self.reply)

    def row(self) -> dict[str, Any]:
        e = self.explanation
        return {
            "prompt": self.prompt,
            "case": self.case,
            "output": e.text,
            "backend": e.backend,
            "latency_ms": round(self.latency_ms, 1),
            "tokens": self.tokens,
            "grounded": self.grounded,
            "valid_json": self.valid_json,
            "ungrounded": list(self.ungrounded),
            "matched_concepts": list(e.matched_concepts),
            "mismatches": list(e.mismatches),
            "confidence": e.confidence,
            "fallback_reason": e.fallback_reason,
            "prompt_used": e.prompt,
        }


def _run(explainer: Explainer, tapped: _TappedBackend | None, prompt_id: str, case: Case) -> PromptRun:
    if tapped is not None:
        tapped.tap.take()
    start = time.perf_counter()
    explanation = explainer.explain(case.context)
    latency = (time.perf_counter() - start) * 1000.0
    replies = tapped.tap.take() if tapped is not None else []
    last = replies[-1] if replies else None
    return PromptRun(
        prompt=prompt_id,
        case=case.name,
        explanation=explanation,
        latency_ms=latency,
        reply=_text_of(last) if last is not None else None,
        tokens=_tokens(last) if last is not None else None,
        ungrounded=ungrounded_concepts(explanation, case.context),
    )


class _Session:
    """One backend, explained with one prompt at a time; closes the backend only if it built it."""

    def __init__(self, backend: BackendLike) -> None:
        self.owned = not isinstance(backend, Backend)
        self.backend = resolve_backend(backend)

    def explainer(self, prompt: PromptFile) -> tuple[Explainer, _TappedBackend | None]:
        if isinstance(self.backend, ChatBackend):
            tapped = _TappedBackend(self.backend)
            return Explainer(tapped, prompt, cache=None, max_concurrency=1), tapped
        return Explainer(self.backend, prompt, cache=None), None

    def run(self, prompt: PromptFile, cases: Iterable[Case]) -> list[PromptRun]:
        """Explain `cases` with `prompt` through a fresh explainer, which leaves the backend open."""
        explainer, tapped = self.explainer(prompt)
        with explainer:
            return [_run(explainer, tapped, prompt.id, case) for case in cases]

    def close(self) -> None:
        if self.owned:
            self.backend.close()

    def __enter__(self) -> _Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def explain_one(
    case: Case | ExplainContext | Mapping[str, Any],
    prompt: PromptLike = "explain_hit",
    backend: BackendLike = "offline",
) -> PromptRun:
    """Explain one case with one prompt (a name, "name@vN", a file path, or a loaded prompt)."""
    (item,) = as_cases([case])
    prompt_file = resolve_prompt(prompt)
    with _Session(backend) as session:
        return session.run(prompt_file, [item])[0]


class Table(list[dict[str, Any]]):
    """Rows of a comparison (what `compare_prompts` returns when pandas is not installed)."""

    @property
    def columns(self) -> list[str]:
        return list(self[0]) if self else list(COLUMNS)

    def to_markdown(self, columns: Sequence[str] | None = None, max_width: int = 80) -> str:
        """A GitHub-flavoured Markdown table; long cells are cut to `max_width` characters."""
        cols = list(
            columns
            or ("prompt", "case", "output", "backend", "latency_ms", "tokens", "grounded", "valid_json")
        )
        lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        for row in self:
            lines.append("| " + " | ".join(_cell(row.get(c), max_width) for c in cols) + " |")
        return "\n".join(lines)


def _cell(value: Any, max_width: int) -> str:
    if value is None:
        text = ""
    elif isinstance(value, float):
        text = f"{value:.1f}"
    elif isinstance(value, list | tuple):
        text = ", ".join(str(v) for v in value)
    else:
        text = str(value)
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= max_width else text[: max_width - 1] + "…"


def _backend_for(
    backend: BackendLike | Mapping[str, BackendLike], spec: PromptLike, prompt: PromptFile
) -> BackendLike:
    if not isinstance(backend, Mapping):
        return backend
    for key in (prompt.id, str(spec)):
        if key in backend:
            return backend[key]
    raise ConfigError(f"no backend given for prompt {prompt.id} (keys: {sorted(backend)})")


def compare_prompts(
    prompts: Sequence[PromptLike],
    cases: Iterable[Case | ExplainContext | Mapping[str, Any]],
    backend: BackendLike | Mapping[str, BackendLike] = "offline",
    *,
    as_frame: bool | None = None,
) -> Table | DataFrame:
    """Every case explained with every prompt, one row each (columns: `COLUMNS`).

    `backend` may map prompt ids ("explain_hit@v1") to their own backend, so scripted fake models
    can answer each prompt differently. Calls are made one at a time, so each row's latency is its
    own. The result is a pandas DataFrame when pandas is installed (`as_frame=None`), else a
    `Table` (a list of dict rows with `to_markdown()`).
    """
    items = as_cases(cases)
    loaded = [(spec, resolve_prompt(spec)) for spec in prompts]
    rows = Table()
    if isinstance(backend, Mapping):  # a backend per prompt: one session each
        for spec, prompt in loaded:
            with _Session(_backend_for(backend, spec, prompt)) as session:
                rows.extend(run.row() for run in session.run(prompt, items))
    else:  # one backend for all prompts: built (a local model loaded) once
        with _Session(backend) as session:
            for _, prompt in loaded:
                rows.extend(run.row() for run in session.run(prompt, items))
    if as_frame is False:
        return rows
    try:
        import pandas
    except ImportError:
        if as_frame:
            raise ConfigError("as_frame=True needs pandas, which is not installed") from None
        return rows
    return pandas.DataFrame(rows, columns=list(COLUMNS))


def summarise(rows: Iterable[Mapping[str, Any]] | DataFrame) -> Table:
    """Per prompt: rows, share grounded, share of valid JSON replies, mean latency and total tokens."""
    records: Iterable[Mapping[str, Any]] = rows.to_dict("records") if hasattr(rows, "to_dict") else rows
    by_prompt: dict[str, list[Mapping[str, Any]]] = {}
    for row in records:
        by_prompt.setdefault(str(row["prompt"]), []).append(row)
    out = Table()
    for prompt, group in by_prompt.items():
        judged = [r["valid_json"] for r in group if _present(r["valid_json"])]
        tokens = [r["tokens"] for r in group if _present(r["tokens"])]
        out.append(
            {
                "prompt": prompt,
                "rows": len(group),
                "grounded": round(sum(bool(r["grounded"]) for r in group) / len(group), 3),
                "valid_json": round(sum(judged) / len(judged), 3) if judged else None,
                "fallbacks": sum(_present(r["fallback_reason"]) for r in group),
                "mean_latency_ms": round(sum(r["latency_ms"] for r in group) / len(group), 1),
                "tokens": sum(tokens) if tokens else None,
            }
        )
    return out


def _present(value: Any) -> bool:
    """Not None, and not the NaN pandas puts where a column had None."""
    return value is not None and value == value
