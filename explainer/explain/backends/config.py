"""The one config object every explainer backend is built from.

A single flat dataclass (rather than one per backend) because settings, the CLI and notebooks all
build it the same way and switch backends by changing one field; fields a backend does not use
are ignored by it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from explainer.errors import ConfigError
from retrieval.registry import default_llm


def default_groq_model() -> str:
    """The Groq model the registry (`models/registry.toml`, [llms]) marks as default."""
    return default_llm("groq").model


@dataclass(frozen=True)
class LLMConfig:
    """How to build an explainer backend.

    `backend` is one of `list_backends()` or "auto" (Groq when an API key is available, otherwise
    offline). The API key is a `SecretStr`, so the config can be printed and logged safely.
    """

    backend: str = "auto"
    model: str = dataclasses.field(default_factory=default_groq_model)
    api_key: SecretStr | None = None
    #: Root URL of an OpenAI-compatible Groq endpoint (the client appends /openai/v1/...).
    base_url: str | None = None
    timeout_s: float = 20.0
    #: Retries after the first attempt, on 429, 5xx and connection errors (not on timeouts).
    max_retries: int = 3
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 8.0
    retry_on_timeout: bool = False
    #: Requests in flight at once per event loop; Groq's free tier rate-limits bursts quickly.
    max_concurrency: int = 16  # at least a page of cards, so a page costs one round trip
    temperature: float = 0.2
    max_tokens: int = 400
    #: Ask the provider for JSON mode (response_format=json_object); the parser validates either way.
    json_mode: bool = True
    #: Hits explained per call (page mode, where the backend supports it); 1 explains hit by hit.
    page_size: int = 12
    #: The provider's limits as known before its first reply (Groq's free tier for the default model);
    #: `x-ratelimit-limit-tokens` replaces the tokens figure once seen. `rate_window_s` is the minute
    #: (tests shorten it, with a fake provider whose window is as short).
    requests_per_minute: int = 30
    tokens_per_minute: int = 6000
    rate_window_s: float = 60.0
    #: How long one call may wait for the rate budget before it is given up (then: offline text).
    max_budget_wait_s: float = 600.0
    #: Local backend: a GGUF file for llama-cpp-python; None: the packaged model (explain/gguf.py),
    #: assembled into `gguf_dir` (None: <data dir>/models). Threads: None takes the machine's CPUs.
    gguf_path: Path | None = None
    gguf_dir: Path | None = None
    n_ctx: int = 2048
    local_threads: int | None = None
    #: Fake backend: replies cycled by LangChain's FakeListChatModel, and an optional delay.
    fake_responses: tuple[str, ...] = ()
    fake_sleep_s: float | None = None

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ConfigError(f"LLM timeout_s must be positive, got {self.timeout_s}")
        if self.max_retries < 0:
            raise ConfigError(f"LLM max_retries must be >= 0, got {self.max_retries}")
        if self.backoff_initial_s < 0 or self.backoff_max_s < self.backoff_initial_s:
            raise ConfigError(
                "LLM backoff must satisfy 0 <= backoff_initial_s <= backoff_max_s, "
                f"got {self.backoff_initial_s} and {self.backoff_max_s}"
            )
        if self.max_concurrency < 1:
            raise ConfigError(f"LLM max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.page_size < 1 or self.requests_per_minute < 1 or self.tokens_per_minute < 1:
            raise ConfigError("LLM page_size, requests_per_minute and tokens_per_minute must be >= 1")
        if self.rate_window_s <= 0 or self.max_budget_wait_s < 0:
            raise ConfigError("LLM rate_window_s must be positive and max_budget_wait_s >= 0")
        if self.local_threads is not None and self.local_threads < 1:
            raise ConfigError(f"LLM local_threads must be >= 1, got {self.local_threads}")
        if self.api_key is not None and not isinstance(self.api_key, SecretStr):
            raise ConfigError("LLM api_key must be a pydantic SecretStr, so that it is never printed")

    def with_env_fallback(self, environ: Mapping[str, str] | None = None) -> LLMConfig:
        """Fill the Groq key and base URL from GROQ_API_KEY / GROQ_BASE_URL when they are unset.

        Only a fallback: settings normally pass both explicitly. `environ` is a parameter so that
        tests never depend on the developer's shell.
        """
        env = os.environ if environ is None else environ
        changes: dict[str, object] = {}
        if self.api_key is None and env.get("GROQ_API_KEY"):
            changes["api_key"] = SecretStr(env["GROQ_API_KEY"])
        if self.base_url is None and env.get("GROQ_BASE_URL"):
            changes["base_url"] = env["GROQ_BASE_URL"]
        return dataclasses.replace(self, **changes) if changes else self  # type: ignore[arg-type]
