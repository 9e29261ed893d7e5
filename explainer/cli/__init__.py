"""The `clearsight` command line: an app with explicit registration, one module per command group."""

from explainer.cli.app import main

__all__ = ["main"]
