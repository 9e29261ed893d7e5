"""The model registry: model definitions are data (`models/registry.toml`), loaded into frozen dataclasses."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from retrieval.assets import asset_dir
from retrieval.errors import ConfigError


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    hub_id: str
    family: str
    dim: int
    revision: str = "main"
    image_size: int = 224
    patch_size: int = 32
    context_length: int = 77
    licence: str = ""
    default: bool = False


@dataclass(frozen=True)
class CaptionerSpec:
    name: str
    hub_id: str
    family: str = "blip"
    revision: str = "main"
    licence: str = ""
    default: bool = False


@dataclass(frozen=True)
class LLMSpec:
    name: str
    backend: str
    model: str
    licence: str = ""
    default: bool = False


def registry_path() -> Path:
    return asset_dir("models") / "registry.toml"


@cache
def _load(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        return tomllib.load(f)


def _section(kind: str) -> dict[str, dict[str, Any]]:
    data = _load(registry_path())
    section = data.get(kind, {})
    if not isinstance(section, dict):
        raise ConfigError(f"{registry_path()}: [{kind}] must be a table")
    return section


def list_encoders() -> list[EncoderSpec]:
    return [EncoderSpec(name=n, **v) for n, v in _section("encoders").items()]


def list_captioners() -> list[CaptionerSpec]:
    return [CaptionerSpec(name=n, **v) for n, v in _section("captioners").items()]


def list_llms() -> list[LLMSpec]:
    return [LLMSpec(name=n, **v) for n, v in _section("llms").items()]


def default_encoder() -> EncoderSpec:
    return next(s for s in list_encoders() if s.default)


def find_encoder(name: str) -> EncoderSpec | None:
    """Look a model up by registry name or hub id; None for anything else (e.g. a local directory)."""
    for spec in list_encoders():
        if name in (spec.name, spec.hub_id):
            return spec
    return None


def default_captioner() -> CaptionerSpec:
    specs = list_captioners()
    return next((s for s in specs if s.default), specs[0])


def find_captioner(name: str) -> CaptionerSpec | None:
    """Look a model up by registry name or hub id; None for anything else (e.g. a local directory)."""
    return next((s for s in list_captioners() if name in (s.name, s.hub_id)), None)


def default_llm(backend: str) -> LLMSpec:
    """The registry's default model for an explanation backend ("groq", "local"...): the one marked
    default, else the first listed for that backend."""
    specs = [s for s in list_llms() if s.backend == backend]
    if not specs:
        raise ConfigError(f"{registry_path()} lists no model for the {backend!r} explanation backend")
    return next((s for s in specs if s.default), specs[0])
