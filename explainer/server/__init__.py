"""The FastAPI server: a page of result cards and a JSON API over the same card model."""

from explainer.server.app import create_app

__all__ = ["create_app"]
