"""The installed Clearsight version, in one place for `--version`, /api/health and the OpenAPI page."""

from __future__ import annotations

from functools import cache
from importlib import metadata


@cache
def version() -> str:
    """The installed distribution's version; a source tree that was never installed says so."""
    try:
        return metadata.version("clearsight")
    except metadata.PackageNotFoundError:
        return "0+unknown (not installed)"
