"""The `clearsight` command line: an app with explicit registration, one module per command group."""

import sys

from explainer.cli.threads import tune_for_queries

tune_for_queries(sys.argv[1:])  # before NumPy, FAISS and torch load their thread pools

from explainer.cli.app import main  # noqa: E402

__all__ = ["main"]
