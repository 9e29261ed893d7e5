"""Typed errors of the application layer, and how the boundaries word them.

The retrieval library's errors are re-exported so that application code (server, CLI, pipeline)
catches everything from one module. The LLM errors are added here because only the explainer talks
to language models; each has a short `reason_code` that a card shows when its explanation fell
back to the offline explainer. Exit codes, HTTP statuses and remedies in the user's terms live
here too, in tables the two boundaries read: the errors themselves carry none of them.
"""

from __future__ import annotations

from collections.abc import Iterable

from retrieval.errors import (
    BadImage,
    BadQuery,
    ClearsightError,
    ConfigError,
    FinetuneRefused,
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
    "FinetuneRefused",
    "IndexCorrupt",
    "IndexError_",
    "IndexMismatch",
    "IndexMissing",
    "LLMCrashed",
    "LLMError",
    "LLMMalformedOutput",
    "LLMRateLimited",
    "LLMRejectedReply",
    "LLMTimeout",
    "ModelUnavailable",
    "NotEnoughData",
    "ShapeError",
    "cli_message",
    "exit_code_for",
    "http_status_for",
    "public_fallback_reason",
    "redact",
    "server_message",
]

_MASK = "***"


class LLMError(ClearsightError):
    """A language model call failed; the card falls back to the offline explainer.

    Messages must never contain credentials: backends build them with `redact` before raising.
    """

    #: Short, stable tag shown in `Explanation.fallback_reason`.
    reason_code: str = "llm_error"


class LLMTimeout(LLMError):
    """The model did not answer within the configured timeout."""

    reason_code = "timeout"


class LLMRateLimited(LLMError):
    """The provider kept answering 429 after every retry."""

    reason_code = "rate_limited"


class LLMMalformedOutput(LLMError):
    """The model answered, but not with the structured output the prompt asked for."""

    reason_code = "malformed_output"


class LLMCrashed(LLMError):
    """A local model's process died (a crash in llama.cpp, the OOM killer) or cannot start."""

    reason_code = "model_crashed"


class LLMRejectedReply(LLMError):
    """The model answered in form, but with junk: the query echoed, text repeated, nothing supported."""

    reason_code = "rejected_reply"


#: What a remote client is told when an LLM explanation was replaced, per reason code. The full reason
#: (provider, base URL, the provider's error body) stays in the server's log: it can name internal hosts
#: and echo request details that are the operator's business, not every client's.
_PUBLIC_FALLBACKS: dict[str, str] = {
    LLMTimeout.reason_code: "the language model did not answer in time",
    LLMRateLimited.reason_code: "the language model provider is rate limiting this server",
    LLMMalformedOutput.reason_code: "the language model's answer was not in the requested form",
    LLMCrashed.reason_code: "the local language model stopped (it crashed or ran out of memory)",
    LLMRejectedReply.reason_code: "the language model's answer said nothing the image's descriptions "
    "support (it echoed the query, repeated itself, or was not prose), so it is not shown",
    LLMError.reason_code: "the language model call failed",
}


def public_fallback_reason(reason: str | None) -> str | None:
    """A fallback reason fit for remote clients: its stable code and a fixed sentence, no details."""
    if reason is None:
        return None
    code = reason.partition(":")[0].strip()
    if code not in _PUBLIC_FALLBACKS:
        code = LLMError.reason_code
    return f"{code}: {_PUBLIC_FALLBACKS[code]} (details are in the server log)"


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """Mask every secret in `text`.

    Providers sometimes echo credentials in error bodies, so any text derived from a failed call
    passes through here before it reaches an exception, a log line or a card.
    """
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, _MASK)
    return text


#: Process exit codes, most specific class first; anything else exits 1.
_EXIT_CODES: tuple[tuple[type[ClearsightError], int], ...] = (
    (ModelUnavailable, 3),
    (IndexError_, 4),
    (ShapeError, 5),
    (LLMError, 6),
    (FinetuneRefused, 6),
    (ConfigError, 2),
    (BadQuery, 2),
    (NotEnoughData, 2),
)

#: HTTP statuses, most specific class first; anything else is a 400.
_HTTP_STATUSES: tuple[tuple[type[ClearsightError], int], ...] = (
    (ModelUnavailable, 503),
    (IndexError_, 503),
    (LLMTimeout, 504),
    (LLMRateLimited, 503),
    (LLMError, 502),
    (ShapeError, 500),
    (BadQuery, 422),
    (NotEnoughData, 409),
    (ConfigError, 400),
)

#: What a CLI user can do, by the library's remedy code.
_CLI_REMEDIES: dict[str, str] = {
    "rebuild": "rebuild it with `clearsight index PATH --rebuild`",
    "other_data_dir": "use another --data-dir, or pass --rebuild to replace it",
    "use_index_model": "search without --model to use the model it was built with, or re-index with "
    "`clearsight index PATH --model ...` into another --data-dir",
    "add_captions": "pass --captions FILE to `clearsight index`, "
    "or generate captions with `clearsight caption`",
    "use_grid_evidence": "use grid evidence (--evidence-method grid)",
    "name_val_split": "name one with --val-split, or let --val-fraction hold some out",
    "force_write": "lower the learning rate, freeze more, or pass --force to write it anyway",
    "other_out_dir": "choose another --out",
    "index_first": "index a folder first with `clearsight index PATH --data-dir DIR`",
    "list_models": "`clearsight models` lists them",
}

#: The same remedies for a web client, which has no flags to pass.
_SERVER_REMEDIES: dict[str, str] = {
    "rebuild": "the index must be rebuilt on the server",
    "other_data_dir": "the server's index was built with another model",
    "use_index_model": "search with the model the index was built with",
    "add_captions": "the collection has no captions yet",
    "use_grid_evidence": "grid evidence works with this model",
    "index_first": "index a folder on the server first (`clearsight index PATH`)",
    "list_models": "name a model the server's registry knows",
}


def exit_code_for(exc: ClearsightError) -> int:
    """The CLI's exit code for an error (1 when no row matches)."""
    return next((code for cls, code in _EXIT_CODES if isinstance(exc, cls)), 1)


def http_status_for(exc: ClearsightError) -> int:
    """The server's HTTP status for an error (400 when no row matches)."""
    return next((code for cls, code in _HTTP_STATUSES if isinstance(exc, cls)), 400)


def _with_remedy(exc: ClearsightError, table: dict[str, str]) -> str:
    text = str(exc)
    hint = table.get(exc.remedy) if exc.remedy else None
    return f"{text}: {hint}" if hint else text


def cli_message(exc: ClearsightError) -> str:
    """The error's message and what to do, with the command-line options that do it."""
    return _with_remedy(exc, _CLI_REMEDIES)


def server_message(exc: ClearsightError) -> str:
    """The error's message and what to do, in words for a web client."""
    return _with_remedy(exc, _SERVER_REMEDIES)
