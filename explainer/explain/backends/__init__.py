"""Registry and factory of explainer backends.

One factory per backend name, chosen by `LLMConfig.backend`; `register_backend` lets a plugin or a
notebook add one without editing this module. "auto" picks Groq when a key is available and the
offline explainer otherwise, so the product always explains and always says who wrote the text.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from explainer.errors import ConfigError
from explainer.explain.backends.base import ChatBackend, ChatModelBackend
from explainer.explain.backends.config import DEFAULT_GROQ_MODEL, LLMConfig
from explainer.explain.backends.fake import FakeBackend
from explainer.explain.backends.offline import OFFLINE_LABEL, OFFLINE_PROMPT, OfflineExplainer

#: What `create_backend` returns: an LLM behind the chain, or the offline explainer.
Backend = ChatBackend | OfflineExplainer
BackendFactory = Callable[[LLMConfig], Backend]

__all__ = [
    "DEFAULT_GROQ_MODEL",
    "OFFLINE_LABEL",
    "OFFLINE_PROMPT",
    "Backend",
    "BackendFactory",
    "ChatBackend",
    "ChatModelBackend",
    "FakeBackend",
    "LLMConfig",
    "OfflineExplainer",
    "create_backend",
    "list_backends",
    "register_backend",
]


def _offline(config: LLMConfig) -> Backend:
    return OfflineExplainer()


def _groq(config: LLMConfig) -> Backend:
    from explainer.explain.backends.groq import (
        GroqBackend,  # imported on use: the groq client is only needed for this backend
    )

    return GroqBackend(config)


def _local(config: LLMConfig) -> Backend:
    from explainer.explain.backends.local import LocalBackend

    return LocalBackend(config)


def _fake(config: LLMConfig) -> Backend:
    return FakeBackend.from_config(config)


_FACTORIES: dict[str, BackendFactory] = {
    "offline": _offline,
    "groq": _groq,
    "local": _local,
    "fake": _fake,
}


def list_backends() -> list[str]:
    """Names accepted by `LLMConfig.backend` (besides "auto")."""
    return sorted(_FACTORIES)


def register_backend(name: str, factory: BackendFactory) -> None:
    """Add (or replace) a backend factory under `name`."""
    if not name or name == "auto":
        raise ConfigError(f"invalid backend name {name!r}")
    _FACTORIES[name] = factory


def create_backend(config: LLMConfig, environ: Mapping[str, str] | None = None) -> Backend:
    """Build the backend `config` names; GROQ_API_KEY / GROQ_BASE_URL from `environ` are fallbacks.

    `environ` defaults to the process environment; tests pass a dict so the developer's shell
    cannot leak a real key into them.
    """
    resolved = config.with_env_fallback(environ)
    name = resolved.backend
    if name == "auto":
        has_key = resolved.api_key is not None and bool(resolved.api_key.get_secret_value())
        name = "groq" if has_key else "offline"
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ConfigError(f"unknown explainer backend {name!r}; choose one of {[*list_backends(), 'auto']}")
    return factory(resolved)
