"""Prompt files: versioned TOML in `prompts/`, each declaring the variables it uses.

A file `prompts/<name>.v<N>.toml` holds `name`, `version`, `input_variables`, `system` and
`template` (LangChain f-string syntax: `{variable}`, literal braces doubled). Declared and used
variables are compared when the file is loaded, so a typo fails at start-up with a message naming
the file, not in the middle of a search; inputs are checked again at call time. Files are re-read
on every `load_prompt` so that a notebook sees edits without restarting.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langchain_core.prompts import ChatPromptTemplate

from explainer.errors import ConfigError
from retrieval.assets import asset_dir

_FILE_RE = re.compile(r"^(?P<name>[A-Za-z0-9_\-]+)\.v(?P<version>\d+)\.toml$")
_REQUIRED = ("name", "version", "input_variables", "system", "template")


def prompts_dir() -> Path:
    """The prompts folder of a checkout or an installed wheel."""
    return asset_dir("prompts")


@dataclass(frozen=True)
class PromptFile:
    """One validated prompt version; constructing it (from a file or a notebook) checks variables."""

    name: str
    version: int
    input_variables: tuple[str, ...]
    system: str
    template: str
    source: str = "<memory>"
    chat_template: ChatPromptTemplate = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = f"prompt {self.name}@v{self.version} ({self.source})"
        if not self.name or self.version < 1:
            raise ConfigError(f"{where}: name must be non-empty and version a positive integer")
        if len(set(self.input_variables)) != len(self.input_variables):
            raise ConfigError(f"{where}: input_variables repeats a variable: {list(self.input_variables)}")
        try:
            chat = ChatPromptTemplate.from_messages(
                [("system", self.system), ("human", self.template)], template_format="f-string"
            )
        except (ValueError, KeyError) as exc:
            raise ConfigError(f"{where}: template does not parse as an f-string template: {exc}") from None
        used = set(chat.input_variables)
        declared = set(self.input_variables)
        undeclared = sorted(used - declared)
        unused = sorted(declared - used)
        if undeclared:
            raise ConfigError(
                f"{where}: template uses {undeclared} but input_variables does not declare them "
                "(declare them, or double the braces if they are literal text)"
            )
        if unused:
            raise ConfigError(f"{where}: input_variables declares {unused} but the template never uses them")
        object.__setattr__(self, "chat_template", chat)

    @property
    def id(self) -> str:
        """Stable identifier stored with every explanation and used in cache keys."""
        return f"{self.name}@v{self.version}"

    def validate_inputs(self, inputs: Mapping[str, Any]) -> None:
        """Fail with a clear message before any model call when an input is missing."""
        missing = [v for v in self.input_variables if inputs.get(v) is None]
        if missing:
            raise ConfigError(
                f"prompt {self.id} needs {missing} but they were not given (given: {sorted(inputs)})"
            )

    def render(self, inputs: Mapping[str, Any]) -> str:
        """The prompt as plain text, for notebooks and debugging."""
        self.validate_inputs(inputs)
        return self.chat_template.format(**{k: inputs[k] for k in self.input_variables})


def parse_prompt(path: Path) -> PromptFile:
    """Load and validate one prompt file; its name must agree with its `name` and `version`."""
    match = _FILE_RE.match(path.name)
    if not match:
        raise ConfigError(f"prompt file {path} is not named <name>.v<N>.toml")
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"prompt file {path} cannot be read: {exc}") from None
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ConfigError(f"prompt file {path} lacks fields {missing}")
    variables = data["input_variables"]
    if not isinstance(variables, list) or not all(isinstance(v, str) for v in variables):
        raise ConfigError(f"prompt file {path}: input_variables must be a list of strings")
    version = data["version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise ConfigError(f"prompt file {path}: version must be an integer, got {version!r}")
    if data["name"] != match["name"] or version != int(match["version"]):
        raise ConfigError(
            f"prompt file {path} declares {data['name']}@v{version}, which disagrees with its file name"
        )
    if not isinstance(data["system"], str) or not isinstance(data["template"], str):
        raise ConfigError(f"prompt file {path}: system and template must be strings")
    return PromptFile(
        name=data["name"],
        version=version,
        input_variables=tuple(variables),
        system=data["system"],
        template=data["template"],
        source=str(path),
    )


def list_prompts(directory: Path | None = None) -> list[PromptFile]:
    """Every valid prompt version, sorted by name then version; a broken file raises ConfigError."""
    folder = directory or prompts_dir()
    files = sorted(p for p in folder.glob("*.toml") if _FILE_RE.match(p.name))
    return sorted((parse_prompt(p) for p in files), key=lambda p: (p.name, p.version))


def _version_number(version: int | str) -> int:
    text = str(version).strip().lower().removeprefix("v")
    if not text.isdigit():
        raise ConfigError(f"prompt version must look like 2 or 'v2', got {version!r}")
    return int(text)


def load_prompt(name: str, version: int | str | None = None, directory: Path | None = None) -> PromptFile:
    """Load prompt `name` at `version` (2 or "v2"), or its latest version when `version` is None.

    A "name@v2" string is accepted as `name` too, so a stored `Explanation.prompt` can be reloaded.
    """
    folder = directory or prompts_dir()
    if "@" in name and version is None:
        name, version = name.split("@", 1)
    if version is not None:
        version = _version_number(version)
        path = folder / f"{name}.v{version}.toml"
        if not path.is_file():
            raise ConfigError(f"prompt {name}@v{version} not found in {folder}")
        return parse_prompt(path)
    versions = []
    for p in folder.glob(f"{name}.v*.toml"):
        match = _FILE_RE.match(p.name)
        if match and match["name"] == name:
            versions.append(int(match["version"]))
    if not versions:
        known = sorted({m["name"] for p in folder.glob("*.toml") if (m := _FILE_RE.match(p.name))})
        raise ConfigError(f"no prompt named {name!r} in {folder} (known: {known})")
    return parse_prompt(folder / f"{name}.v{max(versions)}.toml")
