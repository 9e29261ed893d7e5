"""From the application's settings to an explainer: the one mapping the CLI and notebooks share.

Settings have already read GROQ_API_KEY / GROQ_BASE_URL (and `.env`), so the backend factory is
given an empty environment: the key reaches the Groq client from one place only, as a SecretStr.
A backend that cannot be built (Groq without a key, local without a model file) degrades to the
offline explainer with a message, as the server does, because every hit must still be explained;
a backend name that does not exist is a mistake and is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from explainer.errors import ClearsightError, ConfigError
from explainer.explain.backends import LLMConfig, default_groq_model, list_backends
from explainer.explain.cache import ExplanationCache
from explainer.explain.chain import Explainer
from explainer.settings import Settings

log = logging.getLogger(__name__)


def llm_config_from_settings(settings: Settings, backend: str | None = None) -> LLMConfig:
    """The LLM config the settings describe; `backend` (a CLI option, a notebook argument) wins."""
    name = (backend or settings.explain_backend).strip().lower()
    known = [*list_backends(), "auto"]
    if name not in known:
        raise ConfigError(f"unknown explainer backend {name!r}; choose one of {known}")
    return LLMConfig(
        backend=name,
        model=settings.explain_model or default_groq_model(),
        api_key=settings.groq_api_key,
        base_url=settings.groq_base_url,
        timeout_s=settings.explain_timeout_s,
        max_retries=settings.explain_max_retries,
        max_concurrency=settings.explain_concurrency,
        page_size=settings.explain_page_size,
        requests_per_minute=settings.explain_provider_rpm,
        tokens_per_minute=settings.explain_provider_tpm,
        max_budget_wait_s=settings.explain_budget_wait_s,
        rate_window_s=settings.explain_rate_window_s,
        gguf_path=settings.local_gguf,
        gguf_dir=settings.data_dir / "models",
    )


def explainer_from_settings(
    settings: Settings,
    backend: str | None = None,
    cache: ExplanationCache | None = None,
    *,
    prompt: str | None = None,
    warn: Callable[[str], None] | None = None,
) -> Explainer:
    """An explainer for `backend` (default: the settings'), offline when that backend is unavailable.

    `warn` receives the one-line reason for a downgrade (the CLI prints it; default: the log).
    """
    config = llm_config_from_settings(settings, backend)
    try:
        return Explainer.from_config(config, prompt=prompt, cache=cache, environ={})
    except ClearsightError as exc:
        message = f"explainer {config.backend!r} unavailable ({exc}); explaining offline"
        (warn or log.warning)(message)
        offline = LLMConfig(backend="offline")
        return Explainer.from_config(offline, prompt=prompt, cache=cache, environ={})
