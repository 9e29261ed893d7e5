"""What an LLM backend is to the explainer chain: the `llm` step of `prompt | llm | parser`.

Backends differ in transport (Groq over HTTP, llama.cpp in process, LangChain fakes), not in
prompt or parsing, so they only supply a runnable from a prompt value to a chat message. Each
carries a `label` that is stored with every explanation it writes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import BaseMessage
from langchain_core.runnables import Runnable


class ChatBackend(ABC):
    """A backend the explainer chain calls; failures surface as `LLMError`s."""

    #: "groq:<model>", "fake", "local:<file>"...: written into `Explanation.backend`.
    label: str

    @property
    @abstractmethod
    def runnable(self) -> Runnable[LanguageModelInput, BaseMessage]:
        """The `llm` step of the chain, with the backend's retries and concurrency bound applied."""

    def secrets(self) -> tuple[str, ...]:
        """Values that must be masked in any text derived from this backend's failures."""
        return ()

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release sync resources (HTTP connections, model memory)."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release resources bound to the running event loop."""


class ChatModelBackend(ChatBackend):
    """Any LangChain chat model as a backend: LangChain's fakes, or a model built in a notebook."""

    def __init__(self, model: Runnable[LanguageModelInput, BaseMessage], label: str) -> None:
        self.label = label
        self._model = model

    @property
    def runnable(self) -> Runnable[LanguageModelInput, BaseMessage]:
        return self._model

    def __repr__(self) -> str:
        return f"ChatModelBackend(label={self.label!r}, model={type(self._model).__name__})"
