"""What a backend is to the explainer: who writes explanations, and how.

Every backend (Groq, llama.cpp, LangChain's fakes, and the offline explainer) is a `Backend`, so the
explainer never asks which kind it holds. LLM backends are `ChatBackend`s: they differ in transport,
not in prompt or parsing, so they only supply the `llm` step of `prompt | llm | parser`. The offline
backend has no chain: it writes its text from the hit's facts. Each carries a `label` stored with
every explanation it writes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import BaseMessage
from langchain_core.runnables import Runnable


class Backend(ABC):
    """Anything that writes explanations; the hooks have safe defaults so most backends override few."""

    #: "groq:<model>", "fake", "local:<file>", "offline"...: written into `Explanation.backend`.
    label: str
    #: Whether parsed replies are vetted for junk (`explain/vetting.py`: an echo of the query, repetition,
    #: nothing supported) and replaced by the offline text when junk: on for small local models.
    vets_replies: bool = False
    #: The one-hit prompt ("name@vN") this backend explains with when none is named; None: the latest
    #: version of explain_hit. A small model can follow an older wording better (measured per backend).
    default_prompt: str | None = None

    @property
    def runnable(self) -> Runnable[LanguageModelInput, BaseMessage] | None:
        """The `llm` step of `prompt | llm | parser`; None for a backend that needs no language model."""
        return None

    def page_runnable(
        self, tool: dict[str, Any], max_tokens: int
    ) -> Runnable[LanguageModelInput, BaseMessage] | None:
        """The `llm` step of a page call whose reply must follow `tool`'s JSON schema (function calling),
        with a completion ceiling of `max_tokens`; None where the backend explains one hit per call."""
        return None

    def secrets(self) -> tuple[str, ...]:
        """Values that must be masked in any text derived from this backend's failures."""
        return ()

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release sync resources (HTTP connections, model memory)."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release resources bound to the running event loop."""


class ChatBackend(Backend):
    """A language model behind the chain; failures surface as `LLMError`s."""

    @property
    @abstractmethod
    def runnable(self) -> Runnable[LanguageModelInput, BaseMessage]:
        """The `llm` step of the chain, with the backend's retries and concurrency bound applied."""


class ChatModelBackend(ChatBackend):
    """Any LangChain chat model as a backend: LangChain's fakes, or a model built in a notebook.

    With `pages=True` it explains pages too, the model answering the page's JSON in its content (a
    scripted fake cannot call functions), so tests can drive page mode without a server.
    """

    def __init__(
        self, model: Runnable[LanguageModelInput, BaseMessage], label: str, *, pages: bool = False
    ) -> None:
        self.label = label
        self._model = model
        self._pages = pages

    def page_runnable(
        self, tool: dict[str, Any], max_tokens: int
    ) -> Runnable[LanguageModelInput, BaseMessage] | None:
        return self._model if self._pages else None

    @property
    def runnable(self) -> Runnable[LanguageModelInput, BaseMessage]:
        return self._model

    def __repr__(self) -> str:
        return f"ChatModelBackend(label={self.label!r}, model={type(self._model).__name__})"
