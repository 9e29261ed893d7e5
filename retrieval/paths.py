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


#: Written by `clearsight demo` beside its collection: the models it trained, so that commands run on
#: the demo collection (`caption`, `search --caption`) use the demo's captioner without being told.
DEMO_RECORD = "demo.json"


def demo_captioner(data_dir: Path | str) -> str | None:
    """The demo captioner's folder when `data_dir` holds a collection `clearsight demo` built, else None."""
    import json

    try:
        recorded = json.loads((Path(data_dir) / DEMO_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    folder = recorded.get("captioner") if isinstance(recorded, dict) else None
    if isinstance(folder, str) and is_demo_model(folder) and Path(folder).is_dir():
        return folder
    return None
