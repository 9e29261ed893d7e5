"""Fake backend for tests and notebooks: LangChain's fake chat models behind the real chain.

Everything but the model runs for real (prompt formatting, parsing, fallback, caching), so a
test or a prompt-tuning session can script replies, including malformed ones, without a network.
"""

from __future__ import annotations

import json

from langchain_core.language_models import LanguageModelInput
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import BaseMessage
from langchain_core.runnables import Runnable

from explainer.explain.backends.base import ChatModelBackend
from explainer.explain.backends.config import LLMConfig

FAKE_LABEL = "fake"

#: Used when no replies are scripted: a valid structured answer that names nothing specific.
DEFAULT_FAKE_REPLY = json.dumps(
    {
        "explanation": "Fake explanation: the scripted model always gives this answer.",
        "matched_concepts": [],
        "mismatches": [],
        "confidence": 0.5,
    }
)


class FakeBackend(ChatModelBackend):
    """Scripted replies (cycled) from `FakeListChatModel`, or any fake chat model passed in."""

    def __init__(
        self,
        responses: tuple[str, ...] | list[str] = (),
        sleep_s: float | None = None,
        model: Runnable[LanguageModelInput, BaseMessage] | None = None,
        label: str = FAKE_LABEL,
    ) -> None:
        chat = model or FakeListChatModel(responses=list(responses) or [DEFAULT_FAKE_REPLY], sleep=sleep_s)
        super().__init__(chat, label)

    @classmethod
    def from_config(cls, config: LLMConfig) -> FakeBackend:
        return cls(config.fake_responses, config.fake_sleep_s)
