"""Registry and factory of explainer backends.

One factory per backend name, chosen by `LLMConfig.backend`; `register_backend` lets a plugin or a
notebook add one without editing this module. "auto" picks Groq when a key is available and the
offline explainer otherwise, so the product always explains and always says who wrote the text.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from explainer.errors import ConfigError
from explainer.explain.backends.base import Backend, ChatBackend, ChatModelBackend
from explainer.explain.backends.config import LLMConfig, default_groq_model
from explainer.explain.backends.fake import FakeBackend
from explainer.explain.backends.offline import OFFLINE_LABEL, OFFLINE_PROMPT, OfflineExplainer

BackendFactory = Callable[[LLMConfig], Backend]

__all__ = [
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
    "default_groq_model",
    "list_backends",
    "register_backend",
    "unregister_backend",
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


_BUILT_IN = frozenset(_FACTORIES)


def list_backends() -> list[str]:
    """Names accepted by `LLMConfig.backend` (besides "auto")."""
    return sorted(_FACTORIES)


def register_backend(name: str, factory: BackendFactory) -> None:
    """Add (or replace) a backend factory under `name`."""
    if not name or name == "auto":
        raise ConfigError(f"invalid backend name {name!r}")
    _FACTORIES[name] = factory


def unregister_backend(name: str) -> None:
    """Remove a backend added with `register_backend` (tests and notebooks clean up after themselves);
    the built-in backends cannot be removed."""
    if name in _BUILT_IN:
        raise ConfigError(f"{name!r} is a built-in backend and cannot be removed")
    _FACTORIES.pop(name, None)


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
