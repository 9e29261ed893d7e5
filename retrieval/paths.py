"""Where things live on disk; every location can be overridden by an environment variable."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "CLEARSIGHT_DATA_DIR"


def default_data_dir() -> Path:
    """$CLEARSIGHT_DATA_DIR, else $XDG_DATA_HOME/clearsight, else ~/.local/share/clearsight."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "clearsight"
