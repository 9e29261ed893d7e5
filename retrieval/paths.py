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


def path_bytes(path: str) -> bytes:
    """The bytes a path names on disk.

    Python hands over a file name that is not valid UTF-8 as a str holding lone surrogates
    (PEP 383 `surrogateescape`); that str still opens the file, but cannot be encoded as UTF-8, so
    anything that stores or prints paths needs their bytes instead.
    """
    try:
        return os.fsencode(path)
    except UnicodeEncodeError:  # a surrogate no file system produced (e.g. from JSON): keep it anyway
        return path.encode("utf-8", "surrogatepass")


def is_utf8(path: str) -> bool:
    """Whether a path is valid text: true of every name except those holding undecodable bytes."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def display_path(path: str) -> str:
    """`path` as it can be shown anywhere: undecodable bytes written as `\\xe9` escapes.

    A file name that is not UTF-8 cannot be printed to a UTF-8 terminal, put in JSON or rendered in
    a page as it is (each raises UnicodeEncodeError); escaped, it still says which file it is. Valid
    names come back unchanged.
    """
    if is_utf8(path):
        return path
    return path_bytes(path).decode("utf-8", "backslashreplace")


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
