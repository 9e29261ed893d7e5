"""The `clearsight` app: every command registered here, explicitly, behind the error boundary."""

from __future__ import annotations

import logging
import os
from typing import Annotated, Any

import typer

from explainer.cli.caption import caption_cmd
from explainer.cli.demo import demo_cmd
from explainer.cli.duplicates import duplicates_cmd
from explainer.cli.index import index_cmd
from explainer.cli.models import models_cmd
from explainer.cli.options import boundary
from explainer.cli.run import run_cmd
from explainer.cli.search import search_cmd
from explainer.cli.serve import serve_cmd
from explainer.cli.status import status_cmd
from explainer.cli.train import eval_cmd, finetune_cmd
from explainer.cli.tune import tune_cmd
from explainer.version import version

app = typer.Typer(
    name="clearsight",
    help="Explainable image search: index a folder of images, search it by text and image, see why.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"clearsight {version()}")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", "-V", callback=_print_version, is_eager=True, help="Print the version and exit"
        ),
    ] = False,
) -> None:
    """Explainable image search: index a folder of images, search it by text and image, see why."""


# In the order `--help` lists them: the everyday commands first.
for _name, _command in (
    ("index", index_cmd),
    ("search", search_cmd),
    ("models", models_cmd),
    ("tune-index", tune_cmd),
    ("status", status_cmd),
    ("duplicates", duplicates_cmd),
    ("caption", caption_cmd),
    ("serve", serve_cmd),
    ("run", run_cmd),
    ("eval", eval_cmd),
    ("finetune", finetune_cmd),
    ("demo", demo_cmd),
):
    app.command(_name)(boundary(_command))


def _no_type(ctx: object) -> None:
    return None


def command() -> Any:
    """The command behind `app`, with on/off flags shown as flags in --help.

    Typer labels every boolean flag `<bool>` in its help panels, which reads as if the flag took a value.
    (Typer carries its own copy of click, so parameters are recognised by their attributes.)
    """
    root = typer.main.get_command(app)
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
    command()(prog_name="clearsight")
