"""`python -m explainer.cli`: the same as the `clearsight` command."""

from explainer.cli.app import main

main()
