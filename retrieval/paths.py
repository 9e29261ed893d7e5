"""Where things live on disk; every location can be overridden by an environment variable."""

from __future__ import annotations

import os
from pathlib import Path, PurePath

DATA_DIR_ENV = "CLEARSIGHT_DATA_DIR"
#: `clearsight demo` names its models with this prefix, so results from them can be labelled.
DEMO_MODEL_PREFIX = "clearsight-demo-"


def default_data_dir() -> Path:
    """$CLEARSIGHT_DATA_DIR, else $XDG_DATA_HOME/clearsight, else ~/.local/share/clearsight."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "clearsight"


def is_demo_model(model: str) -> bool:
    """Whether a model id or directory is one `clearsight demo` trained (a toy, not a real encoder)."""
    return PurePath(model.rstrip("/\\")).name.startswith(DEMO_MODEL_PREFIX)
