"""The `clearsight` app: every command registered here, explicitly, behind the error boundary."""

from __future__ import annotations

import logging
import os

import typer

from explainer.cli.caption import caption_cmd
from explainer.cli.demo import demo_cmd
from explainer.cli.index import index_cmd
from explainer.cli.models import models_cmd
from explainer.cli.options import boundary
from explainer.cli.run import run_cmd
from explainer.cli.search import search_cmd
from explainer.cli.serve import serve_cmd
from explainer.cli.train import eval_cmd, finetune_cmd
from explainer.cli.tune import tune_cmd

app = typer.Typer(
    name="clearsight",
    help="Explainable image search: index a folder of images, search it by text and image, see why.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# In the order `--help` lists them: the everyday commands first.
for _name, _command in (
    ("index", index_cmd),
    ("search", search_cmd),
    ("models", models_cmd),
    ("tune-index", tune_cmd),
    ("caption", caption_cmd),
    ("serve", serve_cmd),
    ("run", run_cmd),
    ("eval", eval_cmd),
    ("finetune", finetune_cmd),
    ("demo", demo_cmd),
):
    app.command(_name)(boundary(_command))


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
