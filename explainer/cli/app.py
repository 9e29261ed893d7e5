"""The `clearsight` app: every command registered here, explicitly, behind the error boundary."""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Annotated, Any

import typer

from explainer.cli.options import boundary
from explainer.version import version

#: Every command as (name, module, function), in the order `--help` lists them: the everyday ones first.
#: A command's module is imported only when that command runs (or --help lists them all), so
#: `clearsight search` does not import the server, training or the explanation chain.
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("index", "explainer.cli.index", "index_cmd"),
    ("search", "explainer.cli.search", "search_cmd"),
    ("models", "explainer.cli.models", "models_cmd"),
    ("tune-index", "explainer.cli.tune", "tune_cmd"),
    ("status", "explainer.cli.status", "status_cmd"),
    ("duplicates", "explainer.cli.duplicates", "duplicates_cmd"),
    ("caption", "explainer.cli.caption", "caption_cmd"),
    ("serve", "explainer.cli.serve", "serve_cmd"),
    ("run", "explainer.cli.run", "run_cmd"),
    ("eval", "explainer.cli.train", "eval_cmd"),
    ("finetune", "explainer.cli.train", "finetune_cmd"),
    ("demo", "explainer.cli.demo", "demo_cmd"),
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"clearsight {version()}")
        raise typer.Exit()


def _root(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", "-V", callback=_print_version, is_eager=True, help="Print the version and exit"
        ),
    ] = False,
) -> None:
    """Explainable image search: index a folder of images, search it by text and image, see why."""


def build_app(only: Iterable[str] | None = None) -> typer.Typer:
    """The app with every command, or with the commands named in `only` (the others not imported)."""
    wanted = None if only is None else set(only)
    built = typer.Typer(
        name="clearsight",
        help="Explainable image search: index a folder of images, search it by text and image, see why.",
        no_args_is_help=True,
        add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
        pretty_exceptions_enable=False,
    )
    built.callback()(_root)
    for name, module, function in COMMANDS:
        if wanted is None or name in wanted:
            built.command(name)(boundary(getattr(importlib.import_module(module), function)))
    return built


@functools.cache
def _full_app() -> typer.Typer:
    return build_app()


def __getattr__(name: str) -> Any:
    # `app` (every command) is built when first asked for: tests and `--help` need it, a command does not
    if name == "app":
        return _full_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _asked_command(argv: Sequence[str]) -> str | None:
    """The command `argv` runs: its first word that is not an option (the root takes no values)."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in {name for name, _, _ in COMMANDS} else None


def _no_type(ctx: object) -> None:
    return None


def command(app: typer.Typer | None = None) -> Any:
    """The command behind `app`, with on/off flags shown as flags in --help.

    Typer labels every boolean flag `<bool>` in its help panels, which reads as if the flag took a value.
    (Typer carries its own copy of click, so parameters are recognised by their attributes.)
    """
    root = typer.main.get_command(app if app is not None else _full_app())
    todo: list[Any] = [root]
    while todo:
        cmd = todo.pop()
        for param in cmd.params:
            if getattr(param, "is_flag", False) and hasattr(param, "display_type_rich"):
                setattr(param, "display_type_rich", _no_type)  # noqa: B010  (an instance override)
        _flag_help(cmd)
        todo.extend(getattr(cmd, "commands", {}).values())
    return root


def _flag_help(cmd: Any) -> None:
    """--help is made afresh for each context, so its option is fixed as it is made."""
    make = cmd.get_help_option

    def get_help_option(ctx: Any) -> Any:
        option = make(ctx)
        if option is not None:
            setattr(option, "display_type_rich", _no_type)  # noqa: B010
        return option

    cmd.get_help_option = get_help_option


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    asked = _asked_command(sys.argv[1:])
    command(build_app([asked]) if asked else None)(prog_name="clearsight")
