"""Typed errors of the application layer.

The retrieval library's errors are re-exported so that application code (server, CLI, pipeline)
catches everything from one module. The LLM errors are added here because only the explainer
talks to language models; each carries the HTTP status and exit code the boundaries translate
it into, like the library's errors do, plus a short `reason_code` that a card shows when its
explanation fell back to the offline explainer.
"""

from __future__ import annotations

from collections.abc import Iterable

from retrieval.errors import (
    BadImage,
    BadQuery,
    ClearsightError,
    ConfigError,
    IndexCorrupt,
    IndexError_,
    IndexMismatch,
    IndexMissing,
    ModelUnavailable,
    NotEnoughData,
    ShapeError,
)

__all__ = [
    "BadImage",
    "BadQuery",
    "ClearsightError",
    "ConfigError",
    "IndexCorrupt",
    "IndexError_",
    "IndexMismatch",
    "IndexMissing",
    "LLMError",
    "LLMMalformedOutput",
    "LLMRateLimited",
    "LLMTimeout",
    "ModelUnavailable",
    "NotEnoughData",
    "ShapeError",
    "redact",
]

_MASK = "***"


class LLMError(ClearsightError):
    """A language model call failed; the card falls back to the offline explainer.

    Messages must never contain credentials: backends build them with `redact` before raising.
    """

    exit_code = 6
    http_status = 502
    #: Short, stable tag shown in `Explanation.fallback_reason`.
    reason_code: str = "llm_error"


class LLMTimeout(LLMError):
    """The model did not answer within the configured timeout."""

    http_status = 504
    reason_code = "timeout"


class LLMRateLimited(LLMError):
    """The provider kept answering 429 after every retry."""

    http_status = 503
    reason_code = "rate_limited"


class LLMMalformedOutput(LLMError):
    """The model answered, but not with the structured output the prompt asked for."""

    reason_code = "malformed_output"


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """Mask every secret in `text`.

    Providers sometimes echo credentials in error bodies, so any text derived from a failed call
    passes through here before it reaches an exception, a log line or a card.
    """
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, _MASK)
    return text
